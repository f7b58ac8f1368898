import t from 'tap';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { DeadlineExceededError, FrameDroppedError, InvalidInputError, ModelNotFoundError, FailedPreconditionError } from '../agent/errors.js';
import { pendingBytes, tensorBytes, tensorFromBytes, type ExecutionRecord, type Tensor } from '../agent/runtime/index.js';
import { DEMO_REPO, startRuntime, copyDemoRepo } from './helpers/runtime.js';
import { mulberry32 as seeded } from '../scripts/demo-models.js';

function randomTensor(shape: number[], rnd: () => number): Tensor {
  const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
  for (let i = 0; i < data.length; i++) data[i] = rnd() * 2 - 1;
  return { dtype: 'float32', shape, data };
}

async function direct(model: string, feeds: Record<string, Tensor>): Promise<Record<string, Float32Array>> {
  const s = await ort.InferenceSession.create(join(DEMO_REPO, model, '1', 'model.onnx'));
  const inputs: Record<string, ort.Tensor> = {};
  for (const [k, v] of Object.entries(feeds)) inputs[k] = new ort.Tensor(v.dtype, v.data as Float32Array, v.shape as number[]);
  const out = await s.run(inputs);
  await s.release();
  return Object.fromEntries(Object.entries(out).map(([k, v]) => [k, v.data as Float32Array]));
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = a.length === b.length ? 0 : Infinity;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs((a[i] as number) - (b[i] as number)));
  return m;
}

t.test('a frame returns what a direct session.run returns', async (t) => {
  const rt = await startRuntime(t, copyDemoRepo(t, ['classifier']));
  const input = randomTensor([1, 3, 112, 112], seeded(1));
  const res = await rt.submit('classifier', undefined, { inputs: { image: input } });
  const want = await direct('classifier', { image: input });
  t.same(res.outputs.logits?.shape, [1, 10]);
  t.ok(maxAbsDiff(res.outputs.logits?.data as Float32Array, want.logits as Float32Array) < 1e-5, 'logits equal direct run');
  t.equal(res.version, 1);
  t.equal(rt.modelInfo('classifier').provider, 'cpu');
});

t.test('a version still draining after a reload is released once when the runtime stops or the model unloads', async (t) => {
  const image = randomTensor([1, 3, 112, 112], seeded(7));
  for (const execution of ['inline', 'worker'] as const) {
    for (const end of ['close', 'unload'] as const) {
      const rt = await startRuntime(t, copyDemoRepo(t, ['classifier']), { execution });
      // Frames queued on the old version keep it draining, about 3 ms each, while the same version loads again.
      const queued = Array.from({ length: 96 }, () => rt.submit('classifier', undefined, { inputs: { image } }));
      await rt.loadModel('classifier');
      const stopping = end === 'close' ? rt.close() : rt.unloadModel('classifier');
      await t.resolves(stopping, `${execution}: ${end === 'close' ? 'stopping' : 'unloading'} while the old version drains succeeds`);
      const answered = await Promise.allSettled(queued);
      t.equal(answered.filter((r) => r.status === 'fulfilled').length, queued.length, `${execution}: every frame the old version accepted is answered`);
    }
  }
});

t.test('closing the runtime while a load runs: the load releases what it opened, later loads are refused', async (t) => {
  for (const execution of ['worker', 'inline'] as const) {
    const rt = await startRuntime(t, copyDemoRepo(t, ['tiny', 'classifier']), { execution });
    const loading = rt.loadModel('classifier'); // opens and warms a new scheduler while the old one serves
    const queued = rt.loadModel('tiny');
    await t.resolves(rt.close(), `${execution}: close waits for the load and resolves`);
    await t.rejects(loading, { code: 'UNAVAILABLE', message: /shutting down/ }, `${execution}: the load that finished after close is refused`);
    await t.rejects(queued, { code: 'UNAVAILABLE', message: /shutting down/ }, `${execution}: a load queued behind it never starts`);
    t.same(rt.listModels().filter((m) => m.state === 'READY').map((m) => m.name), [], `${execution}: nothing serves after close`);
    await t.rejects(rt.loadModel('tiny'), { code: 'UNAVAILABLE' }, `${execution}: a load after close is refused`);
  }
});

