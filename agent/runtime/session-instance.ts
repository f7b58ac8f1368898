import { Worker } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';
import { errorMessage, InternalError, ModelLoadError, UnavailableError } from '../errors.js';
import type { Logger } from '../logger.js';
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
  /**
   * False while a run would fail at once: a worker whose thread died is backing off before its next restart,
   * or gave up restarting. The scheduler then sends its frames to the other instances.
   */
  readonly available: boolean;
  /** Why this instance will not run anything again until the model is reloaded (it gave up restarting its worker). */
  readonly stoppedReason: string | undefined;
  /** A reusable buffer for one input of the next batch; valid until that batch's run resolves. */
  inputBuffer(name: string, dtype: DType, length: number): TensorData;
  run(feeds: Readonly<Record<string, FeedTensor>>): Promise<Record<string, FeedTensor>>;
  release(): Promise<void>;
}

export type ExecutionMode = 'worker' | 'inline';

class InlineInstance implements SessionInstance {
  readonly needsOwnBuffers = false;
  readonly synchronous = true;
  readonly available = true;
  readonly stoppedReason = undefined;
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
 * Waits before each restart of a worker instance's thread, by failures in a row (deaths and failed reopens
 * with no run succeeding between them). A death after serving is usually a one-off (an out-of-memory, a native
 * abort on one input), so the first restart is immediate and frames wait for it. Later ones back off, frames
 * fail fast meanwhile, and after the last the instance gives up: a model that kills its worker on every open or
 * every run is reopened 5 times in about 41 s, then no more until it is reloaded.
 */
const RESPAWN_DELAYS_MS: readonly number[] = [0, 500, 2_000, 8_000, 30_000];
/** How long release waits for a worker to free its session and exit before terminating it. */
const RELEASE_GRACE_MS = 5_000;

interface SpawnedWorker { readonly worker: Worker; readonly info: InstanceInfo }

/** A thread that is being dropped: an error it still raises must not become an uncaught 'error' event. */
function discard(worker: Worker): void {
  worker.removeAllListeners('message');
  worker.on('error', () => undefined);
  void worker.terminate();
}

/** Starts a worker thread and opens the request's session in it; rejects with ModelLoadError if that fails. */
function spawnWorker(request: SessionRequest): Promise<SpawnedWorker> {
  const worker = new Worker(workerUrl(), { workerData: { request } });
  return new Promise((resolve, reject) => {
    const fail = (reason: string, cause?: unknown): void => {
      worker.removeListener('error', onError);
      worker.removeListener('exit', onExit);
      discard(worker);
      reject(new ModelLoadError(request.model, request.path, reason, cause === undefined ? undefined : { cause }));
    };
    const onError = (err: Error): void => fail(`inference worker failed during load: ${err.message}`, err);
    const onExit = (code: number): void => fail(`inference worker exited during load (code ${code})`);
    worker.once('error', onError);
    worker.once('exit', onExit);
    worker.once('message', (m: FromWorker) => {
      worker.removeListener('error', onError);
      worker.removeListener('exit', onExit);
      if (m.type === 'created') resolve({ worker, info: m.info });
      else if (m.type === 'failed' && m.modelLoad) fail(m.message.replace(/^model '.*?' \(.*?\) failed to load: /, ''));
      else fail(m.type === 'failed' ? m.message : 'unexpected message from worker');
    });
  });
}

/**
 * A session in a worker thread. Batch inputs are written once into this instance's own ArrayBuffers (the one
 * copy batching needs anyway), which are transferred to the worker and back with the results; outputs come
 * back as transferred ArrayBuffers. Nothing is copied across the thread boundary. (onnxruntime-node refuses
 * SharedArrayBuffer-backed tensors, hence transfer rather than sharing.)
 *
 * A thread that dies (out of memory, a native abort) is replaced by a new one opening the same request, as
 * the respawn delays bound: the scheduler keeps handing this instance batches, so it must serve again by itself.
 */
class WorkerInstance implements SessionInstance {
  readonly needsOwnBuffers = true;
  readonly synchronous = false;
  readonly info: InstanceInfo;
  /** Input buffers not lent to the worker, by input name: one a batch, two while the next is handed over early. */
  private readonly buffers = new Map<string, ArrayBuffer[]>();
  private readonly pending = new Map<number, { resolve: (o: Record<string, FeedTensor>) => void; reject: (e: Error) => void }>();
  private nextId = 1;
  /** The thread that runs batches; undefined while it is being replaced, after giving up, and once released. */
  private worker: Worker | undefined;
  /** Deaths and failed restarts since a run last succeeded. */
  private failures = 0;
  private lastFailure = '';
  /** Runs waiting for the immediate restart that follows a death. */
  private waiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private backoff: { timer: NodeJS.Timeout; wake: () => void } | undefined;
  /** Set once the instance gave up restarting its worker or was released: every later run fails with it. */
  private stopped: UnavailableError | undefined;
  private released: Promise<void> | undefined;

