import { requireGraph, subgraphsOf } from './graph-analysis.js';
import {
  attr, defaultOpsetVersion, floatTensor, getAttribute, getFloatAttribute, getIntAttribute, getIntsAttribute, int64Tensor,
  makeAttribute, makeNode, type GraphProto, type IGraphProto, type IModelProto, type NodeProto,
} from './onnx-graph.js';

/** Ops removed from the default domain before opset 13 that have no mechanical rewrite here. */
const REMOVED_OPS = new Set(['Scatter', 'ImageScaler', 'Crop', 'Affine', 'ParametricSoftplus', 'ScaledTanh', 'GRUUnit', 'GivenTensorFill', 'ConstantFill']);

export class OpsetUpgradeError extends Error {
  override readonly name = 'OpsetUpgradeError';
}

/**
 * Raises the default-domain opset to `target` (≥ 13 is what per-channel QuantizeLinear/DequantizeLinear need).
 * The ops whose inputs or semantics changed on the way are rewritten to their new form: attributes that became
 * inputs (Squeeze/Unsqueeze/ReduceSum axes, Split split, Clip min/max, Pad pads, Slice starts/ends, TopK k,
 * Reshape shape), Upsample and Resize-10 to Resize, Softmax-family axis semantics, legacy attributes.
 * The opset covers the subgraphs of If/Loop/Scan too, so their nodes are rewritten the same way (constants
 * they need go into the subgraph's own initializers).
 * Returns the list of rewrites made; throws OpsetUpgradeError naming the op it cannot carry over.
 */
