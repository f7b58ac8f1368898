import { createRequire } from 'node:module';
import * as ort from 'onnxruntime-node';

export interface ValueInfo {
  readonly name: string;
  readonly isTensor: boolean;
  readonly type?: string;
  readonly shape?: readonly (number | string)[];
}

/** One onnxruntime session, as the runtime uses it. */
export interface OrtSession {
  readonly inputMetadata: readonly ValueInfo[];
  readonly outputMetadata: readonly ValueInfo[];
  /** Synchronous on the binding path (the usual one); a promise only on the public-API fallback. */
  run(feeds: Record<string, ort.Tensor>): Record<string, ort.Tensor> | Promise<Record<string, ort.Tensor>>;
  release(): Promise<void>;
}

interface RawValueInfo {
  readonly name: string;
  readonly isTensor: boolean;
  readonly type: number;
  readonly shape: readonly number[];
  readonly symbolicDimensions: readonly string[];
}

interface NativeSession {
  loadModel(path: string, options: ort.InferenceSession.SessionOptions): void;
  readonly inputMetadata: readonly RawValueInfo[];
  readonly outputMetadata: readonly RawValueInfo[];
  run(feeds: Record<string, ort.Tensor>, fetches: Record<string, null>, options: ort.InferenceSession.RunOptions): Record<string, ort.Tensor>;
  dispose(): void;
}

interface BindingModule {
  readonly binding: { readonly InferenceSession: new () => NativeSession };
  readonly initOrt: () => void;
}

// ONNX TensorProto element types, as onnxruntime-node's own backend names them.
const ELEMENT_TYPES: readonly (string | undefined)[] = [
  undefined, 'float32', 'uint8', 'int8', 'uint16', 'int16', 'int32', 'int64', 'string', 'bool', 'float16',
  'float64', 'uint32', 'uint64', undefined, undefined, undefined, undefined, undefined, undefined, undefined, 'uint4', 'int4',
];

function loadBinding(): BindingModule | undefined {
  try {
    const m = createRequire(import.meta.url)('onnxruntime-node/dist/binding') as Partial<BindingModule>;
    if (typeof m.initOrt !== 'function' || typeof m.binding?.InferenceSession !== 'function') return undefined;
    return m as BindingModule;
  } catch {
    return undefined;
  }
}

const native = loadBinding();

/** Whether sessions run through onnxruntime-node's native binding (synchronously) rather than its public API. */
export const directBinding: boolean = native !== undefined;

function valueInfo(raw: readonly RawValueInfo[]): ValueInfo[] {
  return raw.map((m) => {
    if (!m.isTensor) return { name: m.name, isTensor: false };
    return {
      name: m.name, isTensor: true, type: ELEMENT_TYPES[m.type] ?? `onnx-type-${m.type}`,
      shape: m.shape.map((d, i) => (d === -1 ? m.symbolicDimensions[i] ?? '' : d)),
    };
  });
}

class BindingSession implements OrtSession {
  readonly inputMetadata: readonly ValueInfo[];
  readonly outputMetadata: readonly ValueInfo[];
  private readonly fetches: Record<string, null>;
  private released = false;

  constructor(private readonly session: NativeSession) {
    this.inputMetadata = valueInfo(session.inputMetadata);
    this.outputMetadata = valueInfo(session.outputMetadata);
    this.fetches = Object.fromEntries(this.outputMetadata.map((m) => [m.name, null]));
  }

  run(feeds: Record<string, ort.Tensor>): Record<string, ort.Tensor> {
    return this.session.run(feeds, this.fetches, {});
  }

  release(): Promise<void> {
    if (!this.released) {
      this.released = true;
      this.session.dispose(); // a second dispose throws
    }
    return Promise.resolve();
  }
}

class PublicApiSession implements OrtSession {
  constructor(private readonly session: ort.InferenceSession) {}
  get inputMetadata(): readonly ValueInfo[] { return this.session.inputMetadata; }
  get outputMetadata(): readonly ValueInfo[] { return this.session.outputMetadata; }
  run(feeds: Record<string, ort.Tensor>): Promise<Record<string, ort.Tensor>> { return this.session.run(feeds); }
  release(): Promise<void> { return this.session.release(); }
}

/**
 * Opens a model file. onnxruntime-node's public `InferenceSession.run` is synchronous native code deferred by a
 * `setImmediate` and wrapped in a promise: every frame paid an extra event-loop turn (measured 7–12 µs on a
 * 12 µs model here) for nothing, since the call blocks its thread either way. Sessions therefore go through the
 * package's own native binding — the object its public API wraps, loaded with the same options — and run
 * synchronously. Should a future onnxruntime-node move that module, the public API serves instead.
 */
export async function openOrtSession(path: string, options: ort.InferenceSession.SessionOptions): Promise<OrtSession> {
  if (!native) return new PublicApiSession(await ort.InferenceSession.create(path, options));
  native.initOrt();
  const session = new native.binding.InferenceSession();
  session.loadModel(path, options);
  return new BindingSession(session);
}
