import t from 'tap';
import { readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { buildClassifier, mulberry32 as seeded } from '../scripts/demo-models.js';
import { calibrateRanges, percentileRange, type Feeds } from '../agent/compress/calibrate.js';
import { convertFloat16 } from '../agent/compress/convert-fp16.js';
import { compareOutputs, runAll } from '../agent/compress/evaluate.js';
import {
  attr, DataType, decodeModel, encodeModel, floatTensor, makeModel, makeNode, valueInfo, type NodeProto,
} from '../agent/compress/onnx-graph.js';
import { prepareModel } from '../agent/compress/prepare-graph.js';
import {
  calibrationTensors, dequantizeWeightsPerChannel, planQuantization, quantizeInt8, quantizeWeightsPerChannel, uint8Params,
} from '../agent/compress/quantize-int8.js';
import { equalizeCrossLayer } from '../agent/compress/cross-layer-equalization.js';
import { requireGraph } from '../agent/compress/graph-analysis.js';

/** Smooth, image-like inputs (gradients and blobs), different per seed. */
function imageFeeds(size: number, seed: number): Feeds {
  const rand = seeded(seed);
  const fx = rand() * 0.3, fy = rand() * 0.3, phase = rand() * 6;
  const data = new Float32Array(3 * size * size);
  for (let c = 0; c < 3; c++) {
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        data[c * size * size + y * size + x] = 0.5 + 0.4 * Math.sin(x * fx + y * fy + phase + c) * Math.cos((x - y) * 0.05 * (c + 1));
      }
    }
  }
  return { image: new ort.Tensor('float32', data, [1, 3, size, size]) };
}

t.test('weights: per-channel int8 quantize → dequantize stays within half a step', async (t) => {
  const rand = seeded(7);
  const dims = [8, 4, 3, 3];
  const w = new Float32Array(8 * 4 * 9).map((_, i) => (rand() * 2 - 1) * (1 + Math.floor(i / 36) * 3));
  w[5] = 0; // an exact zero stays exact
  for (let k = 36; k < 72; k++) w[k] = 0; // an all-zero channel must not divide by zero
  const q = quantizeWeightsPerChannel(w, dims, 0);
  t.equal(q.scales.length, 8);
  t.equal(q.scales[1], 1, 'an all-zero channel gets scale 1');
  const back = dequantizeWeightsPerChannel(q, dims);
  for (let i = 0; i < w.length; i++) {
    const step = q.scales[Math.floor(i / 36)]!;
    if (Math.abs(back[i]! - w[i]!) > step / 2 + 1e-7) t.fail(`element ${i}: ${w[i]} → ${back[i]} (step ${step})`);
  }
  t.equal(back[5], 0);
  t.ok(q.values.every((v) => v >= -127 && v <= 127), 'symmetric range ±127');
  // The channel's largest magnitude maps to ±127 exactly.
  const c2 = Array.from(w.slice(72, 108), Math.abs);
  t.equal(Math.max(...Array.from(q.values.slice(72, 108), Math.abs)), 127);
  t.ok(Math.abs(q.scales[2]! - Math.max(...c2) / 127) < 1e-9);

  // Axis 1 (MatMul weights [K, N]: one scale per output column).
  const m = new Float32Array(6 * 4).map(() => rand() * 2 - 1);
  const qm = quantizeWeightsPerChannel(m, [6, 4], 1);
  t.equal(qm.scales.length, 4);
  const mb = dequantizeWeightsPerChannel(qm, [6, 4]);
  const worst = Math.max(...Array.from(m, (v, i) => Math.abs(mb[i]! - v) / qm.scales[i % 4]!));
  t.ok(worst <= 0.5 + 1e-6, `matmul weights within half a step (worst ${worst.toFixed(3)} steps)`);
});

t.test('activations: uint8 parameters represent zero exactly and cover the range', async (t) => {
  const p = uint8Params({ min: -1, max: 3 });
  t.ok(Math.abs(p.scale - 4 / 255) < 1e-12);
  t.equal(p.zeroPoint, 64);
  const relu = uint8Params({ min: 0, max: 6 });
  t.equal(relu.zeroPoint, 0, 'a ReLU range starts at zero point 0 (what lets the quantizer absorb the Relu)');
  const positive = uint8Params({ min: 2, max: 4 });
  t.equal(positive.zeroPoint, 0, 'a range not holding 0 is widened to it');
  t.ok(Math.abs(positive.scale - 4 / 255) < 1e-12);
  t.same(uint8Params({ min: 0, max: 0 }), { scale: 1, zeroPoint: 0 }, 'a constant-zero tensor gets a usable scale');
});

