import { InvalidInputError } from '../errors.js';
import { tensorBytes, tensorFromBytes, type DType, type Tensor, type TensorSpec } from '../runtime/index.js';

/** edge.v1.DataType names ↔ the runtime's dtypes. */
const TO_DTYPE: Record<string, DType> = {
  FLOAT32: 'float32', FLOAT16: 'float16', FLOAT64: 'float64',
  INT8: 'int8', INT16: 'int16', INT32: 'int32', INT64: 'int64',
  UINT8: 'uint8', UINT16: 'uint16', UINT32: 'uint32', UINT64: 'uint64', BOOL: 'bool',
};
const FROM_DTYPE = Object.fromEntries(Object.entries(TO_DTYPE).map(([k, v]) => [v, k])) as Record<DType, string>;

export interface WireTensor {
  name: string;
  dtype: string;
  shape: (number | string)[];
  data: Buffer;
}

export interface WireTensorInfo {
  name: string;
  dtype: string;
  shape: number[];
}

export function wireDType(dtype: DType): string {
  return FROM_DTYPE[dtype];
}

/** An edge.v1.DataType name as the runtime's dtype; undefined when unset or unknown. */
export function dtypeFromWire(name: string): DType | undefined {
  return TO_DTYPE[name];
}

function toShape(name: string, shape: readonly (number | string)[]): number[] {
  return shape.map((d) => {
    const n = typeof d === 'number' ? d : Number(d);
    if (!Number.isSafeInteger(n) || n < 0) throw new InvalidInputError(`tensor '${name}': dimension ${String(d)} is not a non-negative integer`);
    return n;
  });
}

/** Decodes a frame's tensors into views over the message's bytes (no copy unless alignment forces one). */
export function decodeTensors(tensors: readonly WireTensor[]): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  for (const t of tensors) {
    if (!t.name) throw new InvalidInputError('a tensor has no name');
    const dtype = TO_DTYPE[t.dtype];
    if (!dtype) throw new InvalidInputError(`tensor '${t.name}': dtype ${t.dtype || 'DATA_TYPE_UNSPECIFIED'} is not set or not supported`);
    if (Object.prototype.hasOwnProperty.call(out, t.name)) throw new InvalidInputError(`tensor '${t.name}' appears twice in the frame`);
    out[t.name] = tensorFromBytes(t.name, dtype, toShape(t.name, t.shape), t.data);
  }
  return out;
}

/** Encodes output tensors as raw bytes over the output buffers (no copy). */
export function encodeTensors(outputs: Readonly<Record<string, Tensor>>): WireTensor[] {
  const out: WireTensor[] = [];
  for (const [name, t] of Object.entries(outputs)) out.push({ name, dtype: FROM_DTYPE[t.dtype], shape: t.shape as number[], data: tensorBytes(t) });
  return out;
}

export function tensorInfo(specs: readonly TensorSpec[]): WireTensorInfo[] {
  return specs.map((s) => ({ name: s.name, dtype: FROM_DTYPE[s.dtype], shape: [...s.shape] }));
}
