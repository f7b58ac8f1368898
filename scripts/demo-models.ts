import {
  attr, DataType, encodeModel, floatTensor, int64Tensor, makeModel, makeNode, makeTensor, toFloat16Array, valueInfo,
  type Dim, type NodeProto, type TensorProto,
} from '../agent/compress/onnx-graph.js';

/**
 * Deterministic demo models for the model repository, the tests and the benchmarks. Weights come from a
 * seeded PRNG so every build yields identical bytes (the model hash is part of what the fleet syncs).
 */

/** mulberry32: tiny, fast, good enough for weight init; identical across platforms. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Standard normal via Box–Muller over a seeded uniform source. */
function gaussian(rand: () => number): () => number {
  return () => {
    const u = Math.max(rand(), 1e-12);
    const v = rand();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  };
}

/** He-normal weights: std = sqrt(2 / fan_in), keeps activations in range through Relu stacks. */
function heWeights(normal: () => number, count: number, fanIn: number): Float32Array {
  const std = Math.sqrt(2 / fanIn);
  const w = new Float32Array(count);
  for (let i = 0; i < count; i++) w[i] = normal() * std;
  return w;
}

function smallBias(rand: () => number, count: number, amplitude = 0.05): Float32Array {
  const b = new Float32Array(count);
  for (let i = 0; i < count; i++) b[i] = (rand() * 2 - 1) * amplitude;
  return b;
}

export interface ClassifierOptions {
  /** Input height and width (square). */
  readonly size?: number;
  readonly classes?: number;
  /** Fixed batch size instead of the dynamic 'N' (for tests of models that cannot batch). */
  readonly fixedBatch?: number;
  /** Conv stages; defaults to CLASSIFIER_STAGES. */
  readonly stages?: readonly { readonly channels: number; readonly stride: number }[];
}

/**
 * Channels per conv stage. Sized so one 112×112 frame at batch 1 takes a few ms on a small CPU: the
 * benchmarks need inference, not the transport, to dominate a frame's latency.
 */
export const CLASSIFIER_STAGES: readonly { readonly channels: number; readonly stride: number }[] = [
  { channels: 32, stride: 2 }, { channels: 64, stride: 1 }, { channels: 128, stride: 2 }, { channels: 192, stride: 1 },
];

/**
 * Image classifier: image float32 [N,3,S,S] → logits float32 [N,classes]. Four 3×3 Conv+Relu stages
 * (strides 2,1,2,1: 112→56→56→28→28), GlobalAveragePool, Flatten, Gemm. ~0.29 GMAC per 112×112 frame.
 */
export function buildClassifier(options: ClassifierOptions = {}): Uint8Array {
  const size = options.size ?? 112;
  const classes = options.classes ?? 10;
  const batch: Dim = options.fixedBatch ?? 'N';
  const rand = mulberry32(0xc1a55);
  const normal = gaussian(rand);
  const nodes: NodeProto[] = [];
  const inits: TensorProto[] = [];
  let prev = 'image';
  let inCh = 3;
  (options.stages ?? CLASSIFIER_STAGES).forEach(({ channels: outCh, stride }, i) => {
    const w = `conv${i}.weight`;
    const b = `conv${i}.bias`;
    inits.push(floatTensor(w, [outCh, inCh, 3, 3], heWeights(normal, outCh * inCh * 9, inCh * 9)));
    inits.push(floatTensor(b, [outCh], smallBias(rand, outCh)));
    nodes.push(makeNode('Conv', [prev, w, b], [`conv${i}`], {
      kernel_shape: attr.ints([3, 3]), strides: attr.ints([stride, stride]), pads: attr.ints([1, 1, 1, 1]),
    }, `conv${i}`));
    nodes.push(makeNode('Relu', [`conv${i}`], [`relu${i}`], {}, `relu${i}`));
    prev = `relu${i}`;
    inCh = outCh;
  });
  nodes.push(makeNode('GlobalAveragePool', [prev], ['pooled'], {}, 'pool'));
  nodes.push(makeNode('Flatten', ['pooled'], ['features'], { axis: attr.int(1) }, 'flatten'));
  // Pooled ReLU features are all positive and move together; rows summing to zero cancel that common mode, so
  // the random classifier spreads real images over more than one class.
  const fc = heWeights(normal, classes * inCh, inCh);
  for (let c = 0; c < classes; c++) {
    let mean = 0;
    for (let j = 0; j < inCh; j++) mean += fc[c * inCh + j]! / inCh;
    for (let j = 0; j < inCh; j++) fc[c * inCh + j]! -= mean;
  }
  inits.push(floatTensor('fc.weight', [classes, inCh], fc));
  inits.push(floatTensor('fc.bias', [classes], smallBias(rand, classes)));
  nodes.push(makeNode('Gemm', ['features', 'fc.weight', 'fc.bias'], ['logits'], { transB: attr.int(1) }, 'fc'));
  return encodeModel(makeModel({
    docString: 'edge-agent demo image classifier (random weights, deterministic)',
    graph: {
      name: 'classifier',
      nodes,
      initializers: inits,
      inputs: [valueInfo('image', DataType.FLOAT, [batch, 3, size, size])],
      outputs: [valueInfo('logits', DataType.FLOAT, [batch, classes])],
    },
  }));
}

