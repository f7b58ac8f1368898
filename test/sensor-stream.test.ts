import t from 'tap';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import type { FrameResult, SensorStreamHandle } from '../agent/client/index.js';
import type { Tensor } from '../agent/runtime/index.js';
import { startTestAgent } from './helpers/agent.js';

function frameTensor(shape: number[], seed: number): Tensor {
  const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
  let x = seed >>> 0;
  for (let i = 0; i < data.length; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    data[i] = x / 2 ** 31 - 1;
  }
  return { dtype: 'float32', shape, data };
}

async function collect(stream: SensorStreamHandle, n: number): Promise<FrameResult[]> {
  const out: FrameResult[] = [];
  for await (const r of stream.results()) {
    out.push(r);
    if (out.length === n) break;
  }
  return out;
}

async function directRun(repo: string, model: string, feeds: Record<string, Tensor>): Promise<Record<string, Float32Array>> {
  const s = await ort.InferenceSession.create(join(repo, model, '1', 'model.onnx'));
  const inputs: Record<string, ort.Tensor> = {};
  for (const [k, v] of Object.entries(feeds)) inputs[k] = new ort.Tensor(v.dtype, v.data as Float32Array, v.shape as number[]);
  const out = await s.run(inputs);
  await s.release();
  return Object.fromEntries(Object.entries(out).map(([k, v]) => [k, v.data as Float32Array]));
}

function close(a: ArrayLike<number>, b: ArrayLike<number>, tol = 1e-5): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (Math.abs((a[i] as number) - (b[i] as number)) > tol) return false;
  return true;
}

t.test('frames over TCP and over the unix socket return the direct run\'s outputs, in order', async (t) => {
  const a = await startTestAgent(t, { models: ['classifier'] });
  for (const address of [a.tcp, a.unix]) {
    const stream = await a.client(address).openStream({ model: 'classifier', maxInFlight: 4 });
    t.equal(stream.opened.model, 'classifier');
    t.equal(stream.opened.provider, 'cpu');
    t.same(stream.opened.inputs[0], { name: 'image', dtype: 'float32', shape: [-1, 3, 112, 112] });
    const frames = Array.from({ length: 12 }, (_, i) => frameTensor([1, 3, 112, 112], i + 1));
    const results = collect(stream, frames.length);
    for (let i = 0; i < frames.length; i++) await stream.send({ seq: 100 + i, captureTimeUs: 5000 + i, inputs: { image: frames[i] as Tensor } });
    const got = await results;
    stream.end();
    t.same(got.map((r) => r.seq), frames.map((_, i) => 100 + i), `${address}: results in sequence order`);
    t.ok(got.every((r) => r.status === 'OK' && r.version === 1), 'all OK from version 1');
    t.equal(got[3]?.captureTimeUs, 5003, 'capture time echoed');
    for (const i of [0, 7]) {
      const want = await directRun(a.repo, 'classifier', { image: frames[i] as Tensor });
      t.ok(close(got[i]?.outputs.logits?.data as Float32Array, want.logits as Float32Array), `${address}: frame ${i} equals a direct session.run`);
    }
    t.ok((got[0]?.timings.totalUs ?? 0) >= (got[0]?.timings.inferenceUs ?? 0), 'timings reported');
  }
});

t.test('a stateful stream keeps its own state; results equal the hand-fed recurrence', async (t) => {
  const a = await startTestAgent(t, { models: ['filter'] });
  const s1 = await a.client().openStream({ model: 'filter' });
  const s2 = await a.client().openStream({ model: 'filter' });
  t.ok(s1.opened.stateful, 'stream reports the model as stateful');
  t.same(s1.opened.inputs.map((i) => i.name), ['x'], 'state inputs are not client inputs');
  const xs = Array.from({ length: 4 }, (_, i) => frameTensor([1, 8], 77 + i));
  const r1 = collect(s1, 4);
  const r2 = collect(s2, 4);
  for (let i = 0; i < 4; i++) {
    await s1.send({ seq: i, inputs: { x: xs[i] as Tensor } });
    await s2.send({ seq: i, inputs: { x: xs[3 - i] as Tensor } });
  }
  const [g1, g2] = await Promise.all([r1, r2]);
  let h: Tensor = { dtype: 'float32', shape: [1, 32], data: new Float32Array(32) };
  for (let i = 0; i < 4; i++) {
    const want = await directRun(a.repo, 'filter', { x: xs[i] as Tensor, h_in: h });
    t.ok(close(g1[i]?.outputs.y?.data as Float32Array, want.y as Float32Array), `stream 1 step ${i}`);
    h = { dtype: 'float32', shape: [1, 32], data: want.h_out as Float32Array };
  }
  t.notOk(close(g1[1]?.outputs.y?.data as Float32Array, g2[1]?.outputs.y?.data as Float32Array), 'two streams do not share state');
  s1.end();
  s2.end();
});

