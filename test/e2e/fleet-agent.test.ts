import t from 'tap';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { attr, DataType, encodeModel, floatTensor, makeModel, makeNode, valueInfo } from '../../agent/compress/onnx-graph.js';
import type { MqttArtifactServerOptions } from '../../agent/fleet/index.js';
import { Database } from '../../agent/store/index.js';
import { AgentProcess, pumpFrames, tinyFrame, versionRuns } from '../helpers/agent-process.js';
import { distinct, startFleetHarness, Watcher, type FleetHarness, type SeenMessage } from '../helpers/fleet.js';
import { copyDemoRepo, tempDir } from '../helpers/runtime.js';

// The real agent (compiled CLI, child process) driven over a real mosquitto by the fleet manager's side.

const DEVICE = 'e2e-fleet';
const DEVICE_TOPIC = `edge/devices/${DEVICE}/deployments`;
type Teardown = { teardown(fn: () => void | Promise<void>): void };

interface Setup {
  readonly h: FleetHarness;
  readonly agent: AgentProcess;
  readonly repo: string;
  readonly tinyBytes: Buffer;
}

async function setup(t: Teardown, o: { health?: Record<string, unknown>; chunkServer?: Omit<MqttArtifactServerOptions, 'client'> } = {}): Promise<Setup> {
  const h = await startFleetHarness(t, o.chunkServer ? { chunkServer: o.chunkServer } : {});
  const repo = copyDemoRepo(t, ['tiny']);
  const agent = await AgentProcess.start(t, {
    dir: tempDir(t, 'edge-e2e-fleet-'),
    repo,
    fleet: {
      broker_url: h.broker.url,
      device_id: DEVICE,
      trusted_keys: { [h.keyId]: h.publicKey },
      settle_ms: 100,
      state_interval_s: 0,
      reconnect: { min_ms: 200, max_ms: 1000 },
      artifacts: { chunk_timeout_ms: 1500, window: 8 },
      health: { duration_s: 0, poll_ms: 100, ...o.health },
    },
  });
  await h.manager.waitFor((m) => m.topic === `edge/devices/${DEVICE}/status` && m.json?.state === 'online', 20_000, 'presence online');
  return { h, agent, repo, tinyBytes: readFileSync(join(repo, 'tiny', '1', 'model.onnx')) };
}

function activeVersions(agent: AgentProcess): Record<string, number> {
  const file = join(agent.dataDir, 'active-versions.json');
  return existsSync(file) ? JSON.parse(readFileSync(file, 'utf8')) as Record<string, number> : {};
}

/** The retained reported state the fleet last saw, once it shows `tiny` at `version`. */
function reportedTiny(h: FleetHarness, version: number): Promise<SeenMessage> {
  return h.manager.waitFor((m) => m.topic === `edge/devices/${DEVICE}/state`
    && (m.json?.models as { name: string; active_version: number }[] | undefined)?.some((x) => x.name === 'tiny' && x.active_version === version) === true,
  20_000, `reported state with tiny at version ${version}`);
}

/** First 'model ready' log line of `tiny` in this process: the version served after start. */
function firstServed(agent: AgentProcess): unknown {
  return agent.logs().find((l) => l.msg === 'model ready' && l.model === 'tiny')?.version;
}