/** Tiny MLP: x float32 [N,1024] (a 4 KiB frame) → y float32 [N,16]; for transport-bound benchmarks. */
export function buildTiny(): Uint8Array {
  const rand = mulberry32(0x7141);
  const normal = gaussian(rand);
  const hidden = 64;
  return encodeModel(makeModel({
    docString: 'edge-agent demo tiny MLP (random weights, deterministic)',
    graph: {
      name: 'tiny',
      nodes: [
        makeNode('Gemm', ['x', 'fc1.weight', 'fc1.bias'], ['h'], { transB: attr.int(1) }, 'fc1'),
        makeNode('Relu', ['h'], ['h_relu'], {}, 'relu'),
        makeNode('Gemm', ['h_relu', 'fc2.weight', 'fc2.bias'], ['y'], { transB: attr.int(1) }, 'fc2'),
      ],
      initializers: [
        floatTensor('fc1.weight', [hidden, 1024], heWeights(normal, hidden * 1024, 1024)),
        floatTensor('fc1.bias', [hidden], smallBias(rand, hidden)),
        floatTensor('fc2.weight', [16, hidden], heWeights(normal, 16 * hidden, hidden)),
        floatTensor('fc2.bias', [16], smallBias(rand, 16)),
      ],
      inputs: [valueInfo('x', DataType.FLOAT, ['N', 1024])],
      outputs: [valueInfo('y', DataType.FLOAT, ['N', 16])],
    },
  }));
}

/**
 * Stateful streaming filter, a GRU cell built from plain ops:
 *   z = σ(x·Wz + h·Uz + bz), r = σ(x·Wr + h·Ur + br), n = tanh(x·Wn + (r⊙h)·Un + bn),
 *   h_out = (1 − z)⊙n + z⊙h, y = h_out·Wy + by.
 * Inputs x [N,8], h_in [N,32]; outputs y [N,4], h_out [N,32]. y depends on h_in, so state handling is testable.
 */
