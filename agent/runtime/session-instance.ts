import { Worker } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';
import { EdgeAgentError, InternalError, ModelLoadError, UnavailableError } from '../errors.js';
import type { OrtSession, ValueInfo } from './ort-session.js';
import { createSession, type SessionRequest } from './session-factory.js';
import { allocate, bytesPerElement, typedView, type DType, type TensorData } from './tensor.js';

export interface FeedTensor {
  readonly dtype: DType;
  readonly data: TensorData;
  readonly dims: readonly number[];
}

export type { ValueInfo } from './ort-session.js';

export interface InstanceInfo {
  readonly provider: SessionRequest['providers'][number];
  readonly skipped: readonly { provider: string; reason: string }[];
  readonly graphCache: 'hit' | 'stored' | 'off';
  /** How long creating the session held the thread that created it. */
  readonly openMs: number;
  readonly inputMetadata: readonly ValueInfo[];
  readonly outputMetadata: readonly ValueInfo[];
}

/**
 * One onnxruntime session the scheduler can run batches on. Two kinds: `inline` runs on the event loop
 * (onnxruntime's `run` is synchronous, so the loop is blocked while a batch runs), and
 * `worker` runs in its own thread, so gRPC, health and MQTT keep flowing while a batch computes.
 */
export interface SessionInstance {
  readonly info: InstanceInfo;
  /** True when inputs must be written into `inputBuffer` (they cross a thread); false: any typed array will do. */
  readonly needsOwnBuffers: boolean;
  /** True when `run` computes on the calling thread before it returns (the event loop waits). */
  readonly synchronous: boolean;
  /** A reusable buffer for one input of the next batch; valid until that batch's run resolves. */
  inputBuffer(name: string, dtype: DType, length: number): TensorData;
  run(feeds: Readonly<Record<string, FeedTensor>>): Promise<Record<string, FeedTensor>>;
  release(): Promise<void>;
}

export type ExecutionMode = 'worker' | 'inline';

class InlineInstance implements SessionInstance {
  readonly needsOwnBuffers = false;
  readonly synchronous = true;
  private readonly buffers = new Map<string, TensorData>();

  constructor(private readonly session: OrtSession, readonly info: InstanceInfo) {}

  inputBuffer(name: string, dtype: DType, length: number): TensorData {
    let b = this.buffers.get(name);
    if (!b || b.length < length || !(b instanceof allocate(dtype, 0).constructor)) {
      b = allocate(dtype, length);
      this.buffers.set(name, b);
    }
    return b.subarray(0, length) as TensorData;
  }

  async run(feeds: Readonly<Record<string, FeedTensor>>): Promise<Record<string, FeedTensor>> {
    const inputs: Record<string, ort.Tensor> = {};
    for (const [name, f] of Object.entries(feeds)) inputs[name] = new ort.Tensor(f.dtype, f.data as ort.Tensor.DataType, f.dims as number[]);
    const out = await this.session.run(inputs);
    const result: Record<string, FeedTensor> = {};
    for (const [name, t] of Object.entries(out)) result[name] = { dtype: t.type as DType, data: t.data as TensorData, dims: t.dims };
    return result;
  }

  release(): Promise<void> {
    return this.session.release();
  }
}

interface WorkerFeed { name: string; dtype: DType; dims: readonly number[]; buffer: ArrayBuffer; byteOffset: number; length: number }
type FromWorker =
  | { type: 'created'; info: InstanceInfo }
  | { type: 'failed'; message: string; modelLoad: boolean }
  | { type: 'result'; id: number; outputs: { name: string; dtype: DType; dims: number[]; buffer: ArrayBuffer; byteOffset: number; length: number }[]; inputs: { name: string; buffer: ArrayBuffer }[] }
  | { type: 'error'; id: number; message: string; inputs: { name: string; buffer: ArrayBuffer }[] };

function workerUrl(): URL {
  // Under a TypeScript loader (tests) this module is a .ts file and so is its worker; compiled, both are .js.
  const ext = import.meta.url.endsWith('.ts') ? 'ts' : 'js';
  return new URL(`./instance-worker.${ext}`, import.meta.url);
}

/**
 * A session in a worker thread. Batch inputs are written once into this instance's own ArrayBuffers (the one
 * copy batching needs anyway), which are transferred to the worker and back with the results; outputs come
 * back as transferred ArrayBuffers. Nothing is copied across the thread boundary. (onnxruntime-node refuses
 * SharedArrayBuffer-backed tensors, hence transfer rather than sharing.)
 */