t.test('concurrent frames batch into one run and each gets its own rows', async (t) => {
  const rt = await startRuntime(t, copyDemoRepo(t, ['tiny']));
  const rnd = seeded(2);
  const inputs = Array.from({ length: 24 }, () => randomTensor([1, 1024], rnd));
  const results = await Promise.all(inputs.map((x) => rt.submit('tiny', undefined, { inputs: { x } })));
  t.ok(results.some((r) => r.batchSize > 1), `batches formed (sizes ${[...new Set(results.map((r) => r.batchSize))].join(',')})`);
  for (let i = 0; i < inputs.length; i++) {
    const want = await direct('tiny', { x: inputs[i] as Tensor });
    t.ok(maxAbsDiff(results[i]?.outputs.y?.data as Float32Array, want.y as Float32Array) < 1e-5, `frame ${i} equals its own direct run`);
  }
  const stats = rt.statistics('tiny')[0];
  t.equal(stats?.inferenceCount, 24);
  t.ok((stats?.executionCount ?? 0) < 24, 'fewer executions than frames');
});

t.test('an inline model batches frames that several streams deliver together, and runs a lone stream\'s frame at once', async (t) => {
  const order: string[] = [];
  const rt = await startRuntime(t, copyDemoRepo(t, ['tiny']), { execution: 'inline' }, { onExecution: (e) => order.push(`run b${e.batchSize}`) });
  const rnd = seeded(4);
  // Two streams' frames submitted in one I/O callback, as HTTP/2 delivers them. The first pair shows the model
  // that several streams feed it (its first frame has already run alone by then); from the next pair on, one run.
  const a = {};
  const b = {};
  const pair = () => Promise.all([
    rt.submit('tiny', undefined, { inputs: { x: randomTensor([1, 1024], rnd) }, streamKey: a }),
    rt.submit('tiny', undefined, { inputs: { x: randomTensor([1, 1024], rnd) }, streamKey: b }),
  ]);
  await pair();
  t.same((await pair()).map((r) => r.batchSize), [2, 2], 'frames of two streams arriving together ran as one batch');
  // One stream alone, once the other has gone quiet: its frame runs before the event loop turns.
  await new Promise((r) => setTimeout(r, 50));
  for (let i = 0; i < 3; i++) {
    order.length = 0;
    setImmediate(() => order.push('next loop turn'));
    const r = await rt.submit('tiny', undefined, { inputs: { x: randomTensor([1, 1024], rnd) }, streamKey: a });
    t.equal(r.batchSize, 1);
    await new Promise((resolve) => setImmediate(resolve));
    t.same(order, ['run b1', 'next loop turn'], `lone frame ${i} ran without waiting for the event loop`);
  }
});

/** Closed-loop streams on the classifier: each sends its next frame once its previous result is back. */
async function closedLoops(rt: Awaited<ReturnType<typeof startRuntime>>, frames: Tensor[][], options: { qos?: 'LOSSLESS' | 'LATEST_ONLY'; deadlineMs?: number } = {}) {
  return Promise.all(frames.map(async (stream) => {
    const key = {};
    const out = [];
    for (const image of stream) {
      out.push(await rt.submit('classifier', undefined, {
        inputs: { image }, streamKey: key, ...(options.qos ? { qos: options.qos } : {}),
        ...(options.deadlineMs ? { deadline: performance.now() + options.deadlineMs } : {}),
      }));
    }
    return out;
  }));
}

t.test('a busy worker is handed its next batch before the running one ends, and every frame still gets its own rows', async (t) => {
  const executions: ExecutionRecord[] = [];
  const rt = await startRuntime(t, copyDemoRepo(t, ['classifier']), { execution: 'worker' }, { onExecution: (e) => executions.push(e) });
  const rnd = seeded(11);
  const frames = Array.from({ length: 8 }, () => Array.from({ length: 6 }, () => randomTensor([1, 3, 112, 112], rnd)));
  const results = await closedLoops(rt, frames);
  const ahead = executions.filter((e) => e.handedAhead);
  t.ok(ahead.length > 0, `${ahead.length} of ${executions.length} batches were handed over while another ran (sizes ${ahead.map((e) => e.batchSize).join(',')})`);
  const session = await ort.InferenceSession.create(join(DEMO_REPO, 'classifier', '1', 'model.onnx'));
  t.teardown(() => session.release());
  let worst = 0;
  for (let i = 0; i < frames.length; i++) {
    for (let k = 0; k < (frames[i] as Tensor[]).length; k++) {
      const x = frames[i]?.[k] as Tensor;
      const want = (await session.run({ image: new ort.Tensor('float32', x.data as Float32Array, x.shape as number[]) })).logits?.data as Float32Array;
      worst = Math.max(worst, maxAbsDiff(results[i]?.[k]?.outputs.logits?.data as Float32Array, want));
    }
  }
  t.ok(worst < 1e-4, `all 48 frames equal their own direct run (largest difference ${worst})`);
  t.equal(rt.statistics('classifier')[0]?.inferenceCount, 48, 'every frame counted once');
});

