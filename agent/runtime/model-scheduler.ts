import { performance } from 'node:perf_hooks';
import {
  DeadlineExceededError, EdgeAgentError, errorMessage, FrameDroppedError, InternalError, ResourceExhaustedError, UnavailableError,
} from '../errors.js';
import type { Logger } from '../logger.js';
import { gatherAlongAxis, scatterAlongAxis, stackBytes } from './batch-assembly.js';
import { ModelStatisticsRecorder } from './model-statistics.js';
import { validateRequest } from './request-validation.js';
import type { FeedTensor, SessionInstance } from './session-instance.js';
import { RecentSources } from './recent-sources.js';
import { SequenceStore } from './sequence-store.js';
import { allocate, elementCount, pendingBytes, tensorBytes, type Tensor, type TensorData, type TensorSpec } from './tensor.js';
import type {
  InferenceRequest, InferenceResult, ModelStatistics, RequestOutcome, RuntimeObserver, StateSpec,
} from './types.js';

/** How long after frames last waited for busy sessions a model still counts as under load (at least). */
const CONTENTION_WINDOW_MS = 20;

/** A loaded, warmed model version: what the scheduler runs. */
export interface LoadedModel {
  readonly name: string;
  readonly version: number;
  readonly path: string;
  readonly provider: string;
  readonly variant: string;
  /** Client-visible inputs/outputs (state tensors excluded). */
  readonly inputs: readonly TensorSpec[];
  readonly outputs: readonly TensorSpec[];
  readonly state: readonly StateSpec[];
  /** 0: every request runs alone. */
  readonly maxBatchSize: number;
  /** The most rows the scheduler stacks from several requests into one run (at most maxBatchSize; absent: all
   * of it). An inline model's runs block the event loop, so `auto` keeps them under its time bound; a single
   * request of up to maxBatchSize rows is still accepted and runs alone. */
  readonly maxStackedRows?: number;
  readonly preferredBatchSizes: readonly number[];
  readonly maxQueueDelayUs: number;
  readonly instances: readonly SessionInstance[];
}

export interface SchedulerOptions {
  readonly maxQueue: number;
  readonly sequenceIdleTimeoutMs: number;
  readonly maxSequences: number;
  readonly refuseNonFinite: boolean;
  readonly maxTensorBytes: number;
  readonly observer?: RuntimeObserver;
  readonly log?: Logger;
}

interface Pending {
  readonly request: InferenceRequest;
  readonly rows: number;
  readonly groupKey: string;
  readonly enqueuedAt: number;
  readonly resolve: (r: InferenceResult) => void;
  readonly reject: (e: Error) => void;
  /** Set when a newer LATEST_ONLY frame superseded it or its deadline passed while queued. */
  cancelled: boolean;
  /** Taken from the queue into a batch: from then on it is never dropped. */
  started: boolean;
  /** Runs alone: its batch failed, and one member's input may be what onnxruntime rejected. */
  solo: boolean;
}

interface Instance {
  readonly session: SessionInstance;
  /** One of the sessions that serve while several sources feed the model (`instances_under_load`). */
  readonly underLoad: boolean;
  /**
   * Batches handed to the session and not answered yet, oldest (the one running) first. A worker instance may
   * hold a second one, handed over before the first finishes (see `dispatch`).
   */
  readonly inFlight: { readonly rows: number }[];
  /** When the result of its latest batch came back (performance.now() ms). */
  lastRunEnd: number;
}

/**
 * Queue, dynamic batcher and instance pool of one model version. Frames from every stream and API meet here:
 * compatible frames (same non-batch shapes) are stacked into one `session.run` on an idle instance, and the
 * results are split back as views of the batch outputs. Stateful models batch too: each sequence's state rows
 * are gathered along the state's batch axis and scattered back after the run.
 */
