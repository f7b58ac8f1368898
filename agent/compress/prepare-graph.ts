import { hoistConstants, indexGraph, nameNodes, pruneInitializers, requireGraph, uniqueNamer } from './graph-analysis.js';
import { upgradeOpset } from './opset-upgrade.js';
import {
  DataType, decodeModel, encodeModel, floatTensor, getFloatAttribute, tensorDims, tensorToFloat32,
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

/**
 * Normalises a float model before compression: Constant nodes become initializers, the opset is raised to
 * ≥ 13, Conv→BatchNormalization pairs are folded into the Conv's weights (so the int8 Conv carries the
 * batch-norm scale, as a deployed graph would after onnxruntime's own fusion), and every node gets a name.
 */
export function prepareModel(source: ModelProto): PreparedModel {
  const model = cloneModel(source);
  const graph = requireGraph(model);
  const notes: string[] = [];
  const hoisted = hoistConstants(graph);
  if (hoisted > 0) notes.push(`${hoisted} Constant nodes moved to initializers`);
  notes.push(...upgradeOpset(model, QDQ_MIN_OPSET));
  const folded = foldBatchNorms(model);
  if (folded > 0) notes.push(`${folded} BatchNormalization nodes folded into Conv weights`);
  const affine = foldAffineIntoConvs(model);
  if (affine > 0) notes.push(`${affine} constant Mul/Add nodes after a Conv folded into its weights and bias`);
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
      if ((op.opType !== 'Mul' && op.opType !== 'Add') || (op.domain && op.domain !== 'ai.onnx') || op.input.length !== 2) continue;
      const side = index.initializers.has(op.input[0] ?? '') ? 0 : 1;
      const x = op.input[1 - side] ?? '';
      const conv = index.producers.get(x);
      if (!conv || conv.opType !== 'Conv' || (index.consumers.get(x)?.length ?? 0) !== 1 || index.graphOutputs.has(x)) continue;
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
    if (!conv || conv.opType !== 'Conv' || (index.consumers.get(x)?.length ?? 0) !== 1 || index.graphOutputs.has(x)) continue;
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