class WorkerInstance implements SessionInstance {
  readonly needsOwnBuffers = true;
  readonly synchronous = false;
  private readonly buffers = new Map<string, ArrayBuffer>();
  private readonly pending = new Map<number, { resolve: (o: Record<string, FeedTensor>) => void; reject: (e: Error) => void }>();
  private nextId = 1;
  private dead: Error | undefined;

  private constructor(private readonly worker: Worker, readonly info: InstanceInfo) {
    worker.on('message', (m: FromWorker) => this.onMessage(m));
    worker.on('error', (err) => this.fail(new InternalError(`inference worker failed: ${err.message}`, { cause: err })));
    worker.on('exit', (code) => this.fail(new UnavailableError(`inference worker exited (code ${code})`)));
  }

  static create(request: SessionRequest): Promise<WorkerInstance> {
    const worker = new Worker(workerUrl(), { workerData: { request } });
    return new Promise((resolve, reject) => {
      const onExit = (code: number): void => reject(new ModelLoadError(request.model, request.path, `inference worker exited during load (code ${code})`));
      worker.once('error', reject);
      worker.once('exit', onExit);
      worker.once('message', (m: FromWorker) => {
        worker.removeListener('error', reject);
        worker.removeListener('exit', onExit);
        if (m.type === 'created') resolve(new WorkerInstance(worker, m.info));
        else {
          void worker.terminate();
          reject(m.type === 'failed' && m.modelLoad ? new ModelLoadError(request.model, request.path, m.message.replace(/^model '.*?' \(.*?\) failed to load: /, '')) : new ModelLoadError(request.model, request.path, m.type === 'failed' ? m.message : 'unexpected message from worker'));
        }
      });
    });
  }

  private onMessage(m: FromWorker): void {
    if (m.type !== 'result' && m.type !== 'error') return;
    const p = this.pending.get(m.id);
    if (!p) return;
    this.pending.delete(m.id);
    for (const i of m.inputs) this.buffers.set(i.name, i.buffer);
    if (m.type === 'error') {
      p.reject(new InternalError(m.message));
      return;
    }
    const out: Record<string, FeedTensor> = {};
    for (const o of m.outputs) out[o.name] = { dtype: o.dtype, dims: o.dims, data: typedView(o.dtype, o.buffer, o.byteOffset, o.length) };
    p.resolve(out);
  }

  private fail(err: EdgeAgentError): void {
    this.dead ??= err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  inputBuffer(name: string, dtype: DType, length: number): TensorData {
    const bytes = length * bytesPerElement(dtype);
    let b = this.buffers.get(name);
    // Missing, too small, or detached (lost with a failed worker): allocate; otherwise reuse run after run.
    if (!b || b.byteLength < bytes) {
      b = new ArrayBuffer(Math.max(bytes, 64));
      this.buffers.set(name, b);
    }
    return typedView(dtype, b, 0, length);
  }

  run(feeds: Readonly<Record<string, FeedTensor>>): Promise<Record<string, FeedTensor>> {
    if (this.dead) return Promise.reject(this.dead);
    const wire: WorkerFeed[] = [];
    const transfer: ArrayBuffer[] = [];
    for (const [name, f] of Object.entries(feeds)) {
      let data = f.data;
      if (data.buffer !== this.buffers.get(name)) {
        const own = this.inputBuffer(name, f.dtype, data.length);
        (own as unknown as { set(a: ArrayLike<unknown>): void }).set(data as unknown as ArrayLike<unknown>);
        data = own;
      }
      wire.push({ name, dtype: f.dtype, dims: f.dims, buffer: data.buffer as ArrayBuffer, byteOffset: data.byteOffset, length: data.length });
      transfer.push(data.buffer as ArrayBuffer);
      this.buffers.delete(name);
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ type: 'run', id, feeds: wire }, transfer);
    });
  }

  async release(): Promise<void> {
    this.worker.removeAllListeners('exit');
    this.worker.postMessage({ type: 'release' });
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => { void this.worker.terminate().then(() => resolve()); }, 5000);
      this.worker.once('exit', () => { clearTimeout(timer); resolve(); });
    });
  }
}

/** Creates one instance of a model: in a worker thread or on the event loop. */
export async function createInstance(request: SessionRequest, mode: ExecutionMode): Promise<SessionInstance> {
  if (mode === 'worker') return WorkerInstance.create(request);
  const created = await createSession(request);
  const s = created.session;
  return new InlineInstance(s, {
    provider: created.provider, skipped: created.skipped, graphCache: created.graphCache, openMs: created.openMs,
    inputMetadata: s.inputMetadata, outputMetadata: s.outputMetadata,
  });
}
