import type { TensorRange } from './calibrate.js';
import { indexGraph, inferElemTypes, pruneInitializers, requireGraph, uniqueNamer, type GraphIndex } from './graph-analysis.js';
import { cloneModel } from './prepare-graph.js';
import {
  attr, DataType, getFloatAttribute, getIntAttribute, makeNode, makeTensor, tensorDims, tensorToFloat32, tensorToNumbers,
  type ModelProto, type NodeProto, type TensorProto,
} from './onnx-graph.js';

/**
 * Static int8 quantization in QDQ form. Weights of Conv/MatMul/Gemm become per-channel symmetric int8 behind
 * DequantizeLinear; activations get QuantizeLinear→DequantizeLinear pairs with uint8 scales from calibration;
 * biases become int32 with scale = input scale × weight scale. That is the exact pattern onnxruntime's QDQ
 * transformers fuse into QLinearConv / QLinearMatMul / QGemm (and QLinearAdd, QLinearConcat, … for the
 * "flow" ops around them), so the int8 graph runs integer kernels end to end.
 */

/** Ops with weights whose int8 kernels carry the speed-up. */
export const COMPUTE_OPS: ReadonlySet<string> = new Set(['Conv', 'MatMul', 'Gemm']);
/** Ops that get QDQ on their inputs and outputs so int8 flows through them between compute ops. */
export const FLOW_OPS: ReadonlySet<string> = new Set([
  'Add', 'Mul', 'MaxPool', 'AveragePool', 'GlobalAveragePool', 'Concat', 'Reshape', 'Transpose', 'Flatten',
  'Squeeze', 'Unsqueeze', 'Resize', 'Sigmoid', 'LeakyRelu', 'Slice', 'Split', 'Div',
]);
const COMMUTATIVE_OPS: ReadonlySet<string> = new Set(['Add', 'Mul']);
/** Ops that only move or select values: their output reuses the input's scale, so onnxruntime drops the QDQ pair. */
const SHARED_SCALE_OPS: ReadonlySet<string> = new Set(['Reshape', 'Transpose', 'Flatten', 'Squeeze', 'Unsqueeze', 'MaxPool', 'Slice', 'Split']);
/**
 * Float activations after a compute op: onnxruntime runs a Conv as QLinearConv only with a QuantizeLinear on
 * its output, so that output is quantized even though these read it in float (one DequantizeLinear in front).
 * Without it the Conv would run in float on dequantized weights, slower than the fp32 model.
 */
const FLOAT_ACTIVATIONS: ReadonlySet<string> = new Set(['HardSwish', 'HardSigmoid', 'Tanh', 'Softplus', 'Elu', 'Selu', 'Erf']);
/** Activations a quantized producer absorbs: a uint8 range starting at 0 clamps exactly like them. */
const ABSORBABLE_ACTIVATIONS: ReadonlySet<string> = new Set(['Relu', 'Clip']);

export const INT8_WEIGHT_MAX = 127;

export interface QuantizedWeights {
  readonly values: Int8Array;
  readonly scales: Float32Array;
  readonly axis: number;
}

/**
 * Symmetric per-channel int8 (range ±127, zero point 0) along `axis`. A channel of zeros gets scale 1 so
 * DequantizeLinear never divides by zero downstream.
 */
export function quantizeWeightsPerChannel(values: Float32Array, dims: readonly number[], axis: number): QuantizedWeights {
  const channels = dims[axis] ?? 1;
  const inner = dims.slice(axis + 1).reduce((a, b) => a * b, 1);
  const maxAbs = new Float32Array(channels);
  for (let i = 0; i < values.length; i++) {
    const c = Math.floor(i / inner) % channels;
    const a = Math.abs(values[i]!);
    if (a > maxAbs[c]!) maxAbs[c] = a;
  }
  const scales = new Float32Array(channels);
  for (let c = 0; c < channels; c++) scales[c] = maxAbs[c]! > 0 ? maxAbs[c]! / INT8_WEIGHT_MAX : 1;
  const q = new Int8Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const c = Math.floor(i / inner) % channels;
    q[i] = Math.max(-INT8_WEIGHT_MAX, Math.min(INT8_WEIGHT_MAX, Math.round(values[i]! / scales[c]!)));
  }
  return { values: q, scales, axis };
}

