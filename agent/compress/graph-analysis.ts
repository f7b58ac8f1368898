import {
  DataType, getAttribute, onnx, tensorToFloat32, toNumber,
  type GraphProto, type IGraphProto, type IModelProto, type INodeProto, type ITensorProto, type NodeProto, type TensorProto,
} from './onnx-graph.js';

/** Producer/consumer maps over one graph, rebuilt after every structural edit (graphs here are small). */
export interface GraphIndex {
  readonly initializers: Map<string, TensorProto>;
  readonly producers: Map<string, NodeProto>;
  readonly consumers: Map<string, NodeProto[]>;
  readonly graphInputs: Set<string>;
  readonly graphOutputs: Set<string>;
}

export function indexGraph(graph: GraphProto): GraphIndex {
  const initializers = new Map<string, TensorProto>();
  for (const t of graph.initializer ?? []) initializers.set(t.name ?? '', t as TensorProto);
  const producers = new Map<string, NodeProto>();
  const consumers = new Map<string, NodeProto[]>();
  for (const node of graph.node as NodeProto[]) {
    for (const out of node.output ?? []) if (out) producers.set(out, node);
    for (const inp of node.input ?? []) {
      if (!inp) continue;
      const list = consumers.get(inp);
      if (list) list.push(node); else consumers.set(inp, [node]);
    }
  }
  return {
    initializers,
    producers,
    consumers,
    graphInputs: new Set((graph.input ?? []).map((v) => v.name ?? '').filter((n) => !initializers.has(n))),
    graphOutputs: new Set((graph.output ?? []).map((v) => v.name ?? '')),
  };
}

/** The one node reading `tensor`, when it has exactly one reader and is no graph output; else undefined. */
export function soleReader(index: GraphIndex, tensor: string): NodeProto | undefined {
  const readers = index.consumers.get(tensor) ?? [];
  return readers.length === 1 && !index.graphOutputs.has(tensor) ? readers[0] : undefined;
}

/** Whether a node belongs to the default ONNX operator set (empty domain or 'ai.onnx'). */
/** The subgraphs a node carries in its attributes (If's branches, Loop's and Scan's bodies). */
export function subgraphsOf(node: INodeProto): IGraphProto[] {
  return (node.attribute ?? []).flatMap((a) => [...(a.g ? [a.g] : []), ...(a.graphs ?? [])]);
}

export function isDefaultDomain(node: INodeProto): boolean {
  return !node.domain || node.domain === 'ai.onnx';
}

export function requireGraph(model: IModelProto): GraphProto {
  if (!model.graph) throw new TypeError('model has no graph');
  return model.graph as GraphProto;
}

/** A float initializer's values, or undefined when the name is not a float initializer. */
export function floatInitializer(index: GraphIndex, name: string): { tensor: TensorProto; values: Float32Array } | undefined {
  const tensor = index.initializers.get(name);
  if (!tensor || (tensor.dataType !== DataType.FLOAT && tensor.dataType !== DataType.DOUBLE)) return undefined;
  return { tensor, values: tensorToFloat32(tensor) };
}

function constantTensor(node: INodeProto): ITensorProto | undefined {
  const value = getAttribute(node, 'value');
  if (value?.t) return value.t;
  const vf = getAttribute(node, 'value_float');
  if (vf) return onnx.TensorProto.create({ dataType: DataType.FLOAT, dims: [], floatData: [vf.f ?? 0] });
  const vfs = getAttribute(node, 'value_floats');
  if (vfs) return onnx.TensorProto.create({ dataType: DataType.FLOAT, dims: [vfs.floats?.length ?? 0], floatData: vfs.floats ?? [] });
  const vi = getAttribute(node, 'value_int');
  if (vi) return onnx.TensorProto.create({ dataType: DataType.INT64, dims: [], int64Data: [vi.i ?? 0] });
  const vis = getAttribute(node, 'value_ints');
  if (vis) return onnx.TensorProto.create({ dataType: DataType.INT64, dims: [vis.ints?.length ?? 0], int64Data: vis.ints ?? [] });
  return undefined;
}

/**
 * Element type of every tensor whose type can be known without running the graph: graph inputs, initializers,
 * declared value infos, and a forward pass over ops with simple typing rules. Tensors left out are unknown and
 * are never quantized or converted.
 */