t.test('frames with a deadline, LATEST_ONLY frames and a lone stream are never handed to a busy worker early', async (t) => {
  const executions: ExecutionRecord[] = [];
  const rt = await startRuntime(t, copyDemoRepo(t, ['classifier']), { execution: 'worker' }, { onExecution: (e) => executions.push(e) });
  const rnd = seeded(12);
  const load = (streams: number) => Array.from({ length: streams }, () => Array.from({ length: 5 }, () => randomTensor([1, 3, 112, 112], rnd)));
  const aheadDuring = async (run: () => Promise<unknown>): Promise<number> => {
    executions.length = 0;
    await run();
    return executions.filter((e) => e.handedAhead).length;
  };
  t.equal(await aheadDuring(() => closedLoops(rt, load(8), { deadlineMs: 60_000 })), 0, 'frames with a deadline start only on a free instance');
  t.equal(await aheadDuring(() => closedLoops(rt, load(8), { qos: 'LATEST_ONLY' })), 0, 'LATEST_ONLY frames stay replaceable until an instance frees');
  t.equal(await aheadDuring(() => closedLoops(rt, load(1))), 0, 'a lone stream has nothing queued while its frame runs');
  // The same eight streams without either: the load itself does hand batches over early.
  t.ok(await aheadDuring(() => closedLoops(rt, load(8))) > 0, 'eight LOSSLESS streams without deadlines are handed over early');
});

t.test('max_queue_delay_us waits for frames of active streams, never for frames no stream will send', async (t) => {
  const repo = copyDemoRepo(t, ['tiny']);
  // A delay far beyond any run: a frame that waited it out would show it in its queue time.
  writeFileSync(join(repo, 'tiny', 'config.yaml'), 'max_batch_size: 32\ndynamic_batching: { max_queue_delay_us: 2000000, preferred_batch_sizes: [4] }\n');
  const rt = await startRuntime(t, repo);
  const rnd = seeded(5);
  const frame = (key: object) => rt.submit('tiny', undefined, { inputs: { x: randomTensor([1, 1024], rnd) }, streamKey: key });
  const lone = {};
  for (let i = 0; i < 3; i++) {
    const r = await frame(lone);
    t.ok(r.timings.queueUs < 1_000_000, `a lone stream's frame ${i} did not wait for a batch nobody would fill (queued ${Math.round(r.timings.queueUs)} µs)`);
  }
  const streams = [{}, {}, {}, {}];
  const round = () => Promise.all(streams.map(async (key, i) => {
    await new Promise((r) => setTimeout(r, 3 * i)); // frames of four streams, a few ms apart
    return frame(key);
  }));
  await round(); // the model learns that four streams feed it
  const second = await round();
  t.same(second.map((r) => r.batchSize), [4, 4, 4, 4], 'the first frame waited for the other three streams: one run of four');
});

t.test('frames whose shapes cannot stack run alone', async (t) => {
  const rt = await startRuntime(t, copyDemoRepo(t, ['tiny']));
  const rnd = seeded(3);
  const a = randomTensor([1, 1024], rnd);
  const b = randomTensor([3, 1024], rnd);
  const [ra, rb] = await Promise.all([rt.submit('tiny', undefined, { inputs: { x: a } }), rt.submit('tiny', undefined, { inputs: { x: b } })]);
  t.same(ra.outputs.y?.shape, [1, 16]);
  t.same(rb.outputs.y?.shape, [3, 16]);
  const want = await direct('tiny', { x: b });
  t.ok(maxAbsDiff(rb.outputs.y?.data as Float32Array, want.y as Float32Array) < 1e-5);
});

/** `x`'s bytes at an odd offset inside a larger buffer, as a protobuf field lies inside its message. */
function misaligned(x: Tensor): Tensor {
  const bytes = new Uint8Array(x.data.buffer, x.data.byteOffset, x.data.byteLength);
  const message = new Uint8Array(bytes.byteLength + 37);
  message.set(bytes, 37);
  return tensorFromBytes('x', x.dtype, x.shape, message.subarray(37));
}

