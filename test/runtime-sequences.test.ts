import t from 'tap';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { DeadlineExceededError, FailedPreconditionError, ResourceExhaustedError } from '../agent/errors.js';
import { readModelConfig } from '../agent/models/index.js';
import type { InferenceResult, Tensor } from '../agent/runtime/index.js';
import { attr, DataType, encodeModel, floatTensor, int64Tensor, makeModel, makeNode, valueInfo } from '../agent/compress/onnx-graph.js';
import { RequestSources } from '../agent/server/request-sources.js';
import { mulberry32 as seeded } from '../scripts/demo-models.js';
import { copyDemoRepo, startRuntime, tempDir } from './helpers/runtime.js';

// The sequence and batching defects found by a review: each test here failed on the code before the fix.

const MODES = ['inline', 'worker'] as const;

function f32(shape: number[], rnd: () => number): Tensor {
  const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
  for (let i = 0; i < data.length; i++) data[i] = rnd() * 2 - 1;
  return { dtype: 'float32', shape, data };
}

const y = (r: InferenceResult): number[] => Array.from(r.outputs.y?.data as Float32Array);

for (const execution of MODES) {
  t.test(`${execution}: a sequence ended while its frame is queued fails nobody else's frame in the batch`, async (t) => {
    const rt = await startRuntime(t, copyDemoRepo(t, ['filter']), { execution });
    const rnd = seeded(11);
    for (const id of ['A', 'B', 'C']) await rt.submit('filter', undefined, { inputs: { x: f32([1, 8], rnd) }, sequence: { id, start: true } });
    const frame = (id: string): Promise<InferenceResult> => rt.submit('filter', undefined, { inputs: { x: f32([1, 8], rnd) }, sequence: { id }, streamKey: {} });
    const running = frame('A');
    const queued = [frame('B'), frame('C')];
    rt.endSequence('B'); // B's stream closed: its queued frame still runs on its state, then the state is freed
    const results = await Promise.allSettled([running, ...queued]);
    t.same(results.map((r) => r.status), ['fulfilled', 'fulfilled', 'fulfilled'], 'every accepted frame is answered');
    await t.rejects(frame('B'), FailedPreconditionError, 'the ended sequence takes no more frames');
    t.ok(y(await frame('C')).length === 4, 'C goes on');
  });

  t.test(`${execution}: a frame onnxruntime refuses fails alone, not the batch it was gathered into`, async (t) => {
    const bytes = encodeModel(makeModel({ graph: {
      name: 'emb',
      nodes: [makeNode('Gather', ['table', 'idx'], ['emb'], { axis: attr.int(0) }, 'gather')],
      initializers: [floatTensor('table', [10, 4], Array.from({ length: 40 }, (_, i) => i))],
      inputs: [valueInfo('idx', DataType.INT64, ['N', 1])],
      outputs: [valueInfo('emb', DataType.FLOAT, ['N', 1, 4])],
    } }));
    const repo = join(tempDir(t, 'edge-repo-'), 'models');
    mkdirSync(join(repo, 'emb', '1'), { recursive: true });
    writeFileSync(join(repo, 'emb', '1', 'model.onnx'), bytes);
    const rt = await startRuntime(t, repo, { execution });
    const streams = [{}, {}, {}, {}];
    const idx = (k: number, v: number): Promise<InferenceResult> =>
      rt.submit('emb', undefined, { inputs: { idx: { dtype: 'int64', shape: [1, 1], data: BigInt64Array.from([BigInt(v)]) } }, streamKey: streams[k] as object });
    await Promise.all([idx(0, 1), idx(1, 2), idx(2, 3)]);
    const results = await Promise.allSettled([idx(3, 0), idx(0, 1), idx(1, 99), idx(2, 3)]);
    t.same(results.map((r) => r.status), ['fulfilled', 'fulfilled', 'rejected', 'fulfilled'], 'only the out-of-range index fails');
    const bad = results[2] as PromiseRejectedResult;
    t.match(String(bad.reason), /idx=99/, 'its error is onnxruntime\'s reason');
    const good = results[3] as PromiseFulfilledResult<InferenceResult>;
    t.same(Array.from(good.value.outputs.emb?.data as Float32Array), [12, 13, 14, 15], 'the others got their own rows');
    t.same(Array.from((await idx(0, 5)).outputs.emb?.data as Float32Array), [20, 21, 22, 23], 'the model keeps serving');
  });

  t.test(`${execution}: end then start of the same id, pipelined, run in the order sent`, async (t) => {
    const rt = await startRuntime(t, copyDemoRepo(t, ['filter']), { execution });
    const reference = await startRuntime(t, copyDemoRepo(t, ['filter']), { execution });
    const rnd = seeded(12);
    const xs = [f32([1, 8], rnd), f32([1, 8], rnd), f32([1, 8], rnd)];
    const submit = (r: typeof rt, id: string, x: Tensor, start: boolean, end: boolean): Promise<InferenceResult> =>
      r.submit('filter', undefined, { inputs: { x }, sequence: { id, start, end } });
    await submit(rt, 'S', xs[0] as Tensor, true, false);
    // T keeps the instance busy so S's end and restart are both queued before either runs.
    const busy = submit(rt, 'T', xs[0] as Tensor, true, false);
    const ended = submit(rt, 'S', xs[1] as Tensor, false, true);
    const restarted = submit(rt, 'S', xs[2] as Tensor, true, false);
    const [, e, s] = await Promise.all([busy, ended, restarted]);
    await submit(reference, 'S', xs[0] as Tensor, true, false);
    const wantEnd = await submit(reference, 'S', xs[1] as Tensor, false, true);
    const wantStart = await submit(reference, 'R', xs[2] as Tensor, true, false);
    t.same(y(e), y(wantEnd), 'the end step continued the old state');
    t.same(y(s), y(wantStart), 'the restart began from fresh state');
    t.ok(y(await submit(rt, 'S', xs[0] as Tensor, false, false)).length === 4, 'the restarted sequence goes on');
  });
}

