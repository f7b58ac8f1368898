import t from 'tap';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { decodeNetpbm, decodeNpy, loadSamples, splitHeldOut, type Sample } from '../agent/compress/calibration-data.js';
import { compareOutputs, runAll } from '../agent/compress/evaluate.js';
import { inferElemTypes, requireGraph } from '../agent/compress/graph-analysis.js';
import {
  attr, DataType, defaultOpsetVersion, encodeModel, float16BitsToFloat32, float32ToFloat16Bits, floatTensor, makeModel,
  makeNode, valueInfo,
} from '../agent/compress/onnx-graph.js';
import { upgradeOpset } from '../agent/compress/opset-upgrade.js';
import { foldAffineIntoConvs, foldBatchNorms, prepareModel } from '../agent/compress/prepare-graph.js';

const work = mkdtempSync(join(tmpdir(), 'edge-agent-compress-graph-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));

function feeds(name: string, dims: number[], seed: number): Record<string, ort.Tensor> {
  const n = dims.reduce((a, b) => a * b, 1);
  return { [name]: new ort.Tensor('float32', Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.7 + seed) * 2), dims) };
}

t.test('opset 11 → 13: attribute-to-input rewrites and Softmax semantics keep the outputs', async (t) => {
  // x [2,3,4] → Unsqueeze(axes=[0]) → Squeeze(axes=[0]) → Clip(0..1 as inputs already at 11) → Softmax(axis=1) → ReduceSum(axes=[2])
  const old = makeModel({
    opset: 11,
    graph: {
      name: 'old',
      nodes: [
        makeNode('Unsqueeze', ['x'], ['u'], { axes: attr.ints([0]) }),
        makeNode('Squeeze', ['u'], ['s'], { axes: attr.ints([0]) }),
        makeNode('Softmax', ['s'], ['sm'], { axis: attr.int(1) }),
        makeNode('ReduceSum', ['sm'], ['y'], { axes: attr.ints([2]), keepdims: attr.int(0) }),
        makeNode('Split', ['x'], ['a', 'b'], { axis: attr.int(2), split: attr.ints([1, 3]) }),
      ],
      inputs: [valueInfo('x', DataType.FLOAT, [2, 3, 4])],
      outputs: [valueInfo('y', DataType.FLOAT), valueInfo('b', DataType.FLOAT)],
    },
  });
  const before = encodeModel(old);
  const rewrites = upgradeOpset(old, 13);
  t.equal(defaultOpsetVersion(old), 13);
  t.ok(rewrites.some((r) => r.includes('Softmax')), rewrites.join('; '));
  t.ok(rewrites.some((r) => r.includes('split attribute')), 'Split split → input');
  const samples = [feeds('x', [2, 3, 4], 1), feeds('x', [2, 3, 4], 2)];
  const a = await runAll(await ort.InferenceSession.create(before), samples);
  const b = await runAll(await ort.InferenceSession.create(encodeModel(old)), samples);
  t.ok(compareOutputs(a, b).maxAbsError < 1e-6, 'same outputs after the upgrade');

  const removed = makeModel({
    opset: 9,
    graph: { name: 'r', nodes: [makeNode('Scatter', ['x', 'x', 'x'], ['y'])], inputs: [valueInfo('x', DataType.FLOAT, [2])], outputs: [valueInfo('y', DataType.FLOAT)] },
  });
  t.throws(() => upgradeOpset(removed, 13), { name: 'OpsetUpgradeError', message: /op Scatter .* was removed/ }, 'a removed op is named, not mangled');
});

t.test('opset 9 → 13: Clip, Pad and Slice attributes move to inputs with the same results', async (t) => {
  const old = makeModel({
    opset: 9,
    graph: {
      name: 'old9',
      nodes: [
        makeNode('Clip', ['x'], ['c'], { min: attr.float(-0.5), max: attr.float(1.5) }),
        makeNode('Pad', ['c'], ['p'], { pads: attr.ints([0, 1, 0, 2]), value: attr.float(0.25) }),
        makeNode('Slice', ['p'], ['y'], { starts: attr.ints([0, 1]), ends: attr.ints([2, 5]), axes: attr.ints([0, 1]) }),
      ],
      inputs: [valueInfo('x', DataType.FLOAT, [2, 4])],
      outputs: [valueInfo('y', DataType.FLOAT)],
    },
  });
  const before = encodeModel(old);
  upgradeOpset(old, 13);
  const samples = [feeds('x', [2, 4], 3)];
  const a = await runAll(await ort.InferenceSession.create(before), samples);
  const b = await runAll(await ort.InferenceSession.create(encodeModel(old)), samples);
  t.same(a[0]!.y!.dims, b[0]!.y!.dims);
  t.ok(compareOutputs(a, b).maxAbsError === 0, 'identical outputs');
});

