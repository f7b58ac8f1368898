import t from 'tap';
import { cpSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, closeSync, writeFileSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { runtimeSchema } from '../agent/config/schema.js';
import { DirectStatusPublisher, FleetAgent, MqttLink, RuntimeDeploymentTarget, type VersionHealth } from '../agent/fleet/index.js';
import { watchHealth } from '../agent/fleet/health-watch.js';
import { silentLogger } from '../agent/logger.js';
import { ActiveVersions, ModelRepository } from '../agent/models/index.js';
import { InferenceRuntime, type RuntimeObserver } from '../agent/runtime/index.js';
import { Database } from '../agent/store/index.js';
import { RolledBackDeployments } from '../agent/fleet/rolled-back-deployments.js';
import { FileDeploymentTarget } from './helpers/fleet-file-target.js';
import { classifier, LIGHT, MEDIUM } from './helpers/fleet-runtime-device.js';
import { deviceConfig, memoryLogger, modelBytes, scratchDir, startDevice, startFleetHarness, type FleetHarness, type SeenMessage } from './helpers/fleet.js';
import { tempDir } from './helpers/runtime.js';
import { CAN_MOUNT, fillDisk, smallDisk } from './helpers/small-disk.js';

type Teardown = { teardown(fn: () => void | Promise<void>): void };

const V1_CONFIG = 'max_batch_size: 8\n';
/** A config v1's bytes cannot load with: the state input it names does not exist in the classifier. */
const STATEFUL_CONFIG = { max_batch_size: 8, state: [{ input: 'h_in', output: 'h_out' }] };

/** A repository with `cls` version 1 (and its config.yaml), as a device ships. */
function shippedRepository(t: Teardown): { repo: string; activeFile: string } {
  const dir = scratchDir(t);
  const repo = join(dir, 'models');
  mkdirSync(join(repo, 'cls', '1'), { recursive: true });
  writeFileSync(join(repo, 'cls', '1', 'model.onnx'), classifier(LIGHT));
  writeFileSync(join(repo, 'cls', 'config.yaml'), V1_CONFIG);
  return { repo, activeFile: join(dir, 'var', 'active-versions.json') };
}

/**
 * A runtime and the fleet's target over `repo`, wired as agent/main.ts wires them: one ActiveVersions file for
 * both, the target constructed before the runtime loads anything. Starting it again on the same files is a restart.
 */
async function startServing(t: Teardown, repo: string, activeFile: string): Promise<{ runtime: InferenceRuntime; target: RuntimeDeploymentTarget }> {
  const active = new ActiveVersions(activeFile);
  let target: RuntimeDeploymentTarget | undefined;
  const observer: RuntimeObserver = { onRequest: (o) => target?.observer.onRequest?.(o) };
  const repository = new ModelRepository(repo, active);
  const runtime = new InferenceRuntime({
    repository, config: runtimeSchema.parse({ execution_providers: ['cpu'], execution: 'inline' }), dataDir: tempDir(t, 'edge-data-'), log: silentLogger(), observer,
  });
  target = new RuntimeDeploymentTarget(repository, runtime, active);
  await runtime.start();
  t.teardown(() => runtime.close());
  return { runtime, target };
}

function servingState(runtime: InferenceRuntime, model: string): { state: string; version: number } {
  const info = runtime.modelInfo(model);
  return { state: info.state, version: info.version };
}

function finalStatus(h: FleetHarness, deploymentId: string, states: readonly string[], timeoutMs = 60_000): Promise<SeenMessage> {
  return h.manager.waitFor((m) => m.topic.endsWith(`/deployments/${deploymentId}/status`) && states.includes(String(m.json?.state)), timeoutMs, `${deploymentId} → ${states.join('|')}`);
}

t.test('2: a version that fails to activate leaves the serving version its own config.yaml, also after a restart', { timeout: 120_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const { repo, activeFile } = shippedRepository(t);
  const { runtime, target } = await startServing(t, repo, activeFile);
  await startDevice(t, h, { target, config: { health: { duration_s: 0 } } });
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(classifier(MEDIUM), 8192), chunkSize: 8192, config: STATEFUL_CONFIG });
  await h.publish('edge/devices/dev-1/deployments', m);
  const failed = await h.manager.waitForState(m.deployment_id, 'failed');
  t.match(failed.json?.reason, /h_in/, 'v2 failed on its config');
  t.same(servingState(runtime, 'cls'), { state: 'READY', version: 1 }, 'v1 kept serving');
  t.equal(readFileSync(join(repo, 'cls', 'config.yaml'), 'utf8'), V1_CONFIG, 'config.yaml is v1\'s again');

  const restarted = await startServing(t, repo, activeFile);
  t.same(servingState(restarted.runtime, 'cls'), { state: 'READY', version: 1 }, 'after a restart v1 loads and serves');
});

