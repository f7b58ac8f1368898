import t from 'tap';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import type { Worker } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';
import { runtimeSchema } from '../agent/config/schema.js';
import { createLogger } from '../agent/logger.js';
import type { InferenceRuntime, RuntimeObserver, Tensor } from '../agent/runtime/index.js';
import { PROTO_DIR } from '../agent/server/proto-path.js';
import type { SessionRequest } from '../agent/runtime/session-factory.js';
import { createInstance, type FeedTensor, type InstanceOptions, type SessionInstance } from '../agent/runtime/session-instance.js';
import { startTestAgent } from './helpers/agent.js';
import { DEMO_REPO, copyDemoRepo, startRuntime, tempDir } from './helpers/runtime.js';
import { mulberry32 as seeded } from '../scripts/demo-models.js';

// Worker threads die here two ways, through the instance's own thread handle (a private field, reached here
// only): terminate() while idle, as the review reproduced it (what an out-of-memory looks like from the main
// thread: an exit), and an uncaught exception in the thread with a batch posted to it. (terminate() while the
// thread is inside onnxruntime's native run can abort the whole process, so it is not used for that.)

interface LogRecord { readonly msg: string; readonly model?: string; readonly reason?: string; readonly [key: string]: unknown }

/** A logger whose records the test reads, and a way to wait for one. */
function capturedLog(): { options: InstanceOptions; records: LogRecord[]; next(msg: string): Promise<LogRecord> } {
  const records: LogRecord[] = [];
  let watchers: { msg: string; resolve: (r: LogRecord) => void }[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString().split('\n').filter((l) => l.length > 0)) {
        const r = JSON.parse(line) as LogRecord;
        records.push(r);
        watchers = watchers.filter((w) => (w.msg === r.msg ? (w.resolve(r), false) : true));
      }
      done();
    },
  });
  return {
    options: { log: createLogger({ level: 'info', destination }) },
    records,
    next: (msg) => new Promise((resolve) => watchers.push({ msg, resolve })),
  };
}

function workerOf(instance: SessionInstance): Worker {
  const worker = (instance as unknown as { worker?: Worker }).worker;
  if (!worker) throw new Error('the instance has no worker thread right now');
  return worker;
}

/**
 * Crashes the instance's thread as the next batch is posted to it: a run message it cannot read goes first and
 * throws in its message handler (an uncaught exception in the thread), so the batch behind it is in flight,
 * posted and never answered, when the thread dies.
 */
function crashOnNextBatch(instance: SessionInstance): void {
  const worker = workerOf(instance);
  const post = worker.postMessage.bind(worker);
  worker.postMessage = (message: { type: string }, transfer?: readonly ArrayBuffer[]) => {
    if (message.type === 'run') post({ type: 'run', id: -1, feeds: null });
    post(message, transfer);
  };
}

function instancesOf(rt: InferenceRuntime, model: string): readonly SessionInstance[] {
  const slots = (rt as unknown as { slots: Map<string, { active?: { model: { instances: readonly SessionInstance[] } } }> }).slots;
  const instances = slots.get(model)?.active?.model.instances;
  if (!instances) throw new Error(`model '${model}' has no active version`);
  return instances;
}

function request(model: string, path: string): SessionRequest {
  const cfg = runtimeSchema.parse({});
  return { model, path, providers: ['cpu'], providerOptions: cfg.provider_options, graphOptimization: cfg.graph_optimization };
}

function randomTensor(shape: number[], rnd: () => number): Tensor {
  const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
  for (let i = 0; i < data.length; i++) data[i] = rnd() * 2 - 1;
  return { dtype: 'float32', shape, data };
}

function feed(x: Tensor): FeedTensor {
  return { dtype: x.dtype, data: x.data, dims: x.shape };
}