t.test('LATEST_ONLY reports drops under overload; LOSSLESS loses nothing', async (t) => {
  const a = await startTestAgent(t, { models: ['classifier'] });
  const n = 40;
  const latest = await a.client().openStream({ model: 'classifier', qos: 'LATEST_ONLY', maxInFlight: 32 });
  const lossless = await a.client().openStream({ model: 'classifier', qos: 'LOSSLESS', maxInFlight: 32 });
  const rl = collect(latest, n);
  const rs = collect(lossless, n);
  const img = frameTensor([1, 3, 112, 112], 9);
  // Overload: another client's big batches keep the model busy while the two streams send.
  const big = frameTensor([32, 3, 112, 112], 10);
  const load = Array.from({ length: 6 }, () => a.agent.runtime.submit('classifier', undefined, { inputs: { image: big } }));
  for (let i = 0; i < n; i++) {
    latest.sendNoWait({ seq: i, inputs: { image: img } });
    lossless.sendNoWait({ seq: i, inputs: { image: img } });
  }
  const [gl, gs] = await Promise.all([rl, rs]);
  await Promise.all(load);
  t.same(gs.map((r) => r.status), Array(n).fill('OK'), 'every LOSSLESS frame answered OK');
  t.same(gl.map((r) => r.seq), [...Array(n).keys()], 'LATEST_ONLY: every frame gets a result, in order');
  const dropped = gl.filter((r) => r.status === 'DROPPED');
  t.ok(dropped.length > 0, `LATEST_ONLY dropped ${dropped.length} of ${n} under overload`);
  t.match(dropped[0]?.message, /superseded/);
  t.equal(gl.at(-1)?.status, 'OK', 'the newest frame is served');
  latest.end();
  lossless.end();
});

t.test('a client that does not read results cannot grow the agent\'s buffers without bound', async (t) => {
  const a = await startTestAgent(t, { models: ['tiny'] });
  const stream = await a.client().openStream({ model: 'tiny', qos: 'LOSSLESS', maxInFlight: 4 });
  const x = frameTensor([1, 1024], 3);
  // Flood: 20k frames written without waiting and without ever reading a result.
  let refusedByTransport = 0;
  for (let i = 0; i < 20_000; i++) if (!stream.sendNoWait({ seq: i, inputs: { x } })) refusedByTransport++;
  // Wait until the agent stops accepting (two samples a second apart agree), however slow this machine is.
  let accepted = -1;
  for (let i = 0; i < 30; i++) {
    await new Promise((r) => setTimeout(r, 1000));
    const now = a.agent.sensorStreams.framesAccepted();
    if (now === accepted) break;
    accepted = now;
  }
  t.ok(refusedByTransport > 0, 'the client transport pushed back');
  // What can be accepted is max_in_flight plus the results that fit the HTTP/2 flow-control window towards the
  // client (64 KiB of ~100-byte results) and the stream buffers on both sides: well under 2000.
  t.ok(accepted > 0 && accepted < 2000, `agent accepted ${accepted} of 20000 frames while the client did not read, then stopped`);
  t.equal(a.agent.sensorStreams.framesAccepted(), accepted, 'and accepts no more: reading is paused');
  stream.cancel();
});

t.test('bad frames get an error result naming the tensor; the stream goes on', async (t) => {
  const a = await startTestAgent(t, { models: ['tiny'] });
  const stream = await a.client().openStream({ model: 'tiny' });
  const good = frameTensor([1, 1024], 1);
  const results = collect(stream, 6);
  await stream.send({ seq: 1, inputs: { x: { dtype: 'int32', shape: [1, 1024], data: new Int32Array(1024) } } });
  await stream.send({ seq: 2, inputs: { x: frameTensor([1, 1000], 1) } });
  await stream.send({ seq: 3, inputs: { x: { dtype: 'float32', shape: [1, 2048], data: new Float32Array(1024) } } });
  await stream.send({ seq: 4, inputs: { y: good } });
  await stream.send({ seq: 5, inputs: {} });
  await stream.send({ seq: 6, inputs: { x: good } });
  const got = await results;
  t.same(got.map((r) => r.status), ['INVALID_ARGUMENT', 'INVALID_ARGUMENT', 'INVALID_ARGUMENT', 'INVALID_ARGUMENT', 'INVALID_ARGUMENT', 'OK']);
  t.match(got[0]?.message, /input 'x': dtype int32 does not match the model's float32/);
  t.match(got[1]?.message, /input 'x': shape \[1,1000\] does not match/);
  t.match(got[2]?.message, /tensor 'x': 4096 bytes do not match float32 shape \[1,2048\]/);
  t.match(got[3]?.message, /unknown input 'y'/);
  t.match(got[4]?.message, /missing input 'x'/);
  stream.end();
});

t.test('unknown model ends the stream with NOT_FOUND; oversized messages get RESOURCE_EXHAUSTED', async (t) => {
  const a = await startTestAgent(t, { models: ['tiny'], config: { server: { max_message_bytes: 64 * 1024 } } });
  await t.rejects(a.client().openStream({ model: 'no-such-model' }), { code: 5, details: /model 'no-such-model' is not loaded/ });
  const stream = await a.client().openStream({ model: 'tiny' });
  const results = collect(stream, 1);
  await stream.send({ seq: 1, inputs: { x: frameTensor([32, 1024], 1) } });
  await t.rejects(results, { code: 8 }, 'a 128 KiB frame over a 64 KiB limit is RESOURCE_EXHAUSTED');
  const again = await a.client().openStream({ model: 'tiny' });
  const ok = collect(again, 1);
  await again.send({ seq: 1, inputs: { x: frameTensor([1, 1024], 1) } });
  t.equal((await ok)[0]?.status, 'OK', 'the agent serves the next stream');
  again.end();
});

t.test('health: SERVING for the agent and each loaded model', async (t) => {
  const a = await startTestAgent(t, { models: ['tiny', 'filter'] });
  const c = a.client(a.unix);
  t.equal(await c.checkHealth(''), 'SERVING');
  t.equal(await c.checkHealth('tiny'), 'SERVING');
  await t.rejects(c.checkHealth('nope'), { code: 5 });
  await a.agent.runtime.unloadModel('tiny');
  t.equal(await c.checkHealth('tiny'), 'NOT_SERVING', 'an unloaded model is NOT_SERVING');
});