t.test('calibration: ranges of a hand-made graph equal the hand-computed min/max', async (t) => {
  // y1 = x * 2, y2 = y1 - 3, y3 = relu(y2)
  const model = makeModel({
    graph: {
      name: 'hand',
      nodes: [
        makeNode('Mul', ['x', 'two'], ['y1']),
        makeNode('Sub', ['y1', 'three'], ['y2']),
        makeNode('Relu', ['y2'], ['y3']),
      ],
      initializers: [floatTensor('two', [], [2]), floatTensor('three', [], [3])],
      inputs: [valueInfo('x', DataType.FLOAT, ['N', 3])],
      outputs: [valueInfo('y3', DataType.FLOAT, ['N', 3])],
    },
  });
  const rows = [[0.5, -1, 2], [4, 0.25, -2.5], [1, 1, 1]];
  const samples = rows.map((r) => ({ x: new ort.Tensor('float32', Float32Array.from(r), [1, 3]) }));
  const all = rows.flat();
  const y1 = all.map((v) => v * 2), y2 = y1.map((v) => v - 3), y3 = y2.map((v) => Math.max(0, v));
  const ranges = await calibrateRanges(model, ['x', 'y1', 'y2', 'y3'], samples, { method: 'minmax' });
  t.same(ranges.get('x'), { min: Math.min(...all), max: Math.max(...all) });
  t.same(ranges.get('y1'), { min: Math.min(...y1), max: Math.max(...y1) });
  t.same(ranges.get('y2'), { min: Math.min(...y2), max: Math.max(...y2) });
  t.same(ranges.get('y3'), { min: 0, max: Math.max(...y3) });

  // Percentile clips single outliers that min-max would keep.
  const hist = new Float64Array(100);
  hist[0] = 1; // one outlier at each end
  hist[99] = 1;
  for (let b = 50; b < 60; b++) hist[b] = 1000;
  const clipped = percentileRange(hist, -100, 100, 0.9999);
  t.ok(clipped.min >= 0 && clipped.max <= 20 + 1e-9, `outlier dropped: [${clipped.min}, ${clipped.max}]`);
  t.same(percentileRange(hist, -100, 100, 1), { min: -100, max: 100 }, 'keep=100% is min-max');
});

t.test('int8: the QDQ classifier is valid ONNX, onnxruntime fuses it to QLinearConv, and it tracks fp32', async (t) => {
  const size = 32;
  const fp32 = buildClassifier({ size });
  const { model } = prepareModel(decodeModel(fp32));
  const calibration = Array.from({ length: 12 }, (_, i) => imageFeeds(size, i));
  const heldOut = Array.from({ length: 12 }, (_, i) => imageFeeds(size, 100 + i));
  const ranges = await calibrateRanges(model, calibrationTensors(model), calibration, { method: 'percentile' });
  const plan = planQuantization(model);
  t.same(plan.compute, ['conv0', 'conv1', 'conv2', 'conv3', 'fc']);
  const q = quantizeInt8(model, ranges, plan);
  t.equal(q.absorbed.length, 4, 'the four Relus are absorbed into the conv output ranges');
  const bytes = encodeModel(q.model);
  const decoded = decodeModel(bytes);
  const ops = decoded.graph!.node!.map((n) => n.opType);
  t.ok(ops.includes('QuantizeLinear') && ops.includes('DequantizeLinear'));
  const inits = new Map(decoded.graph!.initializer!.map((i) => [i.name, i]));
  t.equal(inits.get('conv1.weight_quantized')?.dataType, DataType.INT8, 'conv weights are int8');
  t.equal(inits.get('conv1.bias_quantized')?.dataType, DataType.INT32, 'conv bias is int32');
  t.notOk(inits.has('conv1.weight'), 'the float weights are gone');

  const optimized = join(tmpdir(), `edge-agent-qdq-${process.pid}.onnx`);
  t.teardown(() => rmSync(optimized, { force: true }));
  const session = await ort.InferenceSession.create(bytes, { optimizedModelFilePath: optimized, logSeverityLevel: 3 });
  const fused = decodeModel(readFileSync(optimized)).graph!.node!.map((n) => n.opType);
  t.equal(fused.filter((o) => o === 'QLinearConv').length, 4, 'every conv runs as QLinearConv');
  t.notOk(fused.includes('Conv'), 'no float conv is left');

  const reference = await runAll(await ort.InferenceSession.create(fp32), heldOut);
  const acc = compareOutputs(reference, await runAll(session, heldOut));
  t.ok(acc.cosine > 0.99, `held-out cosine ${acc.cosine}`);
  t.equal(acc.top1Agreement !== undefined, true, 'logits [N,10] count as class scores');

  // The batch axis stays dynamic: the runtime batches frames of several streams into one run.
  const batch = new Float32Array(3 * 3 * size * size);
  heldOut.slice(0, 3).forEach((f, i) => batch.set(f.image!.data as Float32Array, i * 3 * size * size));
  const batched = await session.run({ image: new ort.Tensor('float32', batch, [3, 3, size, size]) });
  t.same(batched.logits!.dims, [3, 10], 'the int8 model runs a batch of 3');

  // A deliberately broken variant: activation ranges 1000× too narrow saturate everything.
  const broken = new Map([...ranges].map(([k, r]) => [k, { min: r.min / 1000, max: r.max / 1000 }]));
  const bad = compareOutputs(reference, await runAll(await ort.InferenceSession.create(encodeModel(quantizeInt8(model, broken, plan).model)), heldOut));
  t.ok(bad.cosine < 0.99, `the broken variant fails the bound (cosine ${bad.cosine})`);
});