for (const execution of MODES) {
  t.test(`${execution}: a sequence's frames run in the order sent, even when a later one could join a batch the earlier one cannot`, async (t) => {
    // h_out = h_in + sum(x), x [N,T]: frames of different lengths T never share a batch.
    const bytes = encodeModel(makeModel({ graph: {
      name: 'acc',
      nodes: [
        makeNode('ReduceSum', ['x', 'ax'], ['s'], { keepdims: attr.int(1) }, 'sum'),
        makeNode('Add', ['h_in', 's'], ['h_out'], {}, 'add'),
        makeNode('Identity', ['h_out'], ['y'], {}, 'id'),
      ],
      initializers: [int64Tensor('ax', [1], [1])],
      inputs: [valueInfo('x', DataType.FLOAT, ['N', 'T']), valueInfo('h_in', DataType.FLOAT, ['N', 1])],
      outputs: [valueInfo('y', DataType.FLOAT, ['N', 1]), valueInfo('h_out', DataType.FLOAT, ['N', 1])],
    } }));
    const repo = join(tempDir(t, 'edge-repo-'), 'models');
    mkdirSync(join(repo, 'acc', '1'), { recursive: true });
    writeFileSync(join(repo, 'acc', '1', 'model.onnx'), bytes);
    writeFileSync(join(repo, 'acc', 'config.yaml'), 'max_batch_size: 8\nstate:\n  - input: h_in\n    output: h_out\n');
    const rt = await startRuntime(t, repo, { execution });
    const sub = (id: string, vals: number[], start = false): Promise<number> =>
      rt.submit('acc', undefined, { inputs: { x: { dtype: 'float32', shape: [1, vals.length], data: Float32Array.from(vals) } }, sequence: { id, start }, streamKey: {} })
        .then((r) => (r.outputs.y?.data as Float32Array)[0] as number);
    for (const id of ['S', 'U', 'B']) await sub(id, [1], true);
    const busy = sub('B', [100]); // holds the instance while the rest queue
    const u = sub('U', [1]);
    const s1 = sub('S', [1, 1]); // cannot join U's batch (T = 2)
    const s2 = sub('S', [1]); // could, but must wait for S's first frame
    const [, , r1, r2] = await Promise.all([busy, u, s1, s2]);
    t.same([r1, r2], [3, 4], 'S: 1, then +2, then +1');
  });
}

