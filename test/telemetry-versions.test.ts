import t from 'tap';
import { appendFileSync, cpSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentMetrics, MAX_MODEL_EVENTS_PER_INTERVAL, type ModelIntervalReport } from '../agent/telemetry/agent-metrics.js';
import { createPrometheusRegistry } from '../agent/telemetry/prometheus-metrics.js';
import { LocalHttpServer } from '../agent/telemetry/local-http-server.js';
import { TelemetryReporter, type TelemetryRecord } from '../agent/telemetry/telemetry-reporter.js';
import { MemoryOutbox } from '../agent/store/outbox-memory.js';
import type { InferenceRuntime, Tensor } from '../agent/runtime/index.js';
import { parsePrometheusText, sampleValue } from './helpers/prometheus-text.js';
import { copyDemoRepo, startRuntime } from './helpers/runtime.js';

// Which model versions telemetry lists, on a real runtime (demo model `tiny`) whose versions are switched by
// reload (RepositoryModelLoad's path), activation (a deployment's path) and failed loads; /metrics over real HTTP.

type Tap = { teardown(fn: () => void | Promise<void>): void };

const frame = (): Tensor => ({ dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(0.5) });

async function until<T>(what: string, probe: () => T | undefined, timeoutMs = 20_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = probe();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`gave up waiting for ${what} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * The runtime closes a replaced version in the background; this waits until every replaced scheduler of the
 * model has closed (the runtime's private draining set is empty), the one moment after which its report must
 * have happened. Reading a private field here is deliberate: nothing public marks that moment.
 */
function drained(rt: InferenceRuntime, model: string): Promise<true> {
  const slots = (rt as unknown as { slots: Map<string, { others: Set<unknown> }> }).slots;
  return until(`the replaced versions of '${model}' to close`, () => (slots.get(model)?.others.size === 0 ? true : undefined));
}

interface Scrape {
  /** `v<version>:<state>` of every edge_agent_model_info series of `tiny`, sorted. */
  readonly info: string[];
  /** Versions with an nv_inference_request_success series. */
  readonly counted: number[];
  readonly loadFailures: number | undefined;
}

async function setup(t: Tap): Promise<{ repo: string; metrics: AgentMetrics; rt: InferenceRuntime; scrape: () => Promise<Scrape> }> {
  const repo = copyDemoRepo(t, ['tiny']);
  const metrics = new AgentMetrics();
  const rt = await startRuntime(t, repo, {}, metrics);
  t.teardown(() => metrics.close());
  const registry = createPrometheusRegistry({ metrics, defaultMetrics: false });
  const server = new LocalHttpServer({ port: 0, registry, status: () => { throw new Error('not asked here'); } });
  await server.start();
  t.teardown(() => server.stop());
  const scrape = async (): Promise<Scrape> => {
    const res = await fetch(`${server.url}/metrics`);
    const fams = parsePrometheusText(await res.text());
    const info = (fams.get('edge_agent_model_info')?.samples ?? []).filter((s) => s.labels.model === 'tiny').map((s) => `v${s.labels.version}:${s.labels.state}`).sort();
    const counted = (fams.get('nv_inference_request_success')?.samples ?? []).filter((s) => s.labels.model === 'tiny').map((s) => Number(s.labels.version)).sort();
    return { info, counted, loadFailures: sampleValue(fams, 'edge_agent_model_load_failures_total', 'edge_agent_model_load_failures_total', { model: 'tiny' }) };
  };
  return { repo, metrics, rt, scrape };
}

const brief = (models: readonly ModelIntervalReport[], model = 'tiny'): string[] => models.filter((m) => m.model === model).map((m) => `v${m.version}:${m.state}`);

t.test('a version replaced by a reload or an activation is reported once as unloaded, then forgotten', async (t) => {
  const { repo, metrics, rt, scrape } = await setup(t);
  await rt.submit('tiny', undefined, { inputs: { x: frame() } });
  t.same(brief(metrics.closeInterval().models), ['v1:ready']);

  // RepositoryModelLoad's path: a newer version on disk, the model reloaded.
  cpSync(join(repo, 'tiny', '1'), join(repo, 'tiny', '2'), { recursive: true });
  await rt.loadModel('tiny');
  t.equal(rt.modelInfo('tiny').version, 2, 'version 2 serves');
  await rt.submit('tiny', undefined, { inputs: { x: frame() } });
  await drained(rt, 'tiny');
  t.same((await scrape()).info, ['v1:unloaded', 'v2:ready'], '/metrics shows the replaced version as unloaded until the interval closes');
  const switched = metrics.closeInterval();
  t.same(brief(switched.models), ['v1:unloaded', 'v2:ready'], 'the record reports the replaced version once more');
  t.equal(switched.models.find((m) => m.version === 1)?.reason, 'replaced by version 2');
  t.notOk('reason' in switched.models.find((m) => m.version === 2)!, 'a serving version has no reason');
  t.match(switched.model_events, [
    { type: 'model-ready', model: 'tiny', version: 2 },
    { type: 'model-unloaded', model: 'tiny', version: 1, reason: 'replaced by version 2' },
  ], 'the switch is in the interval\'s events');
  t.same(brief(metrics.closeInterval().models), ['v2:ready'], 'then it is forgotten');
  t.same(await scrape(), { info: ['v2:ready'], counted: [2], loadFailures: undefined }, '/metrics lists only the served version');
  t.same([...metrics.models()].map((m) => m.version), [2], 'its histograms are freed');

  // A deployment's path: activate an older version.
  await rt.activate('tiny', 1);
  await drained(rt, 'tiny');
  t.same(brief(metrics.closeInterval().models), ['v1:ready', 'v2:unloaded']);
  t.same(brief(metrics.closeInterval().models), ['v1:ready']);

  // The same version loaded again: the version that serves is never reported gone.
  await rt.activate('tiny', 1);
  await drained(rt, 'tiny');
  await rt.submit('tiny', 1, { inputs: { x: frame() } });
  const again = metrics.closeInterval();
  t.same(brief(again.models), ['v1:ready'], 'a reload of the serving version keeps it ready');
  t.equal(again.models[0]!.success, 1, 'and counting');
  t.same(brief(metrics.closeInterval().models), ['v1:ready']);
  t.same((await scrape()).info, ['v1:ready']);
});

t.test('a version that failed to load and never served is reported once as failed, then forgotten', async (t) => {
  const { repo, metrics, rt, scrape } = await setup(t);
  metrics.closeInterval();
  mkdirSync(join(repo, 'tiny', '3'));
  writeFileSync(join(repo, 'tiny', '3', 'model.onnx'), 'not an ONNX model');
  await t.rejects(rt.activate('tiny', 3), 'version 3 does not load');
  t.match(rt.modelInfo('tiny'), { version: 1, state: 'READY' }, 'version 1 still serves');
  await rt.submit('tiny', undefined, { inputs: { x: frame() } });

  t.same(await scrape(), { info: ['v1:ready', 'v3:failed'], counted: [1, 3], loadFailures: 1 });
  const failed = metrics.closeInterval();
  t.same(brief(failed.models), ['v1:ready', 'v3:failed'], 'the failed version is reported once');
  t.match(failed.models.find((m) => m.version === 3), { state: 'failed', reason: /\S/, requests: 0 });
  t.match(failed.model_events, [{ type: 'model-failed', model: 'tiny', version: 3 }]);
  t.same(brief(metrics.closeInterval().models), ['v1:ready'], 'then forgotten');
  t.same(await scrape(), { info: ['v1:ready'], counted: [1], loadFailures: 1 }, 'the failure stays counted per model');
  t.same([...metrics.models()].map((m) => m.version), [1]);
});

t.test('a failed reload leaves the serving version ready; the failure is logged against the version attempted', async (t) => {
  const { repo, metrics, rt, scrape } = await setup(t);
  const outbox = new MemoryOutbox();
  t.teardown(() => outbox.close());
  const reporter = new TelemetryReporter({ metrics, outbox, deviceId: 'dev-versions', agentVersion: '0.1.0-test', topic: 'edge/devices/dev-versions/telemetry', intervalMs: 60_000 });
  const record = async (): Promise<TelemetryRecord> => {
    const r = await reporter.tick();
    if (!r) throw new Error('no record stored');
    return r;
  };
  await record();

  // KServe RepositoryModelLoad with config.yaml pinning a version that is not on disk.
  const config = join(repo, 'tiny', 'config.yaml');
  const original = readFileSync(config, 'utf8');
  appendFileSync(config, '\nversion: 9\n');
  await t.rejects(rt.loadModel('tiny'), { message: /pinned version 9 is not on disk/ });
  await rt.submit('tiny', undefined, { inputs: { x: frame() } });
  t.same((await scrape()).info, ['v1:ready', 'v9:failed'], '/metrics: version 1 ready, the attempt failed');
  const pinned = await record();
  t.same(brief(pinned.models), ['v1:ready', 'v9:failed'], 'the record says the same');
  t.equal(pinned.models.find((m) => m.version === 1)?.success, 1, 'version 1 served meanwhile');
  t.match(pinned.model_events, [{ type: 'model-failed', model: 'tiny', version: 9, reason: /pinned version 9 is not on disk/, ts: /^\d{4}-\d\d-\d\dT/ }]);
  t.equal(pinned.model_events_omitted, 0);
  t.same(brief((await record()).models), ['v1:ready'], 'the failed attempt is reported once');

  // The serving version itself fails to load again (its file replaced by garbage); its sessions keep serving.
  writeFileSync(config, original);
  writeFileSync(join(repo, 'tiny', '1', 'model.onnx'), 'truncated');
  await t.rejects(rt.loadModel('tiny'));
  const res = await rt.submit('tiny', undefined, { inputs: { x: frame() } });
  t.equal(res.version, 1, 'version 1 still answers');
  const same = await record();
  t.same(brief(same.models), ['v1:ready'], 'a failed reload of the serving version does not mark it failed');
  t.match(same.model_events, [{ type: 'model-failed', model: 'tiny', version: 1 }], 'the failure is an event of the record');
  t.same(await scrape(), { info: ['v1:ready'], counted: [1], loadFailures: 2 }, 'and counted');
});

t.test('events that come late or name nothing do not bring versions back', async (t) => {
  const m = new AgentMetrics();
  t.teardown(() => m.close());
  m.onModelEvent({ type: 'model-ready', model: 'cam', version: 1, provider: 'cpu', variant: 'fp32' });
  m.onModelEvent({ type: 'model-unloaded', model: 'cam' });
  t.same(brief(m.closeInterval().models, 'cam'), ['v1:unloaded']);
  m.onModelEvent({ type: 'model-unloaded', model: 'cam', version: 1, reason: 'replaced by version 2' });
  m.onModelEvent({ type: 'model-failed', model: 'cam', reason: 'no version folder with a model.onnx' });
  const later = m.closeInterval();
  t.same(later.models, [], 'a retirement after the unload, and a failure without a version, list nothing');
  t.equal(later.model_events.length, 2, 'both are still events');
  t.same([...m.loadFailures()], [['cam', 1]]);

  for (let i = 0; i < MAX_MODEL_EVENTS_PER_INTERVAL + 5; i += 1) m.onModelEvent({ type: 'model-failed', model: 'loop', version: 1, reason: 'bad file' });
  const flood = m.closeInterval();
  t.equal(flood.model_events.length, MAX_MODEL_EVENTS_PER_INTERVAL, 'events per interval are bounded');
  t.equal(flood.model_events_omitted, 5, 'the rest are counted');
  t.same(m.closeInterval().models, []);
});