t.test('int8: excluded layers stay float, only-mode quantizes a single layer', async (t) => {
  const { model } = prepareModel(decodeModel(buildClassifier({ size: 32 })));
  const plan = planQuantization(model, { exclude: ['conv0', 'fc'] });
  t.same(plan.compute, ['conv1', 'conv2', 'conv3']);
  t.same(plan.excluded, ['conv0', 'fc']);
  t.same(plan.flow, [], 'pool/flatten lead to no quantized compute op once fc is float');
  const ranges = await calibrateRanges(model, calibrationTensors(model), [imageFeeds(32, 1), imageFeeds(32, 2)]);
  const q = quantizeInt8(model, ranges, plan);
  const nodes = requireGraph(q.model).node as NodeProto[];
  const conv0 = nodes.find((n) => n.name === 'conv0')!;
  t.equal(conv0.input?.[1], 'conv0.weight', 'conv0 keeps its float weight');
  const only = planQuantization(model, { only: ['conv2'] });
  t.same(only.compute, ['conv2']);
  t.same(only.flow, []);
});

t.test('fp16: weights are half precision, inputs and outputs stay float32, outputs match', async (t) => {
  const size = 32;
  const fp32 = buildClassifier({ size });
  const { model } = prepareModel(decodeModel(fp32));
  const half = convertFloat16(model);
  const inits = half.graph!.initializer!;
  t.ok(inits.every((i) => i.dataType !== DataType.FLOAT), 'no float32 initializer left');
  t.ok(inits.some((i) => i.dataType === DataType.FLOAT16));
  const session = await ort.InferenceSession.create(encodeModel(half), { logSeverityLevel: 3 });
  const meta = session.inputMetadata[0]!;
  t.equal(meta.isTensor && meta.type, 'float32', 'the input is still float32');
  const samples = [imageFeeds(size, 3), imageFeeds(size, 4)];
  const out = await session.run(samples[0]!);
  t.equal(out.logits!.type, 'float32', 'the output is still float32');
  const acc = compareOutputs(await runAll(await ort.InferenceSession.create(fp32), samples), await runAll(session, samples));
  t.ok(acc.cosine > 0.9999, `fp16 cosine ${acc.cosine}`);
});

t.test('cross-layer equalization leaves the float function unchanged', async (t) => {
  const fp32 = buildClassifier({ size: 32 });
  const model = decodeModel(fp32);
  const pairs = equalizeCrossLayer(model);
  t.equal(pairs, 3, 'conv0→conv1, conv1→conv2, conv2→conv3 through their Relus');
  const samples = [imageFeeds(32, 5), imageFeeds(32, 6)];
  const a = await runAll(await ort.InferenceSession.create(fp32), samples);
  const b = await runAll(await ort.InferenceSession.create(encodeModel(model)), samples);
  const acc = compareOutputs(a, b);
  t.ok(acc.maxAbsError < 1e-4, `max abs error ${acc.maxAbsError}`);
});