export function buildFilter(): Uint8Array {
  const rand = mulberry32(0xf117e2);
  const normal = gaussian(rand);
  const X = 8, H = 32, Y = 4;
  // Xavier-ish scale keeps the gates out of saturation so the state visibly moves y.
  const w = (name: string, rows: number, cols: number): TensorProto => {
    const std = Math.sqrt(2 / (rows + cols)) * 1.5;
    const v = new Float32Array(rows * cols);
    for (let i = 0; i < v.length; i++) v[i] = normal() * std;
    return floatTensor(name, [rows, cols], v);
  };
  const inits: TensorProto[] = [
    w('Wz', X, H), w('Uz', H, H), floatTensor('bz', [H], smallBias(rand, H, 0.1)),
    w('Wr', X, H), w('Ur', H, H), floatTensor('br', [H], smallBias(rand, H, 0.1)),
    w('Wn', X, H), w('Un', H, H), floatTensor('bn', [H], smallBias(rand, H, 0.1)),
    w('Wy', H, Y), floatTensor('by', [Y], smallBias(rand, Y, 0.1)),
    floatTensor('one', [], [1]),
  ];
  const mm = (a: string, b: string, out: string): NodeProto => makeNode('MatMul', [a, b], [out], {}, out);
  const add = (a: string, b: string, out: string): NodeProto => makeNode('Add', [a, b], [out], {}, out);
  const nodes: NodeProto[] = [
    mm('x', 'Wz', 'xz'), mm('h_in', 'Uz', 'hz'), add('xz', 'hz', 'z_sum'), add('z_sum', 'bz', 'z_pre'),
    makeNode('Sigmoid', ['z_pre'], ['z'], {}, 'z'),
    mm('x', 'Wr', 'xr'), mm('h_in', 'Ur', 'hr'), add('xr', 'hr', 'r_sum'), add('r_sum', 'br', 'r_pre'),
    makeNode('Sigmoid', ['r_pre'], ['r'], {}, 'r'),
    makeNode('Mul', ['r', 'h_in'], ['rh'], {}, 'rh'),
    mm('x', 'Wn', 'xn'), mm('rh', 'Un', 'hn'), add('xn', 'hn', 'n_sum'), add('n_sum', 'bn', 'n_pre'),
    makeNode('Tanh', ['n_pre'], ['n'], {}, 'n'),
    makeNode('Sub', ['one', 'z'], ['one_minus_z'], {}, 'one_minus_z'),
    makeNode('Mul', ['one_minus_z', 'n'], ['keep_new'], {}, 'keep_new'),
    makeNode('Mul', ['z', 'h_in'], ['keep_old'], {}, 'keep_old'),
    add('keep_new', 'keep_old', 'h_out'),
    mm('h_out', 'Wy', 'y_mm'), add('y_mm', 'by', 'y'),
  ];
  return encodeModel(makeModel({
    docString: 'edge-agent demo stateful filter (GRU cell, random weights, deterministic)',
    graph: {
      name: 'filter',
      nodes,
      initializers: inits,
      inputs: [valueInfo('x', DataType.FLOAT, ['N', X]), valueInfo('h_in', DataType.FLOAT, ['N', H])],
      outputs: [valueInfo('y', DataType.FLOAT, ['N', Y]), valueInfo('h_out', DataType.FLOAT, ['N', H])],
    },
  }));
}

/**
 * dtype coverage: f16 float16 [N,4] → f16_out = f16·2; i64 int64 [N,4] → i64_out = i64+1;
 * u8 uint8 [N,4] → u8_out = u8 (Identity); sum float32 [N,1] = Σ of all three cast to float32, per row.
 */
export function buildTypes(): Uint8Array {
  const nodes: NodeProto[] = [
    makeNode('Mul', ['f16', 'two_f16'], ['f16_out'], {}, 'f16_double'),
    makeNode('Add', ['i64', 'one_i64'], ['i64_out'], {}, 'i64_increment'),
    makeNode('Identity', ['u8'], ['u8_out'], {}, 'u8_identity'),
    makeNode('Cast', ['f16'], ['f16_f32'], { to: attr.int(DataType.FLOAT) }, 'cast_f16'),
    makeNode('Cast', ['i64'], ['i64_f32'], { to: attr.int(DataType.FLOAT) }, 'cast_i64'),
    makeNode('Cast', ['u8'], ['u8_f32'], { to: attr.int(DataType.FLOAT) }, 'cast_u8'),
    makeNode('Concat', ['f16_f32', 'i64_f32', 'u8_f32'], ['all_f32'], { axis: attr.int(1) }, 'concat'),
    makeNode('ReduceSum', ['all_f32', 'sum_axes'], ['sum'], { keepdims: attr.int(1) }, 'sum'),
  ];
  return encodeModel(makeModel({
    docString: 'edge-agent demo dtype model (float16, int64, uint8 in and out)',
    graph: {
      name: 'types',
      nodes,
      initializers: [
        makeTensor('two_f16', DataType.FLOAT16, [], toFloat16Array([2])),
        int64Tensor('one_i64', [], [1]),
        int64Tensor('sum_axes', [1], [1]),
      ],
      inputs: [
        valueInfo('f16', DataType.FLOAT16, ['N', 4]),
        valueInfo('i64', DataType.INT64, ['N', 4]),
        valueInfo('u8', DataType.UINT8, ['N', 4]),
      ],
      outputs: [
        valueInfo('f16_out', DataType.FLOAT16, ['N', 4]),
        valueInfo('i64_out', DataType.INT64, ['N', 4]),
        valueInfo('u8_out', DataType.UINT8, ['N', 4]),
        valueInfo('sum', DataType.FLOAT, ['N', 1]),
      ],
    },
  }));
}

export const DEMO_MODELS: Readonly<Record<'classifier' | 'tiny' | 'filter' | 'types', () => Uint8Array>> = {
  classifier: () => buildClassifier(),
  tiny: buildTiny,
  filter: buildFilter,
  types: buildTypes,
};