t.test('a signed deployment over MQTT chunks reaches active while frames stream; the version switches once', async (t) => {
  const { h, agent, tinyBytes } = await setup(t, { health: { duration_s: 1, max_p99_factor: 1000 } });
  const client = agent.client(t);
  const frames = pumpFrames(await client.openStream({ model: 'tiny', maxInFlight: 8 }), () => ({ x: tinyFrame(0.25) }));
  t.teardown(() => frames.stop());
  await frames.waitForMore(20);

  const m = h.manifest({ model: 'tiny', version: 2, artifact: await h.artifact(tinyBytes, 16384), chunkSize: 16384 });
  await h.publish(DEVICE_TOPIC, m);
  const passed = await h.manager.waitFor((x) => x.topic.endsWith(`/${m.deployment_id}/status`) && x.json?.health === 'passed', 60_000, 'health window passed');
  await frames.waitForMore(20);
  await frames.stop();

  t.equal(frames.error(), undefined, 'the stream never failed');
  t.same(frames.results.map((r) => r.seq), [...Array(frames.sent()).keys()], `every one of ${frames.sent()} frames answered, in order`);
  const notOk = frames.results.filter((r) => r.status !== 'OK');
  t.same(notOk.map((r) => `${r.seq} ${r.status} ${r.message}`), [], 'every frame OK');
  t.same(versionRuns(frames.results.map((r) => r.version)), [1, 2], 'v1, then v2: exactly one switch');

  const statuses = h.manager.statuses(m.deployment_id);
  t.same(distinct(statuses.map((s) => String(s.json?.state))), ['accepted', 'downloading', 'verifying', 'loading', 'warming', 'validating', 'active'], 'states in order');
  t.equal(passed.json?.state, 'active');
  const progress = statuses.filter((s) => s.json?.state === 'downloading').map((s) => Number(s.json?.progress ?? 0));
  t.same(progress, [...progress].sort((a, b) => a - b), `download progress only grows (${progress.join(', ')})`);
  // Through the outbox every status carries its sequence number and epoch (telemetry readme, "The outbox").
  const seqs = statuses.map((s) => s.json?.seq);
  t.ok(seqs.every((s) => typeof s === 'number'), `statuses carry seq (${seqs.join(',')})`);
  t.same(seqs, seqs.map((_, i) => Number(seqs[0]) + i), 'status seq counts up by one in arrival order: in order, no gap');
  const epochs = new Set(statuses.map((s) => s.json?.epoch));
  t.ok(epochs.size === 1 && typeof [...epochs][0] === 'number', 'all in one epoch');

  const late = await Watcher.connect(t, h.broker.url, [`edge/devices/${DEVICE}/deployments/${m.deployment_id}/status`]);
  const retained = await late.waitFor(() => true, 10_000, 'the retained status');
  t.match(retained, { retain: true, json: { state: 'active', health: 'passed' } }, 'a fleet manager connecting later gets the final status, retained');
  const state = await reportedTiny(h, 2);
  t.match(state.json, { device_id: DEVICE, agent_version: '0.1.0', models: [{ name: 'tiny', active_version: 2, versions_on_disk: [1, 2], provider: 'cpu' }] });
  t.same(activeVersions(agent), { tiny: 2 }, 'active-versions.json names version 2');

  t.equal(await agent.stop(), 0, 'SIGTERM: exit 0 with the fleet link and telemetry running');
  await h.manager.waitFor((x) => x.topic === `edge/devices/${DEVICE}/status` && x.json?.state === 'offline' && x.json.reason === 'stopped', 10_000, 'presence offline (stopped)');
});

