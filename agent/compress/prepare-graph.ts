import { hoistConstants, indexGraph, isDefaultDomain, nameNodes, pruneInitializers, requireGraph, soleReader, uniqueNamer } from './graph-analysis.js';
import { upgradeOpset } from './opset-upgrade.js';
import {
  DataType, decodeModel, defaultOpsetVersion, encodeModel, floatTensor, getFloatAttribute, makeNode, tensorDims, tensorToFloat32,
  type ModelProto, type NodeProto,
} from './onnx-graph.js';

/** Minimum default-domain opset for per-channel QuantizeLinear/DequantizeLinear (the `axis` attribute). */
export const QDQ_MIN_OPSET = 13;

export interface PreparedModel {
  readonly model: ModelProto;
  /** What was changed, for the report: constants hoisted, opset rewrites, batch norms folded. */
  readonly notes: readonly string[];
}

/** A deep copy, so the callers' model is never edited in place. */
export function cloneModel(model: ModelProto): ModelProto {
  return decodeModel(encodeModel(model));
}

export interface PrepareOptions {
  /**
   * Raise the opset to QDQ_MIN_OPSET (what int8 needs) and fuse hard-swish (opset 14); default true. An
   * fp16-only run leaves the opset alone: fp16 needs no new op, and an upgrade could only add ways to fail.
   */
  readonly upgradeOpset?: boolean;
}

/**
 * Normalises a float model before compression: Constant nodes become initializers, the opset is raised to
 * ≥ 13 (unless options.upgradeOpset is false), Conv→BatchNormalization pairs are folded into the Conv's weights
 * (so the int8 Conv carries the batch-norm scale, as a deployed graph would after onnxruntime's own fusion),
 * and every node gets a name.
 */
export function prepareModel(source: ModelProto, options: PrepareOptions = {}): PreparedModel {
  const upgrade = options.upgradeOpset ?? true;
  const model = cloneModel(source);
  const graph = requireGraph(model);
  const notes: string[] = [];
  const hoisted = hoistConstants(graph);
  if (hoisted > 0) notes.push(`${hoisted} Constant nodes moved to initializers`);
  if (upgrade) notes.push(...upgradeOpset(model, QDQ_MIN_OPSET));
  const folded = foldBatchNorms(model);
  if (folded > 0) notes.push(`${folded} BatchNormalization nodes folded into Conv weights`);
  const affine = foldAffineIntoConvs(model);
  if (affine > 0) notes.push(`${affine} constant Mul/Add nodes after a Conv folded into its weights and bias`);
  const hardSwish = upgrade || defaultOpsetVersion(model) >= 14 ? fuseHardSwish(model) : 0;
  if (hardSwish > 0) notes.push(`${hardSwish} Add→Clip→Mul→Div chains fused into HardSwish (opset 14)`);
  const scaled = foldScaleIntoNextConvs(model);
  if (scaled > 0) notes.push(`${scaled} scalar Mul nodes before a Conv folded into its weights`);
  nameNodes(graph);
  pruneInitializers(graph);
  return { model, notes };
}

/**
 * Per-output-channel factors (or one scalar) of a broadcast constant that a Conv's output is multiplied by or
 * added to, or undefined when the constant does not broadcast that way (e.g. it varies along a spatial axis).
 */
function channelConstant(index: ReturnType<typeof indexGraph>, name: string, outRank: number, outCh: number): Float32Array | undefined {
  const t = index.initializers.get(name);
  if (!t || t.dataType !== DataType.FLOAT) return undefined;
  const dims = tensorDims(t);
  if (dims.length > outRank) return undefined;
  const padded = [...new Array<number>(outRank - dims.length).fill(1), ...dims];
  if (padded.some((d, i) => d !== 1 && !(i === 1 && d === outCh))) return undefined;
  const values = tensorToFloat32(t);
  if (values.length === outCh) return values;
  return values.length === 1 ? new Float32Array(outCh).fill(values[0]!) : undefined;
}