t.test('a sequence ended while it runs is freed when the run returns, and cannot be continued', async (t) => {
  const rt = await startRuntime(t, copyDemoRepo(t, ['filter']), { execution: 'worker', max_sequences: 2 });
  const rnd = seeded(13);
  const runs = ['s0', 's1'].map((id) => rt.submit('filter', undefined, { inputs: { x: f32([1, 8], rnd) }, sequence: { id, start: true } }));
  rt.endSequence('s0');
  rt.endSequence('s1');
  await Promise.all(runs);
  await t.rejects(rt.submit('filter', undefined, { inputs: { x: f32([1, 8], rnd) }, sequence: { id: 's0' } }), FailedPreconditionError);
  const fresh = await Promise.all(['n0', 'n1'].map((id) => rt.submit('filter', undefined, { inputs: { x: f32([1, 8], rnd) }, sequence: { id, start: true } })));
  t.equal(fresh.length, 2, 'both slots were freed for new sequences');
  await t.rejects(rt.submit('filter', undefined, { inputs: { x: f32([1, 8], rnd) }, sequence: { id: 'n2', start: true } }), ResourceExhaustedError, 'the limit still holds');
});

t.test('a stream\'s own sequence outlives the idle timeout and a version switch; a client sequence does not', async (t) => {
  const repo = copyDemoRepo(t, ['filter']);
  const rt = await startRuntime(t, repo, { sequence_idle_timeout_s: 0.1 });
  const rnd = seeded(14);
  const x = (): Tensor => f32([1, 8], rnd);
  await rt.submit('filter', undefined, { inputs: { x: x() }, sequence: { id: 'stream-1', start: true, owned: true } });
  await rt.submit('filter', undefined, { inputs: { x: x() }, sequence: { id: 'client-1', start: true } });
  await new Promise((r) => setTimeout(r, 400)); // the sweeper runs every 50 ms
  t.ok(y(await rt.submit('filter', undefined, { inputs: { x: x() }, sequence: { id: 'stream-1', owned: true } })).length === 4, 'the idle stream goes on');
  await t.rejects(rt.submit('filter', undefined, { inputs: { x: x() }, sequence: { id: 'client-1' } }), /never started, has expired/, 'the idle client sequence expired');

  await rt.submit('filter', undefined, { inputs: { x: x() }, sequence: { id: 'client-2', start: true } });
  await rt.loadModel('filter'); // a reload: a new scheduler for the same version
  const after = await rt.submit('filter', undefined, { inputs: { x: x() }, sequence: { id: 'stream-1', owned: true } });
  t.ok(y(after).length === 4, 'the stream goes on after the switch, from fresh state');
  await t.rejects(rt.submit('filter', undefined, { inputs: { x: x() }, sequence: { id: 'client-2' } }), /another version of the model/, 'a client sequence is told to start again');
});

t.test('two reloads while the first old version still drains: inFlight, drain and close count every version', async (t) => {
  // One session, no sessions for load: the backlog below is sized against one session's pace, and sessions
  // for load would run it about a fifth faster (and the second reload waits for the first one's to open).
  const repo = copyDemoRepo(t, ['classifier']);
  writeFileSync(join(repo, 'classifier', 'config.yaml'), 'instances_under_load: 0\n');
  const rt = await startRuntime(t, repo, { execution: 'worker' });
  const rnd = seeded(15);
  const image = f32([1, 3, 112, 112], rnd);
  let answered = 0;
  const frames: Promise<InferenceResult>[] = [];
  // While the first reload loads, frames keep arriving on the version it replaces, about twice as fast as it
  // runs them: a backlog that scales with the load time and so outlasts the second reload, on any machine.
  let reloaded = false;
  const first = rt.loadModel('classifier').then(() => { reloaded = true; });
  while (!reloaded && frames.length < 1000) {
    for (let i = 0; i < 2; i++) frames.push(rt.submit('classifier', undefined, { inputs: { image } }).then((r) => { answered++; return r; }));
    await new Promise((r) => setTimeout(r, 1));
  }
  await first;
  await rt.loadModel('classifier');
  t.ok(answered < frames.length, `the backlog still drains after both reloads (${answered} of ${frames.length} answered)`);
  t.equal(rt.inFlight(), frames.length - answered, 'inFlight counts frames on both draining versions');
  await rt.close();
  t.equal(answered, frames.length, 'close resolved only after every accepted frame was answered');
});

