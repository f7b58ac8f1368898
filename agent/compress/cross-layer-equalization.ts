import { indexGraph, requireGraph } from './graph-analysis.js';
import { floatTensor, getIntAttribute, tensorDims, tensorToFloat32, type ModelProto, type NodeProto, type TensorProto } from './onnx-graph.js';

/**
 * Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019) for Conv → [Relu] → Conv pairs.
 * Output channel c of the first conv is divided by s_c and input channel c of the second multiplied by s_c,
 * with s_c = sqrt(r1_c / r2_c) from the channels' weight ranges; ReLU commutes with a positive scale, so the
 * float model computes the same function. Depthwise convs (MobileNet, BlazeFace) have channels whose
 * weights, and so activations, differ by orders of magnitude; after equalization one per-tensor uint8 scale
 * fits the intermediate activation far better.
 */
export function equalizeCrossLayer(model: ModelProto, iterations = 4): number {
  const graph = requireGraph(model);
  let pairs = 0;
  for (let it = 0; it < iterations; it++) {
    const index = indexGraph(graph);
    const inits = graph.initializer as TensorProto[];
    pairs = 0;
    for (const first of graph.node as NodeProto[]) {
      if (first.opType !== 'Conv') continue;
      let link = first.output[0] ?? '';
      let readers = index.consumers.get(link) ?? [];
      if (readers.length === 1 && readers[0]!.opType === 'Relu' && !index.graphOutputs.has(link)) {
        link = readers[0]!.output[0] ?? '';
        readers = index.consumers.get(link) ?? [];
      }
      const second = readers[0];
      if (readers.length !== 1 || !second || second.opType !== 'Conv' || index.graphOutputs.has(link) || index.graphOutputs.has(first.output[0] ?? '')) continue;
      if (getIntAttribute(second, 'group', 1) !== 1) continue;
      const w1t = index.initializers.get(first.input[1] ?? '');
      const w2t = index.initializers.get(second.input[1] ?? '');
      if (!w1t || !w2t) continue;
      // Weights shared with other nodes cannot be rescaled for this pair alone.
      if ((index.consumers.get(w1t.name ?? '') ?? []).length !== 1 || (index.consumers.get(w2t.name ?? '') ?? []).length !== 1) continue;
      const b1t = first.input[2] ? index.initializers.get(first.input[2]) : undefined;
      if (first.input[2] && (!b1t || (index.consumers.get(b1t.name ?? '') ?? []).length !== 1)) continue;
      const d1 = tensorDims(w1t), d2 = tensorDims(w2t);
      const channels = d1[0]!;
      if (d2[1] !== channels) continue;
      const w1 = tensorToFloat32(w1t), w2 = tensorToFloat32(w2t);
      const per1 = w1.length / channels;
      const outer2 = d2[0]!, inner2 = w2.length / (outer2 * channels);
      const scales = new Float32Array(channels);
      for (let c = 0; c < channels; c++) {
        let r1 = 0, r2 = 0;
        for (let j = 0; j < per1; j++) r1 = Math.max(r1, Math.abs(w1[c * per1 + j]!));
        for (let o = 0; o < outer2; o++) for (let j = 0; j < inner2; j++) r2 = Math.max(r2, Math.abs(w2[(o * channels + c) * inner2 + j]!));
        scales[c] = r1 > 0 && r2 > 0 ? Math.sqrt(r1 / r2) : 1;
      }
      for (let c = 0; c < channels; c++) for (let j = 0; j < per1; j++) w1[c * per1 + j]! /= scales[c]!;
      for (let o = 0; o < outer2; o++) for (let c = 0; c < channels; c++) for (let j = 0; j < inner2; j++) w2[(o * channels + c) * inner2 + j]! *= scales[c]!;
      replace(inits, index.initializers, w1t, floatTensor(w1t.name ?? '', d1, w1));
      replace(inits, index.initializers, w2t, floatTensor(w2t.name ?? '', d2, w2));
      if (b1t) {
        const b1 = tensorToFloat32(b1t);
        for (let c = 0; c < channels; c++) b1[c]! /= scales[c]!;
        replace(inits, index.initializers, b1t, floatTensor(b1t.name ?? '', tensorDims(b1t), b1));
      }
      pairs++;
    }
  }
  return pairs;
}

/** Swaps an initializer in the graph and in the index, so a conv that is `second` of one pair and `first` of
 * the next sees the weights the earlier pair already rescaled. */
function replace(list: TensorProto[], byName: Map<string, TensorProto>, old: TensorProto, next: TensorProto): void {
  const i = list.indexOf(old);
  if (i >= 0) list[i] = next;
  byName.set(next.name ?? '', next);
}