t.test('2: a rollback command brings back the config of the version rolled back to (restart, SIGHUP)', { timeout: 120_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const { repo, activeFile } = shippedRepository(t);
  const { runtime, target } = await startServing(t, repo, activeFile);
  await startDevice(t, h, { target, config: { health: { duration_s: 0 } } });
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(classifier(MEDIUM), 8192), chunkSize: 8192, config: { max_batch_size: 4 } });
  await h.publish('edge/devices/dev-1/deployments', m);
  await h.manager.waitForState(m.deployment_id, 'active');
  t.equal(readFileSync(join(repo, 'cls', 'config.yaml'), 'utf8'), 'max_batch_size: 4\n', 'v2 serves with its config');
  t.equal(runtime.modelInfo('cls').maxBatchSize, 4);

  await h.publish('edge/devices/dev-1/commands/rb-1', h.command({ commandId: 'rb-1', command: 'rollback', args: { model: 'cls' }, deviceId: 'dev-1' }), false);
  const result = await h.manager.waitFor((x) => x.topic.endsWith('/commands/rb-1/result'), 30_000, 'rollback result');
  t.match(result.json, { ok: true, result: { from: 2, to: 1 } });
  t.equal(readFileSync(join(repo, 'cls', 'config.yaml'), 'utf8'), V1_CONFIG, 'config.yaml is v1\'s again');
  t.match(runtime.modelInfo('cls'), { version: 1, state: 'READY', maxBatchSize: 8 }, 'v1 serves with its own config');
  t.same(runtime.reloadModelConfigs().needsReload, [], 'SIGHUP finds config.yaml as the serving version has it');
  const restarted = await startServing(t, repo, activeFile);
  t.match(restarted.runtime.modelInfo('cls'), { version: 1, state: 'READY', maxBatchSize: 8 }, 'a restart serves v1 with its config');
});

t.test('2: a kill while the new version loads comes back on the old version with the old config', { timeout: 120_000 }, async (t) => {
  const { repo, activeFile } = shippedRepository(t);
  const { target } = await startServing(t, repo, activeFile);
  const artifact = join(scratchDir(t), 'v2.onnx');
  writeFileSync(artifact, classifier(MEDIUM));
  await target.install('cls', 2, artifact, STATEFUL_CONFIG);
  t.equal(readFileSync(join(repo, 'cls', 'config.yaml'), 'utf8'), V1_CONFIG, 'installing v2 leaves the serving config alone');
  // The files as a kill -9 leaves them, copied at the moment the activation is loading v2.
  const crashed = join(scratchDir(t), 'crashed');
  await target.activate('cls', 2, undefined, (phase) => {
    if (phase !== 'loading') return;
    cpSync(repo, join(crashed, 'models'), { recursive: true });
    cpSync(dirname(activeFile), join(crashed, 'var'), { recursive: true });
  }).catch(() => undefined);
  t.ok(existsSync(join(crashed, 'models', 'cls', '2', 'model.onnx')), 'the copy was taken mid-activation');
  const restarted = await startServing(t, join(crashed, 'models'), join(crashed, 'var', 'active-versions.json'));
  t.equal(readFileSync(join(crashed, 'models', 'cls', 'config.yaml'), 'utf8'), V1_CONFIG, 'the restart put v1\'s config back');
  t.same(servingState(restarted.runtime, 'cls'), { state: 'READY', version: 1 }, 'and serves v1');
});

