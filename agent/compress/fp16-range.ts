import { calibrateRanges, type Feeds } from './calibrate.js';
import { indexGraph, inferElemTypes, isDefaultDomain, modelInputs, requireGraph } from './graph-analysis.js';
import { DataType, tensorToFloat32, type ModelProto, type NodeProto } from './onnx-graph.js';
import { FLOAT16_MAX } from './variant-report.js';

/**
 * The fp16 range check. onnxruntime's CPU provider runs most float16 nodes in float32 (it inserts Casts around
 * them), so an fp16 variant measured on a CPU shows no overflow even where a CUDA or TensorRT kernel would
 * produce ±Inf. The magnitudes that matter are those of the float32 model's tensors, measured here on sample
 * inputs: every tensor beyond the limit is kept in float32, together with the nodes that produce or read it.
 *
 * Keeping them in float32 rather than failing the variant: the tensors that overflow are few and local
 * (un-normalised sums, logits, decoded box coordinates), the rest of the graph keeps fp16's speed and
 * precision, and the report names each kept tensor with its measured range. Not seen here: overflow inside one
 * kernel whose inputs and outputs are in range (an fp16 accumulator of a long reduction).
 */

/** Headroom under fp16's max: inputs brighter or louder than the samples reach larger activations. */
export const FLOAT16_HEADROOM = 2;
export const FLOAT16_SAFE_LIMIT = FLOAT16_MAX / FLOAT16_HEADROOM;

/** Ops whose output type is not their first input's, which inferElemTypes would guess wrong. */
const UNTYPED_OUTPUT_OPS: ReadonlySet<string> = new Set(['NonMaxSuppression', 'OneHot', 'Multinomial', 'Unique', 'StringNormalizer']);

export interface KeptTensor {
  readonly tensor: string;
  readonly maxAbs: number;
  /** Nodes producing or reading it, run in float32 in the fp16 variant. */
  readonly nodes: readonly string[];
}

export interface Float16RangeCheck {
  readonly checked: true;
  readonly limit: number;
  readonly samples: number;
  readonly maxAbsInFloat16: number;
  readonly keptFloat32: readonly KeptTensor[];
}

export interface Float16RangeResult {
  readonly check: Float16RangeCheck;
  /** Node names for convertFloat16's keepFloat32. */
  readonly keepNodes: readonly string[];
}

/**
 * Measures the magnitude of every float tensor of `model` (graph inputs, weights, activations) on `samples`
 * and picks the nodes to keep in float32. Node names must be set (prepareModel names every node).
 */
export async function checkFloat16Range(model: ModelProto, samples: readonly Feeds[], limit = FLOAT16_SAFE_LIMIT): Promise<Float16RangeResult> {
  const graph = requireGraph(model);
  const types = inferElemTypes(graph);
  const index = indexGraph(graph);
  const isFloat = (t: string): boolean => types.get(t) === DataType.FLOAT;
  const activations = new Set<string>();
  for (const v of modelInputs(graph)) if (v.name && isFloat(v.name)) activations.add(v.name);
  for (const node of graph.node as NodeProto[]) {
    if (!isDefaultDomain(node) || UNTYPED_OUTPUT_OPS.has(node.opType ?? '')) continue;
    for (const o of node.output) if (o && isFloat(o) && !index.initializers.has(o)) activations.add(o);
  }
  const magnitudes = new Map<string, number>();
  const ranges = await calibrateRanges(model, [...activations], samples, { method: 'minmax' });
  for (const [name, r] of ranges) magnitudes.set(name, Math.max(Math.abs(r.min), Math.abs(r.max)));
  for (const t of graph.initializer) {
    if (t.dataType !== DataType.FLOAT || !index.consumers.has(t.name ?? '')) continue;
    let m = 0;
    for (const v of tensorToFloat32(t)) m = Math.max(m, Math.abs(v));
    magnitudes.set(t.name ?? '', m);
  }

  const keptFloat32: KeptTensor[] = [];
  const keepNodes = new Set<string>();
  let maxAbsInFloat16 = 0;
  for (const [tensor, maxAbs] of magnitudes) {
    // NaN never compares above the limit; a tensor that is NaN on sample inputs is as unsafe as an overflow.
    if (!(maxAbs <= limit)) {
      const producer = index.producers.get(tensor);
      const nodes = [...new Set([...(producer ? [producer] : []), ...(index.consumers.get(tensor) ?? [])].map((n) => n.name ?? ''))];
      for (const n of nodes) keepNodes.add(n);
      keptFloat32.push({ tensor, maxAbs, nodes });
    } else {
      maxAbsInFloat16 = Math.max(maxAbsInFloat16, maxAbs);
    }
  }
  keptFloat32.sort((a, b) => (b.maxAbs || Infinity) - (a.maxAbs || Infinity));
  return {
    check: { checked: true, limit, samples: samples.length, maxAbsInFloat16, keptFloat32 },
    keepNodes: [...keepNodes],
  };
}