export class ModelScheduler {
  private queue: Pending[] = [];
  private live = 0;
  private readonly instances: Instance[];
  private underLoadCount = 0;
  /** When a frame last found every session it could start on busy (performance.now() ms). */
  private lastContendedAt = -Infinity;
  /** Told once, the first time frames of several sources wait for each other (see `whenLoaded`). */
  private onFirstLoad: (() => void) | undefined;
  /** Settles once the under-load sessions being opened have joined (or been released). */
  private underLoadJoining: Promise<void> | undefined;
  private readonly latestByStream = new WeakMap<object, Pending>();
  readonly sequences: SequenceStore;
  private accepting = true;
  /** Why requests are refused once it stopped accepting. */
  private refusal = '';
  private drainWaiters: (() => void)[] = [];
  private delayTimer: NodeJS.Timeout | undefined;
  private deadlineTimer: NodeJS.Timeout | undefined;
  private deadlineAt = Infinity;
  private closing: Promise<void> | undefined;
  private dispatchImmediate: NodeJS.Immediate | undefined;
  private readonly sources = new RecentSources();
  private lastExecutionMs = 0;
  private readonly stats: ModelStatisticsRecorder;
  /** Batching knobs that a config reload may change while frames flow. */
  private batching: { maxQueueDelayUs: number; preferredBatchSizes: readonly number[] };
  /** Set when a batched run's output could not be split by rows: the model then never stacks frames. */
  private stackingBroken = false;
  private readonly outputNames: string[];
  private readonly outputSpecByName: Map<string, TensorSpec>;

  constructor(readonly model: LoadedModel, private readonly options: SchedulerOptions) {
    this.instances = model.instances.map((session) => ({ session, underLoad: false, inFlight: [], lastRunEnd: 0 }));
    this.stats = new ModelStatisticsRecorder(model.name, model.version);
    this.sequences = new SequenceStore({ idleTimeoutMs: options.sequenceIdleTimeoutMs, maxSequences: options.maxSequences });
    this.batching = { maxQueueDelayUs: model.maxQueueDelayUs, preferredBatchSizes: model.preferredBatchSizes };
    this.outputNames = model.outputs.map((o) => o.name);
    this.outputSpecByName = new Map(model.outputs.map((o) => [o.name, o]));
  }

  /** Set when no instance will run again (every worker gave up restarting): the model is then not serving. */
  get failure(): string | undefined {
    return this.instances.every((i) => i.session.stoppedReason !== undefined) ? this.instances[0]?.session.stoppedReason : undefined;
  }

  get stateful(): boolean {
    return this.model.state.length > 0;
  }

  /**
   * Adds the sessions that serve instead of the configured ones while several sources feed the model
   * (`instances_under_load`), once they are open and warm; until then the configured ones serve alone. Nothing
   * is opened once the scheduler stopped accepting, and sessions that arrive after that are released instead.
   * Resolves with how many joined.
   */
  addUnderLoadInstances(open: () => Promise<readonly SessionInstance[]>): Promise<number> {
    if (this.closing || !this.accepting) return Promise.resolve(0);
    const joined = open().then(async (sessions) => {
      if (this.closing || !this.accepting) {
        await Promise.all(sessions.map((s) => s.release().catch(() => undefined)));
        return 0;
      }
      for (const session of sessions) this.instances.push({ session, underLoad: true, inFlight: [], lastRunEnd: 0 });
      this.underLoadCount += sessions.length;
      this.pump();
      return sessions.length;
    });
    this.underLoadJoining = joined.then(() => undefined, () => undefined);
    return joined;
  }

  /**
   * Calls `fn` once, the first time frames of several sources wait for busy sessions: the moment sessions for
   * load would start to pay. A model that only ever serves one stream never opens them (nor holds their memory).
   */
  whenLoaded(fn: () => void): void {
    this.onFirstLoad = fn;
  }

  /** Sessions serving this version: the configured ones, and those that serve under load once they joined. */
  get sessionCounts(): { configured: number; underLoad: number } {
    return { configured: this.instances.length - this.underLoadCount, underLoad: this.underLoadCount };
  }

  /** Takes effect from the next batch formed. */
  setBatching(b: { maxQueueDelayUs: number; preferredBatchSizes: readonly number[] }): void {
    this.batching = b;
    this.pump();
  }

