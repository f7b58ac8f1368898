import { InvalidInputError } from '../errors.js';

/** Element types the runtime handles, named as onnxruntime names them. float16 travels as raw uint16 bits. */
export type DType =
  | 'float32' | 'float16' | 'float64'
  | 'int8' | 'int16' | 'int32' | 'int64'
  | 'uint8' | 'uint16' | 'uint32' | 'uint64'
  | 'bool';

export type TensorData =
  | Float32Array | Float64Array
  | Int8Array | Int16Array | Int32Array | BigInt64Array
  | Uint8Array | Uint16Array | Uint32Array | BigUint64Array;

/** A dense, row-major tensor. `data` may be a view into a larger buffer (a gRPC message, a batch output), or a
 * getter that makes an aligned copy of misaligned wire bytes on first read (so copy a tensor field by field). */
export interface Tensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly data: TensorData;
}

/** Declared shape of a model input/output; -1 marks a dynamic dimension. */
export interface TensorSpec {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
}

type TypedArrayCtor = { new (buffer: ArrayBufferLike, byteOffset: number, length: number): TensorData; new (length: number): TensorData; BYTES_PER_ELEMENT: number };

const CTORS: Record<DType, TypedArrayCtor> = {
  float32: Float32Array, float16: Uint16Array, float64: Float64Array,
  int8: Int8Array, int16: Int16Array, int32: Int32Array, int64: BigInt64Array,
  uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, uint64: BigUint64Array,
  bool: Uint8Array,
} as Record<DType, TypedArrayCtor>;

export const DTYPES: readonly DType[] = Object.keys(CTORS) as DType[];

export function isDType(s: string): s is DType {
  return Object.prototype.hasOwnProperty.call(CTORS, s);
}

export function bytesPerElement(dtype: DType): number {
  return CTORS[dtype].BYTES_PER_ELEMENT;
}

export function elementCount(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function allocate(dtype: DType, length: number): TensorData {
  return new CTORS[dtype](length);
}

function alignedCopy(ctor: TypedArrayCtor, bytes: Uint8Array): TensorData {
  const copy = new Uint8Array(bytes.byteLength);
  copy.set(bytes);
  return new ctor(copy.buffer, 0, bytes.byteLength / ctor.BYTES_PER_ELEMENT);
}

/**
 * Views `bytes` (little-endian, as they came off the wire) as a typed array without copying. A copy happens
 * only when the bytes do not sit on the element's alignment inside their buffer, which a typed array requires.
 */
export function viewBytes(dtype: DType, bytes: Uint8Array): TensorData {
  const ctor = CTORS[dtype];
  if (bytes.byteOffset % ctor.BYTES_PER_ELEMENT === 0) return new ctor(bytes.buffer, bytes.byteOffset, bytes.byteLength / ctor.BYTES_PER_ELEMENT);
  return alignedCopy(ctor, bytes);
}

/**
 * A tensor over wire bytes that are misaligned for a typed array (a protobuf field's offset in its message is
 * arbitrary: 37 bytes for the demo classifier's frame). The aligned copy is made only if something reads
 * `data`. Batch assembly does not: it copies `tensorBytes()` straight into its own buffer, so a frame bound
 * for a worker or a batch is copied once instead of twice (150 KB: 28 → 4 µs, and no 150 KB allocation).
 *
 * A class, not an object literal with getters: the literal's computed (symbol) accessor put every tensor in
 * V8's dictionary mode, and the agent ran 5-6 full collections per 1500 classifier frames instead of 2 (RSS
 * after the bench's warm-up: 240 MB instead of 173). `data` is therefore a prototype getter, which an object
 * spread does not copy: build a copy as `{ dtype, shape, data }`.
 */
class WireBytesTensor implements Tensor {
  private aligned: TensorData | undefined;

  constructor(readonly dtype: DType, readonly shape: readonly number[], readonly wire: Uint8Array, private readonly ctor: TypedArrayCtor) {}

  get data(): TensorData {
    return (this.aligned ??= alignedCopy(this.ctor, this.wire));
  }

  get pending(): Uint8Array | undefined {
    return this.aligned === undefined ? this.wire : undefined;
  }
}

function tensorOverBytes(dtype: DType, shape: readonly number[], bytes: Uint8Array): Tensor {
  const ctor = CTORS[dtype];
  if (bytes.byteOffset % ctor.BYTES_PER_ELEMENT !== 0) return new WireBytesTensor(dtype, shape, bytes, ctor);
  return { dtype, shape, data: viewBytes(dtype, bytes) };
}

/** The wire bytes of a tensor whose aligned copy has not been made (and need not be, to copy it somewhere). */
export function pendingBytes(t: Tensor): Uint8Array | undefined {
  return t instanceof WireBytesTensor ? t.pending : undefined;
}

/** A typed array of `length` elements over `buffer` at `byteOffset` (no copy). */
export function typedView(dtype: DType, buffer: ArrayBufferLike, byteOffset: number, length: number): TensorData {
  return new CTORS[dtype](buffer, byteOffset, length);
}

/** The tensor's bytes as a Buffer over the same memory (no copy), ready for a protobuf `bytes` field. */
export function tensorBytes(t: Tensor): Buffer {
  const b = pendingBytes(t) ?? t.data;
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

export const MAX_RANK = 8;

/** Validates a client-declared shape before anything is allocated from it. */
export function checkShape(name: string, shape: readonly number[]): void {
  if (shape.length > MAX_RANK) throw new InvalidInputError(`tensor '${name}': rank ${shape.length} exceeds the maximum of ${MAX_RANK}`);
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) throw new InvalidInputError(`tensor '${name}': dimension ${d} in shape [${shape.join(',')}] is not a non-negative integer`);
  }
}

/** Builds a tensor from raw little-endian bytes, checking that the byte count matches dtype × shape. */
export function tensorFromBytes(name: string, dtype: DType, shape: readonly number[], bytes: Uint8Array): Tensor {
  checkShape(name, shape);
  const expected = elementCount(shape) * bytesPerElement(dtype);
  if (bytes.byteLength !== expected) {
    throw new InvalidInputError(
      `tensor '${name}': ${bytes.byteLength} bytes do not match ${dtype} shape [${shape.join(',')}] (expected ${expected} bytes)`,
    );
  }
  return tensorOverBytes(dtype, [...shape], bytes);
}

/** Whether `shape` fits `spec` (same rank, equal where the spec is fixed). */
export function shapeMatches(spec: readonly number[], shape: readonly number[]): boolean {
  if (spec.length !== shape.length) return false;
  for (let i = 0; i < spec.length; i++) if (spec[i] !== -1 && spec[i] !== shape[i]) return false;
  return true;
}

export function formatShape(shape: readonly number[]): string {
  return `[${shape.join(',')}]`;
}