t.test('4: after the database is recreated, the retained manifest of a rolled-back deployment is not activated again', { timeout: 90_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const dataDir = scratchDir(t);
  const target = new FileDeploymentTarget(join(dataDir, 'models'));
  target.seed('cls', 1, modelBytes(3000, 'ONNX', 1));
  const first = await startDevice(t, h, { target, dataDir });
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(modelBytes(5000, 'ONNX', 2)) });
  await h.publish('edge/devices/dev-1/deployments', m);
  await h.manager.waitForState(m.deployment_id, 'active');
  await h.publish('edge/devices/dev-1/commands/rb', h.command({ commandId: 'rb', command: 'rollback', args: { model: 'cls' }, deviceId: 'dev-1' }), false);
  await h.manager.waitForState(m.deployment_id, 'rolled_back');
  t.equal(target.modelVersions('cls').active, 1);
  await first.stop();

  // The state database is found corrupt at the next start: it is set aside and recreated empty.
  const fd = openSync(join(dataDir, 'agent.db'), 'r+');
  writeSync(fd, Buffer.alloc(100, 0x41), 0, 100, 0);
  closeSync(fd);
  const seenBefore = new Set(h.manager.seen);
  const second = await startDevice(t, h, { target, dataDir });
  t.ok(second.logger.lines.some((l) => /database was corrupt/.test(l.msg)), 'the database was recreated');
  const after = await h.manager.waitFor((x) => !seenBefore.has(x) && x.topic.endsWith(`/deployments/${m.deployment_id}/status`), 20_000, 'status of the redelivered manifest');
  t.equal(after.json?.state, 'rolled_back', 'reported rolled back again, not accepted');
  t.match(after.json?.reason, /was rolled back before the state database was recreated/);
  await second.agent.idle();
  t.equal(target.modelVersions('cls').active, 1, 'v1 still serves');
  t.same(target.activations.filter((a) => a.version === 2).length, 1, 'v2 was activated once, before the rollback, never after');
});

t.test('5: two models deploying the same bytes at the same time both install', { timeout: 90_000 }, async (t) => {
  let bothDownloading!: () => void;
  const gate = new Promise<void>((resolve) => { bothDownloading = resolve; });
  // No chunk leaves the fleet manager until both deployments are downloading, so the two overlap.
  const h = await startFleetHarness(t, { chunkServer: { beforeSend: () => gate } });
  const target = new FileDeploymentTarget(scratchDir(t));
  const dev = await startDevice(t, h, { target, config: { groups: ['g1'] } });
  const artifact = await h.artifact(modelBytes(40_000, 'ONNX', 5), 2048);
  const a = h.manifest({ model: 'det-a', version: 1, artifact, chunkSize: 2048 });
  const b = h.manifest({ model: 'det-b', version: 1, artifact, chunkSize: 2048 });
  await h.publish('edge/devices/dev-1/deployments', a);
  await h.publish('edge/groups/g1/deployments', b);
  await Promise.all([h.manager.waitForState(a.deployment_id, 'downloading'), h.manager.waitForState(b.deployment_id, 'downloading')]);
  bothDownloading();
  const [fa, fb] = await Promise.all([finalStatus(h, a.deployment_id, ['active', 'failed', 'rejected']), finalStatus(h, b.deployment_id, ['active', 'failed', 'rejected'])]);
  t.same([fa.json?.state, fa.json?.reason], ['active', undefined], 'det-a active');
  t.same([fb.json?.state, fb.json?.reason], ['active', undefined], 'det-b active');
  const bytes = readFileSync(artifact.path);
  t.ok(readFileSync(target.versionPath('det-a', 1)).equals(bytes) && readFileSync(target.versionPath('det-b', 1)).equals(bytes), 'both hold the artifact');
  await dev.agent.idle();
  t.same(readdirSync(join(dev.dataDir, 'fleet', 'downloads')), [], 'no download left behind');
  t.same(await dev.agent.fleetStore.chunks.downloads(), [], 'no chunk map left behind');
});

