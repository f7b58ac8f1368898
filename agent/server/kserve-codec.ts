import { InternalError, InvalidInputError } from '../errors.js';
import { elementCount, checkShape, tensorBytes, tensorFromBytes, type DType, type Tensor, type TensorData } from '../runtime/tensor.js';
import type { InferenceRequest, InferenceResult, SequenceControl } from '../runtime/types.js';

/**
 * Translation between KServe v2 / Triton messages (as @grpc/proto-loader decodes them with KSERVE_LOADER_OPTIONS:
 * keepCase, 64-bit integers as decimal strings, bytes as Buffers that view the received message) and the
 * runtime's plain tensors. Raw contents are the fast path: input bytes become typed-array views, output
 * typed arrays become Buffer views; nothing is copied here.
 */

// ---- datatypes ----

export type KServeDatatype =
  | 'BOOL' | 'UINT8' | 'UINT16' | 'UINT32' | 'UINT64'
  | 'INT8' | 'INT16' | 'INT32' | 'INT64'
  | 'FP16' | 'FP32' | 'FP64' | 'BYTES' | 'BF16';

/** The model-configuration enum name of a datatype (inference.DataType). */
export type ConfigDataType =
  | 'TYPE_BOOL' | 'TYPE_UINT8' | 'TYPE_UINT16' | 'TYPE_UINT32' | 'TYPE_UINT64'
  | 'TYPE_INT8' | 'TYPE_INT16' | 'TYPE_INT32' | 'TYPE_INT64'
  | 'TYPE_FP16' | 'TYPE_FP32' | 'TYPE_FP64';

const KSERVE_OF: Record<DType, KServeDatatype> = {
  bool: 'BOOL',
  uint8: 'UINT8', uint16: 'UINT16', uint32: 'UINT32', uint64: 'UINT64',
  int8: 'INT8', int16: 'INT16', int32: 'INT32', int64: 'INT64',
  float16: 'FP16', float32: 'FP32', float64: 'FP64',
};

const DTYPE_OF = new Map<string, DType>(Object.entries(KSERVE_OF).map(([d, k]) => [k, d as DType]));

export function kserveDatatype(dtype: DType): KServeDatatype {
  return KSERVE_OF[dtype];
}

export function configDataType(dtype: DType): ConfigDataType {
  return `TYPE_${KSERVE_OF[dtype]}` as ConfigDataType;
}

/** The runtime dtype of a KServe datatype; BYTES and BF16 have none and are refused with the reason. */
export function dtypeOf(datatype: string, tensor: string): DType {
  const dtype = DTYPE_OF.get(datatype);
  if (dtype !== undefined) return dtype;
  if (datatype === 'BYTES') {
    throw new InvalidInputError(`input '${tensor}': datatype BYTES is not supported (the runtime has no string tensors; send numeric tensors)`);
  }
  if (datatype === 'BF16') {
    throw new InvalidInputError(`input '${tensor}': datatype BF16 is not supported (onnxruntime-node has no bfloat16 tensors; send FP16 or FP32)`);
  }
  throw new InvalidInputError(`input '${tensor}': unknown datatype '${datatype}' (expected one of ${[...DTYPE_OF.keys()].join(', ')})`);
}

// ---- messages as decoded/encoded ----

/** 64-bit integers arrive as decimal strings (exact); numbers are accepted on the way out. */
export type Int64Value = string | number;

export interface InferParameterMessage {
  bool_param?: boolean;
  int64_param?: Int64Value;
  string_param?: string;
  double_param?: number;
  uint64_param?: Int64Value;
  /** Which member of the oneof is set (proto-loader `oneofs: true`). */
  parameter_choice?: 'bool_param' | 'int64_param' | 'string_param' | 'double_param' | 'uint64_param';
}

export type ParameterMap = Record<string, InferParameterMessage>;

export interface TensorContentsMessage {
  bool_contents?: boolean[];
  int_contents?: number[];
  int64_contents?: Int64Value[];
  uint_contents?: number[];
  uint64_contents?: Int64Value[];
  fp32_contents?: number[];
  fp64_contents?: number[];
  bytes_contents?: Uint8Array[];
}

export interface InferInputTensorMessage {
  name: string;
  datatype: string;
  shape: Int64Value[];
  parameters?: ParameterMap;
  contents?: TensorContentsMessage | null;
}

export interface InferRequestedOutputMessage {
  name: string;
  parameters?: ParameterMap;
}

export interface ModelInferRequestMessage {
  model_name: string;
  model_version: string;
  id: string;
  parameters?: ParameterMap;
  inputs: InferInputTensorMessage[];
  outputs?: InferRequestedOutputMessage[];
  raw_input_contents?: Uint8Array[];
}