t.test('SIGKILL mid-download: the restart serves version 1 and asks only for the chunks not yet durable', async (t) => {
  let sent = 0;
  let release!: () => void;
  const gate = new Promise<void>((r) => { release = r; });
  t.teardown(() => release());
  const { h, agent, tinyBytes } = await setup(t, {
    chunkServer: { beforeSend: async () => { if (++sent > 14) await gate; } },
  });
  const artifact = await h.artifact(tinyBytes, 8192);
  const total = Math.ceil(artifact.size / 8192);
  const m = h.manifest({ model: 'tiny', version: 2, artifact, chunkSize: 8192 });
  await h.publish(DEVICE_TOPIC, m);
  await h.manager.waitFor((x) => x.topic.endsWith(`/${m.deployment_id}/status`) && x.json?.state === 'downloading' && Number(x.json.progress) >= 0.2, 30_000, 'download at 20%');
  await agent.kill();

  const db = await Database.open(join(agent.dataDir, 'edge-agent.db'));
  const durable = new Set((await db.all<{ idx: number }>('SELECT idx FROM fleet_chunks WHERE sha256 = ?', [artifact.sha256])).map((r) => r.idx));
  await db.close();
  t.ok(durable.size > 0 && durable.size < total, `${durable.size} of ${total} chunks durable at the kill`);
  t.same(activeVersions(agent), {}, 'nothing activated');
  const askedBefore = h.chunkServer.requests.length;
  release(); // what the dead agent asked for goes to nobody

  const restartedAt = Date.now();
  const again = await agent.restart(t);
  t.equal(firstServed(again), 1, 'the restarted agent serves version 1');
  const stream = await again.client(t).openStream({ model: 'tiny' });
  await stream.send({ seq: 0, inputs: { x: tinyFrame() } });
  const first = (await stream.results().next()).value;
  t.match(first, { status: 'OK' }, `a frame right after the restart is answered (version ${first?.version})`);
  stream.end();

  const active = await h.manager.waitForState(m.deployment_id, 'active', 60_000);
  t.equal(active.json?.version, 2);
  const askedAfter = h.chunkServer.requests.slice(askedBefore).flatMap((r) => r.chunks);
  t.same(askedAfter.filter((i) => durable.has(i)), [], 'no durable chunk asked for again');
  t.same([...new Set([...durable, ...askedAfter])].sort((a, b) => a - b), [...Array(total).keys()], 'the rest was asked for');
  const resumed = h.manager.statuses(m.deployment_id).filter((s) => s.at > restartedAt && s.json?.state === 'downloading').map((s) => Number(s.json?.progress));
  t.ok(resumed.length > 0 && resumed.every((p) => p > 0), `after the restart the download went on from where it was (progress ${resumed.join(', ')})`);
  t.same(activeVersions(again), { tiny: 2 });
});

t.test('SIGKILL mid-activation: the restart serves the old version, then finishes the deployment', async (t) => {
  const { h, agent, tinyBytes } = await setup(t);
  // Many warm-up runs make loading last long enough to be killed in the middle of it.
  const m = h.manifest({ model: 'tiny', version: 2, artifact: await h.artifact(tinyBytes, 65536), chunkSize: 65536, config: { max_batch_size: 32, warmup: { runs: 2000 } } });
  await h.publish(DEVICE_TOPIC, m);
  await h.manager.waitForState(m.deployment_id, 'loading', 30_000);
  await agent.kill();
  t.notOk(agent.logs().some((l) => l.msg === 'model ready' && l.version === 2), 'killed before version 2 was ready');
  t.same(activeVersions(agent), { tiny: 1 }, 'active-versions.json still names version 1');
  t.ok(existsSync(join(agent.options.repo, 'tiny', '2', 'model.onnx')), 'version 2 was installed (whole) before the kill');

  const again = await agent.restart(t);
  t.equal(firstServed(again), 1, 'the restarted agent serves version 1, not the half-activated version 2');
  const frames = pumpFrames(await again.client(t).openStream({ model: 'tiny' }), () => ({ x: tinyFrame() }), 2);
  t.teardown(() => frames.stop());
  await frames.waitForMore(5);
  const active = await h.manager.waitFor((x) => x.topic.endsWith(`/${m.deployment_id}/status`) && x.json?.state === 'active', 60_000, 'active after the restart');
  await frames.waitForMore(5);
  await frames.stop();
  t.equal(active.json?.version, 2);
  t.same(frames.results.filter((r) => r.status !== 'OK').map((r) => r.message), [], 'every frame OK across the resumed activation');
  t.same(versionRuns(frames.results.map((r) => r.version)), [1, 2], 'version 1 until the resumed activation switched to 2');
  const states = h.manager.states(m.deployment_id);
  // Statuses are sent at least once (entries not yet acknowledged at the kill are sent again): count distinct ones.
  const loading = new Set(h.manager.statuses(m.deployment_id).filter((s) => s.json?.state === 'loading').map((s) => s.json?.ts));
  t.equal(loading.size, 2, `activation attempted again after the restart (${distinct(states).join(' → ')})`);
  t.same(activeVersions(again), { tiny: 2 });
});

/**
 * `tiny`'s signature (x [N,1024] → y [N,16]) with a flaw: it adds table[int(mean(x))] from a one-entry table, so
 * the all-zero warm-up passes and any frame whose mean is 1 or more fails in onnxruntime (Gather out of bounds).
 */
