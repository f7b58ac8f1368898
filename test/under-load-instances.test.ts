import t from 'tap';
import { writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { runtimeSchema } from '../agent/config/schema.js';
import { ModelRepository } from '../agent/models/index.js';
import { InferenceRuntime, ModelScheduler, type ExecutionRecord, type LoadedModel, type Tensor } from '../agent/runtime/index.js';
import { loadModelVersion, type LoadOutcome } from '../agent/runtime/model-loader.js';
import type { SessionInstance } from '../agent/runtime/session-instance.js';
import { mulberry32 as seeded } from '../scripts/demo-models.js';
import { Writable } from 'node:stream';
import { createLogger, silentLogger } from '../agent/logger.js';
import { copyDemoRepo, DEMO_REPO, startRuntime, tempDir } from './helpers/runtime.js';

function randomImage(rnd: () => number): Tensor {
  const data = new Float32Array(3 * 112 * 112);
  for (let i = 0; i < data.length; i++) data[i] = rnd() * 2 - 1;
  return { dtype: 'float32', shape: [1, 3, 112, 112], data };
}

/** Loads one demo model version the way the runtime does, with `config` as its config.yaml. */
async function load(t: { teardown(fn: () => void | Promise<void>): void }, model: string, config: string, execution: 'auto' | 'worker' = 'worker'): Promise<LoadOutcome> {
  const repo = copyDemoRepo(t, [model]);
  // Warm-up at 4 rows rather than 32 keeps each load short.
  writeFileSync(join(repo, model, 'config.yaml'), `max_batch_size: 4\n${config}`);
  const entry = new ModelRepository(repo).read(model);
  const version = entry?.versions[0];
  if (!entry || !version) throw new Error(`${model} is not in the repository`);
  const cfg = runtimeSchema.parse({ execution_providers: ['cpu'] });
  const outcome = await loadModelVersion(entry, version, {
    providers: cfg.execution_providers, providerOptions: cfg.provider_options, graphOptimization: cfg.graph_optimization, execution,
    inlineMaxRunUs: cfg.inline_max_run_us, inlineMaxOpenMs: cfg.inline_max_open_ms, cacheDir: join(tempDir(t, 'edge-data-'), 'cache'),
  }, silentLogger());
  t.teardown(async () => { await Promise.all(outcome.model.instances.map((s) => s.release())); });
  return outcome;
}

t.test('which models get sessions for load, how many and with how many threads', async (t) => {
  const cores = availableParallelism();
  const auto = (await load(t, 'classifier', '')).underLoad;
  if (cores >= 2) {
    t.equal(auto?.count, Math.min(cores, 4), `auto on ${cores} cores: min(cores, 4) sessions`);
    t.equal(auto?.intraOpThreads, Math.max(1, Math.floor(cores / Math.min(cores, 4))), 'the cores split between them');
  } else {
    t.equal(auto, undefined, 'auto on one core: none');
  }
  t.equal((await load(t, 'classifier', 'instances_under_load: 0\n')).underLoad, undefined, '0: none');
  t.equal((await load(t, 'classifier', 'instance_count: 2\n')).underLoad, undefined, 'auto with two configured instances: none');
  t.equal((await load(t, 'classifier', 'intra_op_threads: 1\n')).underLoad, undefined, 'auto with a thread count set: none');
  const explicit = (await load(t, 'classifier', 'instance_count: 2\ninstances_under_load: 3\n')).underLoad;
  t.equal(explicit?.count, 3, 'an explicit count applies beside several configured instances');
  t.equal(explicit?.intraOpThreads, Math.max(1, Math.floor(cores / 3)), 'each with its share of the cores');
  const inline = await load(t, 'tiny', 'instances_under_load: 2\n', 'auto');
  t.equal(inline.execution, 'inline', 'tiny runs on the event loop');
  t.equal(inline.underLoad, undefined, 'an inline model gets none: its runs never overlap anyway');

  const plan = (await load(t, 'classifier', 'instances_under_load: 2\n')).underLoad;
  const sessions = await (plan as NonNullable<typeof plan>).open();
  t.teardown(async () => { await Promise.all(sessions.map((s) => s.release())); });
  t.equal(sessions.length, 2, 'open() opens them all');
  const out = await (sessions[1] as SessionInstance).run({ image: { dtype: 'float32', data: new Float32Array(3 * 112 * 112), dims: [1, 3, 112, 112] } });
  t.same(out.logits?.dims, [1, 10], 'and each runs the model');
});

t.test('instances_under_load is checked like every key of config.yaml', async (t) => {
  const repo = copyDemoRepo(t, ['classifier']);
  writeFileSync(join(repo, 'classifier', 'config.yaml'), 'instances_under_load: many\n');
  const entry = new ModelRepository(repo).read('classifier');
  t.equal(entry?.config, undefined, 'the config is refused');
  t.match(entry?.configError, /instances_under_load/, 'and the error names the key');
});

/** Records when each run of a session was handed to it and when it answered. */
interface Span { readonly underLoad: boolean; readonly start: number; end: number }

function recording(session: SessionInstance, underLoad: boolean, spans: Span[], released: SessionInstance[]): SessionInstance {
  return new Proxy(session, {
    get(target, prop) {
      if (prop === 'run') {
        return async (feeds: Parameters<SessionInstance['run']>[0]) => {
          const span: Span = { underLoad, start: performance.now(), end: Infinity };
          spans.push(span);
          try {
            return await target.run(feeds);
          } finally {
            span.end = performance.now();
          }
        };
      }
      if (prop === 'release') return () => { released.push(target); return target.release(); };
      const v = Reflect.get(target, prop, target) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}

t.test('several streams run on the sessions for load, a lone stream on the wide one, never both kinds at once', async (t) => {
  const outcome = await load(t, 'classifier', 'instances_under_load: 2\n');
  const spans: Span[] = [];
  const released: SessionInstance[] = [];
  const records: ExecutionRecord[] = [];
  const model: LoadedModel = { ...outcome.model, instances: outcome.model.instances.map((s) => recording(s, false, spans, released)) };
  const scheduler = new ModelScheduler(model, {
    maxQueue: 1000, sequenceIdleTimeoutMs: 60_000, maxSequences: 100, refuseNonFinite: false, maxTensorBytes: 1 << 24,
    observer: { onExecution: (e) => records.push(e) },
  });
  // Opening them failed (out of memory, a file gone): the configured session goes on serving alone.
  await t.rejects(scheduler.addUnderLoadInstances(() => Promise.reject(new Error('no memory for another session'))), /no memory/, 'a failed open is reported to the caller');
  t.same(scheduler.sessionCounts, { configured: 1, underLoad: 0 }, 'and nothing joined');
  const alone = await scheduler.submit({ inputs: { image: randomImage(seeded(20)) }, streamKey: {} });
  t.same(alone.outputs.logits?.shape, [1, 10], 'the model still serves on its configured session');
  await new Promise((r) => setTimeout(r, 250)); // that frame's stream has gone quiet before the lone stream below
  records.length = 0;
  const opened = await (outcome.underLoad as NonNullable<LoadOutcome['underLoad']>).open();
  t.equal(await scheduler.addUnderLoadInstances(() => Promise.resolve(opened.map((s) => recording(s, true, spans, released)))), 2, 'both joined');
  t.same(scheduler.sessionCounts, { configured: 1, underLoad: 2 });

  const rnd = seeded(21);
  const reference = await ort.InferenceSession.create(join(DEMO_REPO, 'classifier', '1', 'model.onnx'));
  t.teardown(() => reference.release());
  let worst = 0;
  const closedLoops = (streams: number, frames: number): Promise<unknown> => Promise.all(Array.from({ length: streams }, async () => {
    const key = {};
    for (let k = 0; k < frames; k++) {
      const image = randomImage(rnd);
      const got = await scheduler.submit({ inputs: { image }, streamKey: key });
      const want = (await reference.run({ image: new ort.Tensor('float32', image.data as Float32Array, image.shape as number[]) })).logits?.data as Float32Array;
      const logits = got.outputs.logits?.data as Float32Array;
      for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs((logits[i] as number) - (want[i] as number)));
    }
  }));
  const quiet = (): Promise<void> => new Promise((r) => setTimeout(r, 250));

  await closedLoops(1, 4);
  t.ok(records.length === 4 && records.every((r) => !r.underLoad), 'a lone stream runs on the wide session');
  await quiet();
  records.length = 0;
  // Two cameras whose frames do not meet (one every 30 ms each, 15 ms apart, a frame's run about 3 ms): both
  // count as active sources, but no frame waits for another, so each keeps the wide session's latency. (A
  // stall on a slow machine may make two frames meet, and the next ones then run on the sessions for load.)
  const paced = (offsetMs: number): Promise<void> => (async () => {
    const key = {};
    await new Promise((r) => setTimeout(r, offsetMs));
    for (let k = 0; k < 5; k++) {
      const started = performance.now();
      await scheduler.submit({ inputs: { image: randomImage(rnd) }, streamKey: key });
      await new Promise((r) => setTimeout(r, Math.max(0, 30 - (performance.now() - started))));
    }
  })();
  await Promise.all([paced(0), paced(15)]);
  const wide = records.filter((r) => !r.underLoad).length;
  t.ok(records.length === 10 && wide >= 8, `two cameras that do not overlap run on the wide session (${wide} of ${records.length})`);
  await quiet();
  records.length = 0;
  await closedLoops(8, 6);
  const underLoad = records.filter((r) => r.underLoad).length;
  // The first frame may start on the wide session before the others arrive, and a stream finishing last, alone,
  // goes back to it.
  t.ok(underLoad >= Math.ceil(records.length * 0.75), `eight streams run on the sessions for load (${underLoad} of ${records.length} runs)`);
  await quiet();
  records.length = 0;
  await closedLoops(1, 3);
  t.ok(records.length === 3 && records.every((r) => !r.underLoad), 'once the others have gone quiet, a lone stream is back on the wide session');
  t.ok(worst < 1e-4, `every frame equals its own direct run (largest difference ${worst})`);

  const overlaps = spans.filter((a) => a.underLoad).flatMap((a) => spans.filter((b) => !b.underLoad && b.start < a.end && a.start < b.end));
  t.equal(overlaps.length, 0, `no run of the wide session overlapped one of the sessions for load (${spans.length} runs)`);
  t.ok(spans.some((a) => a.underLoad && spans.some((b) => b !== a && b.underLoad && b.start < a.end && a.start < b.end)), 'the sessions for load ran side by side');

  // Sessions still opening when close begins: close waits for them, and they are released, not joined.
  const late = await (outcome.underLoad as NonNullable<LoadOutcome['underLoad']>).open();
  const lateReleased: SessionInstance[] = [];
  let finishOpening: (sessions: SessionInstance[]) => void = () => undefined;
  const joining = scheduler.addUnderLoadInstances(() => new Promise((resolve) => { finishOpening = resolve; }));
  let closed = false;
  const closing = scheduler.close().then(() => { closed = true; });
  await new Promise((r) => setTimeout(r, 50));
  t.notOk(closed, 'close waits for sessions still opening');
  finishOpening(late.map((s) => recording(s, true, [], lateReleased)));
  t.equal(await joining, 0, 'sessions that finish opening after close began do not join');
  await closing;
  t.equal(lateReleased.length, 2, 'they are released instead');
  t.equal(released.length, 3, 'close releases the wide session and both sessions for load');
  let called = false;
  t.equal(await scheduler.addUnderLoadInstances(() => { called = true; return Promise.resolve([]); }), 0, 'after close nothing joins');
  t.notOk(called, 'and nothing is opened');
});

t.test('the runtime opens them when the model first sees load, never while a model loads, and reports them', async (t) => {
  const lines: { msg: string; model?: string }[] = [];
  const log = createLogger({ level: 'debug', destination: new Writable({ write(chunk, _enc, cb) { lines.push(JSON.parse(String(chunk)) as { msg: string; model?: string }); cb(); } }) });
  const repo = copyDemoRepo(t, ['classifier', 'tiny']);
  writeFileSync(join(repo, 'classifier', 'config.yaml'), 'instances_under_load: 2\n');
  writeFileSync(join(repo, 'tiny', 'config.yaml'), 'instances_under_load: 0\n');
  const records: ExecutionRecord[] = [];
  const rt = new InferenceRuntime({
    repository: new ModelRepository(repo), config: runtimeSchema.parse({ execution_providers: ['cpu'], execution: 'worker' }),
    dataDir: tempDir(t, 'edge-data-'), log, observer: { onExecution: (e) => records.push(e) },
  });
  await rt.start();
  t.teardown(() => rt.close());
  t.equal(rt.modelInfo('classifier').state, 'READY');
  const rnd = seeded(22);
  const streams = (n: number, frames: number): Promise<unknown> => Promise.all(Array.from({ length: n }, async () => {
    const key = {};
    for (let k = 0; k < frames; k++) await rt.submit('classifier', undefined, { inputs: { image: randomImage(rnd) }, streamKey: key });
  }));
  const opening = (): number => lines.findIndex((l) => l.msg === 'opening instances under load');

  await streams(1, 5);
  await new Promise((r) => setTimeout(r, 200));
  t.equal(rt.modelInfo('classifier').instancesUnderLoad, 0, 'a lone stream opens none');
  t.equal(opening(), -1, 'nor starts opening them');

  // Load arrives while tiny reloads: the sessions open once tiny is ready, not during its load (a load times
  // its runs to place the model, and their warm-up would share the cores).
  const reloading = rt.loadModel('tiny');
  await new Promise((r) => setImmediate(r)); // its load has begun (it opens a worker thread, far longer than this)
  await streams(6, 4);
  await reloading;
  const deadline = Date.now() + 30_000;
  while (rt.modelInfo('classifier').instancesUnderLoad < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  t.equal(rt.modelInfo('classifier').instancesUnderLoad, 2, 'several streams waiting for each other open them, and model info counts them');
  t.equal(rt.modelInfo('classifier').instanceCount, 1, 'beside the one configured instance');
  const tinyReady = lines.map((l) => `${l.msg} ${l.model}`).lastIndexOf('model ready tiny');
  t.ok(tinyReady >= 0 && opening() > tinyReady, `they started opening after tiny's reload was ready (log lines ${tinyReady} and ${opening()})`);
  records.length = 0;
  await streams(6, 4);
  t.ok(records.some((r) => r.underLoad), 'several streams ran on them');

  // A runtime closed while they are still opening: close waits for them and releases them.
  const second = await startRuntime(t, copyDemoRepo(t, ['classifier']), { execution: 'worker' });
  await Promise.all(Array.from({ length: 4 }, () => second.submit('classifier', undefined, { inputs: { image: randomImage(rnd) }, streamKey: {} })));
  await t.resolves(second.close(), 'close during the background open resolves');
});