  get batchingSettings(): { maxQueueDelayUs: number; preferredBatchSizes: readonly number[] } {
    return this.batching;
  }

  /** Requests queued or running. */
  get inFlight(): number {
    return this.live;
  }

  submit(request: InferenceRequest): Promise<InferenceResult> {
    if (!this.accepting) return Promise.reject(new UnavailableError(this.refusal));
    let rows: number;
    let groupKey: string;
    try {
      ({ rows, groupKey } = validateRequest(this.model, request, this.options));
      if (this.live >= this.options.maxQueue) {
        throw new ResourceExhaustedError('runtime.max_queue', `model '${this.model.name}' has ${this.live} requests queued (limit runtime.max_queue = ${this.options.maxQueue})`);
      }
      if (request.sequence && this.stateful) this.sequences.admit(request.sequence);
    } catch (err) {
      this.report({ status: 'ERROR' });
      this.stats.failed();
      return Promise.reject(err);
    }
    return new Promise<InferenceResult>((resolve, reject) => {
      const pending: Pending = { request, rows, groupKey, enqueuedAt: performance.now(), resolve, reject, cancelled: false, started: false, solo: false };
      const key = request.streamKey;
      if (key && request.qos === 'LATEST_ONLY') {
        const previous = this.latestByStream.get(key);
        if (previous && !previous.cancelled && !previous.started) this.cancel(previous, new FrameDroppedError(), 'DROPPED');
        this.latestByStream.set(key, pending);
      }
      this.queue.push(pending);
      this.live++;
      if (request.deadline !== undefined) this.armDeadline(request.deadline);
      // A request without a source or stream is a source of its own; a fresh key, so the map holds no request
      // (or its tensors).
      const source = request.source ?? key ?? {};
      this.sources.submitted(source, pending.enqueuedAt);
      this.pump();
    });
  }

  private report(o: Omit<RequestOutcome, 'model' | 'version'>): void {
    const observer = this.options.observer;
    if (observer?.onRequest) observer.onRequest({ model: this.model.name, version: this.model.version, status: o.status, timings: o.timings });
  }

  private cancel(p: Pending, err: EdgeAgentError, status: RequestOutcome['status']): void {
    p.cancelled = true;
    this.live--;
    const seq = p.request.sequence;
    if (seq && this.stateful) this.sequences.abandon(seq.id);
    this.report({ status });
    if (status !== 'DROPPED') this.stats.failed();
    p.reject(err);
    this.notifyDrained();
  }

  /**
   * Assigns queued requests to idle instances, forming batches; called whenever either changes.
   *
   * An inline instance runs synchronously: started at once, a frame runs alone while the frames that other
   * streams delivered in the same I/O phase wait behind it, each then running alone too — no batch ever forms.
   * So while frames from several sources are arriving, dispatch waits for the end of the I/O phase
   * (setImmediate) and takes them all as one batch. A lone stream gains nothing from waiting and its frame
   * starts at once, which is what single-stream latency needs.
   */
  private pump(): void {
    if (this.dispatchImmediate) return;
    if (this.activeSources(performance.now()) > 1 && this.accepting && this.model.maxBatchSize > 1 && this.instances.some((i) => i.inFlight.length === 0 && i.session.synchronous)) {
      this.dispatchImmediate = setImmediate(() => {
        this.dispatchImmediate = undefined;
        this.dispatch();
      });
      return;
    }
    this.dispatch();
  }

