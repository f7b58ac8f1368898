import { InvalidInputError, ResourceExhaustedError } from '../errors.js';
import { bytesPerElement, formatShape, pendingBytes, shapeMatches, type Tensor, type TensorSpec } from './tensor.js';
import type { InferenceRequest, StateSpec } from './types.js';

interface ValidatedModel {
  readonly name: string;
  readonly inputs: readonly TensorSpec[];
  readonly outputs: readonly TensorSpec[];
  readonly state: readonly StateSpec[];
  readonly maxBatchSize: number;
}

function hasNonFinite(t: Tensor): boolean {
  if (t.dtype !== 'float32' && t.dtype !== 'float64') return false;
  const d = t.data as Float32Array | Float64Array;
  for (let i = 0; i < d.length; i++) if (!Number.isFinite(d[i] as number)) return true;
  return false;
}

/**
 * Checks a request against the model before it is queued, so a bad frame is answered with a message naming the
 * tensor and the problem instead of failing a whole batch inside onnxruntime. Returns the request's batch rows
 * and the key that frames must share to be stacked into one batch (their shapes past the batch dimension).
 */
export function validateRequest(model: ValidatedModel, req: InferenceRequest, limits: { refuseNonFinite: boolean; maxTensorBytes: number }): { rows: number; groupKey: string } {
  const { refuseNonFinite } = limits;
  const names = Object.keys(req.inputs);
  for (const name of names) {
    if (model.state.some((s) => s.input === name)) {
      throw new InvalidInputError(`input '${name}' is state of model '${model.name}': the agent keeps it per stream/sequence; do not send it`);
    }
    if (!model.inputs.some((s) => s.name === name)) {
      throw new InvalidInputError(`unknown input '${name}' for model '${model.name}' (inputs: ${model.inputs.map((s) => s.name).join(', ')})`);
    }
  }
  let rows = 1;
  let rowsFrom: string | undefined;
  let groupKey = '';
  const batching = model.maxBatchSize > 0;
  for (let i = 0; i < model.inputs.length; i++) {
    const spec = model.inputs[i] as TensorSpec;
    const t = req.inputs[spec.name];
    if (!t) throw new InvalidInputError(`missing input '${spec.name}' for model '${model.name}'`);
    // Not `t.data`: on misaligned wire bytes that would make the aligned copy batching avoids.
    const byteLength = (pendingBytes(t) ?? t.data).byteLength;
    if (byteLength > limits.maxTensorBytes) {
      throw new ResourceExhaustedError('runtime.max_tensor_bytes', `input '${spec.name}': ${byteLength} bytes exceed runtime.max_tensor_bytes (${limits.maxTensorBytes})`);
    }
    if (t.dtype !== spec.dtype) throw new InvalidInputError(`input '${spec.name}': dtype ${t.dtype} does not match the model's ${spec.dtype}`);
    if (!shapeMatches(spec.shape, t.shape)) {
      throw new InvalidInputError(`input '${spec.name}': shape ${formatShape(t.shape)} does not match the model's ${formatShape(spec.shape)} (-1 = any)`);
    }
    if (t.shape.some((d) => d === 0)) throw new InvalidInputError(`input '${spec.name}': empty tensor, shape ${formatShape(t.shape)}`);
    const elements = byteLength / bytesPerElement(t.dtype);
    if (elements !== t.shape.reduce((a, b) => a * b, 1)) {
      throw new InvalidInputError(`input '${spec.name}': ${elements} elements do not fill shape ${formatShape(t.shape)}`);
    }
    if (refuseNonFinite && hasNonFinite(t)) throw new InvalidInputError(`input '${spec.name}': contains NaN or Inf (runtime.non_finite_inputs = refuse)`);
    if (batching) {
      if (spec.shape.length === 0) {
        // A scalar is passed to the batch once: only frames with the same value may share a run.
        groupKey += `=${String(t.data[0])};`;
        continue;
      }
      const r = t.shape[0] as number;
      if (rowsFrom === undefined) {
        rows = r;
        rowsFrom = spec.name;
      } else if (r !== rows) throw new InvalidInputError(`input '${spec.name}': batch size ${r} differs from input '${rowsFrom}' (${rows})`);
      groupKey += `${t.shape.slice(1).join('x')};`;
    }
  }
  if (batching && rows > model.maxBatchSize) {
    throw new InvalidInputError(`batch size ${rows} exceeds max_batch_size ${model.maxBatchSize} of model '${model.name}'`);
  }
  if (model.state.length > 0 && rows !== 1) {
    throw new InvalidInputError(`model '${model.name}' is stateful: each request is one step of one stream (batch size 1, got ${rows})`);
  }
  if (req.outputs) {
    for (const o of req.outputs) {
      if (!model.outputs.some((s) => s.name === o)) {
        throw new InvalidInputError(`unknown output '${o}' requested from model '${model.name}' (outputs: ${model.outputs.map((s) => s.name).join(', ')})`);
      }
    }
  }
  return { rows, groupKey };
}