t.test('5: a deployment finding its bytes on disk does not discard another deployment\'s download of them', { timeout: 90_000 }, async (t) => {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => { release = resolve; });
  // The fleet manager holds every chunk from the fifth on until released: det-b's download stays half-way.
  const h = await startFleetHarness(t, { chunkServer: { beforeSend: async (_sha, index) => { if (index >= 4) await gate; } } });
  const bytes = modelBytes(40_000, 'ONNX', 6);
  const artifact = await h.artifact(bytes, 2048);
  const target = new FileDeploymentTarget(scratchDir(t));
  target.seed('det-a', 2, bytes); // on disk (shipped), not serving
  target.seed('det-a', 1, modelBytes(3000, 'ONNX', 1));
  const dev = await startDevice(t, h, { target, config: { groups: ['g1'] } });
  const b = h.manifest({ model: 'det-b', version: 1, artifact, chunkSize: 2048 });
  await h.publish('edge/groups/g1/deployments', b);
  while ((await dev.agent.fleetStore.chunks.receivedCount(artifact.sha256)) < 4) await new Promise((r) => setTimeout(r, 20));
  const a = h.manifest({ model: 'det-a', version: 2, artifact, chunkSize: 2048 });
  await h.publish('edge/devices/dev-1/deployments', a);
  const fa = await finalStatus(h, a.deployment_id, ['active', 'failed', 'rejected']);
  t.equal(fa.json?.state, 'active', 'det-a v2 activated from the bytes on disk');
  release();
  const fb = await finalStatus(h, b.deployment_id, ['active', 'failed', 'rejected']);
  t.same([fb.json?.state, fb.json?.reason], ['active', undefined], 'det-b\'s download went on and installed');
  t.ok(readFileSync(target.versionPath('det-b', 1)).equals(bytes), 'det-b holds the artifact');
});

/** A FileDeploymentTarget that counts health readings (each poll of a health window reads once). */
class CountingTarget extends FileDeploymentTarget {
  readings = 0;
  override versionHealth(model: string, version: number): VersionHealth {
    this.readings += 1;
    return super.versionHealth(model, version);
  }
}

/** Resolves once `target` was read `n` more times, or `settled` settles, whichever comes first. */
async function readingsOrSettled(target: CountingTarget, n: number, settled: Promise<unknown>): Promise<void> {
  const until = target.readings + n;
  let done = false;
  void settled.then(() => { done = true; }, () => { done = true; });
  while (!done && target.readings < until) await new Promise((r) => setTimeout(r, 10));
}

t.test('9: a wall-clock step during the health window neither ends nor judges it', async (t) => {
  const target = new CountingTarget(scratchDir(t));
  target.seed('cls', 2, modelBytes(3000, 'ONNX', 1));
  const realNow = Date.now;
  t.teardown(() => { Date.now = realNow; });
  const controller = new AbortController();
  const config = { duration_s: 60, max_error_rate: 0.05, max_p99_factor: 2, min_requests: 20, poll_ms: 10 };
  const watching = watchHealth(target, 'cls', 2, { windowMs: 60_000, leftMs: 60_000 }, config, controller.signal);
  watching.catch(() => undefined);
  await readingsOrSettled(target, 3, watching);
  Date.now = () => realNow() + 3600_000; // NTP steps the clock an hour forward
  await readingsOrSettled(target, 10, watching);
  let outcome: unknown = 'still watching';
  void watching.then((o) => { outcome = o; }, () => undefined);
  await new Promise((r) => setImmediate(r));
  t.equal(outcome, 'still watching', 'the window is still open after the step');
  controller.abort(new Error('test over'));
  await t.rejects(watching, { message: 'test over' });
});