  /**
   * Idle instances take batches first. When every instance is busy, a worker instance running one batch is
   * handed the next one ahead of time, once as many rows are queued as it is running (or as a batch may
   * stack): it waits in the worker thread and starts the moment the running one ends. Otherwise the session
   * sits idle between two batches for two thread hops and the main thread's turn in between (0.4–0.6 ms a
   * batch for the classifier at 8 streams on the development VM, 4–7 % of the time). Waiting for that many
   * rows keeps the batches as large as they were: the streams whose frames are running now send their next
   * ones only after their results, so they form the batch after.
   */
  private dispatch(): void {
    for (;;) {
      const now = performance.now();
      const lane = this.underLoadLane(now);
      let instance = this.instances.find((i) => i.underLoad === lane && i.inFlight.length === 0 && i.session.available);
      let minRows: number | undefined;
      if (!instance) {
        if (this.live > 0 && this.instances.every((i) => i.inFlight.length === 0 && !i.session.available)) {
          this.refuseQueued();
          return;
        }
        if (this.queue.length > 0) {
          this.lastContendedAt = now;
          if (this.onFirstLoad && this.activeSources(now) > 1) {
            const told = this.onFirstLoad;
            this.onFirstLoad = undefined;
            told();
          }
        }
        // A configured session running while several sources feed the model is not handed more: once its run
        // ends, the load moves to the under-load sessions.
        if (!lane && this.underLoadCount > 0 && this.activeSources(now) > 1 && this.instances.some((i) => i.underLoad && i.session.available)) return;
        instance = this.instances.find((i) => i.underLoad === lane && i.inFlight.length === 1 && !i.session.synchronous && i.session.available);
        if (!instance) return;
        minRows = Math.min(this.maxStackedRows(), (instance.inFlight[0] as { rows: number }).rows);
      }
      if (this.live === 0) return;
      const batch = this.takeBatch(minRows);
      if (!batch) return;
      void this.execute(instance, batch);
    }
  }

  /**
   * Whether the under-load sessions take the next batch (true) or the configured ones. The two kinds never run
   * at once, as each kind alone is sized to fill the cores: the kind running keeps the work until it is idle.
   * Then the under-load sessions take over only under load: several sources active, and frames waiting for
   * each other (more than one queued now, or one that found the sessions busy within the last two runs or
   * 20 ms). Otherwise the configured, wider session serves: a lone stream, or cameras whose frames do not
   * overlap, get a frame's latency on every core. A kind with no session available gives way to the other.
   */
  private underLoadLane(now: number): boolean {
    if (this.underLoadCount === 0) return false;
    const running = this.instances.find((i) => i.inFlight.length > 0);
    if (running) return running.underLoad;
    const contended = this.queue.length > 1 || now - this.lastContendedAt <= Math.max(CONTENTION_WINDOW_MS, 2 * this.lastExecutionMs);
    const wanted = contended && this.activeSources(now) > 1;
    return this.instances.some((i) => i.underLoad === wanted && i.session.available) ? wanted : !wanted;
  }

  private maxStackedRows(): number {
    return Math.max(1, Math.min(this.model.maxBatchSize, this.model.maxStackedRows ?? Infinity));
  }

  /** No instance can run anything now (every worker thread keeps dying): queued frames fail instead of waiting. */
  private refuseQueued(): void {
    const err = new UnavailableError(`model '${this.model.name}' version ${this.model.version}: none of its inference instances is serving (their worker threads keep failing; see the log)`);
    for (const p of this.queue) if (!p.cancelled) this.cancel(p, err, 'ERROR');
    this.queue = [];
  }