/** What a plain onnxruntime session returns for `x` on the input `name` of `path`. */
async function direct(path: string, name: string, xs: readonly Tensor[]): Promise<Float32Array[]> {
  const s = await ort.InferenceSession.create(path);
  const out: Float32Array[] = [];
  for (const x of xs) {
    const r = await s.run({ [name]: new ort.Tensor('float32', x.data as Float32Array, x.shape as number[]) });
    out.push(Object.values(r)[0]?.data as Float32Array);
  }
  await s.release();
  return out;
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = a.length === b.length ? 0 : Infinity;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs((a[i] as number) - (b[i] as number)));
  return m;
}

const CLASSIFIER = join(DEMO_REPO, 'classifier', '1', 'model.onnx');

t.test('a worker instance: the batch on a dying thread is answered UNAVAILABLE, the next runs on a new thread', async (t) => {
  const log = capturedLog();
  const instance = await createInstance(request('classifier', CLASSIFIER), 'worker', log.options);
  t.teardown(() => instance.release());
  const rnd = seeded(11);
  const inFlight = randomTensor([8, 3, 112, 112], rnd);
  const after = randomTensor([2, 3, 112, 112], rnd);
  const [want] = await direct(CLASSIFIER, 'image', [after]);

  await t.rejects(instance.run({ image: { dtype: 'float32', data: new Float32Array(300), dims: [1, 3, 10, 10] } }),
    { code: 'INTERNAL', message: /^onnxruntime failed on model 'classifier': / }, 'an onnxruntime error in the thread names the model');
  const first = workerOf(instance);
  crashOnNextBatch(instance);
  await t.rejects(instance.run({ image: feed(inFlight) }), { code: 'UNAVAILABLE', message: /^model 'classifier': its inference worker failed \(.+\) while running this batch/ },
    'the batch the thread held is answered, naming the model');
  const out = await instance.run({ image: feed(after) });
  t.ok(maxAbsDiff(out.logits?.data as Float32Array, want as Float32Array) < 1e-5, 'the next batch equals a direct run');
  t.not(workerOf(instance), first, 'it ran on a new thread');
  t.match(log.records.find((r) => r.msg === 'inference worker died'), { model: 'classifier', reason: /^failed \(/, in_flight: 1 }, 'the death is logged');
  t.match(log.records.find((r) => r.msg === 'inference worker restarted'), { model: 'classifier', provider: 'cpu' }, 'the restart is logged');
  await t.resolves(instance.release(), 'release resolves');
});

t.test('a worker instance: two batches stacked while its thread restarts keep their own inputs', async (t) => {
  const log = capturedLog();
  const instance = await createInstance(request('classifier', CLASSIFIER), 'worker', log.options);
  t.teardown(() => instance.release());
  const rnd = seeded(13);
  const xs = [randomTensor([2, 3, 112, 112], rnd), randomTensor([2, 3, 112, 112], rnd)];
  const want = await direct(CLASSIFIER, 'image', xs);
  const died = log.next('inference worker died');
  const restarted = log.next('inference worker restarted');
  await workerOf(instance).terminate();
  await died;
  // As the scheduler does with a batch handed over early: stack into the instance's buffer, run, and stack the
  // next one while the first still waits for the new thread.
  const runs = xs.map((x) => {
    const buffer = instance.inputBuffer('image', 'float32', x.data.length);
    (buffer as Float32Array).set(x.data as Float32Array);
    return instance.run({ image: { dtype: 'float32', data: buffer, dims: x.shape } });
  });
  const outs = await Promise.all(runs);
  await restarted;
  outs.forEach((o, i) => t.ok(maxAbsDiff(o.logits?.data as Float32Array, want[i] as Float32Array) < 1e-5, `batch ${i} ran on its own inputs`));
});

t.test('releasing a worker instance whose thread died resolves, stops the restart and refuses later runs', async (t) => {
  for (const when of ['while restarting', 'after restarting'] as const) {
    const log = capturedLog();
    const instance = await createInstance(request('classifier', CLASSIFIER), 'worker', log.options);
    const restarted = log.next('inference worker restarted');
    await workerOf(instance).terminate();
    if (when === 'after restarting') await restarted;
    await t.resolves(instance.release(), `${when}: release resolves`);
    await t.resolves(instance.release(), `${when}: a second release resolves too`);
    await t.rejects(instance.run({ image: feed(randomTensor([1, 3, 112, 112], seeded(13))) }), { code: 'UNAVAILABLE', message: /^model 'classifier': this instance was released/ },
      `${when}: a run after release is refused`);
  }
});

t.test('a model whose worker cannot be reopened: frames fail fast, restarts stop after the configured tries', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'model.onnx');
  cpSync(join(DEMO_REPO, 'tiny', '1', 'model.onnx'), path);
  const log = capturedLog();
  const delays = [0, 20, 20];
  const instance = await createInstance(request('tiny', path), 'worker', { ...log.options, respawnDelaysMs: delays });
  t.teardown(() => instance.release());
  writeFileSync(path, 'no longer an onnx model'); // every reopen now fails
  const x = { x: feed(randomTensor([1, 1024], seeded(14))) };
  const gaveUp = log.next('inference worker keeps failing: instance stopped restarting it');

  await workerOf(instance).terminate();
  await t.rejects(instance.run(x), { code: 'UNAVAILABLE', message: /^model 'tiny': restarting its inference worker failed \(model 'tiny' .* failed to load/ },
    'a run waiting for the first restart is told it failed');
  await t.rejects(instance.run(x), { code: 'UNAVAILABLE', message: /^model 'tiny': .*; restarting it \(2 failures in a row\)/ },
    'while the restart backs off, a run fails at once');
  t.match(await gaveUp, { model: 'tiny', failures_in_a_row: delays.length + 1 }, 'the instance gives up and says so');
  t.equal(log.records.filter((r) => r.msg === 'restarting inference worker').length, delays.length, 'one reopen per configured delay, no more');
  await t.rejects(instance.run(x), { code: 'UNAVAILABLE', message: /^model 'tiny': .*stopped restarting it until the model is reloaded/ }, 'later runs are refused');
  await t.resolves(instance.release(), 'release resolves');
});