export interface InferOutputTensorMessage {
  name: string;
  datatype: KServeDatatype;
  shape: number[];
  contents?: TensorContentsMessage;
}

export interface ModelInferResponseMessage {
  model_name: string;
  model_version: string;
  id?: string;
  outputs: InferOutputTensorMessage[];
  raw_output_contents: Buffer[];
}

// ---- request decoding ----

export interface DecodedInferRequest {
  readonly model: string;
  /** undefined: the served version. */
  readonly version: number | undefined;
  readonly id: string;
  readonly request: InferenceRequest;
  /** The request sent typed contents, so the response does too (where the datatype allows). */
  readonly typedResponse: boolean;
  /** Output names in response order when the request named a subset. */
  readonly requestedOutputs: readonly string[] | undefined;
}

/** Parses a KServe version string: '' means the served version. */
export function parseVersion(version: string, what: string): number | undefined {
  if (version === '') return undefined;
  if (!/^[0-9]{1,15}$/.test(version)) {
    throw new InvalidInputError(`${what}: version '${version}' is not a non-negative integer`);
  }
  return Number(version);
}

/**
 * Turns one ModelInferRequest into the runtime's request. `deadline` (performance.now() clock, ms) is the
 * transport deadline, if any; a `timeout` parameter (µs) can shorten it. `source` is who sent it, for batching.
 */
export function decodeInferRequest(msg: ModelInferRequestMessage, deadline?: number, source?: object | string): DecodedInferRequest {
  if (msg.model_name === '') throw new InvalidInputError('model_name is empty');
  const version = parseVersion(msg.model_version, `model '${msg.model_name}'`);
  const raw = msg.raw_input_contents ?? [];
  const inputs = msg.inputs;
  if (raw.length > 0 && raw.length !== inputs.length) {
    throw new InvalidInputError(
      `raw_input_contents has ${raw.length} entries for ${inputs.length} inputs; send one entry per input, in the order of 'inputs'`,
    );
  }

  const tensors: Record<string, Tensor> = {};
  for (let i = 0; i < inputs.length; i++) {
    const input = inputs[i]!;
    if (input.name === '') throw new InvalidInputError(`input #${i} has an empty name`);
    if (Object.prototype.hasOwnProperty.call(tensors, input.name)) throw new InvalidInputError(`input '${input.name}' is given twice`);
    const dtype = dtypeOf(input.datatype, input.name);
    const shape = decodeShape(input.name, input.shape);
    const contents = input.contents ?? null;
    if (raw.length > 0) {
      if (contents !== null && hasAnyContents(contents)) {
        throw new InvalidInputError(
          `input '${input.name}' has typed contents while the request also uses raw_input_contents; use one or the other for all inputs`,
        );
      }
      tensors[input.name] = tensorFromBytes(input.name, dtype, shape, raw[i]!);
    } else {
      if (contents === null) {
        throw new InvalidInputError(`input '${input.name}' has no data: set its contents or send raw_input_contents`);
      }
      tensors[input.name] = { dtype, shape, data: typedToArray(input.name, input.datatype, dtype, shape, contents) };
    }
  }

  const params = msg.parameters ?? {};
  const requestedOutputs = decodeRequestedOutputs(msg.outputs ?? []);
  const sequence = decodeSequence(params);
  const effectiveDeadline = earliest(deadline, timeoutDeadline(params));
  // Keys only when set (the request is compared as a plain object), assigned rather than spread: object
  // spread costs microseconds a request on this hot path.
  const request: { -readonly [K in keyof InferenceRequest]: InferenceRequest[K] } = { inputs: tensors };
  if (requestedOutputs !== undefined) request.outputs = requestedOutputs;
  if (sequence !== undefined) request.sequence = sequence;
  if (effectiveDeadline !== undefined) request.deadline = effectiveDeadline;
  if (source !== undefined) request.source = source;
  return {
    model: msg.model_name,
    version,
    id: msg.id,
    request,
    typedResponse: raw.length === 0 && inputs.length > 0,
    requestedOutputs,
  };
}

function decodeShape(name: string, shape: readonly Int64Value[]): number[] {
  const dims = shape.map(Number);
  checkShape(name, dims);
  return dims;
}