export function dequantizeWeightsPerChannel(w: QuantizedWeights, dims: readonly number[]): Float32Array {
  const channels = dims[w.axis] ?? 1;
  const inner = dims.slice(w.axis + 1).reduce((a, b) => a * b, 1);
  const out = new Float32Array(w.values.length);
  for (let i = 0; i < out.length; i++) out[i] = w.values[i]! * w.scales[Math.floor(i / inner) % channels]!;
  return out;
}

export interface ActivationParams {
  readonly scale: number;
  readonly zeroPoint: number;
}

/** Asymmetric uint8 parameters for a range; the range always includes 0 so zero is exactly representable. */
export function uint8Params(range: TensorRange): ActivationParams {
  const lo = Math.min(0, range.min);
  const hi = Math.max(0, range.max);
  if (!(hi - lo > 1e-12) || !Number.isFinite(hi - lo)) return { scale: 1, zeroPoint: 0 };
  const scale = (hi - lo) / 255;
  const zeroPoint = Math.max(0, Math.min(255, Math.round(-lo / scale)));
  return { scale, zeroPoint };
}

export interface QuantizationPlan {
  /** Conv/MatMul/Gemm nodes (by name) that will run in int8. */
  readonly compute: readonly string[];
  /** Flow nodes that get QDQ around them. */
  readonly flow: readonly string[];
  /** Nodes left in float because they were excluded. */
  readonly excluded: readonly string[];
}

export interface PlanOptions {
  /** Node names kept in float. */
  readonly exclude?: Iterable<string>;
  /** Quantize only these nodes (per-layer sensitivity runs); flow ops are not added around them. */
  readonly only?: Iterable<string>;
}

function weightAxis(node: NodeProto): number {
  if (node.opType === 'Gemm') return getIntAttribute(node, 'transB', 0) === 1 ? 0 : 1;
  if (node.opType === 'MatMul') return 1;
  return 0;
}

function isComputeCandidate(node: NodeProto, index: GraphIndex, types: Map<string, number>): boolean {
  if (!COMPUTE_OPS.has(node.opType ?? '')) return false;
  const x = node.input[0] ?? '';
  const w = index.initializers.get(node.input[1] ?? '');
  if (!w || w.dataType !== DataType.FLOAT || index.initializers.has(x) || types.get(x) !== DataType.FLOAT) return false;
  const rank = tensorDims(w).length;
  if (node.opType === 'MatMul') return rank === 2;
  if (node.opType === 'Gemm') {
    return rank === 2 && getIntAttribute(node, 'transA', 0) === 0 && getFloatAttribute(node, 'alpha', 1) === 1 && getFloatAttribute(node, 'beta', 1) === 1;
  }
  return rank >= 3;
}

function isFlowCandidate(node: NodeProto, index: GraphIndex, types: Map<string, number>): boolean {
  if (!FLOW_OPS.has(node.opType ?? '') || (node.domain && node.domain !== 'ai.onnx')) return false;
  // Add and Mul commute: exporters put a constant operand first as often as second.
  const x = (COMMUTATIVE_OPS.has(node.opType ?? '') ? node.input.find((i) => i && !index.initializers.has(i)) : node.input[0]) ?? '';
  if (types.get(x) !== DataType.FLOAT || index.initializers.has(x)) return false;
  return (node.output ?? []).filter(Boolean).every((o) => types.get(o) === DataType.FLOAT);
}