/**
 * A runtime serving one demo model from two worker instances, `n` seeded random frames of `shape`, and what a
 * direct onnxruntime run of the model file returns for each of them.
 */
async function twoWorkers(t: Parameters<typeof startRuntime>[0], model: string, input: string, shape: number[], n: number, seed: number) {
  const repo = copyDemoRepo(t, [model]);
  writeFileSync(join(repo, model, 'config.yaml'), 'max_batch_size: 32\ninstance_count: 2\n');
  const rt = await startRuntime(t, repo, { execution: 'worker' });
  const rnd = seeded(seed);
  const xs = Array.from({ length: n }, () => randomTensor(shape, rnd));
  const path = join(repo, model, '1', 'model.onnx');
  return { rt, xs, path, want: await direct(path, input, xs) };
}

t.test('runtime: with instance_count 2, frames after a worker dies are answered correctly and unload/close complete', async (t) => {
  const { rt, xs, want } = await twoWorkers(t, 'tiny', 'x', [1, 1024], 20, 15);

  await workerOf(instancesOf(rt, 'tiny')[0] as SessionInstance).terminate();
  for (let i = 0; i < xs.length; i++) {
    const res = await rt.submit('tiny', undefined, { inputs: { x: xs[i] as Tensor } });
    t.ok(maxAbsDiff(res.outputs.y?.data as Float32Array, want[i] as Float32Array) < 1e-5, `frame ${i} after the death equals a direct run`);
  }
  t.equal(rt.modelInfo('tiny').state, 'READY');
  await workerOf(instancesOf(rt, 'tiny')[1] as SessionInstance).terminate();
  await t.resolves(rt.unloadModel('tiny'), 'unloading after a death completes');
  await t.resolves(rt.close(), 'closing completes');
});

