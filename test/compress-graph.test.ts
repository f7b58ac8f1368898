import t from 'tap';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { decodeNetpbm, decodeNpy, loadSamples, splitHeldOut, type Sample } from '../agent/compress/calibration-data.js';
import { compareOutputs, runAll, type RunOutputs } from '../agent/compress/evaluate.js';
import { inferElemTypes, requireGraph } from '../agent/compress/graph-analysis.js';
import {
  attr, DataType, defaultOpsetVersion, encodeModel, float16BitsToFloat32, float32ToFloat16Bits, floatTensor, makeModel,
  makeNode, tensorToFloat32, valueInfo, type ModelProto, type NodeProto,
} from '../agent/compress/onnx-graph.js';
import { upgradeOpset } from '../agent/compress/opset-upgrade.js';
import { foldAffineIntoConvs, foldBatchNorms, foldScaleIntoNextConvs, fuseHardSwish, prepareModel } from '../agent/compress/prepare-graph.js';

const work = mkdtempSync(join(tmpdir(), 'edge-agent-compress-graph-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));

function feeds(name: string, dims: number[], seed: number): Record<string, ort.Tensor> {
  const n = dims.reduce((a, b) => a * b, 1);
  return { [name]: new ort.Tensor('float32', Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.7 + seed) * 2), dims) };
}