/**
 * Folds a Mul or Add by a constant (scalar or one value per output channel) that directly follows a Conv into
 * the Conv's weights and bias — the "learnable affine" blocks of PP-LCNet/MobileOne backbones (paddle2onnx
 * emits them as `Mul(scale, conv)` then `Add(·, bias)`). onnxruntime fuses these into the fp32 Conv itself;
 * left in the int8 graph they would sit between the Conv and its QuantizeLinear, so the Conv could not run as
 * QLinearConv and its raw output (channels an order of magnitude apart before the scale) would share one
 * uint8 scale. Returns how many Mul/Add nodes were folded.
 */
export function foldAffineIntoConvs(model: ModelProto): number {
  const graph = requireGraph(model);
  const fresh = uniqueNamer(graph);
  let folded = 0;
  for (;;) {
    const index = indexGraph(graph);
    let changed: NodeProto | undefined;
    for (const op of graph.node as NodeProto[]) {
      if ((op.opType !== 'Mul' && op.opType !== 'Add') || !isDefaultDomain(op) || op.input.length !== 2) continue;
      const side = index.initializers.has(op.input[0] ?? '') ? 0 : 1;
      const x = op.input[1 - side] ?? '';
      const conv = index.producers.get(x);
      if (!conv || conv.opType !== 'Conv' || !soleReader(index, x)) continue;
      const w = index.initializers.get(conv.input[1] ?? '');
      if (!w || w.dataType !== DataType.FLOAT) continue;
      const dims = tensorDims(w);
      const outCh = dims[0] ?? 0;
      const factors = channelConstant(index, op.input[side] ?? '', dims.length, outCh);
      const biasInit = conv.input[2] ? index.initializers.get(conv.input[2]) : undefined;
      if (!factors || (conv.input[2] && (!biasInit || biasInit.dataType !== DataType.FLOAT))) continue;
      const bias = biasInit ? tensorToFloat32(biasInit) : new Float32Array(outCh);
      const newB = new Float32Array(outCh);
      let wName = conv.input[1] ?? '';
      if (op.opType === 'Mul') {
        const weights = tensorToFloat32(w);
        const perCh = weights.length / outCh;
        const newW = new Float32Array(weights.length);
        for (let c = 0; c < outCh; c++) {
          for (let j = 0; j < perCh; j++) newW[c * perCh + j] = weights[c * perCh + j]! * factors[c]!;
          newB[c] = bias[c]! * factors[c]!;
        }
        wName = fresh(`${wName}_scaled`);
        graph.initializer.push(floatTensor(wName, dims, newW));
      } else {
        for (let c = 0; c < outCh; c++) newB[c] = bias[c]! + factors[c]!;
      }
      const bName = fresh(`${conv.name || conv.output[0]}_bias_folded`);
      graph.initializer.push(floatTensor(bName, [outCh], newB));
      conv.input = [conv.input[0] ?? '', wName, bName];
      conv.output = [op.output[0] ?? ''];
      changed = op;
      break;
    }
    if (!changed) break;
    graph.node = (graph.node as NodeProto[]).filter((n) => n !== changed);
    folded++;
  }
  if (folded > 0) pruneInitializers(graph);
  return folded;
}

