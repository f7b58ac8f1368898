import { indexGraph, inferElemTypes, requireGraph, subgraphsOf, uniqueNamer } from './graph-analysis.js';
import { cloneModel } from './prepare-graph.js';
import {
  attr, DataType, getAttribute, makeAttribute, makeNode, makeTensor, tensorDims, tensorToFloat32, toFloat16Array,
  type IGraphProto, type ModelProto, type NodeProto, type TensorProto,
} from './onnx-graph.js';

/**
 * float32 → float16 for GPU providers: weights and activations in half precision, graph inputs and outputs
 * still float32 (a Cast after each input and before each output), so clients and the runtime's tensor specs do
 * not change.
 */

/** Inputs that stay float32 whatever the data type (Resize's roi and scales). */
const FLOAT32_INPUTS: Readonly<Record<string, readonly number[]>> = { Resize: [1, 2], Upsample: [1] };
/** Ops run in float32 between Casts: no half-precision kernels, or range/precision too narrow in fp16. */
const FLOAT32_OPS: ReadonlySet<string> = new Set(['Range', 'NonMaxSuppression', 'RandomNormal', 'RandomUniform', 'RandomNormalLike', 'RandomUniformLike', 'CumSum']);
/**
 * Control flow stays float32 with its subgraphs untouched: their declared inputs and outputs are float32, and
 * converting them would mean retyping every subgraph. Outer tensors a subgraph reads by name get a float32 copy.
 */
const CONTROL_FLOW_OPS: ReadonlySet<string> = new Set(['If', 'Loop', 'Scan']);

/** Names a subgraph (and the subgraphs inside it) reads but does not define: the outer-scope tensors it uses. */
function outerNames(graph: IGraphProto): Set<string> {
  const defined = new Set<string>([
    ...(graph.input ?? []).map((v) => v.name ?? ''),
    ...(graph.initializer ?? []).map((t) => t.name ?? ''),
    ...(graph.node ?? []).flatMap((n) => n.output ?? []),
  ]);
  const used = new Set<string>();
  for (const n of graph.node ?? []) {
    for (const x of n.input ?? []) if (x) used.add(x);
    for (const sub of subgraphsOf(n)) for (const x of outerNames(sub)) used.add(x);
  }
  for (const o of graph.output ?? []) if (o.name) used.add(o.name);
  return new Set([...used].filter((x) => !defined.has(x)));
}

/** Renames reads of outer tensor `from` to `to` inside a subgraph and its nested subgraphs. */
function renameOuter(graph: IGraphProto, from: string, to: string): void {
  for (const n of graph.node ?? []) {
    n.input = (n.input ?? []).map((x) => (x === from ? to : x));
    for (const sub of subgraphsOf(n)) renameOuter(sub, from, to);
  }
  for (const o of graph.output ?? []) if (o.name === from) o.name = to;
}

export interface Fp16Options {
  /** Node names to keep in float32 (between Casts). */
  readonly keepFloat32?: Iterable<string>;
}

