import { readFileSync, writeFileSync } from 'node:fs';
import onnxProto from 'onnx-proto';
import type { onnx as OnnxTypes } from 'onnx-proto';

/**
 * Thin helpers over the ONNX protobuf (onnx-proto is a protobufjs 6 static module; under NodeNext its CommonJS
 * `module.exports` arrives as the default import). Used by the demo-model builder, the quantizer and the fp16
 * converter, which all edit graphs directly since no Python toolchain exists on the devices.
 */
export const onnx = onnxProto.onnx;

export type ModelProto = OnnxTypes.ModelProto;
export type GraphProto = OnnxTypes.GraphProto;
export type NodeProto = OnnxTypes.NodeProto;
export type TensorProto = OnnxTypes.TensorProto;
export type ValueInfoProto = OnnxTypes.ValueInfoProto;
export type AttributeProto = OnnxTypes.AttributeProto;
export type IModelProto = OnnxTypes.IModelProto;
export type IGraphProto = OnnxTypes.IGraphProto;
export type INodeProto = OnnxTypes.INodeProto;
export type ITensorProto = OnnxTypes.ITensorProto;
export type IValueInfoProto = OnnxTypes.IValueInfoProto;
export type IAttributeProto = OnnxTypes.IAttributeProto;

/** TensorProto.DataType numbers (the subset this project builds or reads). */
export const DataType = {
  FLOAT: 1, UINT8: 2, INT8: 3, UINT16: 4, INT16: 5, INT32: 6, INT64: 7, STRING: 8, BOOL: 9,
  FLOAT16: 10, DOUBLE: 11, UINT32: 12, UINT64: 13,
} as const;
export type DataTypeCode = (typeof DataType)[keyof typeof DataType];

const DATA_TYPE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(DataType).map(([k, v]) => [v, k.toLowerCase()]),
);
export function dataTypeName(code: number): string {
  return DATA_TYPE_NAMES[code] ?? `dtype#${code}`;
}

/** protobufjs decodes int64 fields as Long objects when `long` is installed, numbers otherwise. */
type LongLike = number | { toNumber(): number };
export function toNumber(v: LongLike | null | undefined): number {
  if (v === null || v === undefined) return 0;
  return typeof v === 'number' ? v : v.toNumber();
}

// ---------------------------------------------------------------- tensors

type RawTyped = Float32Array | Uint16Array | Int8Array | Uint8Array | Int32Array | BigInt64Array | Float64Array;

function littleEndianBytes(values: RawTyped): Uint8Array {
  // Typed arrays are host-endian; ONNX raw_data is little-endian. Every platform this runs on is LE, so a copy
  // of the bytes suffices (copied, so the proto does not pin a caller's larger buffer).
  return new Uint8Array(values.buffer.slice(values.byteOffset, values.byteOffset + values.byteLength));
}

/** An initializer (or Constant payload) with raw little-endian data. */
export function makeTensor(name: string, dataType: DataTypeCode, dims: readonly number[], values: RawTyped): TensorProto {
  const expected = dims.reduce((a, b) => a * b, 1);
  if (values.length !== expected) {
    throw new RangeError(`tensor ${name}: ${values.length} values for dims [${dims.join(',')}] (${expected} expected)`);
  }
  return onnx.TensorProto.create({ name, dataType, dims: [...dims], rawData: littleEndianBytes(values) });
}

export function floatTensor(name: string, dims: readonly number[], values: Float32Array | readonly number[]): TensorProto {
  return makeTensor(name, DataType.FLOAT, dims, values instanceof Float32Array ? values : Float32Array.from(values));
}

export function int64Tensor(name: string, dims: readonly number[], values: readonly number[]): TensorProto {
  return makeTensor(name, DataType.INT64, dims, BigInt64Array.from(values.map((v) => BigInt(v))));
}

export function tensorDims(t: ITensorProto): number[] {
  return (t.dims ?? []).map((d) => toNumber(d as LongLike));
}

function alignedCopy(bytes: Uint8Array): ArrayBuffer {
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer;
}