t.test('plan: Mul/Add with the constant first and Div by a constant carry int8 between convs (hard-swish chains)', async (t) => {
  // Conv → Mul(3, ·) → Div(·, 6) → Conv, as paddle2onnx writes PP-LCNet's scaled hard-swish: without flow ops
  // there, the first Conv's output has no QuantizeLinear and onnxruntime cannot run it as QLinearConv.
  const model = makeModel({
    opset: 13,
    graph: {
      name: 'chain',
      nodes: [
        makeNode('Conv', ['x', 'w1'], ['c1'], {}, 'conv1'),
        makeNode('Mul', ['three', 'c1'], ['m'], {}, 'mul'),
        makeNode('Div', ['m', 'six'], ['d'], {}, 'div'),
        makeNode('Conv', ['d', 'w2'], ['y'], {}, 'conv2'),
      ],
      initializers: [
        floatTensor('w1', [2, 2, 1, 1], [1, 2, 3, 4]), floatTensor('w2', [2, 2, 1, 1], [1, -1, 2, 0.5]),
        floatTensor('three', [], [3]), floatTensor('six', [], [6]),
      ],
      inputs: [valueInfo('x', DataType.FLOAT, [1, 2, 3, 3])],
      outputs: [valueInfo('y', DataType.FLOAT, [1, 2, 3, 3])],
    },
  });
  const plan = planQuantization(model);
  t.same([...plan.compute].sort(), ['conv1', 'conv2']);
  t.same([...plan.flow].sort(), ['div', 'mul'], 'the constant-first Mul and the Div join the int8 region');
});

t.test('int8: a Conv read only by a float activation (HardSwish) gets a QuantizeLinear, so it runs as QLinearConv', async (t) => {
  const w = Float32Array.from({ length: 4 * 3 * 3 * 3 }, (_, i) => Math.sin(i * 0.37) * 0.5);
  const source = makeModel({
    opset: 14,
    graph: {
      name: 'conv-hswish',
      nodes: [
        makeNode('Conv', ['image', 'w', 'b'], ['c'], { pads: attr.ints([1, 1, 1, 1]) }, 'conv'),
        makeNode('HardSwish', ['c'], ['y'], {}, 'hswish'),
      ],
      initializers: [floatTensor('w', [4, 3, 3, 3], w), floatTensor('b', [4], [0.1, -0.2, 0.3, 0])],
      inputs: [valueInfo('image', DataType.FLOAT, ['N', 3, 16, 16])],
      outputs: [valueInfo('y', DataType.FLOAT, ['N', 4, 16, 16])],
    },
  });
  const { model } = prepareModel(source);
  const ranges = await calibrateRanges(model, calibrationTensors(model), Array.from({ length: 6 }, (_, i) => imageFeeds(16, i)));
  const plan = planQuantization(model);
  t.same(plan.compute, ['conv']);
  const q = quantizeInt8(model, ranges, plan);
  const nodes = requireGraph(q.model).node as NodeProto[];
  const quantizeC = nodes.find((n) => n.opType === 'QuantizeLinear' && n.input[0] === 'c');
  t.ok(quantizeC, 'the Conv output has a QuantizeLinear');
  const dq = nodes.find((n) => n.opType === 'DequantizeLinear' && n.input[0] === quantizeC?.output[0]);
  t.equal(nodes.find((n) => n.opType === 'HardSwish')?.input[0], dq?.output[0], 'HardSwish reads the dequantized Conv output');

  const optimized = join(tmpdir(), `edge-agent-qdq-hswish-${process.pid}.onnx`);
  t.teardown(() => rmSync(optimized, { force: true }));
  const session = await ort.InferenceSession.create(encodeModel(q.model), { optimizedModelFilePath: optimized, logSeverityLevel: 3 });
  const fused = decodeModel(readFileSync(optimized)).graph!.node!.map((n) => n.opType);
  t.equal(fused.filter((o) => o === 'QLinearConv').length, 1, `the Conv runs as QLinearConv (${fused.join(', ')})`);
  t.notOk(fused.includes('Conv'), 'no float Conv is left');

  const heldOut = Array.from({ length: 4 }, (_, i) => imageFeeds(16, 50 + i));
  const acc = compareOutputs(await runAll(await ort.InferenceSession.create(encodeModel(source)), heldOut), await runAll(session, heldOut));
  t.ok(acc.cosine > 0.99, `held-out cosine ${acc.cosine}`);
});