function decodeRequestedOutputs(outputs: readonly InferRequestedOutputMessage[]): string[] | undefined {
  if (outputs.length === 0) return undefined;
  const names: string[] = [];
  for (const out of outputs) {
    if (out.name === '') throw new InvalidInputError('a requested output has an empty name');
    if (names.includes(out.name)) throw new InvalidInputError(`output '${out.name}' is requested twice`);
    if (out.parameters && Object.prototype.hasOwnProperty.call(out.parameters, 'classification')) {
      throw new InvalidInputError(`output '${out.name}': the 'classification' parameter (top-k labels) is not supported; request the raw output`);
    }
    names.push(out.name);
  }
  return names;
}

/**
 * Prefix of KServe sequence ids in the runtime's sequence store, which native streams share: a client's
 * sequence_id 7 must never land on a native stream's state. uint64 7 and string "7" are the same sequence
 * (Triton fixes one id type per model, so a client never mixes them).
 */
export const KSERVE_SEQUENCE_PREFIX = 'kserve:';

/** Triton's sequence parameters → the runtime's SequenceControl. A zero / empty id means "not a sequence". */
export function decodeSequence(params: ParameterMap): SequenceControl | undefined {
  const idParam = params['sequence_id'];
  let id = '';
  if (idParam !== undefined) {
    switch (idParam.parameter_choice) {
      case 'int64_param': {
        const v = BigInt(idParam.int64_param ?? 0);
        if (v < 0n) throw new InvalidInputError(`sequence_id ${v} is negative; sequence ids are unsigned`);
        id = v === 0n ? '' : v.toString();
        break;
      }
      case 'uint64_param': {
        const v = BigInt(idParam.uint64_param ?? 0);
        id = v === 0n ? '' : v.toString();
        break;
      }
      case 'string_param':
        id = idParam.string_param ?? '';
        break;
      default:
        throw new InvalidInputError(`sequence_id must be an int64, uint64 or string parameter (got ${idParam.parameter_choice ?? 'no value'})`);
    }
  }
  const start = boolParam(params, 'sequence_start');
  const end = boolParam(params, 'sequence_end');
  if (id === '') {
    if (start || end) throw new InvalidInputError('sequence_start/sequence_end need a non-zero, non-empty sequence_id');
    return undefined;
  }
  const control: { id: string; start?: boolean; end?: boolean } = { id: KSERVE_SEQUENCE_PREFIX + id };
  if (start) control.start = true;
  if (end) control.end = true;
  return control;
}

function boolParam(params: ParameterMap, key: string): boolean {
  const p = params[key];
  if (p === undefined) return false;
  if (p.parameter_choice !== 'bool_param') throw new InvalidInputError(`${key} must be a bool parameter (got ${p.parameter_choice ?? 'no value'})`);
  return p.bool_param === true;
}

/** Triton's `timeout` request parameter, in microseconds; 0 or absent: none. */
function timeoutDeadline(params: ParameterMap): number | undefined {
  const p = params['timeout'];
  if (p === undefined) return undefined;
  const raw = p.parameter_choice === 'int64_param' ? p.int64_param : p.parameter_choice === 'uint64_param' ? p.uint64_param : undefined;
  if (raw === undefined) throw new InvalidInputError(`timeout must be an int64 parameter in microseconds (got ${p.parameter_choice ?? 'no value'})`);
  const us = Number(raw);
  if (!(us >= 0)) throw new InvalidInputError(`timeout ${raw} µs is negative`);
  return us === 0 ? undefined : performance.now() + us / 1000;
}

function earliest(a: number | undefined, b: number | undefined): number | undefined {
  if (a === undefined) return b;
  if (b === undefined) return a;
  return Math.min(a, b);
}

// ---- typed contents ----

const CONTENTS_FIELD: Record<DType, keyof TensorContentsMessage | undefined> = {
  bool: 'bool_contents',
  int8: 'int_contents', int16: 'int_contents', int32: 'int_contents', int64: 'int64_contents',
  uint8: 'uint_contents', uint16: 'uint_contents', uint32: 'uint_contents', uint64: 'uint64_contents',
  float32: 'fp32_contents', float64: 'fp64_contents',
  float16: undefined,
};

const INT_RANGE: Partial<Record<DType, readonly [number, number]>> = {
  int8: [-128, 127], int16: [-32768, 32767], int32: [-2147483648, 2147483647],
  uint8: [0, 255], uint16: [0, 65535], uint32: [0, 4294967295],
};

const INT_CTORS: Partial<Record<DType, { from(values: readonly number[]): TensorData }>> = {
  int8: Int8Array, int16: Int16Array, int32: Int32Array, uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array,
};

function hasAnyContents(c: TensorContentsMessage): boolean {
  for (const key of Object.keys(c) as (keyof TensorContentsMessage)[]) {
    const v = c[key];
    if (Array.isArray(v) && v.length > 0) return true;
  }
  return false;
}