  /**
   * @param aheadRows set when the batch is handed over ahead of time (see `dispatch`): it must reach this many
   * rows, and it takes no frame with a deadline, a LATEST_ONLY frame or one retrying alone. Those start only on
   * an instance that is free, so a deadline is checked when the frame really starts and a newer LATEST_ONLY
   * frame can still replace a queued one.
   */
  private takeBatch(aheadRows?: number): Pending[] | undefined {
    const now = performance.now();
    const max = this.maxStackedRows();
    const batch: Pending[] = [];
    const seqs = new Set<string>();
    let rows = 0;
    let groupKey: string | undefined;
    const remaining: Pending[] = [];
    for (const p of this.queue) {
      if (p.cancelled || this.expired(p, now)) continue;
      const seqId = this.stateful ? p.request.sequence?.id : undefined;
      const blocked = (seqId !== undefined && (seqs.has(seqId) || this.sequences.isBusy(seqId)))
        || (aheadRows !== undefined && (p.request.deadline !== undefined || p.request.qos === 'LATEST_ONLY' || p.solo));
      const fits = groupKey === undefined
        || (p.groupKey === groupKey && rows + p.rows <= max && this.model.maxBatchSize > 0 && !p.solo && !(batch[0] as Pending).solo && !this.stackingBroken);
      if (!blocked && fits && rows < max) {
        batch.push(p);
        rows += p.rows;
        groupKey = p.groupKey;
        if (seqId !== undefined) seqs.add(seqId);
      } else {
        remaining.push(p);
        // A sequence's later frames must not overtake this one (a frame whose shape cannot join this batch).
        if (seqId !== undefined) seqs.add(seqId);
      }
    }
    if (batch.length === 0) {
      this.queue = remaining;
      return undefined;
    }
    if (aheadRows !== undefined && rows < aheadRows) {
      this.queue = this.queue.filter((p) => !p.cancelled);
      return undefined;
    }
    const delayUs = this.batching.maxQueueDelayUs;
    if (delayUs > 0 && this.accepting && !(batch[0] as Pending).solo) {
      const preferred = this.batching.preferredBatchSizes;
      // A preferred size above the most rows a run may stack could never be reached: full batches would wait
      // out the whole delay.
      const target = Math.min(max, preferred.length > 0 ? Math.max(...preferred) : max);
      const waitedUs = (now - (batch[0] as Pending).enqueuedAt) * 1000;
      if (rows < target && waitedUs < delayUs && this.activeSources(now) > batch.length) {
        // Not full yet and the oldest frame may still wait: leave everything queued and come back.
        this.queue = this.queue.filter((p) => !p.cancelled);
        if (!this.delayTimer) {
          this.delayTimer = setTimeout(() => { this.delayTimer = undefined; this.pump(); }, Math.max(0, (delayUs - waitedUs) / 1000));
        }
        return undefined;
      }
    }
    this.queue = remaining;
    for (const p of batch) p.started = true;
    return batch;
  }

  /** Answers a queued frame whose deadline has passed with DEADLINE_EXCEEDED; true if it did. */
  private expired(p: Pending, now: number): boolean {
    const deadline = p.request.deadline;
    if (deadline === undefined || p.started || now <= deadline) return false;
    this.cancel(p, new DeadlineExceededError(`deadline passed ${Math.round((now - deadline) * 1000)} us before the frame could start`), 'DEADLINE_EXCEEDED');
    return true;
  }

  /**
   * A frame queued behind busy instances is answered when its deadline passes, not when an instance frees
   * (a 5 ms deadline behind a 200 ms run was answered after 198 ms): one timer, for the earliest deadline.
   */
  private armDeadline(deadline: number): void {
    if (this.deadlineTimer && this.deadlineAt <= deadline) return;
    if (this.deadlineTimer) clearTimeout(this.deadlineTimer);
    this.deadlineAt = deadline;
    this.deadlineTimer = setTimeout(() => {
      this.deadlineTimer = undefined;
      const now = performance.now();
      let next = Infinity;
      for (const p of this.queue) {
        if (p.cancelled || p.started || this.expired(p, now)) continue;
        if (p.request.deadline !== undefined) next = Math.min(next, p.request.deadline);
      }
      this.queue = this.queue.filter((p) => !p.cancelled);
      if (next !== Infinity) this.armDeadline(next);
    }, Math.max(0, deadline - performance.now()) + 0.5);
    this.deadlineTimer.unref();
  }

  private activeSources(now: number): number {
    return this.sources.active(now, this.lastExecutionMs, this.batching.maxQueueDelayUs);
  }