export function inferElemTypes(graph: GraphProto): Map<string, number> {
  const types = new Map<string, number>();
  for (const v of [...(graph.input ?? []), ...(graph.valueInfo ?? []), ...(graph.output ?? [])]) {
    const t = v.type?.tensorType?.elemType;
    if (v.name && t) types.set(v.name, t);
  }
  for (const t of graph.initializer ?? []) if (t.name && t.dataType) types.set(t.name, t.dataType);
  const typeOf = (name: string | undefined | null): number | undefined => (name ? types.get(name) : undefined);
  for (const node of graph.node ?? []) {
    const outs = node.output ?? [];
    const inputs = node.input ?? [];
    const firstKnown = inputs.map(typeOf).find((t) => t !== undefined);
    const set = (i: number, t: number | undefined): void => {
      const name = outs[i];
      if (name && t !== undefined && !types.has(name)) types.set(name, t);
    };
    switch (node.opType) {
      case 'Constant': set(0, constantTensor(node)?.dataType ?? undefined); break;
      case 'Shape': case 'Size': case 'NonZero': case 'ArgMax': case 'ArgMin': set(0, DataType.INT64); break;
      case 'Cast': set(0, toNumber(getAttribute(node, 'to')?.i as number | undefined)); break;
      case 'CastLike': set(0, typeOf(inputs[1])); break;
      case 'ConstantOfShape': set(0, getAttribute(node, 'value')?.t?.dataType ?? DataType.FLOAT); break;
      case 'Equal': case 'Less': case 'Greater': case 'LessOrEqual': case 'GreaterOrEqual':
      case 'Not': case 'And': case 'Or': case 'Xor': case 'IsNaN': case 'IsInf':
        set(0, DataType.BOOL); break;
      case 'QuantizeLinear': set(0, typeOf(inputs[2]) ?? DataType.UINT8); break;
      case 'DequantizeLinear': set(0, typeOf(inputs[1]) ?? DataType.FLOAT); break;
      case 'Where': set(0, typeOf(inputs[1]) ?? typeOf(inputs[2])); break;
      case 'TopK': set(0, typeOf(inputs[0])); set(1, DataType.INT64); break;
      case 'MaxPool': set(0, typeOf(inputs[0])); set(1, DataType.INT64); break;
      case 'Dropout': set(0, typeOf(inputs[0])); set(1, DataType.BOOL); break;
      case 'If': case 'Loop': case 'Scan': break;
      default:
        if (node.domain && node.domain !== 'ai.onnx') break;
        for (let i = 0; i < outs.length; i++) set(i, firstKnown);
    }
  }
  return types;
}

/**
 * Moves Constant nodes (as exported by e.g. paddle2onnx) into initializers, so weights look the same in every
 * model. Returns how many were moved.
 */
export function hoistConstants(graph: GraphProto): number {
  const kept: NodeProto[] = [];
  let moved = 0;
  for (const node of graph.node as NodeProto[]) {
    const t = node.opType === 'Constant' && isDefaultDomain(node) ? constantTensor(node) : undefined;
    if (t && node.output?.[0]) {
      const copy = onnx.TensorProto.create({ ...t, name: node.output[0] });
      graph.initializer.push(copy);
      moved++;
    } else {
      kept.push(node);
    }
  }
  graph.node = kept;
  return moved;
}

/** Gives every unnamed (or duplicate-named) node a stable name, so `--exclude` and reports can refer to it. */
export function nameNodes(graph: GraphProto): void {
  const seen = new Set<string>();
  graph.node.forEach((node, i) => {
    let name = node.name || `${node.opType}_${node.output?.[0] || i}`;
    while (seen.has(name)) name = `${name}_${i}`;
    seen.add(name);
    node.name = name;
  });
}

/** A name generator that never collides with a tensor, initializer or node already in the graph. */
export function uniqueNamer(graph: GraphProto): (base: string) => string {
  const used = new Set<string>();
  for (const n of graph.node ?? []) {
    if (n.name) used.add(n.name);
    for (const x of [...(n.input ?? []), ...(n.output ?? [])]) used.add(x);
  }
  for (const t of graph.initializer ?? []) used.add(t.name ?? '');
  for (const v of [...(graph.input ?? []), ...(graph.output ?? [])]) used.add(v.name ?? '');
  return (base: string) => {
    let name = base;
    for (let i = 1; used.has(name); i++) name = `${base}_${i}`;
    used.add(name);
    return name;
  };
}

/** Drops initializers no node reads (and that are not graph outputs), after weights were replaced. */
export function pruneInitializers(graph: GraphProto): void {
  const read = new Set<string>();
  for (const n of graph.node ?? []) for (const x of n.input ?? []) read.add(x);
  for (const o of graph.output ?? []) read.add(o.name ?? '');
  const removed = new Set<string>();
  graph.initializer = (graph.initializer as TensorProto[]).filter((t) => {
    const keep = read.has(t.name ?? '');
    if (!keep) removed.add(t.name ?? '');
    return keep;
  });
  // Old exporters (IR < 4) also list initializers among the inputs; a pruned one must leave that list too.
  graph.input = graph.input.filter((v) => !removed.has(v.name ?? ''));
}

/** Inputs that clients feed: graph inputs that no initializer backs. */
export function modelInputs(graph: GraphProto): GraphProto['input'] {
  const inits = new Set((graph.initializer ?? []).map((t) => t.name));
  return (graph.input ?? []).filter((v) => !inits.has(v.name));
}