t.test('prepare: Constant nodes become initializers and Conv→BatchNormalization folds exactly', async (t) => {
  const w = Float32Array.from({ length: 4 * 2 * 3 * 3 }, (_, i) => Math.cos(i));
  const model = makeModel({
    opset: 13,
    graph: {
      name: 'bn',
      nodes: [
        makeNode('Constant', [], ['w'], { value: attr.tensor(floatTensor('w', [4, 2, 3, 3], w)) }),
        makeNode('Conv', ['x', 'w'], ['c'], { pads: attr.ints([1, 1, 1, 1]) }),
        makeNode('BatchNormalization', ['c', 'gamma', 'beta', 'mean', 'var'], ['y'], { epsilon: attr.float(1e-3) }),
      ],
      initializers: [
        floatTensor('gamma', [4], [1, 2, 0.5, -1]), floatTensor('beta', [4], [0, 1, -1, 0.5]),
        floatTensor('mean', [4], [0.1, -0.2, 0.3, 0]), floatTensor('var', [4], [1, 4, 0.25, 2]),
      ],
      inputs: [valueInfo('x', DataType.FLOAT, [1, 2, 5, 5])],
      outputs: [valueInfo('y', DataType.FLOAT, [1, 4, 5, 5])],
    },
  });
  const { model: prepared, notes } = prepareModel(model);
  t.ok(notes.some((n) => n.includes('Constant')), notes.join('; '));
  t.ok(notes.some((n) => n.includes('BatchNormalization')));
  t.same(prepared.graph!.node!.map((n) => n.opType), ['Conv']);
  t.equal(foldBatchNorms(prepared), 0, 'nothing left to fold');
  const samples = [feeds('x', [1, 2, 5, 5], 4)];
  const a = await runAll(await ort.InferenceSession.create(encodeModel(model)), samples);
  const b = await runAll(await ort.InferenceSession.create(encodeModel(prepared)), samples);
  t.ok(compareOutputs(a, b).maxAbsError < 1e-5);
});

t.test('prepare: constant Mul/Add after a Conv (PP-LCNet learnable affine) fold into its weights and bias exactly', async (t) => {
  const w = Float32Array.from({ length: 3 * 2 * 3 * 3 }, (_, i) => Math.sin(i * 1.3));
  const model = makeModel({
    opset: 13,
    graph: {
      name: 'affine',
      nodes: [
        makeNode('Conv', ['x', 'w', 'b'], ['c'], { pads: attr.ints([1, 1, 1, 1]) }),
        makeNode('Mul', ['scale', 'c'], ['m']), // paddle2onnx puts the constant first
        makeNode('Add', ['m', 'shift'], ['a']),
        makeNode('Conv', ['a', 'w2'], ['c2']),
        makeNode('Mul', ['c2', 'rows'], ['y']), // varies along H: not a per-channel factor, must stay
      ],
      initializers: [
        floatTensor('w', [3, 2, 3, 3], w), floatTensor('b', [3], [0.5, -1, 2]),
        floatTensor('scale', [1], [-0.75]), floatTensor('shift', [1, 3, 1, 1], [1, 2, -3]),
        floatTensor('w2', [2, 3, 1, 1], [1, -1, 0.5, 2, 0.25, -0.5]), floatTensor('rows', [1, 1, 4, 1], [1, 2, 3, 4]),
      ],
      inputs: [valueInfo('x', DataType.FLOAT, [1, 2, 4, 4])],
      outputs: [valueInfo('y', DataType.FLOAT, [1, 2, 4, 4])],
    },
  });
  const { model: prepared, notes } = prepareModel(model);
  t.ok(notes.some((n) => n.includes('2 constant Mul/Add')), notes.join('; '));
  t.same(prepared.graph!.node!.map((n) => n.opType), ['Conv', 'Conv', 'Mul'], 'the scale and shift are gone; the row factor stays');
  t.equal(foldAffineIntoConvs(prepared), 0, 'nothing left to fold');
  const samples = [feeds('x', [1, 2, 4, 4], 5), feeds('x', [1, 2, 4, 4], 6)];
  const a = await runAll(await ort.InferenceSession.create(encodeModel(model)), samples);
  const b = await runAll(await ort.InferenceSession.create(encodeModel(prepared)), samples);
  t.ok(compareOutputs(a, b).maxAbsError < 1e-5, `max abs error ${compareOutputs(a, b).maxAbsError}`);
});