  private async execute(instance: Instance, batch: Pending[]): Promise<void> {
    const m = this.model;
    let startedAt = performance.now();
    const rows = batch.map((p) => p.rows);
    const totalRows = rows.reduce((a, b) => a + b, 0);
    const slot = { rows: totalRows };
    instance.inFlight.push(slot);
    const handedAhead = instance.inFlight.length > 1;
    const seqIds = this.stateful ? batch.map((p) => p.request.sequence?.id as string) : [];
    let runStart = startedAt;
    let runEnd = startedAt;
    let nextStates: Record<string, TensorData>[] | undefined;
    let retrySolo = false;
    try {
      const feeds: Record<string, FeedTensor> = {};
      const first = batch[0] as Pending;
      const session = instance.session;
      for (const spec of m.inputs) {
        const t = first.request.inputs[spec.name] as Tensor;
        if ((batch.length === 1 && !session.needsOwnBuffers && pendingBytes(t) === undefined) || spec.shape.length === 0) {
          // One aligned request on an inline session: its bytes go to onnxruntime as they came off the wire. A
          // scalar input is the same for the whole batch (it is part of the batch key) and goes once.
          feeds[spec.name] = { dtype: t.dtype, data: t.data, dims: t.shape };
          continue;
        }
        // Misaligned wire bytes are copied once, here, into the instance's reused buffer.
        const shape = [totalRows, ...t.shape.slice(1)];
        const out = session.inputBuffer(spec.name, t.dtype, elementCount(shape));
        stackBytes(batch.map((p) => tensorBytes(p.request.inputs[spec.name] as Tensor)), out);
        feeds[spec.name] = { dtype: t.dtype, data: out, dims: shape };
      }
      if (this.stateful) {
        const states = batch.map((p, i) => this.sequences.acquire(seqIds[i] as string, p.request.sequence?.start === true));
        for (const st of m.state) {
          const one = elementCount(st.shape);
          const shape = st.shape.map((d, i) => (i === st.batchAxis ? batch.length : d));
          const out = session.inputBuffer(st.input, st.dtype, one * batch.length);
          const parts = states.map((s) => s?.[st.input] ?? allocate(st.dtype, one));
          gatherAlongAxis(parts, batch.map(() => 1), st.shape, st.batchAxis, out);
          feeds[st.input] = { dtype: st.dtype, data: out, dims: shape };
        }
      }
      runStart = performance.now();
      const results = await session.run(feeds);
      runEnd = performance.now();
      // Handed over ahead, the batch waited in the worker for the one before it: it started about when that
      // one's result came back (a thread hop earlier, so its inference time reads that much short).
      const previousEnd = instance.lastRunEnd;
      instance.lastRunEnd = runEnd;
      if (handedAhead && previousEnd > startedAt) {
        startedAt = previousEnd;
        runStart = previousEnd;
      }

      const perRequest: Record<string, Tensor>[] = batch.map(() => ({}));
      for (const name of this.outputNames) {
        const r = results[name];
        if (!r) throw new InternalError(`model '${m.name}' produced no output '${name}'`);
        const dims = r.dims;
        if (batch.length > 1 && dims[0] !== totalRows) throw new BatchSplitError(name, dims, totalRows);
        const parts = batch.length === 1 ? [r.data as TensorData] : scatterAlongAxis(r.data as TensorData, dims, 0, rows);
        const dtype = (this.outputSpecByName.get(name) as TensorSpec).dtype;
        for (let i = 0; i < batch.length; i++) {
          (perRequest[i] as Record<string, Tensor>)[name] = { dtype, shape: batch.length === 1 ? dims : [rows[i] as number, ...dims.slice(1)], data: parts[i] as TensorData };
        }
      }
      if (this.stateful) {
        nextStates = batch.map(() => ({}));
        for (const st of m.state) {
          const r = results[st.output];
          if (!r) throw new InternalError(`model '${m.name}' produced no state output '${st.output}'`);
          const parts = scatterAlongAxis(r.data, r.dims, st.batchAxis, batch.map(() => 1));
          // A copy when batched: a view would keep the whole batch's output alive for as long as any one
          // sequence stays idle (up to max_batch_size times its own state).
          for (let i = 0; i < batch.length; i++) {
            const part = parts[i] as TensorData;
            (nextStates[i] as Record<string, TensorData>)[st.input] = batch.length > 1 ? part.slice() : part;
          }
        }
      }
      const done = performance.now();
      const inferUs = (runEnd - runStart) * 1000;
      this.lastExecutionMs = done - startedAt;
      this.stats.execution(totalRows, startedAt, runStart, runEnd, done);
      this.options.observer?.onExecution?.({ model: m.name, version: m.version, batchSize: batch.length, inferUs, handedAhead, underLoad: instance.underLoad });
      for (let i = 0; i < batch.length; i++) {
        const p = batch[i] as Pending;
        const wanted = p.request.outputs;
        let outputs = perRequest[i] as Record<string, Tensor>;
        if (wanted && wanted.length > 0) {
          const subset: Record<string, Tensor> = {};
          for (const n of wanted) subset[n] = outputs[n] as Tensor;
          outputs = subset;
        }
        const timings = { queueUs: (startedAt - p.enqueuedAt) * 1000, inferUs, totalUs: (done - p.enqueuedAt) * 1000 };
        this.stats.succeeded(startedAt - p.enqueuedAt, done - p.enqueuedAt);
        this.report({ status: 'OK', timings });
        p.resolve({ model: m.name, version: m.version, outputs, timings, batchSize: batch.length });
      }
    } catch (err) {
      if (batch.length > 1 && !(err instanceof UnavailableError)) {
        // One member's input may be what onnxruntime rejected (an index past a table): each runs again alone,
        // first in the queue, so only that one fails. An output that cannot be split by rows means the model
        // does not batch at all; from then on every frame runs alone.
        if (err instanceof BatchSplitError && !this.stackingBroken) {
          this.stackingBroken = true;
          this.options.log?.warn({ model: m.name, version: m.version, err: err.message }, 'batched outputs cannot be split by rows: frames of this model run alone');
        }
        retrySolo = true;
      } else {
        const failure = err instanceof EdgeAgentError ? err : new InternalError(`onnxruntime failed on model '${m.name}': ${errorMessage(err)}`, { cause: err });
        for (const p of batch) {
          this.stats.failed();
          this.report({ status: 'ERROR' });
          p.reject(failure);
        }
      }
    } finally {
      for (let i = 0; i < seqIds.length; i++) {
        const p = batch[i] as Pending;
        if (retrySolo) this.sequences.putBack(seqIds[i] as string);
        else this.sequences.release(seqIds[i] as string, nextStates?.[i], p.request.sequence?.end === true);
      }
      if (retrySolo) {
        for (const p of batch) p.solo = true;
        this.queue.unshift(...batch);
      } else {
        this.live -= batch.length;
      }
      instance.inFlight.splice(instance.inFlight.indexOf(slot), 1);
      this.notifyDrained();
      this.pump();
    }
  }

