import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Database } from '../agent/store/index.js';
import { FileDeploymentTarget } from './helpers/fleet-file-target.js';
import { modelBytes, scratchDir, startFleetHarness, type FleetHarness } from './helpers/fleet.js';
import type { ChildOptions } from './helpers/fleet-agent-child.js';

const HERE = dirname(fileURLToPath(import.meta.url));

interface Child {
  readonly proc: ChildProcess;
  readonly events: Record<string, unknown>[];
  waitFor(pred: (e: Record<string, unknown>) => boolean, what: string, timeoutMs?: number): Promise<Record<string, unknown>>;
  kill(): Promise<void>;
}

function startChild(t: { teardown(fn: () => void): void }, opts: ChildOptions): Child {
  const loader = process.execArgv.find((a) => a.includes('@tapjs/typescript'))
    ?? `--import=${pathToFileURL(join(HERE, '..', 'node_modules', '@tapjs', 'typescript', 'dist', 'esm', 'import.mjs')).href}`;
  const env: NodeJS.ProcessEnv = { ...process.env, TS_NODE_TRANSPILE_ONLY: '1' };
  delete env.NODE_OPTIONS;
  const proc = spawn(process.execPath, [loader, join(HERE, 'helpers', 'fleet-agent-child.ts'), JSON.stringify(opts)], { env, stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => { if (proc.exitCode === null) proc.kill('SIGKILL'); });
  const events: Record<string, unknown>[] = [];
  let waiters: { pred: (e: Record<string, unknown>) => boolean; resolve: (e: Record<string, unknown>) => void }[] = [];
  let buf = '';
  proc.stdout?.on('data', (d: Buffer) => {
    buf += d.toString();
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      let e: Record<string, unknown>;
      try {
        e = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      if (process.env.FLEET_TEST_LOG) console.error('child', line);
      events.push(e);
      waiters = waiters.filter((w) => (w.pred(e) ? (w.resolve(e), false) : true));
    }
  });
  return {
    proc,
    events,
    waitFor(pred, what, timeoutMs = 30_000) {
      const found = events.find(pred);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`child: timed out waiting for ${what}`)), timeoutMs);
        waiters.push({ pred, resolve: (e) => { clearTimeout(timer); resolve(e); } });
      });
    },
    kill: () => new Promise<void>((resolve) => {
      if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
      proc.once('exit', () => resolve());
      proc.kill('SIGKILL');
    }),
  };
}

function childOptions(h: FleetHarness, dataDir: string, extra: Partial<ChildOptions> = {}): ChildOptions {
  return { brokerUrl: h.broker.url, keyId: h.keyId, publicKey: h.publicKey, dataDir, deviceId: 'dev-k', ...extra };
}

t.test('agent killed with SIGKILL mid-download resumes from its chunk map after restart', { timeout: 120_000 }, async (t) => {
  const h = await startFleetHarness(t, { chunkServer: { bytesPerSecond: 150_000 } });
  const dataDir = scratchDir(t);
  const bytes = modelBytes(300 * 1024 + 5, 'ONNX', 21);
  const artifact = await h.artifact(bytes, 2048);
  const total = Math.ceil(bytes.length / 2048);
  const first = startChild(t, childOptions(h, dataDir));
  await first.waitFor((e) => e.event === 'started', 'start');
  const m = h.manifest({ model: 'det', version: 1, artifact });
  await h.publish('edge/devices/dev-k/deployments', m);
  await first.waitFor((e) => e.event === 'chunks' && Number(e.n) >= total * 0.4, '40% of the chunks', 60_000);
  await first.kill();
  const askedBefore = new Map(h.chunkServer.askedFor);
  // What the dead agent recorded as durable.
  const db = await Database.open(join(dataDir, 'agent.db'));
  const durable = (await db.all<{ idx: number }>('SELECT idx FROM fleet_chunks WHERE sha256 = ?', [artifact.sha256])).map((r) => r.idx);
  const journal = await db.get<{ state: string }>('SELECT state FROM fleet_deployments WHERE deployment_id = ?', [m.deployment_id]);
  await db.close();
  t.equal(journal?.state, 'downloading', 'journal says downloading at the kill');
  t.ok(durable.length >= total * 0.4 && durable.length < total, `${durable.length}/${total} chunks durable at the kill`);
  const partial = readFileSync(join(dataDir, 'fleet', 'downloads', `${artifact.sha256}.part`));
  for (const i of durable) {
    if (!partial.subarray(i * 2048, i * 2048 + 2048).equals(bytes.subarray(i * 2048, i * 2048 + 2048))) t.fail(`durable chunk ${i} is not on disk`);
  }
  t.notOk(new FileDeploymentTarget(join(dataDir, 'models')).listModels().includes('det'), 'nothing half-installed in the repository');

  const second = startChild(t, childOptions(h, dataDir));
  t.teardown(() => second.kill());
  await h.manager.waitFor((x) => x.topic === `edge/devices/dev-k/deployments/${m.deployment_id}/status` && x.json?.state === 'active', 60_000, 'active after restart');
  const target = new FileDeploymentTarget(join(dataDir, 'models'));
  t.ok(readFileSync(target.versionPath('det', 1)).equals(bytes), 'installed bytes are the artifact');
  t.equal(target.modelVersions('det').active, 1);
  const askedAgain = durable.filter((i) => (h.chunkServer.askedFor.get(`${artifact.sha256}:${i}`) ?? 0) > (askedBefore.get(`${artifact.sha256}:${i}`) ?? 0));
  t.same(askedAgain, [], 'no durable chunk was asked for again after the restart');
  const askedAfter = [...h.chunkServer.askedFor].filter(([k, n]) => n > (askedBefore.get(k) ?? 0)).length;
  t.ok(askedAfter <= total - durable.length, `after the restart asked for ${askedAfter} chunks, at most the ${total - durable.length} missing`);
  t.ok(second.events.some((e) => e.event === 'log' && e.msg === 'fleet: resuming deployment after restart'), 'restart logged the resume');
});