t.test('9: a health window resumed after a restart keeps its time left whatever the wall clock did', { timeout: 60_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const dataDir = scratchDir(t);
  const target = new CountingTarget(join(dataDir, 'models'));
  target.seed('cls', 1, modelBytes(3000, 'ONNX', 1));
  const health = { duration_s: 3600, poll_ms: 20, min_requests: 1_000_000 };
  const first = await startDevice(t, h, { target, dataDir, config: { health } });
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(modelBytes(5000, 'ONNX', 2)) });
  await h.publish('edge/devices/dev-1/deployments', m);
  await h.manager.waitForState(m.deployment_id, 'active');
  await first.stop();

  const realNow = Date.now;
  t.teardown(() => { Date.now = realNow; });
  Date.now = () => realNow() + 2 * 3600_000; // the device comes back with its clock two hours on
  const second = await startDevice(t, h, { target, dataDir, config: { health } });
  const journal = second.agent.fleetStore.journal;
  let looking = true;
  const ended = (async () => {
    while (looking && (await journal.get(m.deployment_id))?.health === 'watching') await new Promise((r) => setTimeout(r, 20));
  })();
  await readingsOrSettled(target, 10, ended);
  const rec = await journal.get(m.deployment_id);
  looking = false;
  t.equal(rec?.health, 'watching', 'the window goes on after the restart');
  t.match(rec?.details, { health_window: { window_ms: 3_600_000 } });
});

t.test('10: a steady stream of messages on a deployment topic does not starve a valid manifest', { timeout: 60_000 }, async (t) => {
  const h = await startFleetHarness(t);
  await startDevice(t, h, { config: { groups: ['all'], settle_ms: 1000 } });
  let junkFlowing = true;
  const junk = setInterval(() => void h.publish('edge/groups/all/deployments', '{"junk":true}', false), 20);
  t.teardown(() => clearInterval(junk));
  const m = h.manifest({ model: 'det', version: 1, artifact: await h.artifact(modelBytes(3000, 'ONNX', 3)) });
  await h.publish('edge/devices/dev-1/deployments', m);
  await h.manager.waitForState(m.deployment_id, 'accepted', 40_000);
  const whileJunk = junkFlowing;
  clearInterval(junk);
  junkFlowing = false;
  t.ok(whileJunk, 'accepted while junk kept arriving faster than settle_ms');
});

/** A device whose data dir (downloads) is `dataDir` while its database lives elsewhere, as on a split disk. */
async function deviceOn(t: Teardown, h: FleetHarness, dataDir: string): Promise<FleetAgent> {
  const logger = memoryLogger();
  const db = await Database.open(join(scratchDir(t), 'agent.db'));
  const config = deviceConfig(h, {});
  const link = new MqttLink({ config, agentVersion: '0.1.0-test', logger });
  const agent = new FleetAgent({
    config, agentVersion: '0.1.0-test', dataDir, db, target: new FileDeploymentTarget(join(scratchDir(t), 'models')), link, logger,
    statusSink: new DirectStatusPublisher(() => link.client),
  });
  await agent.start();
  link.start();
  t.teardown(async () => {
    await agent.stop();
    await link.stop();
    await db.close();
  });
  return agent;
}