/** A NumPy .npy (format 1.0) file: magic, little-endian header length, dict header padded to 64 bytes, raw body. */
function npy(descr: string, shape: number[], body: ArrayBufferView): Uint8Array {
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${shape.join(', ')}${shape.length === 1 ? ',' : ''}), }`;
  while ((10 + header.length + 1) % 64 !== 0) header += ' ';
  header += '\n';
  const out = new Uint8Array(10 + header.length + body.byteLength);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, header.length & 0xff, header.length >> 8]);
  out.set(new TextEncoder().encode(header), 10);
  out.set(new Uint8Array(body.buffer, body.byteOffset, body.byteLength), 10 + header.length);
  return out;
}

async function outputsOf(model: ModelProto, samples: Record<string, ort.Tensor>[]): Promise<RunOutputs[]> {
  return runAll(await ort.InferenceSession.create(encodeModel(model), { logSeverityLevel: 3 }), samples);
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

/** Inputs spread evenly over [-6, 6] (shifted per seed): below -3, inside [-3, 3] and above 3 all occur. */
function spanFeeds(name: string, dims: number[], seed: number): Record<string, ort.Tensor> {
  const n = dims.reduce((a, b) => a * b, 1);
  return { [name]: new ort.Tensor('float32', Float32Array.from({ length: n }, (_, i) => -6 + (12 * i) / (n - 1) + seed * 0.13), dims) };
}

t.test('fuseHardSwish: x·Clip(x+3, 0, 6)/6 (either operand order, /6 or ·(1/6)) becomes one HardSwish at opset 14', async (t) => {
  const dims = [1, 2, 3, 4];
  const model = makeModel({
    opset: 13,
    graph: {
      name: 'hswish',
      nodes: [
        makeNode('Add', ['x', 'three'], ['xa']),
        makeNode('Clip', ['xa', 'zero', 'six'], ['xc']),
        makeNode('Mul', ['x', 'xc'], ['xm']),
        makeNode('Div', ['xm', 'six'], ['h']),
        // paddle2onnx's spelling: constant first in the Add, the clip first in the Mul, then a multiply by 1/6.
        makeNode('Add', ['three', 'h'], ['ha']),
        makeNode('Clip', ['ha', 'zero', 'six'], ['hc']),
        makeNode('Mul', ['hc', 'h'], ['hm']),
        makeNode('Mul', ['hm', 'sixth'], ['y']),
      ],
      initializers: [floatTensor('three', [], [3]), floatTensor('zero', [], [0]), floatTensor('six', [], [6]), floatTensor('sixth', [], [1 / 6])],
      inputs: [valueInfo('x', DataType.FLOAT, dims)],
      outputs: [valueInfo('h', DataType.FLOAT, dims), valueInfo('y', DataType.FLOAT, dims)],
    },
  });
  const samples = [0, 1, 2, 3].map((seed) => spanFeeds('x', dims, seed));
  const values = Array.from(samples[0]!.x!.data as Float32Array);
  t.ok(values.some((v) => v < -3) && values.some((v) => v > -3 && v < 3) && values.some((v) => v > 3), 'inputs span all three pieces');
  const before = await outputsOf(model, samples);

  t.equal(fuseHardSwish(model), 2, 'both chains fused');
  const nodes = requireGraph(model).node as NodeProto[];
  t.same(nodes.map((n) => [n.opType, n.input, n.output]), [['HardSwish', ['x'], ['h']], ['HardSwish', ['h'], ['y']]]);
  t.ok(defaultOpsetVersion(model) >= 14, `opset ${defaultOpsetVersion(model)} holds HardSwish`);
  t.same(model.graph!.initializer!.map((i) => i.name), [], 'the chain constants are pruned');
  const after = await outputsOf(model, samples);
  const err = compareOutputs(before, after).maxAbsError;
  t.ok(err <= 1e-6, `max abs error ${err}`);
  t.ok(Math.abs(after[0]!.h!.data[0]! - 0) < 1e-6 && Math.abs(after[0]!.h!.data[23]! - 6) < 1e-6, 'hard-swish(-6) = 0, hard-swish(6) = 6');
  t.equal(fuseHardSwish(model), 0, 'nothing left to fuse');
});

t.test('fuseHardSwish: near misses (Clip to 5, divide by 5, an intermediate read elsewhere) are left alone', async (t) => {
  const dims = [1, 24];
  const chain = (k: string, max: string, by: string): ReturnType<typeof makeNode>[] => [
    makeNode('Add', ['x', 'three'], [`a${k}`]),
    makeNode('Clip', [`a${k}`, 'zero', max], [`c${k}`]),
    makeNode('Mul', ['x', `c${k}`], [`m${k}`]),
    makeNode('Div', [`m${k}`, by], [`y${k}`]),
  ];
  const model = makeModel({
    opset: 13,
    graph: {
      name: 'near',
      nodes: [...chain('1', 'five', 'six'), ...chain('2', 'six', 'five'), ...chain('3', 'six', 'six')],
      initializers: [floatTensor('three', [], [3]), floatTensor('zero', [], [0]), floatTensor('five', [], [5]), floatTensor('six', [], [6])],
      inputs: [valueInfo('x', DataType.FLOAT, dims)],
      // m3 (x·Clip) is itself an output: fusing its chain would lose it.
      outputs: ['y1', 'y2', 'y3', 'm3'].map((o) => valueInfo(o, DataType.FLOAT, dims)),
    },
  });
  const ops = (m: ModelProto) => (requireGraph(m).node as NodeProto[]).map((n) => `${n.opType}:${n.input.join(',')}→${n.output.join(',')}`);
  const shape = ops(model);
  const samples = [0, 1].map((seed) => spanFeeds('x', dims, seed));
  const before = await outputsOf(model, samples);
  t.equal(fuseHardSwish(model), 0);
  t.same(ops(model), shape, 'the graph is unchanged');
  t.equal(defaultOpsetVersion(model), 13, 'the opset is not raised for nothing');
  t.equal(compareOutputs(before, await outputsOf(model, samples)).maxAbsError, 0);
});

t.test('fuseHardSwish on an opset-12 graph carries its other ops over to opset 14', async (t) => {
  // Squeeze's axes is an attribute up to opset 12 and an input from 13: bumping the version alone breaks it.
  const model = makeModel({
    opset: 12,
    graph: {
      name: 'old-hswish',
      nodes: [
        makeNode('Squeeze', ['x'], ['s'], { axes: attr.ints([0]) }),
        makeNode('Add', ['s', 'three'], ['a']),
        makeNode('Clip', ['a', 'zero', 'six'], ['c']),
        makeNode('Mul', ['s', 'c'], ['m']),
        makeNode('Div', ['m', 'six'], ['y']),
      ],
      initializers: [floatTensor('three', [], [3]), floatTensor('zero', [], [0]), floatTensor('six', [], [6])],
      inputs: [valueInfo('x', DataType.FLOAT, [1, 2, 6])],
      outputs: [valueInfo('y', DataType.FLOAT, [2, 6])],
    },
  });
  const samples = [spanFeeds('x', [1, 2, 6], 0)];
  const before = await outputsOf(model, samples);
  t.equal(fuseHardSwish(model), 1);
  t.ok(defaultOpsetVersion(model) >= 14);
  const after = await outputsOf(model, samples);
  t.same(after[0]!.y!.dims, [2, 6]);
  t.ok(compareOutputs(before, after).maxAbsError <= 1e-6);
});

t.test('foldScaleIntoNextConvs: scalar Mul (and Mul→Add) before a padded Conv fold into its weights exactly', async (t) => {
  const w1 = Float32Array.from({ length: 3 * 2 * 3 * 3 }, (_, i) => Math.sin(i * 0.9));
  const w2 = Float32Array.from({ length: 2 * 3 * 3 * 3 }, (_, i) => Math.cos(i * 1.7));
  const model = makeModel({
    opset: 13,
    graph: {
      name: 'prescale',
      nodes: [
        makeNode('Mul', ['x', 'a1'], ['m1']),
        makeNode('Add', ['m1', 'b1'], ['s1']),
        makeNode('Conv', ['s1', 'w1', 'bias1'], ['c1'], { pads: attr.ints([1, 1, 1, 1]) }),
        makeNode('Relu', ['c1'], ['r']),
        makeNode('Mul', ['a2', 'r'], ['m2']), // constant first
        makeNode('Conv', ['m2', 'w2'], ['y'], { pads: attr.ints([1, 1, 1, 1]), strides: attr.ints([2, 2]) }),
      ],
      initializers: [
        floatTensor('a1', [], [-0.5]), floatTensor('b1', [1], [0.75]), floatTensor('w1', [3, 2, 3, 3], w1), floatTensor('bias1', [3], [0.1, -0.2, 0.3]),
        floatTensor('a2', [1, 1, 1, 1], [1.5]), floatTensor('w2', [2, 3, 3, 3], w2),
      ],
      inputs: [valueInfo('x', DataType.FLOAT, [1, 2, 5, 5])],
      outputs: [valueInfo('y', DataType.FLOAT, [1, 2, 3, 3])],
    },
  });
  const samples = [4, 5, 6].map((seed) => feeds('x', [1, 2, 5, 5], seed));
  const before = await outputsOf(model, samples);
  t.equal(foldScaleIntoNextConvs(model), 2);
  const nodes = requireGraph(model).node as NodeProto[];
  t.same(nodes.map((n) => n.opType), ['Add', 'Conv', 'Relu', 'Conv'], 'both Muls are gone');
  t.equal(nodes[0]!.input[0], 'x', 'the Add now reads x itself');
  t.equal(nodes[3]!.input[0], 'r', 'the second Conv reads the Relu directly');
  const inits = new Map(model.graph!.initializer!.map((i) => [i.name, i]));
  t.same(Array.from(tensorToFloat32(inits.get(nodes[0]!.input[1]!)!)), [-1.5], 'the shift becomes b/a');
  t.same(Array.from(tensorToFloat32(inits.get(nodes[1]!.input[1]!)!)), Array.from(w1, (v) => Math.fround(v * -0.5)), 'the weights become a·W');
  const err = compareOutputs(before, await outputsOf(model, samples)).maxAbsError;
  t.ok(err <= 1e-5, `max abs error ${err} (padding included)`);
  t.ok(before[0]!.y!.data.some((v) => Math.abs(v) > 0.1), 'the outputs carry signal');
  t.equal(foldScaleIntoNextConvs(model), 0, 'nothing left to fold');
});

t.test('foldScaleIntoNextConvs refuses a shared Mul output, a spatially varying factor, a non-scalar shift and shared weights', async (t) => {
  const w = (seed: number) => Float32Array.from({ length: 2 * 2 * 3 * 3 }, (_, i) => Math.sin(i * 0.6 + seed));
  const pads = { pads: attr.ints([1, 1, 1, 1]) };
  const model = makeModel({
    opset: 13,
    graph: {
      name: 'refuse',
      nodes: [
        makeNode('Mul', ['x', 'two'], ['m1']),
        makeNode('Conv', ['m1', 'w1'], ['y1'], pads),
        makeNode('Relu', ['m1'], ['y1b']), // m1 has a second reader
        makeNode('Mul', ['x', 'rows'], ['m2']), // varies along H: a·W cannot carry it
        makeNode('Conv', ['m2', 'w2'], ['y2'], pads),
        makeNode('Mul', ['x', 'two'], ['m3']),
        makeNode('Add', ['m3', 'perChannel'], ['s3']), // per-channel shift behind a scalar scale
        makeNode('Conv', ['s3', 'w3'], ['y3'], pads),
        makeNode('Mul', ['x', 'two'], ['m4']),
        makeNode('Conv', ['m4', 'shared'], ['y4'], pads),
        makeNode('Conv', ['x', 'shared'], ['y5'], pads), // the weights have another reader
      ],
      initializers: [
        floatTensor('two', [], [2]), floatTensor('rows', [1, 1, 4, 1], [1, 2, 3, 4]), floatTensor('perChannel', [1, 2, 1, 1], [1, -1]),
        floatTensor('w1', [2, 2, 3, 3], w(1)), floatTensor('w2', [2, 2, 3, 3], w(2)), floatTensor('w3', [2, 2, 3, 3], w(3)),
        floatTensor('shared', [2, 2, 3, 3], w(4)),
      ],
      inputs: [valueInfo('x', DataType.FLOAT, [1, 2, 4, 4])],
      outputs: ['y1', 'y1b', 'y2', 'y3', 'y4', 'y5'].map((o) => valueInfo(o, DataType.FLOAT, [1, 2, 4, 4])),
    },
  });
  const ops = (m: ModelProto) => (requireGraph(m).node as NodeProto[]).map((n) => `${n.opType}:${n.input.join(',')}→${n.output.join(',')}`);
  const shape = ops(model);
  const samples = [7, 8].map((seed) => feeds('x', [1, 2, 4, 4], seed));
  const before = await outputsOf(model, samples);
  t.equal(foldScaleIntoNextConvs(model), 0);
  t.same(ops(model), shape, 'the graph is unchanged');
  t.same(model.graph!.initializer!.map((i) => i.name).sort(), ['perChannel', 'rows', 'shared', 'two', 'w1', 'w2', 'w3'], 'no initializer was added or replaced');
  t.equal(compareOutputs(before, await outputsOf(model, samples)).maxAbsError, 0, 'identical outputs');
});

t.test('calibration split: several .npy files are one source each, a lone .npy file splits by row', async (t) => {
  const input = { name: 'x', elemType: DataType.FLOAT, dims: [-1, 2] };
  // Row r of file k holds [k, r]: each sample says where it came from.
  const rows = (k: number, n: number) => Float32Array.from({ length: n * 2 }, (_, i) => (i % 2 === 0 ? k : Math.floor(i / 2)));
  const dir = join(work, 'npy-sources');
  mkdirSync(dir);
  for (let k = 0; k < 4; k++) writeFileSync(join(dir, `crop-${k}.npy`), npy('<f4', [3, 2], rows(k, 3)));
  const samples = await loadSamples(dir, [input]);
  t.equal(samples.length, 12, 'every row of every file is a sample');
  const fileOf = (s: Sample) => (s.feeds.x!.data as Float32Array)[0]!;
  t.same(new Set(samples.map((s) => s.source)).size, 4, 'one source per file');
  const split = splitHeldOut(samples, 0.25);
  const heldFiles = new Set(split.heldOut.map(fileOf));
  const calibrationFiles = new Set(split.calibration.map(fileOf));
  t.same([...heldFiles], [3], 'the fourth file (sorted) is held out');
  t.equal(split.heldOut.length, 3, 'with all three of its rows');
  t.same([...calibrationFiles].sort(), [0, 1, 2]);
  t.ok([...heldFiles].every((k) => !calibrationFiles.has(k)), 'no file has rows on both sides');

  const lone = join(work, 'npy-lone');
  mkdirSync(lone);
  writeFileSync(join(lone, 'batch.npy'), npy('<f4', [4, 2], rows(7, 4)));
  for (const path of [join(lone, 'batch.npy'), lone]) {
    const single = await loadSamples(path, [input]);
    t.equal(single.length, 4);
    const parts = splitHeldOut(single, 0.5);
    const rowOf = (s: Sample) => (s.feeds.x!.data as Float32Array)[1]!;
    t.same(parts.heldOut.map(rowOf), [1, 3], `${path}: every second row is held out`);
    t.same(parts.calibration.map(rowOf), [0, 2], `${path}: the other rows calibrate`);
  }
});