/** Nodes a model would quantize: every candidate compute op, and flow ops connected to them through float tensors. */
export function planQuantization(model: ModelProto, options: PlanOptions = {}): QuantizationPlan {
  const graph = requireGraph(model);
  const index = indexGraph(graph);
  const types = inferElemTypes(graph);
  const exclude = new Set(options.exclude ?? []);
  const only = options.only ? new Set(options.only) : undefined;
  const nodes = graph.node as NodeProto[];
  const compute = nodes.filter((n) => isComputeCandidate(n, index, types));
  const excluded = nodes.filter((n) => exclude.has(n.name ?? '') && (isComputeCandidate(n, index, types) || isFlowCandidate(n, index, types)));
  if (only) {
    return {
      compute: compute.filter((n) => only.has(n.name ?? '')).map((n) => n.name ?? ''),
      flow: nodes.filter((n) => only.has(n.name ?? '') && isFlowCandidate(n, index, types)).map((n) => n.name ?? ''),
      excluded: [],
    };
  }
  const selected = new Set(compute.filter((n) => !exclude.has(n.name ?? '')));
  const flowCandidates = nodes.filter((n) => isFlowCandidate(n, index, types) && !exclude.has(n.name ?? ''));
  // Grow the flow region from the compute ops: a flow op joins when a float tensor links it to a quantized
  // node (directly or through an absorbed Relu/Clip), so isolated float islands stay untouched.
  const neighbours = (n: NodeProto): NodeProto[] => {
    const out: NodeProto[] = [];
    for (const i of n.input ?? []) {
      const p = index.producers.get(i);
      if (p) out.push(p, ...(ABSORBABLE_ACTIVATIONS.has(p.opType ?? '') ? [index.producers.get(p.input[0] ?? '')].filter((x): x is NodeProto => !!x) : []));
    }
    for (const o of n.output ?? []) {
      for (const c of index.consumers.get(o) ?? []) {
        out.push(c);
        if (ABSORBABLE_ACTIVATIONS.has(c.opType ?? '')) for (const cc of index.consumers.get(c.output[0] ?? '') ?? []) out.push(cc);
      }
    }
    return out;
  };
  let grew = true;
  while (grew) {
    grew = false;
    for (const f of flowCandidates) {
      if (selected.has(f)) continue;
      if (neighbours(f).some((n) => selected.has(n))) { selected.add(f); grew = true; }
    }
  }
  // Flow ops from which no path leads to a quantized compute op (heads: Transpose/Reshape/Concat into the
  // graph outputs) gain no integer kernel, yet would force a uint8 step onto the output of the compute op
  // before them: detector logits span ±1000 there. They stay float.
  const feedsCompute = new Set<NodeProto>();
  const computeSet = new Set(compute.filter((n) => selected.has(n)));
  const reaches = (n: NodeProto, seen: Set<NodeProto>): boolean => {
    if (feedsCompute.has(n)) return true;
    if (seen.has(n)) return false;
    seen.add(n);
    for (const o of n.output ?? []) {
      for (const c of index.consumers.get(o) ?? []) {
        if (computeSet.has(c) || ((selected.has(c) || ABSORBABLE_ACTIVATIONS.has(c.opType ?? '')) && reaches(c, seen))) {
          feedsCompute.add(n);
          return true;
        }
      }
    }
    return false;
  };
  for (const f of flowCandidates) if (selected.has(f) && !reaches(f, new Set())) selected.delete(f);
  return {
    compute: compute.filter((n) => selected.has(n)).map((n) => n.name ?? ''),
    flow: flowCandidates.filter((n) => selected.has(n)).map((n) => n.name ?? ''),
    excluded: excluded.map((n) => n.name ?? ''),
  };
}

/**
 * Float tensors whose ranges a plan may need: every float activation read or written by a candidate node, and
 * the outputs of Relu/Clip that may be absorbed. Graph inputs are included (their range comes from the feeds).
 */
export function calibrationTensors(model: ModelProto): string[] {
  const graph = requireGraph(model);
  const index = indexGraph(graph);
  const types = inferElemTypes(graph);
  const wanted = new Set<string>();
  const addFloat = (t: string | undefined): void => {
    if (t && types.get(t) === DataType.FLOAT && !index.initializers.has(t)) wanted.add(t);
  };
  for (const n of graph.node as NodeProto[]) {
    if (isComputeCandidate(n, index, types) || isFlowCandidate(n, index, types) || ABSORBABLE_ACTIVATIONS.has(n.opType ?? '')) {
      for (const i of n.input ?? []) addFloat(i);
      for (const o of n.output ?? []) addFloat(o);
    }
  }
  return [...wanted];
}

export interface QuantizeResult {
  readonly model: ModelProto;
  readonly plan: QuantizationPlan;
  /** Relu/Clip nodes folded into the preceding quantized op's output range. */
  readonly absorbed: readonly string[];
}