/** Folds BatchNormalization into the Conv feeding it when the Conv's output has no other reader. */
export function foldBatchNorms(model: ModelProto): number {
  const graph = requireGraph(model);
  const index = indexGraph(graph);
  const removed = new Set<NodeProto>();
  let folded = 0;
  for (const bn of graph.node as NodeProto[]) {
    if (bn.opType !== 'BatchNormalization' || (bn.output ?? []).filter(Boolean).length !== 1) continue;
    const x = bn.input[0] ?? '';
    const conv = index.producers.get(x);
    if (!conv || conv.opType !== 'Conv' || !soleReader(index, x)) continue;
    const w = index.initializers.get(conv.input[1] ?? '');
    const params = [1, 2, 3, 4].map((i) => index.initializers.get(bn.input[i] ?? ''));
    if (!w || params.some((p) => !p)) continue;
    // Weights shared with another node cannot take this node's scale.
    if ((index.consumers.get(conv.input[1] ?? '') ?? []).length !== 1) continue;
    const [gamma, beta, mean, variance] = params.map((p) => tensorToFloat32(p!)) as [Float32Array, Float32Array, Float32Array, Float32Array];
    const eps = getFloatAttribute(bn, 'epsilon', 1e-5);
    const dims = tensorDims(w);
    const outCh = dims[0] ?? 0;
    const weights = tensorToFloat32(w);
    const perCh = weights.length / outCh;
    const biasInit = conv.input[2] ? index.initializers.get(conv.input[2]) : undefined;
    if (conv.input[2] && !biasInit) continue;
    const bias = biasInit ? tensorToFloat32(biasInit) : new Float32Array(outCh);
    const newW = new Float32Array(weights.length);
    const newB = new Float32Array(outCh);
    for (let c = 0; c < outCh; c++) {
      const k = gamma[c]! / Math.sqrt(variance[c]! + eps);
      for (let j = 0; j < perCh; j++) newW[c * perCh + j] = weights[c * perCh + j]! * k;
      newB[c] = (bias[c]! - mean[c]!) * k + beta[c]!;
    }
    const wName = `${conv.input[1]}_bnfolded`;
    const bName = `${conv.name || conv.output[0]}_bias_bnfolded`;
    graph.initializer.push(floatTensor(wName, dims, newW), floatTensor(bName, [outCh], newB));
    conv.input = [conv.input[0] ?? '', wName, bName];
    conv.output = [bn.output[0] ?? ''];
    removed.add(bn);
    folded++;
  }
  if (folded > 0) {
    graph.node = (graph.node as NodeProto[]).filter((n) => !removed.has(n));
    pruneInitializers(graph);
  }
  return folded;
}

/** The single value of a float initializer, or undefined when `name` is no scalar constant. */
function scalarConstant(index: ReturnType<typeof indexGraph>, name: string): number | undefined {
  const t = index.initializers.get(name);
  if (!t || t.dataType !== DataType.FLOAT) return undefined;
  const v = tensorToFloat32(t);
  return v.length === 1 ? v[0] : undefined;
}

/**
 * Rewrites hard-swish as exporters spell it, `x · Clip(x + 3, 0, 6) / 6` (four nodes), into one HardSwish
 * node, raising the default opset to 14 where HardSwish lives (13→14 changes no inference semantics). Left
 * decomposed, the int8 graph wraps every one of the four in QuantizeLinear/DequantizeLinear and spends more
 * time converting than the int8 Convs save (PP-LCNet/MobileNetV3 backbones run hard-swish after every Conv).
 * Returns how many chains were fused.
 */
export function fuseHardSwish(model: ModelProto): number {
  const graph = requireGraph(model);
  const index = indexGraph(graph);
  const near = (v: number | undefined, want: number): boolean => v !== undefined && Math.abs(v - want) < 1e-6 * Math.max(1, want);
  const removed = new Set<NodeProto>();
  const replacements = new Map<NodeProto, NodeProto>();
  for (const add of graph.node as NodeProto[]) {
    if (add.opType !== 'Add' || !isDefaultDomain(add) || add.input.length !== 2 || removed.has(add)) continue;
    const side = index.initializers.has(add.input[0] ?? '') ? 0 : 1;
    const x = add.input[1 - side] ?? '';
    if (!near(scalarConstant(index, add.input[side] ?? ''), 3) || index.initializers.has(x)) continue;
    const clip = soleReader(index, add.output[0] ?? '');
    if (!clip || clip.opType !== 'Clip' || !isDefaultDomain(clip) || clip.input[0] !== add.output[0]) continue;
    if (!near(scalarConstant(index, clip.input[1] ?? ''), 0) || !near(scalarConstant(index, clip.input[2] ?? ''), 6)) continue;
    const mul = soleReader(index, clip.output[0] ?? '');
    if (!mul || mul.opType !== 'Mul' || !isDefaultDomain(mul) || mul.input.length !== 2) continue;
    if (!(mul.input.includes(x) && mul.input.includes(clip.output[0] ?? ''))) continue;
    const scale = soleReader(index, mul.output[0] ?? '');
    if (!scale || !isDefaultDomain(scale) || scale.input[0] !== mul.output[0]) continue;
    const by = scalarConstant(index, scale.input[1] ?? '');
    if (!((scale.opType === 'Div' && near(by, 6)) || (scale.opType === 'Mul' && near(by, 1 / 6)))) continue;
    for (const n of [add, clip, mul]) removed.add(n);
    replacements.set(scale, makeNode('HardSwish', [x], [scale.output[0] ?? ''], {}, `${scale.name || scale.output[0]}_hardswish`));
  }
  if (replacements.size === 0) return 0;
  // Through upgradeOpset, not a bare version bump: below 13 other ops (Squeeze axes, Split, …) change form.
  // It keeps the matched nodes' identities, and throws before any of them is replaced.
  if (defaultOpsetVersion(model) < 14) upgradeOpset(model, 14);
  graph.node = (graph.node as NodeProto[]).filter((n) => !removed.has(n)).map((n) => replacements.get(n) ?? n);
  pruneInitializers(graph);
  return replacements.size;
}