function erroringTiny(): Buffer {
  return Buffer.from(encodeModel(makeModel({
    graph: {
      name: 'erroring-tiny',
      nodes: [
        makeNode('Gemm', ['x', 'avg.weight'], ['mean'], { transB: attr.int(1) }, 'mean'),
        makeNode('Cast', ['mean'], ['idx'], { to: attr.int(DataType.INT64) }, 'cast'),
        makeNode('Gather', ['table', 'idx'], ['offset'], { axis: attr.int(0) }, 'gather'),
        makeNode('Gemm', ['x', 'fc.weight', 'fc.bias'], ['z'], { transB: attr.int(1) }, 'fc'),
        makeNode('Add', ['z', 'offset'], ['y'], {}, 'add'),
      ],
      initializers: [
        floatTensor('avg.weight', [1, 1024], new Float32Array(1024).fill(1 / 1024)),
        floatTensor('table', [1], [0]),
        floatTensor('fc.weight', [16, 1024], new Float32Array(16 * 1024).map((_, i) => Math.sin(i) / 32)),
        floatTensor('fc.bias', [16], new Float32Array(16)),
      ],
      inputs: [valueInfo('x', DataType.FLOAT, ['N', 1024])],
      outputs: [valueInfo('y', DataType.FLOAT, ['N', 16])],
    },
  })));
}

t.test('a version that errors on real frames is rolled back automatically; version 1 serves again', async (t) => {
  const { h, agent } = await setup(t, { health: { duration_s: 60, max_error_rate: 0.05, min_requests: 10 } });
  const frames = pumpFrames(await agent.client(t).openStream({ model: 'tiny' }), () => ({ x: tinyFrame(3) }), 2);
  t.teardown(() => frames.stop());
  await frames.waitForMore(30);
  const m = h.manifest({ model: 'tiny', version: 2, artifact: await h.artifact(erroringTiny(), 16384), chunkSize: 16384 });
  await h.publish(DEVICE_TOPIC, m);
  const rolled = await h.manager.waitForState(m.deployment_id, 'rolled_back', 60_000);
  const atRollback = frames.results.length;
  await frames.waitForMore(20);
  await frames.stop();

  t.match(rolled.json?.reason, /^rolled back to version 1: error rate \d+\.\d% \(\d+\/\d+\) exceeds 5\.0%$/);
  const fig = (rolled.json?.details as { rolled_back_to: number; health: Record<string, number> });
  t.equal(fig.rolled_back_to, 1);
  t.ok(fig.health.requests! >= 10 && fig.health.error_rate! > 0.05, `figures: ${fig.health.errors}/${fig.health.requests} errors`);
  t.ok(fig.health.previous_p99_us! > 0, `version 1's p99 (${fig.health.previous_p99_us} us, served since start) is the baseline`);
  t.equal(rolled.json?.health, 'breached');

  t.equal(frames.error(), undefined, 'the stream never failed');
  const failed = frames.results.filter((r) => r.status !== 'OK');
  t.ok(failed.length >= 10, `${failed.length} frames failed on version 2`);
  t.ok(failed.every((r) => /Gather|indices/.test(r.message)), `each failure names the problem (${failed[0]?.status}: ${failed[0]?.message})`);
  t.ok(frames.results.filter((r) => r.status === 'OK').every((r) => r.version === 1), 'every OK frame ran on version 1');
  const tail = frames.results.slice(Math.max(atRollback, frames.results.length - 10));
  t.ok(tail.length > 0 && tail.every((r) => r.status === 'OK' && r.version === 1), 'after the rollback frames are OK on version 1');
  t.notOk(existsSync(join(agent.options.repo, 'tiny', '2')), 'version 2 was removed from disk');
  t.same(activeVersions(agent), { tiny: 1 });
  const state = await reportedTiny(h, 1);
  t.match(state.json, { models: [{ name: 'tiny', active_version: 1, versions_on_disk: [1] }] });
});