/** The values of a FLOAT, FLOAT16 or DOUBLE tensor as float32, from raw_data or the typed repeated fields. */
export function tensorToFloat32(t: ITensorProto): Float32Array {
  const n = tensorDims(t).reduce((a, b) => a * b, 1);
  const raw = t.rawData && t.rawData.length > 0 ? t.rawData : null;
  switch (t.dataType) {
    case DataType.FLOAT:
      if (raw) return new Float32Array(alignedCopy(raw));
      return Float32Array.from(t.floatData ?? []);
    case DataType.DOUBLE:
      if (raw) return Float32Array.from(new Float64Array(alignedCopy(raw)));
      return Float32Array.from(t.doubleData ?? []);
    case DataType.FLOAT16: {
      const bits = raw ? new Uint16Array(alignedCopy(raw)) : Uint16Array.from(t.int32Data ?? []);
      const out = new Float32Array(bits.length);
      for (let i = 0; i < bits.length; i++) out[i] = float16BitsToFloat32(bits[i]!);
      return out;
    }
    default:
      throw new TypeError(`tensor ${t.name ?? '?'}: ${dataTypeName(t.dataType ?? 0)} is not a float type (${n} elements)`);
  }
}

/** The values of an integer tensor as plain numbers (int64 narrowed; shapes and axes fit easily). */
export function tensorToNumbers(t: ITensorProto): number[] {
  const raw = t.rawData && t.rawData.length > 0 ? t.rawData : null;
  switch (t.dataType) {
    case DataType.INT64:
      if (raw) return Array.from(new BigInt64Array(alignedCopy(raw)), (v) => Number(v));
      return (t.int64Data ?? []).map((v) => toNumber(v as LongLike));
    case DataType.INT32: case DataType.INT16: case DataType.INT8: case DataType.UINT8: case DataType.UINT16: case DataType.BOOL: {
      if (!raw) return [...(t.int32Data ?? [])];
      const buf = alignedCopy(raw);
      if (t.dataType === DataType.INT32) return Array.from(new Int32Array(buf));
      if (t.dataType === DataType.INT16) return Array.from(new Int16Array(buf));
      if (t.dataType === DataType.UINT16) return Array.from(new Uint16Array(buf));
      if (t.dataType === DataType.INT8) return Array.from(new Int8Array(buf));
      return Array.from(new Uint8Array(buf));
    }
    default:
      return Array.from(tensorToFloat32(t));
  }
}

// ---------------------------------------------------------------- float16

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** IEEE 754 binary32 → binary16 bits, round to nearest even, overflow to ±Inf. */
export function float32ToFloat16Bits(value: number): number {
  f32[0] = value;
  const x = u32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && (half & 1))) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1))) half++;
  return sign | half;
}

export function float16BitsToFloat32(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exp = (bits >>> 10) & 0x1f;
  const mant = bits & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

export function toFloat16Array(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = float32ToFloat16Bits(values[i]!);
  return out;
}

// ---------------------------------------------------------------- attributes

export type AttributeValue =
  | { readonly kind: 'int'; readonly value: number }
  | { readonly kind: 'float'; readonly value: number }
  | { readonly kind: 'string'; readonly value: string }
  | { readonly kind: 'ints'; readonly value: readonly number[] }
  | { readonly kind: 'floats'; readonly value: readonly number[] }
  | { readonly kind: 'tensor'; readonly value: TensorProto };

export const attr = {
  int: (value: number): AttributeValue => ({ kind: 'int', value }),
  float: (value: number): AttributeValue => ({ kind: 'float', value }),
  string: (value: string): AttributeValue => ({ kind: 'string', value }),
  ints: (value: readonly number[]): AttributeValue => ({ kind: 'ints', value }),
  floats: (value: readonly number[]): AttributeValue => ({ kind: 'floats', value }),
  tensor: (value: TensorProto): AttributeValue => ({ kind: 'tensor', value }),
};

const AttrType = onnx.AttributeProto.AttributeType;

export function makeAttribute(name: string, a: AttributeValue): AttributeProto {
  switch (a.kind) {
    case 'int': return onnx.AttributeProto.create({ name, type: AttrType.INT, i: a.value });
    case 'float': return onnx.AttributeProto.create({ name, type: AttrType.FLOAT, f: a.value });
    case 'string': return onnx.AttributeProto.create({ name, type: AttrType.STRING, s: new TextEncoder().encode(a.value) });
    case 'ints': return onnx.AttributeProto.create({ name, type: AttrType.INTS, ints: [...a.value] });
    case 'floats': return onnx.AttributeProto.create({ name, type: AttrType.FLOATS, floats: [...a.value] });
    case 'tensor': return onnx.AttributeProto.create({ name, type: AttrType.TENSOR, t: a.value });
  }
}

export function makeNode(
  opType: string,
  inputs: readonly string[],
  outputs: readonly string[],
  attributes: Readonly<Record<string, AttributeValue>> = {},
  name?: string,
  domain?: string,
): NodeProto {
  return onnx.NodeProto.create({
    opType,
    input: [...inputs],
    output: [...outputs],
    name: name ?? `${opType}_${outputs[0] ?? ''}`,
    attribute: Object.entries(attributes).map(([k, v]) => makeAttribute(k, v)),
    ...(domain ? { domain } : {}),
  });
}

export function getAttribute(node: INodeProto, name: string): IAttributeProto | undefined {
  return (node.attribute ?? []).find((a) => a.name === name);
}

export function getIntAttribute(node: INodeProto, name: string, fallback: number): number {
  const a = getAttribute(node, name);
  return a ? toNumber(a.i as LongLike) : fallback;
}

export function getIntsAttribute(node: INodeProto, name: string): number[] | undefined {
  const a = getAttribute(node, name);
  return a ? (a.ints ?? []).map((v) => toNumber(v as LongLike)) : undefined;
}

export function getFloatAttribute(node: INodeProto, name: string, fallback: number): number {
  const a = getAttribute(node, name);
  return a && a.f !== undefined && a.f !== null ? a.f : fallback;
}

// ---------------------------------------------------------------- value infos, graph, model

/** A dimension: a fixed size, or a symbolic name (e.g. 'N') for a dynamic one. */
export type Dim = number | string;

export function valueInfo(name: string, elemType: DataTypeCode, dims?: readonly Dim[]): ValueInfoProto {
  const tensorType: OnnxTypes.TypeProto.ITensor = { elemType };
  if (dims) {
    tensorType.shape = {
      dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })),
    };
  }
  return onnx.ValueInfoProto.create({ name, type: { tensorType } });
}