t.test('runtime: frames in flight on dying workers are answered UNAVAILABLE, later frames are served', async (t) => {
  const { rt, xs, want } = await twoWorkers(t, 'classifier', 'image', [1, 3, 112, 112], 24, 16);

  for (const instance of instancesOf(rt, 'classifier')) crashOnNextBatch(instance);
  const settled = await Promise.allSettled(xs.slice(0, 16).map((x) => rt.submit('classifier', undefined, { inputs: { image: x } })));
  const failed = settled.filter((s): s is PromiseRejectedResult => s.status === 'rejected');
  t.ok(failed.length > 0, `the frames of the batches the threads held failed (${failed.length} of ${settled.length})`);
  for (const f of failed) t.match(f.reason, { code: 'UNAVAILABLE', message: /^model 'classifier': its inference worker failed \(.+\) while running this batch/ }, 'failed with UNAVAILABLE naming the model');
  settled.forEach((s, i) => {
    if (s.status === 'fulfilled') t.ok(maxAbsDiff(s.value.outputs.logits?.data as Float32Array, want[i] as Float32Array) < 1e-5, `frame ${i}, served, equals a direct run`);
  });
  const later = await Promise.all(xs.slice(16).map((x) => rt.submit('classifier', undefined, { inputs: { image: x } })));
  later.forEach((r, i) => t.ok(maxAbsDiff(r.outputs.logits?.data as Float32Array, want[16 + i] as Float32Array) < 1e-5, `later frame ${16 + i} equals a direct run`));
  await t.resolves(rt.close(), 'closing completes');
});

t.test('runtime: an instance whose worker cannot restart is passed over; with none serving, frames fail at once', async (t) => {
  const { rt, xs, path, want } = await twoWorkers(t, 'tiny', 'x', [1, 1024], 10, 17);
  writeFileSync(path, 'no longer an onnx model'); // a thread that dies now cannot reopen the model
  const [first, second] = instancesOf(rt, 'tiny') as [SessionInstance, SessionInstance];
  const unavailable = async (instance: SessionInstance): Promise<void> => {
    while (instance.available) await new Promise((r) => setTimeout(r, 5));
  };

  await workerOf(first).terminate();
  await unavailable(first); // its immediate restart failed: it backs off before the next
  for (let i = 0; i < xs.length; i++) {
    const res = await rt.submit('tiny', undefined, { inputs: { x: xs[i] as Tensor } });
    t.ok(maxAbsDiff(res.outputs.y?.data as Float32Array, want[i] as Float32Array) < 1e-5, `frame ${i} is served by the other instance`);
  }

  await workerOf(second).terminate();
  await unavailable(second);
  await t.rejects(rt.submit('tiny', undefined, { inputs: { x: xs[0] as Tensor } }), { code: 'UNAVAILABLE', message: /none of its inference instances is serving/ },
    'with no instance serving, a frame is refused instead of waiting');
  await t.resolves(rt.close(), 'closing completes');
});