  private readonly log: Logger | undefined;
  private readonly respawnDelaysMs: readonly number[];
  private readonly onStopped: (() => void) | undefined;

  private constructor(private readonly request: SessionRequest, first: SpawnedWorker, options: InstanceOptions) {
    this.info = first.info;
    this.log = options.log;
    this.respawnDelaysMs = options.respawnDelaysMs ?? RESPAWN_DELAYS_MS;
    this.onStopped = options.onStopped;
    this.attach(first.worker);
  }

  static async create(request: SessionRequest, options: InstanceOptions): Promise<WorkerInstance> {
    return new WorkerInstance(request, await spawnWorker(request), options);
  }

  private attach(worker: Worker): void {
    this.worker = worker;
    let error: Error | undefined;
    worker.on('message', (m: FromWorker) => this.onMessage(m));
    // A worker's uncaught error (ERR_WORKER_OUT_OF_MEMORY among them) comes first, then its exit.
    worker.on('error', (err) => {
      error = err;
      this.onDeath(worker, `failed (${err.message})`, err);
    });
    worker.on('exit', (code) => this.onDeath(worker, `exited (code ${code})`, error));
  }

  private onMessage(m: FromWorker): void {
    if (m.type !== 'result' && m.type !== 'error') return;
    const p = this.pending.get(m.id);
    if (!p) return;
    this.pending.delete(m.id);
    for (const i of m.inputs) this.giveBack(i.name, i.buffer);
    if (m.type === 'error') {
      p.reject(new InternalError(m.message));
      return;
    }
    this.failures = 0;
    const out: Record<string, FeedTensor> = {};
    for (const o of m.outputs) out[o.name] = { dtype: o.dtype, dims: o.dims, data: typedView(o.dtype, o.buffer, o.byteOffset, o.length) };
    p.resolve(out);
  }

