import t from 'tap';
import type { InferenceRuntime } from '../agent/runtime/index.js';
import { classifier, HEAVY, MEDIUM, SIZE, startRuntimeDevice } from './helpers/fleet-runtime-device.js';

const setup = startRuntimeDevice;

/** Frames from `lanes` concurrent streams, as fast as they are answered, until stopped. */
function stream(runtime: InferenceRuntime, lanes = 3): { stop: () => Promise<void>; results: { version: number; lane: number }[]; errors: unknown[] } {
  const results: { version: number; lane: number }[] = [];
  const errors: unknown[] = [];
  let running = true;
  const image = new Float32Array(3 * SIZE * SIZE).map((_, i) => Math.sin(i));
  const lane = async (_: unknown, id: number): Promise<void> => {
    while (running) {
      try {
        const r = await runtime.submit('cls', undefined, { inputs: { image: { dtype: 'float32', shape: [1, 3, SIZE, SIZE], data: image } } });
        results.push({ version: r.version, lane: id });
      } catch (err) {
        errors.push(err);
      }
    }
  };
  const all = Promise.all(Array.from({ length: lanes }, lane));
  return { results, errors, stop: async () => { running = false; await all; } };
}

function switches(versions: readonly number[]): number[] {
  return versions.filter((v, i) => i === 0 || versions[i - 1] !== v);
}

/**
 * The version sequence each stream saw, runs collapsed. Across streams completions interleave (a frame accepted
 * just before a switch may finish after one accepted just after it, on the old version), so order is per stream.
 */
function perLane(results: readonly { version: number; lane: number }[]): number[][] {
  const lanes = [...new Set(results.map((r) => r.lane))].sort();
  return lanes.map((l) => switches(results.filter((r) => r.lane === l).map((r) => r.version)));
}

t.test('frames streamed through a deployment all succeed and the version switches exactly once', { timeout: 120_000 }, async (t) => {
  const { h, runtime, target } = await setup(t, { duration_s: 2, max_p99_factor: 1000 });
  const frames = stream(runtime);
  t.teardown(frames.stop);
  while (frames.results.length < 50) await new Promise((r) => setTimeout(r, 20));
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(classifier(MEDIUM), 8192), chunkSize: 8192 });
  await h.publish('edge/devices/dev-1/deployments', m);
  await h.manager.waitFor((x) => x.topic.endsWith(`/${m.deployment_id}/status`) && x.json?.health === 'passed', 60_000, 'health window passed');
  await frames.stop();
  t.same(frames.errors, [], `no frame failed (${frames.results.length} frames)`);
  t.same(perLane(frames.results), [[1, 2], [1, 2], [1, 2]], 'each stream saw v1, then v2: one switch');
  t.ok(frames.results.filter((r) => r.version === 2).length >= 20, 'v2 served frames during its health window');
  t.match(target.modelVersions('cls'), { active: 2, onDisk: [1, 2], provider: 'cpu' });
});

t.test('a far slower version is rolled back on its p99 while frames keep flowing', { timeout: 120_000 }, async (t) => {
  const { h, runtime, target } = await setup(t, { duration_s: 30, max_p99_factor: 3, min_requests: 30, max_error_rate: 0.01 });
  const frames = stream(runtime, 1);
  t.teardown(frames.stop);
  while (target.versionHealth('cls', 1).requests < 1000) await new Promise((r) => setTimeout(r, 20));
  // The baseline is v1's p99 since it was activated, over enough frames that a few first-frame stalls (thread
  // wake-ups, lazy allocation) do not set it.
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(classifier(HEAVY), 65536), chunkSize: 65536 });
  await h.publish('edge/devices/dev-1/deployments', m);
  const rolled = await h.manager.waitForState(m.deployment_id, 'rolled_back', 90_000);
  while (frames.results.length === 0 || frames.results[frames.results.length - 1]?.version !== 1) await new Promise((r) => setTimeout(r, 20));
  await frames.stop();
  t.match(rolled.json?.reason, /^rolled back to version 1: p99 latency \d+ us is \d+\.\d\dx the previous version's \d+ us \(limit 3x\)$/);
  const fig = (rolled.json?.details as { health: { p99_factor: number; requests: number } }).health;
  t.ok(fig.p99_factor > 3 && fig.requests >= 30, `p99 factor ${fig.p99_factor.toFixed(1)} over ${fig.requests} requests`);
  t.same(frames.errors, [], 'no frame failed through the switch and the rollback');
  t.same(perLane(frames.results), [[1, 2, 1]], 'v1, v2, then v1 again');
  t.match(target.modelVersions('cls'), { active: 1, onDisk: [1] });
});

t.test('a model that fails to load leaves the old version serving and reports failed', { timeout: 60_000 }, async (t) => {
  const { h, runtime, target } = await setup(t, { duration_s: 0 });
  const frames = stream(runtime, 2);
  t.teardown(frames.stop);
  const truncated = classifier(MEDIUM).subarray(0, 300);
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(truncated) });
  await h.publish('edge/devices/dev-1/deployments', m);
  const failed = await h.manager.waitForState(m.deployment_id, 'failed');
  await frames.stop();
  t.match(failed.json?.reason, /cls/);
  t.same(frames.errors, []);
  t.same(perLane(frames.results), [[1], [1]]);
  t.same(target.modelVersions('cls').onDisk, [1], 'the version that failed to load was removed');
});