t.test('a misaligned wire tensor makes its aligned copy only when its data is read', async (t) => {
  const x = randomTensor([2, 3], seeded(6));
  const wire = misaligned(x);
  const bytes = pendingBytes(wire) as Uint8Array;
  t.equal(bytes.byteOffset % 4, 1, 'the wire bytes sit off float32 alignment');
  t.equal(tensorBytes(wire).buffer, bytes.buffer, 'tensorBytes() reads the wire bytes, no copy');
  t.same(Array.from(wire.data as Float32Array), Array.from(x.data as Float32Array), 'data holds the values');
  t.equal(wire.data.byteOffset % 4, 0, 'data is aligned');
  t.equal(pendingBytes(wire), undefined, 'once made, the aligned copy is what every reader gets');
  t.equal(tensorBytes(wire).buffer, wire.data.buffer);
  const aligned = tensorFromBytes('x', 'float32', [2, 3], new Uint8Array(x.data.buffer));
  t.equal(pendingBytes(aligned), undefined, 'aligned bytes are viewed at once');
  t.equal(aligned.data.buffer, x.data.buffer);
});

for (const execution of ['worker', 'inline'] as const) {
  t.test(`${execution}: misaligned wire bytes are copied once into the batch buffer, never aligned first`, async (t) => {
    const rt = await startRuntime(t, copyDemoRepo(t, ['tiny']), { execution });
    const rnd = seeded(5);
    const plain = Array.from({ length: 6 }, () => randomTensor([1, 1024], rnd));
    const wire = plain.map(misaligned);
    t.ok(wire.every((w) => pendingBytes(w) !== undefined), 'the frames await an aligned copy');
    const lone = await rt.submit('tiny', undefined, { inputs: { x: wire[0] as Tensor } });
    t.equal(lone.batchSize, 1);
    const streams = wire.slice(1).map(() => ({}));
    const together = () => Promise.all(wire.slice(1).map((x, i) => rt.submit('tiny', undefined, { inputs: { x }, streamKey: streams[i] as object })));
    await together(); // the model learns that five streams feed it
    const batched = await together();
    t.ok(batched.some((r) => r.batchSize > 1), `frames were stacked into a batch (sizes ${batched.map((r) => r.batchSize).join(',')})`);
    for (const [i, r] of [lone, ...batched].entries()) {
      const want = await direct('tiny', { x: plain[i] as Tensor });
      t.ok(maxAbsDiff(r.outputs.y?.data as Float32Array, want.y as Float32Array) < 1e-5, `frame ${i} equals its direct run`);
    }
    t.ok(wire.every((w) => pendingBytes(w) !== undefined), 'no frame was aligned on its way to onnxruntime');
  });
}

t.test('stateful model: batched streams equal sequential runs with state fed back', async (t) => {
  const rt = await startRuntime(t, copyDemoRepo(t, ['filter']));
  const rnd = seeded(4);
  const streams = ['s1', 's2', 's3'];
  const steps = 5;
  const frames = streams.map(() => Array.from({ length: steps }, () => randomTensor([1, 8], rnd)));
  const got: Float32Array[][] = streams.map(() => []);
  for (let k = 0; k < steps; k++) {
    const rs = await Promise.all(streams.map((id, i) => rt.submit('filter', undefined, { inputs: { x: frames[i]?.[k] as Tensor }, sequence: { id, start: k === 0 } })));
    rs.forEach((r, i) => got[i]?.push(r.outputs.y?.data as Float32Array));
    t.notOk('h_out' in (rs[0]?.outputs ?? {}), 'state outputs stay inside the agent');
  }
  for (let i = 0; i < streams.length; i++) {
    let h: Tensor = { dtype: 'float32', shape: [1, 32], data: new Float32Array(32) };
    for (let k = 0; k < steps; k++) {
      const out = await direct('filter', { x: frames[i]?.[k] as Tensor, h_in: h });
      t.ok(maxAbsDiff(got[i]?.[k] as Float32Array, out.y as Float32Array) < 1e-5, `stream ${i} step ${k} equals the hand-fed run`);
      h = { dtype: 'float32', shape: [1, 32], data: out.h_out as Float32Array };
    }
  }
  await t.rejects(rt.submit('filter', undefined, { inputs: { x: randomTensor([1, 8], rnd) }, sequence: { id: 'never-started' } }), FailedPreconditionError);
  await t.rejects(rt.submit('filter', undefined, { inputs: { x: randomTensor([1, 8], rnd) } }), InvalidInputError);
});