/** The element type and dims of a value info; dims are -1 where symbolic or unknown. */
export function valueInfoShape(vi: IValueInfoProto): { elemType: number; dims: number[] | undefined } {
  const tt = vi.type?.tensorType;
  const dims = tt?.shape?.dim?.map((d) => (d.dimValue !== null && d.dimValue !== undefined && !d.dimParam ? toNumber(d.dimValue as LongLike) : -1));
  return { elemType: tt?.elemType ?? 0, dims };
}

export interface GraphSpec {
  readonly name: string;
  readonly nodes: readonly NodeProto[];
  readonly inputs: readonly ValueInfoProto[];
  readonly outputs: readonly ValueInfoProto[];
  readonly initializers?: readonly TensorProto[];
  readonly valueInfo?: readonly ValueInfoProto[];
}

export interface ModelSpec {
  readonly graph: GraphSpec;
  readonly opset?: number;
  readonly irVersion?: number;
  readonly producerName?: string;
  readonly docString?: string;
}

export function makeModel(spec: ModelSpec): ModelProto {
  const g = spec.graph;
  return onnx.ModelProto.create({
    irVersion: spec.irVersion ?? 8,
    producerName: spec.producerName ?? 'edge-agent',
    producerVersion: '1',
    ...(spec.docString ? { docString: spec.docString } : {}),
    opsetImport: [{ domain: '', version: spec.opset ?? 17 }],
    graph: onnx.GraphProto.create({
      name: g.name,
      node: [...g.nodes],
      input: [...g.inputs],
      output: [...g.outputs],
      initializer: [...(g.initializers ?? [])],
      valueInfo: [...(g.valueInfo ?? [])],
    }),
  });
}

export function encodeModel(model: IModelProto): Uint8Array {
  return onnx.ModelProto.encode(model).finish();
}

/** Decodes ONNX bytes; throws a TypeError naming the problem when the bytes are not an ONNX model. */
export function decodeModel(bytes: Uint8Array): ModelProto {
  let model: ModelProto;
  try {
    model = onnx.ModelProto.decode(bytes);
  } catch (err) {
    throw new TypeError(`not an ONNX model: protobuf decoding failed (${(err as Error).message})`);
  }
  if (!model.graph || (model.graph.node ?? []).length === 0 || toNumber(model.irVersion as LongLike) <= 0) {
    throw new TypeError('not an ONNX model: no graph, no nodes or no ir_version');
  }
  return model;
}

export function readModel(file: string): ModelProto {
  return decodeModel(readFileSync(file));
}

export function writeModel(file: string, model: IModelProto): Uint8Array {
  const bytes = encodeModel(model);
  writeFileSync(file, bytes);
  return bytes;
}

/** Version of the default ('' / 'ai.onnx') opset the model imports, 0 if none. */
export function defaultOpsetVersion(model: IModelProto): number {
  const entry = (model.opsetImport ?? []).find((o) => !o.domain || o.domain === 'ai.onnx');
  return entry ? toNumber(entry.version as LongLike) : 0;
}