t.test('runtime: once every instance stopped restarting its worker, the model reports UNAVAILABLE with the reason; a reload brings it back', async (t) => {
  const repo = copyDemoRepo(t, ['tiny']);
  const events: Parameters<NonNullable<RuntimeObserver['onModelEvent']>>[0][] = [];
  const rt = await startRuntime(t, repo, { execution: 'worker', worker_restart_delays_ms: [0, 10] }, { onModelEvent: (e) => events.push(e) });
  const path = join(repo, 'tiny', '1', 'model.onnx');
  const good = readFileSync(path);
  writeFileSync(path, 'no longer an onnx model');
  events.length = 0;
  await workerOf(instancesOf(rt, 'tiny')[0] as SessionInstance).terminate();
  while (rt.modelInfo('tiny').state === 'READY') await new Promise((r) => setTimeout(r, 5));
  t.match(rt.modelInfo('tiny'), { state: 'UNAVAILABLE', reason: /stopped restarting it until the model is reloaded/ }, 'health, ModelReady and /v1/status see it down, with why');
  t.match(events, [{ type: 'model-unavailable', model: 'tiny', version: 1, reason: /stopped restarting it until the model is reloaded/ }],
    'observers are told once, as it happens (telemetry model events, health watchers)');
  writeFileSync(path, good);
  await rt.loadModel('tiny');
  t.equal(rt.modelInfo('tiny').state, 'READY', 'a reload serves again');
  t.match(events.at(-1), { type: 'model-ready', model: 'tiny', version: 1 }, 'and says so');
  const res = await rt.submit('tiny', undefined, { inputs: { x: randomTensor([1, 1024], seeded(18)) } });
  t.same(res.outputs.y?.shape, [1, 16]);
});

t.test('agent: a gRPC health Watch of a model hears NOT_SERVING when its last worker gives up, and SERVING after a reload', async (t) => {
  const a = await startTestAgent(t, { models: ['tiny'], config: { runtime: { execution: 'worker', worker_restart_delays_ms: [0, 10] } } });
  const pkg = grpc.loadPackageDefinition(protoLoader.loadSync(join(PROTO_DIR, 'grpc', 'health', 'v1', 'health.proto'), { keepCase: true, enums: String, defaults: true })) as unknown as {
    grpc: { health: { v1: { Health: grpc.ServiceClientConstructor } } };
  };
  const client = new pkg.grpc.health.v1.Health(a.tcp, grpc.credentials.createInsecure()) as unknown as grpc.Client & { Watch(req: { service: string }): grpc.ClientReadableStream<{ status: string }> };
  const watch = client.Watch({ service: 'tiny' });
  t.teardown(() => { watch.cancel(); client.close(); });
  const heard: string[] = [];
  const waiters: (() => void)[] = [];
  watch.on('data', (m: { status: string }) => { heard.push(m.status); for (const w of waiters.splice(0)) w(); });
  watch.on('error', () => undefined); // the cancel at teardown
  const hear = async (n: number): Promise<void> => { while (heard.length < n) await new Promise<void>((r) => waiters.push(r)); };
  await hear(1);
  t.same(heard, ['SERVING'], 'the watch starts SERVING');

  const path = join(a.repo, 'tiny', '1', 'model.onnx');
  const good = readFileSync(path);
  writeFileSync(path, 'no longer an onnx model');
  await workerOf(instancesOf(a.agent.runtime, 'tiny')[0] as SessionInstance).terminate();
  await hear(2);
  t.same(heard, ['SERVING', 'NOT_SERVING'], 'pushed NOT_SERVING without anyone asking');
  t.equal(a.agent.runtime.modelInfo('tiny').state, 'UNAVAILABLE', 'the model is down');
  const down = a.agent.metrics.closeInterval();
  t.match(down.model_events.at(-1), { type: 'model-unavailable', model: 'tiny', version: 1, reason: /stopped restarting it/ }, 'telemetry records the event');
  t.match(down.models.find((m) => m.model === 'tiny'), { version: 1, state: 'unavailable', reason: /stopped restarting it/ }, 'and reports the version unavailable, with why');
  t.match(a.agent.metrics.closeInterval().models.find((m) => m.model === 'tiny'), { state: 'unavailable' }, 'until it is reloaded (not forgotten)');

  writeFileSync(path, good);
  await a.agent.runtime.loadModel('tiny');
  await hear(3);
  t.same(heard, ['SERVING', 'NOT_SERVING', 'SERVING'], 'and SERVING again once reloaded');
  t.match(a.agent.metrics.closeInterval().models.find((m) => m.model === 'tiny'), { state: 'ready' }, 'telemetry: ready again');
});