function typedToArray(name: string, datatype: string, dtype: DType, shape: readonly number[], contents: TensorContentsMessage): TensorData {
  const field = CONTENTS_FIELD[dtype];
  if (field === undefined) {
    throw new InvalidInputError(`input '${name}': ${datatype} has no typed contents field; send it in raw_input_contents`);
  }
  const values = (contents[field] ?? []) as readonly unknown[];
  const expected = elementCount(shape);
  if (values.length !== expected) {
    const other = (Object.keys(contents) as (keyof TensorContentsMessage)[]).find((k) => k !== field && (contents[k]?.length ?? 0) > 0);
    const hint = values.length === 0 && other !== undefined ? ` (the values are in ${other}; ${datatype} uses ${field})` : '';
    throw new InvalidInputError(
      `input '${name}': ${field} has ${values.length} values, shape [${shape.join(',')}] needs ${expected}${hint}`,
    );
  }
  switch (dtype) {
    case 'bool':
      return Uint8Array.from(values as readonly boolean[], (v) => (v ? 1 : 0));
    case 'int64':
      return BigInt64Array.from(values as readonly Int64Value[], (v) => toBigInt(name, v));
    case 'uint64':
      return BigUint64Array.from(values as readonly Int64Value[], (v) => toBigInt(name, v));
    case 'float32':
      return Float32Array.from(values as readonly number[]);
    case 'float64':
      return Float64Array.from(values as readonly number[]);
    default: {
      const [lo, hi] = INT_RANGE[dtype]!;
      for (const v of values as readonly number[]) {
        if (v < lo || v > hi) throw new InvalidInputError(`input '${name}': value ${v} is out of range for ${datatype}`);
      }
      return INT_CTORS[dtype]!.from(values as readonly number[]);
    }
  }
}

function toBigInt(name: string, v: Int64Value): bigint {
  try {
    return BigInt(v);
  } catch {
    throw new InvalidInputError(`input '${name}': '${String(v)}' is not an integer`);
  }
}

function typedContents(t: Tensor): TensorContentsMessage {
  const data = t.data;
  switch (t.dtype) {
    case 'bool':
      return { bool_contents: Array.from(data as Uint8Array, (v) => v !== 0) };
    case 'int8': case 'int16': case 'int32':
      return { int_contents: Array.from(data as Int32Array) };
    case 'uint8': case 'uint16': case 'uint32':
      return { uint_contents: Array.from(data as Uint32Array) };
    // Decimal strings keep 64-bit values exact through protobufjs's Long conversion.
    case 'int64':
      return { int64_contents: Array.from(data as BigInt64Array, (v) => v.toString()) };
    case 'uint64':
      return { uint64_contents: Array.from(data as BigUint64Array, (v) => v.toString()) };
    case 'float32':
      return { fp32_contents: Array.from(data as Float32Array) };
    case 'float64':
      return { fp64_contents: Array.from(data as Float64Array) };
    case 'float16':
      throw new InternalError('FP16 has no typed contents field');
  }
}

// ---- response encoding ----

/**
 * Builds the ModelInferResponse for a result. Outputs come in the requested order, else in the order the
 * runtime returned them. Raw contents (a Buffer view per output, no copy) unless `typed`; a typed response
 * that includes an FP16 output falls back to raw for all outputs, since raw contents must cover every output.
 */
export function encodeInferResponse(
  result: InferenceResult,
  id: string,
  requestedOutputs: readonly string[] | undefined,
  typed: boolean,
): ModelInferResponseMessage {
  const names = requestedOutputs ?? Object.keys(result.outputs);
  const tensors = names.map((name) => {
    const t = result.outputs[name];
    if (t === undefined) throw new InternalError(`the runtime returned no output '${name}'`);
    return [name, t] as const;
  });
  const useTyped = typed && tensors.every(([, t]) => t.dtype !== 'float16');
  const outputs: InferOutputTensorMessage[] = [];
  const raw: Buffer[] = [];
  for (const [name, t] of tensors) {
    const out: InferOutputTensorMessage = { name, datatype: kserveDatatype(t.dtype), shape: [...t.shape] };
    if (useTyped) out.contents = typedContents(t);
    else raw.push(tensorBytes(t));
    outputs.push(out);
  }
  // An empty id stays off the wire (protobufjs would write the empty string; proto3 leaves defaults out).
  const response: { model_name: string; model_version: string; id?: string; outputs: InferOutputTensorMessage[]; raw_output_contents: Buffer[] } = {
    model_name: result.model, model_version: String(result.version), outputs, raw_output_contents: raw,
  };
  if (id !== '') response.id = id;
  return response;
}
