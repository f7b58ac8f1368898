import t from 'tap';
import * as ort from 'onnxruntime-node';
import { buildClassifier, buildFilter, buildTiny, buildTypes, DEMO_MODELS } from '../scripts/demo-models.js';
import { float16BitsToFloat32, toFloat16Array } from '../agent/compress/onnx-graph.js';

function filled(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.sin(i * 0.37 + seed) * 0.5 + 0.5;
  return a;
}

t.test('every demo model builds to identical bytes twice', async (t) => {
  for (const [name, build] of Object.entries(DEMO_MODELS)) {
    const a = build();
    const b = build();
    t.ok(a.length > 0, `${name} is not empty`);
    t.equal(Buffer.compare(Buffer.from(a), Buffer.from(b)), 0, `${name} is deterministic`);
  }
});

t.test('classifier: image [N,3,112,112] → logits [N,10], batch is dynamic', async (t) => {
  const session = await ort.InferenceSession.create(buildClassifier());
  t.same(session.inputNames, ['image']);
  t.same(session.outputNames, ['logits']);
  const n = 3;
  const out = await session.run({ image: new ort.Tensor('float32', filled(n * 3 * 112 * 112, 1), [n, 3, 112, 112]) });
  const logits = out.logits!;
  t.equal(logits.type, 'float32');
  t.same(logits.dims, [n, 10]);
  const data = logits.data as Float32Array;
  t.ok(data.every(Number.isFinite), 'logits are finite');
  t.not(data[0], data[10], 'different rows see different images');
});

t.test('classifier with fixedBatch rejects another batch size', async (t) => {
  const session = await ort.InferenceSession.create(buildClassifier({ fixedBatch: 1, size: 32 }));
  const one = await session.run({ image: new ort.Tensor('float32', filled(3 * 32 * 32, 2), [1, 3, 32, 32]) });
  t.same(one.logits!.dims, [1, 10]);
  await t.rejects(session.run({ image: new ort.Tensor('float32', filled(2 * 3 * 32 * 32, 2), [2, 3, 32, 32]) }));
});

t.test('tiny: x [N,1024] → y [N,16]', async (t) => {
  const session = await ort.InferenceSession.create(buildTiny());
  const out = await session.run({ x: new ort.Tensor('float32', filled(2 * 1024, 3), [2, 1024]) });
  t.equal(out.y!.type, 'float32');
  t.same(out.y!.dims, [2, 16]);
});

t.test('filter: y depends on the state, and h_out fed back changes y', async (t) => {
  const session = await ort.InferenceSession.create(buildFilter());
  t.same(session.inputNames.slice().sort(), ['h_in', 'x']);
  t.same(session.outputNames.slice().sort(), ['h_out', 'y']);
  const x = new ort.Tensor('float32', filled(8, 4), [1, 8]);
  const first = await session.run({ x, h_in: new ort.Tensor('float32', new Float32Array(32), [1, 32]) });
  t.same(first.y!.dims, [1, 4]);
  t.same(first.h_out!.dims, [1, 32]);
  const h1 = first.h_out!.data as Float32Array;
  t.ok(h1.some((v) => Math.abs(v) > 1e-3), 'the state moves away from zero');
  const second = await session.run({ x, h_in: new ort.Tensor('float32', h1, [1, 32]) });
  const y0 = first.y!.data as Float32Array;
  const y1 = second.y!.data as Float32Array;
  const diff = Math.max(...Array.from(y0, (v, i) => Math.abs(v - y1[i]!)));
  t.ok(diff > 1e-3, `same x with the fed-back state gives another y (max diff ${diff})`);
  // Rows of a batch are independent streams: row 1 with state h1 equals the unbatched second step.
  const batched = await session.run({
    x: new ort.Tensor('float32', new Float32Array([...filled(8, 4), ...filled(8, 4)]), [2, 8]),
    h_in: new ort.Tensor('float32', new Float32Array([...new Float32Array(32), ...h1]), [2, 32]),
  });
  const yb = batched.y!.data as Float32Array;
  for (let i = 0; i < 4; i++) {
    t.ok(Math.abs(yb[i]! - y0[i]!) < 1e-5 && Math.abs(yb[4 + i]! - y1[i]!) < 1e-5, `batched row values match (${i})`);
  }
});

t.test('types: exact values for float16, int64, uint8 and the float32 sum', async (t) => {
  const session = await ort.InferenceSession.create(buildTypes());
  const f16 = [1, 2, 0, -1, 0.5, 3, -4, 1024];
  const out = await session.run({
    f16: new ort.Tensor('float16', toFloat16Array(f16), [2, 4]),
    i64: new ort.Tensor('int64', BigInt64Array.from([1n, 2n, 3n, 4n, -5n, 0n, 10n, 2n ** 40n]), [2, 4]),
    u8: new ort.Tensor('uint8', Uint8Array.from([1, 2, 3, 255, 0, 0, 7, 8]), [2, 4]),
  });
  t.equal(out.f16_out!.type, 'float16');
  t.same(out.f16_out!.dims, [2, 4]);
  t.same(Array.from(out.f16_out!.data as Uint16Array, float16BitsToFloat32), f16.map((v) => v * 2));
  t.equal(out.i64_out!.type, 'int64');
  t.same(Array.from(out.i64_out!.data as BigInt64Array), [2n, 3n, 4n, 5n, -4n, 1n, 11n, 2n ** 40n + 1n]);
  t.equal(out.u8_out!.type, 'uint8');
  t.same(Array.from(out.u8_out!.data as Uint8Array), [1, 2, 3, 255, 0, 0, 7, 8]);
  t.equal(out.sum!.type, 'float32');
  t.same(out.sum!.dims, [2, 1]);
  const sum = out.sum!.data as Float32Array;
  t.equal(sum[0], 2 + 10 + 261);
  // Row 2 sums to 2^40 + 1043.5; float32 spacing at 2^40 is 2^17, so any summation order rounds to 2^40.
  t.equal(sum[1], 2 ** 40);
});