/** Builds the QDQ int8 model for `plan` from a prepared float model and calibrated ranges. */
export function quantizeInt8(source: ModelProto, ranges: ReadonlyMap<string, TensorRange>, plan: QuantizationPlan): QuantizeResult {
  const model = cloneModel(source);
  const graph = requireGraph(model);
  const types = inferElemTypes(graph);
  let index = indexGraph(graph);
  const byName = new Map((graph.node as NodeProto[]).map((n) => [n.name ?? '', n]));
  const compute = new Set(plan.compute.map((n) => byName.get(n)).filter((n): n is NodeProto => !!n));
  const quantized = new Set([...compute, ...plan.flow.map((n) => byName.get(n)).filter((n): n is NodeProto => !!n)]);
  const rangeOf = new Map(ranges);
  const fresh = uniqueNamer(graph);

  // 1. Absorb Relu (and Clip with a lower bound of 0) that sit between quantized nodes into the producer.
  const absorbed: string[] = [];
  const dropped = new Set<NodeProto>();
  for (const act of graph.node as NodeProto[]) {
    if (!ABSORBABLE_ACTIVATIONS.has(act.opType ?? '')) continue;
    const x = act.input[0] ?? '';
    const y = act.output[0] ?? '';
    const producer = index.producers.get(x);
    if (!producer || !quantized.has(producer) || index.graphOutputs.has(x) || index.graphOutputs.has(y)) continue;
    if ((index.consumers.get(x) ?? []).length !== 1) continue;
    const readers = index.consumers.get(y) ?? [];
    if (readers.length === 0 || !readers.every((r) => quantized.has(r))) continue;
    const yRange = rangeOf.get(y);
    if (!yRange) continue;
    if (act.opType === 'Clip') {
      const lo = act.input[1] ? index.initializers.get(act.input[1]) : undefined;
      const hi = act.input[2] ? index.initializers.get(act.input[2]) : undefined;
      if (!lo || tensorToFloat32(lo)[0] !== 0) continue;
      const max = hi ? tensorToFloat32(hi)[0]! : Infinity;
      rangeOf.set(y, { min: 0, max: Math.min(yRange.max, max) });
    } else {
      rangeOf.set(y, { min: 0, max: yRange.max });
    }
    producer.output[producer.output.indexOf(x)] = y;
    dropped.add(act);
    absorbed.push(act.name ?? '');
  }
  if (dropped.size > 0) {
    graph.node = (graph.node as NodeProto[]).filter((n) => !dropped.has(n));
    index = indexGraph(graph);
  }

  // 2. Which activation tensors get a QDQ pair, and with what parameters.
  const qdq = new Map<string, ActivationParams>();
  const need = (t: string | undefined): boolean => !!t && types.get(t) === DataType.FLOAT && !index.initializers.has(t) && !index.graphOutputs.has(t);
  const paramsFor = (t: string): ActivationParams => {
    const r = rangeOf.get(t);
    if (!r) throw new RangeError(`no calibration range for tensor '${t}'`);
    return uint8Params(r);
  };
  for (const node of graph.node as NodeProto[]) {
    if (!quantized.has(node)) continue;
    const activationInputs = compute.has(node) ? [node.input[0]] : node.input;
    for (const i of activationInputs) if (need(i) && !qdq.has(i!)) qdq.set(i!, paramsFor(i!));
    for (const o of node.output) {
      if (!need(o) || qdq.has(o)) continue;
      // An output only float ops read stays float: a uint8 step there buys no integer kernel downstream and
      // costs precision (detector heads end in Conv → Transpose → Reshape → graph output).
      const readers = index.consumers.get(o) ?? [];
      const intoActivation = compute.has(node) && readers.length > 0 && readers.every((c) => FLOAT_ACTIVATIONS.has(c.opType ?? ''));
      if (!intoActivation && !readers.some((c) => quantized.has(c))) continue;
      const shared = SHARED_SCALE_OPS.has(node.opType ?? '') ? qdq.get(node.input[0] ?? '') : undefined;
      qdq.set(o, shared ?? paramsFor(o));
    }
  }

  // 3. Emit QuantizeLinear/DequantizeLinear pairs and rewire readers to the dequantized tensor.
  const newNodes: NodeProto[] = [];
  const initializers = graph.initializer as TensorProto[];
  const dqName = new Map<string, string>();
  const pairFor = (t: string): NodeProto[] => {
    const p = qdq.get(t)!;
    const scale = fresh(`${t}_scale`);
    const zp = fresh(`${t}_zero_point`);
    initializers.push(makeTensor(scale, DataType.FLOAT, [], Float32Array.of(p.scale)));
    initializers.push(makeTensor(zp, DataType.UINT8, [], Uint8Array.of(p.zeroPoint)));
    const q = fresh(`${t}_quantized`);
    const dq = fresh(`${t}_dequantized`);
    dqName.set(t, dq);
    return [
      makeNode('QuantizeLinear', [t, scale, zp], [q], {}, fresh(`${t}_QuantizeLinear`)),
      makeNode('DequantizeLinear', [q, scale, zp], [dq], {}, fresh(`${t}_DequantizeLinear`)),
    ];
  };
  for (const input of graph.input) if (input.name && qdq.has(input.name)) newNodes.push(...pairFor(input.name));
  const weightDq = new Map<string, { dq: string; scales: Float32Array }>();
  for (const node of graph.node as NodeProto[]) {
    if (compute.has(node)) newNodes.push(...quantizeWeightsOf(node));
    newNodes.push(node);
    for (const o of node.output) if (qdq.has(o)) newNodes.push(...pairFor(o));
  }
  for (const node of newNodes) {
    if (node.opType === 'QuantizeLinear') continue;
    node.input = node.input.map((i) => dqName.get(i) ?? i);
  }
  graph.node = newNodes;
  pruneInitializers(graph);
  return { model, plan, absorbed };

  function quantizeWeightsOf(node: NodeProto): NodeProto[] {
    const out: NodeProto[] = [];
    const wName = node.input[1] ?? '';
    const axis = weightAxis(node);
    let w = weightDq.get(`${wName}@${axis}`);
    if (!w) {
      const tensor = index.initializers.get(wName)!;
      const dims = tensorDims(tensor);
      const q = quantizeWeightsPerChannel(tensorToFloat32(tensor), dims, axis);
      const qn = fresh(`${wName}_quantized`);
      const sn = fresh(`${wName}_scale`);
      const zn = fresh(`${wName}_zero_point`);
      initializers.push(makeTensor(qn, DataType.INT8, dims, q.values));
      initializers.push(makeTensor(sn, DataType.FLOAT, [q.scales.length], q.scales));
      initializers.push(makeTensor(zn, DataType.INT8, [q.scales.length], new Int8Array(q.scales.length)));
      const dq = fresh(`${wName}_dequantized`);
      out.push(makeNode('DequantizeLinear', [qn, sn, zn], [dq], { axis: attr.int(axis) }, fresh(`${wName}_DequantizeLinear`)));
      w = { dq, scales: q.scales };
      weightDq.set(`${wName}@${axis}`, w);
    }
    node.input[1] = w.dq;
    // Bias: int32 at scale = input scale × weight scale (per channel), zero point 0 — what QLinearConv expects.
    const bName = node.input[2];
    const bias = bName ? index.initializers.get(bName) : undefined;
    const x = qdq.get(node.input[0] ?? '');
    if (bias && bias.dataType === DataType.FLOAT && x && tensorDims(bias).length === 1 && tensorDims(bias)[0] === w.scales.length) {
      const b = tensorToFloat32(bias);
      const scales = w.scales.map((s) => s * x.scale);
      const q = new Int32Array(b.length);
      for (let i = 0; i < b.length; i++) q[i] = Math.max(-2147483647, Math.min(2147483647, Math.round(b[i]! / scales[i]!)));
      const qn = fresh(`${bName}_quantized`);
      const sn = fresh(`${bName}_scale`);
      const zn = fresh(`${bName}_zero_point`);
      initializers.push(makeTensor(qn, DataType.INT32, [b.length], q));
      initializers.push(makeTensor(sn, DataType.FLOAT, [b.length], Float32Array.from(scales)));
      initializers.push(makeTensor(zn, DataType.INT32, [b.length], new Int32Array(b.length)));
      const dq = fresh(`${bName}_dequantized`);
      out.push(makeNode('DequantizeLinear', [qn, sn, zn], [dq], { axis: attr.int(0) }, fresh(`${bName}_DequantizeLinear`)));
      node.input[2] = dq;
    }
    return out;
  }
}

/** Integer values of an initializer, for tests and reports (int8/uint8/int32 weights). */
export function initializerValues(model: ModelProto, name: string): number[] {
  const t = requireGraph(model).initializer.find((i) => i.name === name);
  if (!t) throw new RangeError(`no initializer '${name}'`);
  return tensorToNumbers(t);
}