  private rejectPending(err: Error): void {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  private onDeath(worker: Worker, how: string, cause: unknown): void {
    if (worker !== this.worker) return; // the exit after an error already handled, or a thread being released
    this.worker = undefined;
    this.failures++;
    this.lastFailure = `its inference worker ${how}`;
    const inFlight = this.pending.size;
    // Accepted frames get an answer: their inputs went down with the thread, so they cannot be retried here.
    this.rejectPending(new UnavailableError(`model '${this.request.model}': its inference worker ${how} while running this batch; the batch did not complete`, { cause }));
    this.log?.error({ model: this.request.model, reason: how, in_flight: inFlight, failures_in_a_row: this.failures }, 'inference worker died');
    void this.restart();
  }

  private async restart(): Promise<void> {
    const model = this.request.model;
    while (!this.stopped) {
      if (this.failures > this.respawnDelaysMs.length) {
        this.stop(new UnavailableError(`model '${model}': ${this.lastFailure}; after ${this.failures} failures in a row with no run succeeding, this instance stopped restarting it until the model is reloaded`));
        this.log?.error({ model, failures_in_a_row: this.failures, reason: this.lastFailure }, 'inference worker keeps failing: instance stopped restarting it');
        this.onStopped?.();
        return;
      }
      const delay = this.respawnDelaysMs[this.failures - 1] ?? 0;
      this.log?.warn({ model, attempt: this.failures, delay_ms: delay }, 'restarting inference worker');
      if (delay > 0) await new Promise<void>((wake) => { this.backoff = { timer: setTimeout(wake, delay), wake }; });
      this.backoff = undefined;
      if (this.stopped) return;
      try {
        // Released meanwhile, the new thread is dropped once its session is open: terminating a thread inside
        // onnxruntime's native code can abort the whole process.
        const spawned = await spawnWorker(this.request);
        if (this.stopped) {
          discard(spawned.worker);
          return;
        }
        this.attach(spawned.worker);
        this.log?.info({ model, provider: spawned.info.provider, open_ms: Math.round(spawned.info.openMs) }, 'inference worker restarted');
        for (const w of this.waiters.splice(0)) w.resolve();
        return;
      } catch (err) {
        if (this.stopped) return;
        this.failures++;
        this.lastFailure = `restarting its inference worker failed (${errorMessage(err)})`;
        this.log?.error({ model, failures_in_a_row: this.failures, err: errorMessage(err) }, 'restarting inference worker failed');
        const failure = new UnavailableError(`model '${model}': ${this.lastFailure}`, { cause: err });
        for (const w of this.waiters.splice(0)) w.reject(failure);
      }
    }
  }

  /** Ends restarting for good: waiting runs and later ones fail with `err`. */
  private stop(err: UnavailableError): void {
    this.stopped ??= err;
    for (const w of this.waiters.splice(0)) w.reject(this.stopped);
    if (this.backoff) {
      clearTimeout(this.backoff.timer);
      this.backoff.wake();
    }
  }

  get stoppedReason(): string | undefined {
    return this.stopped?.message;
  }

  get available(): boolean {
    return this.stopped === undefined && (this.worker !== undefined || this.failures <= 1);
  }

  /** Resolves once a worker serves again; fails fast when restarting is backing off or has been given up. */
  private serving(): Promise<void> {
    if (this.stopped) return Promise.reject(this.stopped);
    // Only the immediate restart after a death is worth waiting for: once a restart failed too, the next waits
    // out a backoff that would hold the frame longer than failing it.
    if (this.failures > 1) {
      return Promise.reject(new UnavailableError(`model '${this.request.model}': ${this.lastFailure}; restarting it (${this.failures} failures in a row)`));
    }
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  inputBuffer(name: string, dtype: DType, length: number): TensorData {
    const bytes = length * bytesPerElement(dtype);
    const free = this.freeBuffers(name);
    // Reused run after run; none free or big enough (all lent, or lost with a failed worker): allocate.
    let b = free.find((x) => x.byteLength >= bytes);
    if (!b) {
      b = new ArrayBuffer(Math.max(bytes, 64));
      free.push(b);
      keepLargest(free);
    }
    return typedView(dtype, b, 0, length);
  }

  /** A buffer back from the worker (or never sent). */
  private giveBack(name: string, buffer: ArrayBuffer): void {
    const free = this.freeBuffers(name);
    free.push(buffer);
    keepLargest(free);
  }

  private freeBuffers(name: string): ArrayBuffer[] {
    let free = this.buffers.get(name);
    if (!free) this.buffers.set(name, (free = []));
    return free;
  }

  async run(feeds: Readonly<Record<string, FeedTensor>>): Promise<Record<string, FeedTensor>> {
    const wire: WorkerFeed[] = [];
    const transfer: ArrayBuffer[] = [];
    const lent: { name: string; buffer: ArrayBuffer }[] = [];
    for (const [name, f] of Object.entries(feeds)) {
      let data = f.data;
      if (!this.buffers.get(name)?.includes(data.buffer as ArrayBuffer)) {
        const own = this.inputBuffer(name, f.dtype, data.length);
        (own as unknown as { set(a: ArrayLike<unknown>): void }).set(data as unknown as ArrayLike<unknown>);
        data = own;
      }
      const buffer = data.buffer as ArrayBuffer;
      wire.push({ name, dtype: f.dtype, dims: f.dims, buffer, byteOffset: data.byteOffset, length: data.length });
      transfer.push(buffer);
      // Lent from here on, before any wait: a batch handed over early while this one waits for a restarting
      // worker must not be stacked into the same buffer.
      const free = this.freeBuffers(name);
      free.splice(free.indexOf(buffer), 1);
      lent.push({ name, buffer });
    }
    let worker: Worker | undefined;
    try {
      if (!this.worker) await this.serving();
      worker = this.worker;
      if (!worker) throw this.stopped ?? new UnavailableError(`model '${this.request.model}': ${this.lastFailure}`);
    } catch (err) {
      for (const l of lent) this.giveBack(l.name, l.buffer);
      throw err;
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      // A thread that died but whose exit is not reported yet drops the message; its exit rejects this run.
      worker.postMessage({ type: 'run', id, feeds: wire }, transfer);
    });
  }

  release(): Promise<void> {
    this.released ??= this.shutDown();
    return this.released;
  }

  private async shutDown(): Promise<void> {
    const worker = this.worker;
    this.worker = undefined; // its exit is expected now: no restart
    const released = new UnavailableError(`model '${this.request.model}': this instance was released`);
    this.stop(released);
    if (worker) {
      worker.postMessage({ type: 'release' });
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => { void worker.terminate().then(() => resolve()); }, RELEASE_GRACE_MS);
        worker.once('exit', () => { clearTimeout(timer); resolve(); });
      });
    }
    // Runs still queued in the thread were answered before it exited; any left had no thread to answer them.
    this.rejectPending(released);
  }
}

/**
 * A running batch and one handed over early need two buffers an input; more are left to the GC, the smallest
 * first (a batch that grew would not fit them).
 */
function keepLargest(free: ArrayBuffer[]): void {
  if (free.length <= 2) return;
  free.sort((a, b) => b.byteLength - a.byteLength);
  free.length = 2;
}

export interface InstanceOptions {
  /** Receives a worker instance's thread deaths and restarts. */
  readonly log?: Logger;
  /** A worker instance's restart backoff; RESPAWN_DELAYS_MS unless given. */
  readonly respawnDelaysMs?: readonly number[];
  /** Called once when a worker instance gives up restarting its thread (not when it is released); `stoppedReason` says why. */
  readonly onStopped?: () => void;
}

/** Creates one instance of a model: in a worker thread or on the event loop. */
export async function createInstance(request: SessionRequest, mode: ExecutionMode, options: InstanceOptions = {}): Promise<SessionInstance> {
  if (mode === 'worker') return WorkerInstance.create(request, options);
  const created = await createSession(request);
  const s = created.session;
  return new InlineInstance(s, {
    provider: created.provider, skipped: created.skipped, graphCache: created.graphCache, openMs: created.openMs,
    inputMetadata: s.inputMetadata, outputMetadata: s.outputMetadata,
  });
}