t.test('LATEST_ONLY drops only frames a newer one superseded; LOSSLESS drops none', async (t) => {
  const rt = await startRuntime(t, copyDemoRepo(t, ['classifier']), {}, undefined);
  const rnd = seeded(5);
  const latest = {};
  const lossless = {};
  const submissions: { key: string; p: Promise<unknown> }[] = [];
  for (let i = 0; i < 12; i++) {
    submissions.push({ key: 'latest', p: rt.submit('classifier', undefined, { inputs: { image: randomTensor([1, 3, 112, 112], rnd) }, qos: 'LATEST_ONLY', streamKey: latest }) });
    submissions.push({ key: 'lossless', p: rt.submit('classifier', undefined, { inputs: { image: randomTensor([1, 3, 112, 112], rnd) }, qos: 'LOSSLESS', streamKey: lossless }) });
  }
  const settled = await Promise.allSettled(submissions.map((s) => s.p));
  const latestOutcomes = settled.filter((_, i) => submissions[i]?.key === 'latest');
  const losslessOutcomes = settled.filter((_, i) => submissions[i]?.key === 'lossless');
  t.ok(losslessOutcomes.every((o) => o.status === 'fulfilled'), 'every LOSSLESS frame answered');
  const dropped = latestOutcomes.filter((o) => o.status === 'rejected');
  t.ok(dropped.length > 0, `LATEST_ONLY under overload dropped ${dropped.length} of 12`);
  t.ok(dropped.every((o) => o.status === 'rejected' && o.reason instanceof FrameDroppedError), 'drops are reported as DROPPED');
  t.equal(latestOutcomes.at(-1)?.status, 'fulfilled', 'the newest frame is never dropped');
});

t.test('a frame whose deadline passed before it could start is not run', async (t) => {
  const rt = await startRuntime(t, copyDemoRepo(t, ['classifier']));
  const rnd = seeded(6);
  const busy = Array.from({ length: 6 }, () => rt.submit('classifier', undefined, { inputs: { image: randomTensor([4, 3, 112, 112], rnd) } }));
  const late = rt.submit('classifier', undefined, { inputs: { image: randomTensor([1, 3, 112, 112], rnd) }, deadline: performance.now() + 0.5 });
  await t.rejects(late, DeadlineExceededError);
  await Promise.all(busy);
  const fine = await rt.submit('classifier', undefined, { inputs: { image: randomTensor([1, 3, 112, 112], rnd) }, deadline: performance.now() + 60_000 });
  t.same(fine.outputs.logits?.shape, [1, 10]);
});

t.test('bad requests are refused with messages naming the problem', async (t) => {
  const rt = await startRuntime(t, copyDemoRepo(t, ['tiny']));
  const x = randomTensor([1, 1024], seeded(7));
  await t.rejects(rt.submit('nope', undefined, { inputs: { x } }), ModelNotFoundError);
  await t.rejects(rt.submit('tiny', 7, { inputs: { x } }), ModelNotFoundError);
  await t.rejects(rt.submit('tiny', undefined, { inputs: { x: randomTensor([1, 1000], seeded(1)) } }), { message: /input 'x': shape \[1,1000\]/ });
  await t.rejects(rt.submit('tiny', undefined, { inputs: { x: { dtype: 'int32', shape: [1, 1024], data: new Int32Array(1024) } } }), { message: /dtype int32 does not match the model's float32/ });
  await t.rejects(rt.submit('tiny', undefined, { inputs: {} }), { message: /missing input 'x'/ });
  await t.rejects(rt.submit('tiny', undefined, { inputs: { x, z: x } }), { message: /unknown input 'z'/ });
  await t.rejects(rt.submit('tiny', undefined, { inputs: { x: randomTensor([64, 1024], seeded(1)) } }), { message: /exceeds max_batch_size 32/ });
  await t.rejects(rt.submit('tiny', undefined, { inputs: { x: randomTensor([0, 1024], seeded(1)) } }), { message: /empty tensor/ });
  await t.rejects(rt.submit('tiny', undefined, { inputs: { x }, outputs: ['nope'] }), { message: /unknown output 'nope'/ });
  const ok = await rt.submit('tiny', undefined, { inputs: { x } });
  t.same(ok.outputs.y?.shape, [1, 16], 'the next good request is served');
});

t.test('a reload that fails leaves the serving version described by the config it was loaded with', async (t) => {
  const repo = copyDemoRepo(t, ['tiny']);
  const rt = await startRuntime(t, repo);
  const file = join(repo, 'tiny', 'config.yaml');
  const good = readFileSync(file, 'utf8');
  writeFileSync(file, `${good}state:\n  - input: h_in\n    output: h_out\n`); // not inputs of tiny: the load fails
  await t.rejects(rt.loadModel('tiny'), /state\.input 'h_in' is not an input/);
  t.equal(rt.modelInfo('tiny').state, 'READY', 'the old version serves on');
  writeFileSync(file, good);
  t.same(rt.reloadModelConfigs().needsReload, [], 'a config reload finds the file as the serving version has it');
});