  private notifyDrained(): void {
    if (this.live === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const w of waiters) w();
    }
  }

  /**
   * Stops accepting (later requests get UNAVAILABLE with `reason`); resolves when every accepted request has
   * been answered.
   */
  drain(reason = `model '${this.model.name}' version ${this.model.version} is being unloaded`): Promise<void> {
    if (this.accepting) this.refusal = reason;
    this.accepting = false;
    if (this.dispatchImmediate) {
      clearImmediate(this.dispatchImmediate);
      this.dispatchImmediate = undefined;
      this.dispatch();
    }
    if (this.delayTimer) {
      clearTimeout(this.delayTimer);
      this.delayTimer = undefined;
      this.pump();
    }
    if (this.live === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /**
   * Drains, then frees the onnxruntime sessions (native memory). Every call gets the same promise: a version
   * still draining after a switch is closed again when the agent stops or the model is unloaded, and its
   * sessions must be released once (a second release of an inline session threw, failing the shutdown).
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.drain();
      if (this.deadlineTimer) clearTimeout(this.deadlineTimer);
      this.sequences.clear();
      await this.underLoadJoining;
      await Promise.all(this.instances.map((i) => i.session.release().catch(() => undefined)));
    })();
    return this.closing;
  }

  statistics(): ModelStatistics {
    return this.stats.snapshot();
  }
}

/** A batched run's output whose first dimension is not the batch's rows: it cannot be split back per request. */
class BatchSplitError extends InternalError {
  constructor(output: string, dims: readonly number[], rows: number) {
    super(`output '${output}' came back with shape [${dims.join(',')}] for a batch of ${rows} rows: its first dimension is not the batch, so frames run alone (set max_batch_size: 0 in config.yaml)`);
  }
}