t.test('output cosine weighs samples by their energy: near-zero outputs (nothing detected) do not swamp it', async (t) => {
  // Sample 1: a probability map with a detection, matched closely. Sample 2: the model sees nothing; both sides
  // are rounding noise around 1e-7 whose own cosine is meaningless (here: negatively correlated).
  const map = Float32Array.from({ length: 64 }, (_, i) => (i % 8 < 3 ? 0.9 : 1e-4));
  const close = map.map((v, i) => v + (i % 2 ? 1e-3 : -1e-3));
  const noiseA = Float32Array.from({ length: 64 }, (_, i) => (i % 2 ? 2e-7 : 1e-9));
  const noiseB = Float32Array.from({ length: 64 }, (_, i) => (i % 2 ? 1e-9 : 2e-7));
  const out = (d: Float32Array) => ({ y: { dims: [1, 64], data: d } });
  const acc = compareOutputs([out(map), out(noiseA)], [out(close), out(noiseB)]);
  t.ok(acc.cosine > 0.999, `cosine ${acc.cosine} reflects the sample that carries the signal`);
  t.ok(acc.minSampleCosine < 0.1, `the worst single sample is still reported (${acc.minSampleCosine})`);
  const wrong = compareOutputs([out(map)], [out(Float32Array.from(map, (v) => 0.9 - v))]);
  t.ok(wrong.cosine < 0.5, `a wrong map still fails (${wrong.cosine})`);
});

t.test('element types are inferred through shape arithmetic, so int64 tensors are never quantized', async (t) => {
  const model = makeModel({
    graph: {
      name: 'types',
      nodes: [
        makeNode('Shape', ['x'], ['shape']),
        makeNode('Concat', ['shape', 'shape'], ['twice'], { axis: attr.int(0) }),
        makeNode('Relu', ['x'], ['r']),
        makeNode('Cast', ['r'], ['h'], { to: attr.int(DataType.FLOAT16) }),
        makeNode('Greater', ['x', 'x'], ['g']),
      ],
      inputs: [valueInfo('x', DataType.FLOAT, [2])],
      outputs: [valueInfo('twice', DataType.INT64), valueInfo('h', DataType.FLOAT16), valueInfo('g', DataType.BOOL)],
    },
  });
  const types = inferElemTypes(requireGraph(model));
  t.equal(types.get('shape'), DataType.INT64);
  t.equal(types.get('twice'), DataType.INT64);
  t.equal(types.get('r'), DataType.FLOAT);
  t.equal(types.get('h'), DataType.FLOAT16);
  t.equal(types.get('g'), DataType.BOOL);
});

t.test('float16 bit conversion rounds to nearest even and keeps specials', async (t) => {
  for (const v of [0, 1, -2, 0.5, 65504, 6.103515625e-5, 5.960464477539063e-8]) t.equal(float16BitsToFloat32(float32ToFloat16Bits(v)), v, `${v} round-trips`);
  t.equal(float32ToFloat16Bits(1e6), 0x7c00, 'overflow → +Inf');
  t.equal(float32ToFloat16Bits(-Infinity), 0xfc00);
  t.ok(Number.isNaN(float16BitsToFloat32(float32ToFloat16Bits(NaN))));
  t.equal(float16BitsToFloat32(float32ToFloat16Bits(1 + 2 ** -11)), 1, 'a tie rounds to even');
});

