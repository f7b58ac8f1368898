import { hoistConstants, indexGraph, nameNodes, pruneInitializers, requireGraph } from './graph-analysis.js';
import { upgradeOpset } from './opset-upgrade.js';
import {
  decodeModel, encodeModel, floatTensor, getFloatAttribute, tensorDims, tensorToFloat32,
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
  nameNodes(graph);
  pruneInitializers(graph);
  return { model, notes };
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