/**
 * Folds `Mul(y, a)` (a scalar constant) that reaches a Conv, directly or through `Add(·, b)` with a scalar b,
 * into that Conv's weights: Conv(a·y + b) = Conv'(y + b/a) with W' = a·W — exact, zero padding included.
 * PP-LCNetV3 puts such a learnable scale after every activation; left in, each costs a float pass (or a
 * quantize/dequantize pair) between two int8 Convs. Returns how many Mul nodes were folded.
 */
export function foldScaleIntoNextConvs(model: ModelProto): number {
  const graph = requireGraph(model);
  const fresh = uniqueNamer(graph);
  const index = indexGraph(graph);
  const removed = new Set<NodeProto>();
  for (const mul of graph.node as NodeProto[]) {
    if (mul.opType !== 'Mul' || !isDefaultDomain(mul) || mul.input.length !== 2) continue;
    const side = index.initializers.has(mul.input[0] ?? '') ? 0 : 1;
    const a = scalarConstant(index, mul.input[side] ?? '');
    const y = mul.input[1 - side] ?? '';
    if (a === undefined || a === 0 || !Number.isFinite(1 / a) || index.initializers.has(y)) continue;
    let next = soleReader(index, mul.output[0] ?? '');
    let add: NodeProto | undefined;
    if (next && next.opType === 'Add' && isDefaultDomain(next) && next.input.length === 2) {
      const bSide = next.input[0] === mul.output[0] ? 1 : 0;
      if (scalarConstant(index, next.input[bSide] ?? '') === undefined) continue;
      add = next;
      next = soleReader(index, add.output[0] ?? '');
    }
    if (!next || next.opType !== 'Conv' || !isDefaultDomain(next) || next.input[0] !== (add ?? mul).output[0]) continue;
    const w = index.initializers.get(next.input[1] ?? '');
    if (!w || w.dataType !== DataType.FLOAT || (index.consumers.get(next.input[1] ?? '') ?? []).length !== 1) continue;
    const weights = tensorToFloat32(w);
    const wName = fresh(`${next.input[1]}_prescaled`);
    graph.initializer.push(floatTensor(wName, tensorDims(w), weights.map((v) => v * a)));
    next.input[1] = wName;
    if (add) {
      const bSide = add.input[0] === mul.output[0] ? 1 : 0;
      const b = scalarConstant(index, add.input[bSide] ?? '')!;
      const bName = fresh(`${add.name || add.output[0]}_prescaled`);
      graph.initializer.push(floatTensor(bName, [], [b / a]));
      add.input = [y, bName];
    } else {
      next.input[0] = y;
    }
    removed.add(mul);
  }
  if (removed.size === 0) return 0;
  graph.node = (graph.node as NodeProto[]).filter((n) => !removed.has(n));
  pruneInitializers(graph);
  return removed.size;
}