t.test('calibration data: PPM/PGM and .npy decoding, per-source held-out split', async (t) => {
  const p6 = new Uint8Array([...new TextEncoder().encode('P6\n2 1\n255\n'), 255, 0, 0, 0, 0, 255]);
  t.same(Array.from(decodeNetpbm(p6).rgb), [255, 0, 0, 0, 0, 255]);
  const p5 = new Uint8Array([...new TextEncoder().encode('P5 # grey\n2 1 15\n'), 15, 0]);
  t.same(Array.from(decodeNetpbm(p5).rgb), [255, 255, 255, 0, 0, 0], '4-bit maxval scales to 8 bits');
  t.throws(() => decodeNetpbm(new TextEncoder().encode('P3\n1 1\n255\n1 2 3')), /not a binary PPM\/PGM/);
  t.throws(() => decodeNetpbm(new Uint8Array([...new TextEncoder().encode('P6\n4 4\n255\n'), 1, 2])), /truncated/);

  const npy = (descr: string, shape: number[], body: ArrayBufferView): Uint8Array => {
    let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${shape.join(', ')}${shape.length === 1 ? ',' : ''}), }`;
    while ((10 + header.length + 1) % 64 !== 0) header += ' ';
    header += '\n';
    const out = new Uint8Array(10 + header.length + body.byteLength);
    out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, header.length & 0xff, header.length >> 8]);
    out.set(new TextEncoder().encode(header), 10);
    out.set(new Uint8Array(body.buffer, body.byteOffset, body.byteLength), 10 + header.length);
    return out;
  };
  const arr = decodeNpy(npy('<f4', [3, 2], Float32Array.from([1, 2, 3, 4, 5, 6])));
  t.same(arr.shape, [3, 2]);
  t.same(Array.from(arr.data as Float32Array), [1, 2, 3, 4, 5, 6]);
  t.throws(() => decodeNpy(new Uint8Array(20)), /not a NumPy .npy file/);
  t.throws(() => decodeNpy(npy('>f4', [1], Float32Array.of(1))), /dtype >f4 is not supported/);

  const dir = join(work, 'npy');
  mkdirSync(dir);
  writeFileSync(join(dir, 'batch.npy'), npy('<f4', [4, 2], Float32Array.from({ length: 8 }, (_, i) => i)));
  const input = { name: 'x', elemType: DataType.FLOAT, dims: [-1, 2] };
  const samples = await loadSamples(join(dir, 'batch.npy'), [input]);
  t.equal(samples.length, 4, 'the leading axis holds samples');
  t.same(samples[1]!.feeds.x!.dims, [1, 2]);
  t.same(Array.from(samples[1]!.feeds.x!.data as Float32Array), [2, 3]);
  await t.rejects(loadSamples(join(dir, 'batch.npy'), [{ ...input, dims: [-1, 3] }]), /does not match input 'x'/);
  await t.rejects(loadSamples(join(dir, 'batch.npy'), [{ ...input, elemType: DataType.INT64 }]), /dtype float32 does not match/);

  // Multi-input models read per-sample directories.
  const multi = join(work, 'multi');
  for (const s of ['s1', 's2']) {
    mkdirSync(join(multi, s), { recursive: true });
    writeFileSync(join(multi, s, 'x.npy'), npy('<f4', [1, 8], new Float32Array(8).fill(1)));
    writeFileSync(join(multi, s, 'h_in.npy'), npy('<f4', [1, 32], new Float32Array(32)));
  }
  const two = await loadSamples(multi, [{ name: 'x', elemType: DataType.FLOAT, dims: [-1, 8] }, { name: 'h_in', elemType: DataType.FLOAT, dims: [-1, 32] }]);
  t.equal(two.length, 2);
  t.same(Object.keys(two[0]!.feeds).sort(), ['h_in', 'x']);

  const fake = (source: string): Sample => ({ source, feeds: {} });
  const set = ['a', 'a', 'b', 'b', 'c', 'd', 'd', 'e', 'f', 'g', 'h'].map(fake);
  const split = splitHeldOut(set, 0.25);
  const held = new Set(split.heldOut.map((s) => s.source));
  t.same([...held].sort(), ['d', 'h'], 'every fourth source (sorted) is held out');
  t.ok(split.calibration.every((s) => !held.has(s.source)), 'no source is on both sides');
});