export function convertFloat16(source: ModelProto, options: Fp16Options = {}): ModelProto {
  const model = cloneModel(source);
  const graph = requireGraph(model);
  const types = inferElemTypes(graph);
  const index = indexGraph(graph);
  const fresh = uniqueNamer(graph);
  const keep = new Set(options.keepFloat32 ?? []);
  const isFloat = (t: string | undefined | null): boolean => !!t && types.get(t) === DataType.FLOAT;
  const blocked = (n: NodeProto): boolean => FLOAT32_OPS.has(n.opType ?? '') || CONTROL_FLOW_OPS.has(n.opType ?? '') || keep.has(n.name ?? '');
  const fp32Slot = (n: NodeProto, i: number): boolean => blocked(n) || (FLOAT32_INPUTS[n.opType ?? ''] ?? []).includes(i);

  // Initializers read only at float32 slots stay float32; every other float initializer becomes float16.
  const fp16Inits = new Set<string>();
  const initializers = graph.initializer as TensorProto[];
  for (const t of initializers) {
    if (t.dataType !== DataType.FLOAT) continue;
    const readers = index.consumers.get(t.name ?? '') ?? [];
    const halfReaders = readers.some((n) => n.input.some((x, i) => x === t.name && !fp32Slot(n, i)));
    if (!halfReaders) continue;
    const values = tensorToFloat32(t);
    const half = makeTensor(t.name ?? '', DataType.FLOAT16, tensorDims(t), toFloat16Array(values));
    Object.assign(t, { dataType: DataType.FLOAT16, rawData: half.rawData, floatData: [] });
    fp16Inits.add(t.name ?? '');
  }

  // Names of float32 copies (for fp32 slots) and float16 copies (for fp16 slots) of a tensor.
  const as32 = new Map<string, string>();
  const as16 = new Map<string, string>();
  const pre: NodeProto[] = [];
  const out: NodeProto[] = [];
  const cast = (from: string, to: number, into: NodeProto[]): string => {
    const name = fresh(`${from}_${to === DataType.FLOAT16 ? 'fp16' : 'fp32'}`);
    into.push(makeNode('Cast', [from], [name], { to: attr.int(to) }, fresh(`${name}_Cast`)));
    return name;
  };
  // Graph inputs stay float32; readers at fp16 slots read a cast copy.
  const graphInputs = new Set(graph.input.map((v) => v.name ?? '').filter((n) => isFloat(n) && !index.initializers.has(n)));
  for (const name of graphInputs) {
    if ((index.consumers.get(name) ?? []).some((n) => n.input.some((x, i) => x === name && !fp32Slot(n, i)))) {
      as16.set(name, cast(name, DataType.FLOAT16, pre));
    }
  }
  // Tensors whose current representation is float16 (all float activations except graph inputs and blocked outputs).
  const half = (t: string): boolean => isFloat(t) && !graphInputs.has(t) && (!index.initializers.has(t) || fp16Inits.has(t));
  const graphOutputs = new Set(graph.output.map((v) => v.name ?? ''));
  const renamedOutputs = new Map<string, string>();
  // One Cast per tensor and direction, made where the first reader needs it and shared by the later ones.
  const float32Copy = (x: string): string => {
    let c = as32.get(x);
    if (!c) { c = cast(renamedOutputs.get(x) ?? x, DataType.FLOAT, out); as32.set(x, c); }
    return c;
  };
  const float16Copy = (x: string): string => {
    let c = as16.get(x);
    if (!c) { c = cast(x, DataType.FLOAT16, out); as16.set(x, c); }
    return c;
  };

  for (const node of graph.node as NodeProto[]) {
    node.input = node.input.map((x, i) => {
      if (!x) return x;
      const wants32 = fp32Slot(node, i);
      if (wants32 && half(x) && !blockedOutput(x)) return float32Copy(x);
      // Cast where a half-precision reader needs it, so a float32 output nobody reads in fp16 costs nothing.
      if (!wants32 && isFloat(x) && blockedOutput(x)) return float16Copy(x);
      if (!wants32 && isFloat(x) && graphInputs.has(x)) return as16.get(x) ?? x;
      return renamedOutputs.get(x) ?? x;
    });
    if (CONTROL_FLOW_OPS.has(node.opType ?? '')) {
      for (const x of [...new Set(subgraphsOf(node).flatMap((g) => [...outerNames(g)]))]) {
        if (!half(x) || blockedOutput(x)) continue;
        const c = float32Copy(x);
        for (const g of subgraphsOf(node)) renameOuter(g, x, c);
      }
    }
    if (node.opType === 'Cast' && !blocked(node) && Number(getAttribute(node, 'to')?.i ?? 0) === DataType.FLOAT) {
      getAttribute(node, 'to')!.i = DataType.FLOAT16;
    }
    if (node.opType === 'ConstantOfShape' && !blocked(node)) {
      const v = getAttribute(node, 'value');
      if (v?.t && v.t.dataType === DataType.FLOAT) {
        v.t = makeTensor(v.t.name ?? 'value', DataType.FLOAT16, tensorDims(v.t), toFloat16Array(tensorToFloat32(v.t)));
      } else if (!v) {
        node.attribute.push(makeAttribute('value', attr.tensor(makeTensor('value', DataType.FLOAT16, [1], toFloat16Array([0])))));
      }
    }
    // A half-precision producer of a graph output writes a renamed tensor; a Cast restores the float32 name.
    for (let k = 0; k < node.output.length; k++) {
      const o = node.output[k]!;
      if (graphOutputs.has(o) && isFloat(o) && !blocked(node)) {
        const inner = fresh(`${o}_fp16`);
        renamedOutputs.set(o, inner);
        node.output[k] = inner;
      }
    }
    out.push(node);
    for (const [o, inner] of renamedOutputs) {
      if (node.output.includes(inner)) out.push(makeNode('Cast', [inner], [o], { to: attr.int(DataType.FLOAT) }, fresh(`${o}_Cast`)));
    }
  }
  graph.node = [...pre, ...out];
  // Declared intermediate types are float32 and now wrong; onnxruntime infers them again.
  graph.valueInfo = [];
  return model;

  function blockedOutput(t: string): boolean {
    const p = index.producers.get(t);
    return !!p && blocked(p);
  }
}