t.test('agent killed with SIGKILL mid-activation keeps serving the old version, then finishes the deployment', { timeout: 120_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const dataDir = scratchDir(t);
  const target = new FileDeploymentTarget(join(dataDir, 'models'));
  const v1 = modelBytes(8000, 'ONNX', 31);
  target.seed('det', 1, v1);
  const first = startChild(t, childOptions(h, dataDir, { activationDelayMs: 10_000 }));
  await first.waitFor((e) => e.event === 'started', 'start');
  const artifact = await h.artifact(modelBytes(12_000, 'ONNX', 32));
  const m = h.manifest({ model: 'det', version: 2, artifact });
  await h.publish('edge/devices/dev-k/deployments', m);
  await first.waitFor((e) => e.event === 'phase' && e.phase === 'warming' && e.version === 2, 'warming v2');
  await first.kill();
  t.same(target.modelVersions('det'), { active: 1, onDisk: [1, 2], provider: 'file', variant: 'fp32' }, 'after the kill: v1 serves, v2 installed whole');
  t.ok(readFileSync(target.versionPath('det', 1)).equals(v1));

  const second = startChild(t, childOptions(h, dataDir));
  t.teardown(() => second.kill());
  await h.manager.waitFor((x) => x.topic === `edge/devices/dev-k/deployments/${m.deployment_id}/status` && x.json?.state === 'active', 60_000, 'active after restart');
  t.equal(target.modelVersions('det').active, 2);
  await second.kill();
  const db = await Database.open(join(dataDir, 'agent.db'));
  const row = await db.get<{ state: string; activation_attempts: number; previous_version: number }>('SELECT state, activation_attempts, previous_version FROM fleet_deployments WHERE deployment_id = ?', [m.deployment_id]);
  await db.close();
  t.same(row, { state: 'active', activation_attempts: 2, previous_version: 1 }, 'second activation attempt finished it');
});

t.test('agent killed with SIGKILL after verifying, before and after the rename into the repository, finishes the deployment', { timeout: 110_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const dataDir = scratchDir(t);
  const target = new FileDeploymentTarget(join(dataDir, 'models'));
  target.seed('det', 1, modelBytes(4000, 'ONNX', 51));
  const bytes = modelBytes(30_000, 'ONNX', 52);
  const artifact = await h.artifact(bytes, 4096);
  const m = h.manifest({ model: 'det', version: 2, artifact });

  // Kill 1: the download is verified, the install has not begun (the verified temp file is all there is).
  const first = startChild(t, childOptions(h, dataDir, { installDelayMs: { before: 10_000 } }));
  await first.waitFor((e) => e.event === 'started', 'start');
  await h.publish('edge/devices/dev-k/deployments', m);
  await first.waitFor((e) => e.event === 'install' && e.step === 'before', 'install begins');
  await first.kill();
  t.same(target.modelVersions('det'), { active: 1, onDisk: [1], provider: 'file', variant: 'fp32' }, 'kill 1: v1 serves, v2 not in the repository');
  t.ok(readFileSync(join(dataDir, 'fleet', 'downloads', `${artifact.sha256}.part`)).equals(bytes), 'kill 1: verified temp file kept');
  const sentBefore = h.chunkServer.chunksSent;

  // Kill 2: after the restart, the temp file is verified again and renamed into place; killed before the journal moves on.
  const second = startChild(t, childOptions(h, dataDir, { installDelayMs: { after: 10_000 } }));
  await second.waitFor((e) => e.event === 'install' && e.step === 'after', 'install done');
  await second.kill();
  t.equal(h.chunkServer.chunksSent, sentBefore, 'kill 2: nothing downloaded again');
  t.same(target.modelVersions('det'), { active: 1, onDisk: [1, 2], provider: 'file', variant: 'fp32' }, 'kill 2: v1 serves, v2 whole on disk');
  t.ok(readFileSync(target.versionPath('det', 2)).equals(bytes));

  // Restart 3: v2 on disk is recognised by its hash, activated, reported.
  const third = startChild(t, childOptions(h, dataDir));
  t.teardown(() => third.kill());
  await h.manager.waitFor((x) => x.topic === `edge/devices/dev-k/deployments/${m.deployment_id}/status` && x.json?.state === 'active', 60_000, 'active after the third start');
  t.equal(target.modelVersions('det').active, 2);
  t.equal(h.chunkServer.chunksSent, sentBefore, 'downloaded once in all');
});