t.test('11: an artifact larger than the free space is rejected before downloading, naming the sizes', { skip: CAN_MOUNT ? false : 'mounting a tmpfs needs root', timeout: 60_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const dataDir = smallDisk(t, '1m');
  await deviceOn(t, h, dataDir);
  const m = h.manifest({ model: 'big', version: 1, artifact: await h.artifact(modelBytes(2 * 1024 * 1024, 'ONNX', 7), 65536), chunkSize: 65536 });
  await h.publish('edge/devices/dev-1/deployments', m);
  const fin = await finalStatus(h, m.deployment_id, ['active', 'failed', 'rejected']);
  t.equal(fin.json?.state, 'rejected');
  t.match(fin.json?.reason, new RegExp(`^disk space: the artifact is 2097152 bytes \\(2097152 still to download\\) but the data disk at ${dataDir}/fleet/downloads has \\d+ bytes free$`));
  t.equal(h.chunkServer.requests.length, 0, 'no chunk was asked for');
  t.same(readdirSync(join(dataDir, 'fleet', 'downloads')), [], 'nothing written');
});

t.test('11: a download that fills the disk removes its partial file', { skip: CAN_MOUNT ? false : 'mounting a tmpfs needs root', timeout: 60_000 }, async (t) => {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => { release = resolve; });
  const h = await startFleetHarness(t, { chunkServer: { beforeSend: async (_sha, index) => { if (index >= 4) await gate; } } });
  const dataDir = smallDisk(t, '4m');
  const agent = await deviceOn(t, h, dataDir);
  const artifact = await h.artifact(modelBytes(1024 * 1024, 'ONNX', 8), 65536);
  const m = h.manifest({ model: 'big', version: 1, artifact, chunkSize: 65536 });
  await h.publish('edge/devices/dev-1/deployments', m);
  while ((await agent.fleetStore.chunks.receivedCount(artifact.sha256)) < 4) await new Promise((r) => setTimeout(r, 20));
  const filler = fillDisk(dataDir); // something else fills the data disk while the download waits for chunks
  release();
  const fin = await finalStatus(h, m.deployment_id, ['active', 'failed', 'rejected']);
  rmSync(filler);
  t.equal(fin.json?.state, 'failed');
  t.match(fin.json?.reason, /^disk full while writing artifact [0-9a-f]{64} under \S+ \(ENOSPC[^)]*\); the partial download was removed/);
  t.same(readdirSync(join(dataDir, 'fleet', 'downloads')), [], 'the partial file is gone');
  t.same(await agent.fleetStore.chunks.downloads(), [], 'and its chunk map');
});

t.test('the active-versions and rolled-back files take concurrent writes: every one lands, none overwrites another', async (t) => {
  // Their writes are asynchronous (fsync off the event loop): two models activating at once must not each write
  // the file from the state before the other, nor share a temp file.
  const dir = scratchDir(t);
  const file = join(dir, 'active-versions.json');
  const active = new ActiveVersions(file);
  await Promise.all(['a', 'b', 'c', 'd'].map((m, i) => active.set(m, i + 1)));
  t.same(JSON.parse(readFileSync(file, 'utf8')), { a: 1, b: 2, c: 3, d: 4 }, 'all four models are in the file');
  t.same(['a', 'b', 'c', 'd'].map((m) => new ActiveVersions(file).get(m)), [1, 2, 3, 4], 'and a restart reads them');
  await Promise.all([active.set('a', undefined), active.set('b', 7)]);
  t.same(JSON.parse(readFileSync(file, 'utf8')), { b: 7, c: 3, d: 4 }, 'a removal and a change at once both land');

  const rolledFile = join(dir, 'rolled-back-deployments.json');
  const rolled = new RolledBackDeployments(rolledFile);
  await Promise.all([rolled.add('d1', 'a', 1), rolled.add('d2', 'b', 2), rolled.add('d1', 'a', 1)]);
  t.same(Object.keys(JSON.parse(readFileSync(rolledFile, 'utf8')) as object).sort(), ['d1', 'd2'], 'both rollbacks are recorded, the repeated one once');
  t.same(readdirSync(dir).filter((f) => f.includes('.tmp-')), [], 'no temp file is left');
});