t.test('preferred_batch_sizes: larger than max_batch_size is a config error; larger than a run may stack never holds a full batch', async (t) => {
  const repo = copyDemoRepo(t, ['tiny']);
  writeFileSync(join(repo, 'tiny', 'config.yaml'), 'max_batch_size: 4\ndynamic_batching: { preferred_batch_sizes: [8] }\n');
  t.throws(() => readModelConfig(join(repo, 'tiny')), /dynamic_batching\.preferred_batch_sizes\[0\]: 8 is larger than max_batch_size 4/);

  // max_batch_size left at its default (32); a full 32-row batch must not wait out a 20 s delay for 64 rows.
  writeFileSync(join(repo, 'tiny', 'config.yaml'), 'dynamic_batching: { preferred_batch_sizes: [64], max_queue_delay_us: 20000000 }\n');
  const rt = await startRuntime(t, repo, { execution: 'worker' });
  const streams = Array.from({ length: 3 }, () => ({}));
  const x = (rows: number): Tensor => ({ dtype: 'float32', shape: [rows, 1024], data: new Float32Array(rows * 1024) });
  const first = rt.submit('tiny', undefined, { inputs: { x: x(1) }, streamKey: streams[0] as object });
  const full = [rt.submit('tiny', undefined, { inputs: { x: x(16) }, streamKey: streams[1] as object }), rt.submit('tiny', undefined, { inputs: { x: x(16) }, streamKey: streams[2] as object })];
  const winner = await Promise.race([Promise.all(full).then(() => 'ran'), new Promise((r) => setTimeout(() => r('held'), 10_000).unref())]);
  t.equal(winner, 'ran', 'the full batch ran without waiting out the delay');
  void first;
});

t.test('a queued frame is answered DEADLINE_EXCEEDED when its deadline passes, before the run ahead of it ends', async (t) => {
  const rt = await startRuntime(t, copyDemoRepo(t, ['classifier']), { execution: 'worker' });
  const rnd = seeded(16);
  const order: string[] = [];
  const busy = rt.submit('classifier', undefined, { inputs: { image: f32([32, 3, 112, 112], rnd) } }).then(() => order.push('busy run'));
  const late = rt.submit('classifier', undefined, { inputs: { image: f32([1, 3, 112, 112], rnd) }, deadline: performance.now() + 2 })
    .catch((err: unknown) => { order.push(err instanceof DeadlineExceededError ? 'deadline' : String(err)); });
  await Promise.all([busy, late]);
  t.same(order, ['deadline', 'busy run']);
});

t.test('KServe sources: one request at a time is one source; requests sent together are a source each', async (t) => {
  const sources = new RequestSources();
  const a = sources.begin('peer-a');
  sources.end('peer-a');
  await new Promise((r) => setImmediate(r));
  t.equal(sources.begin('peer-a'), 'peer-a', 'a sequential client keeps its connection as its source');
  t.equal(a, 'peer-a');
  sources.end('peer-a');
  await new Promise((r) => setImmediate(r));
  const burst = [sources.begin('peer-b'), sources.begin('peer-b'), sources.begin('peer-b')];
  t.equal(burst[0], 'peer-b');
  t.ok(typeof burst[1] === 'object' && typeof burst[2] === 'object' && burst[1] !== burst[2], 'overlapping requests are separate sources');
  for (let i = 0; i < 3; i++) sources.end('peer-b');
  await new Promise((r) => setTimeout(r, 30));
  sources.end(sources.begin('peer-d') === 'peer-d' ? 'peer-d' : 'unexpected');
  await new Promise((r) => setImmediate(r));
  t.equal(sources.size, 0, 'idle clients are forgotten at the next turn with traffic');

  // In the runtime: a lone client under one source never waits out the queue delay.
  const repo = copyDemoRepo(t, ['tiny']);
  writeFileSync(join(repo, 'tiny', 'config.yaml'), 'max_batch_size: 8\ndynamic_batching: { max_queue_delay_us: 20000000 }\n');
  const rt = await startRuntime(t, repo, { execution: 'worker' });
  const x: Tensor = { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024) };
  for (let i = 0; i < 3; i++) {
    const winner = await Promise.race([rt.submit('tiny', undefined, { inputs: { x }, source: 'peer-c' }).then(() => 'ran'), new Promise((r) => setTimeout(() => r('held'), 10_000).unref())]);
    t.equal(winner, 'ran', `request ${i + 1} ran without waiting out the delay`);
  }
});