export function upgradeOpset(model: IModelProto, target = 13): string[] {
  const from = defaultOpsetVersion(model);
  if (from >= target) return [];
  const fresh = namerOverSubgraphs(requireGraph(model));
  const rewrites: string[] = [];
  rewriteGraph(requireGraph(model), '');
  for (const o of model.opsetImport ?? []) if (!o.domain || o.domain === 'ai.onnx') o.version = target;
  const ir = Number(model.irVersion ?? 0);
  if (ir < 7) model.irVersion = 7;
  rewrites.unshift(`opset ${from} → ${target}`);
  return rewrites;

  function rewriteGraph(graph: GraphProto, where: string): void {
    // Copied, not pushed: a subgraph built with GraphProto.create shares protobufjs's frozen empty array.
    const out: NodeProto[] = [];
    const constInt64 = (base: string, values: readonly number[]): string => {
      const name = fresh(base);
      graph.initializer = [...(graph.initializer ?? []), int64Tensor(name, [values.length], values)];
      return name;
    };
    const constFloat = (base: string, values: readonly number[], scalar = false): string => {
      const name = fresh(base);
      graph.initializer = [...(graph.initializer ?? []), floatTensor(name, scalar ? [] : [values.length], values)];
      return name;
    };
    const dropAttrs = (node: NodeProto, names: readonly string[]): void => {
      node.attribute = node.attribute.filter((a) => !names.includes(a.name ?? ''));
    };
    const attrToInput = (node: NodeProto, attrName: string, index: number, make: (v: number[]) => string): void => {
      const values = getIntsAttribute(node, attrName);
      if (values === undefined) return;
      dropAttrs(node, [attrName]);
      while (node.input.length < index) node.input.push('');
      node.input[index] = make(values);
      rewrites.push(`${where}${node.name || node.opType}: ${attrName} attribute → input`);
    };

    for (const node of graph.node as NodeProto[]) {
      for (const a of node.attribute ?? []) {
        const inner = `${where}${node.opType} ${node.name || '?'}.${a.name ?? '?'} → `;
        if (a.g) rewriteGraph(a.g as GraphProto, inner);
        for (const g of a.graphs ?? []) rewriteGraph(g as GraphProto, inner);
      }
      if (node.domain && node.domain !== 'ai.onnx') { out.push(node); continue; }
      const op = node.opType ?? '';
      if (REMOVED_OPS.has(op)) {
        throw new OpsetUpgradeError(`cannot upgrade opset ${from} → ${target}: op ${op} (node ${where}${node.name || '?'}) was removed from ONNX and has no rewrite here`);
      }
      if (op === 'Scan' && from < 9) {
        throw new OpsetUpgradeError(`cannot upgrade opset ${from} → ${target}: Scan ${where}${node.name || '?'} uses the opset-8 form (batch axis, sequence_lens), which has no rewrite here`);
      }
      switch (op) {
        case 'Squeeze': case 'Unsqueeze':
          attrToInput(node, 'axes', 1, (v) => constInt64(`${node.name || op}_axes`, v));
          break;
        case 'ReduceSum':
          attrToInput(node, 'axes', 1, (v) => constInt64(`${node.name || op}_axes`, v));
          break;
        case 'Split':
          attrToInput(node, 'split', 1, (v) => constInt64(`${node.name || op}_split`, v));
          break;
        case 'Reshape':
          attrToInput(node, 'shape', 1, (v) => constInt64(`${node.name || op}_shape`, v));
          dropAttrs(node, ['consumed_inputs']);
          break;
        case 'TopK':
          if (from < 10 && getAttribute(node, 'k')) {
            const k = getIntAttribute(node, 'k', 1);
            dropAttrs(node, ['k']);
            node.input = [node.input[0] ?? '', constInt64(`${node.name || op}_k`, [k])];
            rewrites.push(`${node.name || op}: k attribute → input`);
          }
          break;
        case 'Slice':
          if (from < 10) {
            const starts = getIntsAttribute(node, 'starts') ?? [];
            const ends = getIntsAttribute(node, 'ends') ?? [];
            const axes = getIntsAttribute(node, 'axes');
            dropAttrs(node, ['starts', 'ends', 'axes']);
            const base = node.name || op;
            node.input = [node.input[0] ?? '', constInt64(`${base}_starts`, starts), constInt64(`${base}_ends`, ends), ...(axes ? [constInt64(`${base}_axes`, axes)] : [])];
            rewrites.push(`${base}: starts/ends/axes attributes → inputs`);
          }
          break;
        case 'Clip':
          if (from < 11) {
            const min = getFloatAttribute(node, 'min', -3.4028234663852886e38);
            const max = getFloatAttribute(node, 'max', 3.4028234663852886e38);
            dropAttrs(node, ['min', 'max']);
            node.input = [node.input[0] ?? '', constFloat(`${node.name || op}_min`, [min], true), constFloat(`${node.name || op}_max`, [max], true)];
            rewrites.push(`${node.name || op}: min/max attributes → inputs`);
          }
          break;
        case 'Pad':
          if (from < 11) {
            const pads = getIntsAttribute(node, 'pads') ?? getIntsAttribute(node, 'paddings') ?? [];
            const value = getFloatAttribute(node, 'value', 0);
            dropAttrs(node, ['pads', 'paddings', 'value']);
            node.input = [node.input[0] ?? '', constInt64(`${node.name || op}_pads`, pads), constFloat(`${node.name || op}_value`, [value], true)];
            rewrites.push(`${node.name || op}: pads/value attributes → inputs`);
          }
          break;
        case 'Dropout': {
          // Inference-only: Dropout is the identity. Its mask output, if anything reads it, has no equivalent.
          if (node.output.length > 1 && node.output[1]) {
            throw new OpsetUpgradeError(`cannot upgrade opset ${from} → ${target}: Dropout ${node.name || '?'} has its mask output in use`);
          }
          out.push(makeNode('Identity', [node.input[0] ?? ''], [node.output[0] ?? ''], {}, node.name || undefined));
          rewrites.push(`${node.name || op}: Dropout → Identity`);
          continue;
        }
        case 'BatchNormalization':
          if (getAttribute(node, 'spatial') && getIntAttribute(node, 'spatial', 1) !== 1) {
            throw new OpsetUpgradeError(`cannot upgrade opset ${from} → ${target}: BatchNormalization ${node.name || '?'} uses spatial=0`);
          }
          dropAttrs(node, ['spatial', 'is_test', 'consumed_inputs']);
          break;
        case 'Add': case 'Sub': case 'Mul': case 'Div': case 'Gemm': case 'Sum': case 'Max': case 'Min':
          if (from < 7) {
            if (getAttribute(node, 'axis')) {
              throw new OpsetUpgradeError(`cannot upgrade opset ${from} → ${target}: ${op} ${node.name || '?'} uses legacy axis broadcasting`);
            }
            dropAttrs(node, ['broadcast', 'consumed_inputs']);
          }
          break;
        case 'Softmax': case 'LogSoftmax': case 'Hardmax': {
          // Before 13 these flattened the input to 2-D at `axis` (default 1); since 13 they act on one axis (default -1).
          if (from >= 13) break;
          const axis = getIntAttribute(node, 'axis', 1);
          if (axis === -1) break;
          const base = node.name || op;
          const flat = fresh(`${base}_flat`);
          const shape = fresh(`${base}_shape`);
          const inner = fresh(`${base}_2d`);
          const x = node.input[0] ?? '';
          out.push(makeNode('Shape', [x], [shape], {}, fresh(`${base}_Shape`)));
          out.push(makeNode('Flatten', [x], [flat], { axis: attr.int(axis) }, fresh(`${base}_Flatten`)));
          out.push(makeNode(op, [flat], [inner], { axis: attr.int(1) }, base));
          out.push(makeNode('Reshape', [inner, shape], [node.output[0] ?? ''], {}, fresh(`${base}_Reshape`)));
          rewrites.push(`${base}: ${op} axis=${axis} kept in its pre-13 meaning via Flatten/Reshape`);
          continue;
        }
        case 'Upsample': {
          const mode = getAttribute(node, 'mode')?.s;
          const modeText = mode ? new TextDecoder().decode(mode) : 'nearest';
          const scalesAttr = getAttribute(node, 'scales')?.floats;
          const scales = scalesAttr && scalesAttr.length > 0 ? constFloat(`${node.name || op}_scales`, scalesAttr) : (node.input[1] ?? '');
          out.push(makeNode('Resize', [node.input[0] ?? '', '', scales], [node.output[0] ?? ''], {
            mode: attr.string(modeText === 'bilinear' ? 'linear' : modeText),
            coordinate_transformation_mode: attr.string('asymmetric'),
            nearest_mode: attr.string('floor'),
          }, node.name || undefined));
          rewrites.push(`${node.name || op}: Upsample → Resize`);
          continue;
        }
        case 'Resize':
          if (from === 10) {
            node.input = [node.input[0] ?? '', '', node.input[1] ?? ''];
            node.attribute.push(
              makeAttribute('coordinate_transformation_mode', attr.string('asymmetric')),
              makeAttribute('nearest_mode', attr.string('floor')),
            );
            rewrites.push(`${node.name || op}: Resize-10 → Resize-13 (asymmetric, floor)`);
          }
          break;
        default:
          break;
      }
      out.push(node);
    }
    graph.node = out;
  }
}

/** A name generator that never collides with a name in the graph or any of its subgraphs. */
function namerOverSubgraphs(root: IGraphProto): (base: string) => string {
  const used = new Set<string>();
  const visit = (graph: IGraphProto): void => {
    for (const n of graph.node ?? []) {
      if (n.name) used.add(n.name);
      for (const x of [...(n.input ?? []), ...(n.output ?? [])]) used.add(x);
      for (const g of subgraphsOf(n)) visit(g);
    }
    for (const t of graph.initializer ?? []) used.add(t.name ?? '');
    for (const v of [...(graph.input ?? []), ...(graph.output ?? [])]) used.add(v.name ?? '');
  };
  visit(root);
  return (base: string) => {
    let name = base;
    for (let i = 1; used.has(name); i++) name = `${base}_${i}`;
    used.add(name);
    return name;
  };
}

