import { availableParallelism } from 'node:os';
import type { ExecutionRecord, RequestOutcome, RuntimeObserver } from '../runtime/types.js';
import {
  BatchSizeRecorder,
  LatencyRecorder,
  DEFAULT_BATCH_BUCKETS,
  DEFAULT_LATENCY_BUCKETS_US,
  type BatchSummary,
  type LatencySummary,
} from './latency-histogram.js';

export type ModelEvent = Parameters<NonNullable<RuntimeObserver['onModelEvent']>>[0];
/**
 * `ready`: serving. `failed`: the version's load failed and it never served (reported once, then forgotten).
 * `unloaded`: no longer served, because the model was unloaded or a switch replaced the version (reported once,
 * then forgotten). `unavailable`: loaded, but none of its instances will run again (their worker threads kept
 * dying) until it is reloaded; reported until then. `unknown`: requests seen before the runtime announced the
 * version (a deployment validating).
 */
export type ModelTelemetryState = 'ready' | 'failed' | 'unavailable' | 'unloaded' | 'unknown';

/** A model event as telemetry reports it (records' `model_events`). */
export interface ModelEventReport {
  /** ms since epoch (wall clock). */
  readonly at: number;
  readonly type: ModelEvent['type'];
  readonly model: string;
  /** The version loaded, attempted or retired; null when the runtime did not name one (unload of a whole model). */
  readonly version: number | null;
  readonly reason: string | null;
}

/** Model events kept per interval; later ones are counted, not kept (a model failing in a loop). */
export const MAX_MODEL_EVENTS_PER_INTERVAL = 64;

/** Everything measured about one model version since the agent started (plus its current interval). */
export class ModelMetrics {
  provider: string | undefined;
  variant: string | undefined;
  state: ModelTelemetryState = 'unknown';
  reason: string | undefined;
  /** No longer served: reported in the current interval once more, then dropped with its histograms. */
  retiring = false;
  requests = 0;
  success = 0;
  errors = 0;
  dropped = 0;
  deadlineMisses = 0;
  /** `session.run` calls, and the requests they carried (Triton's exec_count and inference_count). */
  executions = 0;
  inferences = 0;
  readonly queue: LatencyRecorder;
  readonly infer: LatencyRecorder;
  readonly total: LatencyRecorder;
  readonly batch: BatchSizeRecorder;
  /** Counter values at the start of the current interval. */
  baseline = { requests: 0, success: 0, errors: 0, dropped: 0, deadlineMisses: 0, inferences: 0 };

  constructor(readonly model: string, readonly version: number, latencyBuckets: readonly number[], batchBuckets: readonly number[]) {
    this.queue = new LatencyRecorder(latencyBuckets);
    this.infer = new LatencyRecorder(latencyBuckets);
    this.total = new LatencyRecorder(latencyBuckets);
    this.batch = new BatchSizeRecorder(batchBuckets);
  }

  destroy(): void {
    this.queue.destroy();
    this.infer.destroy();
    this.total.destroy();
  }
}

/** One model version over one reporting interval (the wire format of telemetry and /v1/status). */
export interface ModelIntervalReport {
  readonly model: string;
  readonly version: number;
  readonly state: ModelTelemetryState;
  /** Why the version failed or is no longer served (absent while it serves). */
  readonly reason?: string;
  readonly provider: string | null;
  readonly variant: string | null;
  readonly requests: number;
  readonly success: number;
  readonly errors: number;
  readonly dropped: number;
  readonly deadline_misses: number;
  /** Successful requests per second over the interval. */
  readonly throughput_rps: number;
  readonly latency_us: { readonly queue: LatencySummary; readonly infer: LatencySummary; readonly total: LatencySummary };
  readonly batch: BatchSummary;
}

export interface ProcessUsage {
  readonly rss_bytes: number;
  readonly heap_used_bytes: number;
  /** CPU time over the elapsed (monotonic) time of the interval, in % of one core (can exceed 100 with threads). */
  readonly cpu_percent: number;
  readonly cpu_cores: number;
}

export interface MetricsInterval {
  /** ms since epoch (wall clock: the two can differ by more than `seconds` when the clock was set meanwhile). */
  readonly started_at: number;
  readonly ended_at: number;
  /** Length of the interval on the monotonic clock: rates and CPU % divide by it. */
  readonly seconds: number;
  readonly models: readonly ModelIntervalReport[];
  /** Loads, failed loads and retirements during the interval, oldest first (at most MAX_MODEL_EVENTS_PER_INTERVAL). */
  readonly model_events: readonly ModelEventReport[];
  /** Events beyond that bound, counted only. */
  readonly model_events_omitted: number;
  readonly streams: { readonly active: number; readonly opened: number };
  readonly process: ProcessUsage;
}

export interface AgentMetricsOptions {
  readonly latencyBucketsUs?: readonly number[];
  readonly batchBuckets?: readonly number[];
  /** Wall clock, ms since epoch: the intervals' `started_at`/`ended_at` only (tests move it). */
  readonly now?: () => number;
  /**
   * Monotonic clock in ms (default `performance.now`): interval lengths, throughput and CPU %, which a wall
   * clock set by NTP or by hand would stretch or shrink to nothing. When only `now` is given, it drives both.
   */
  readonly monotonicNow?: () => number;
}

/**
 * The agent's measurements: the runtime reports every request and execution here (it is the runtime's
 * `RuntimeObserver`), the server reports streams. The request path does a two-level map lookup, a few
 * increments and three histogram writes; everything else (percentiles, rates, Prometheus text) is computed
 * when someone asks.
 */
export class AgentMetrics implements RuntimeObserver {
  private readonly byModel = new Map<string, Map<number, ModelMetrics>>();
  /** Provider/variant announced without a version: applied to versions seen later. */
  private readonly modelDefaults = new Map<string, { provider?: string; variant?: string }>();
  /** Failed loads and reloads per model since start (a per-version count would outlive the versions). */
  private readonly loadFailuresByModel = new Map<string, number>();
  private events: ModelEventReport[] = [];
  private eventsOmitted = 0;
  /** Prometheus bucket bounds of the latency and batch-size histograms. */
  readonly latencyBucketsUs: readonly number[];
  readonly batchSizeBuckets: readonly number[];
  private readonly now: () => number;
  private readonly monotonicNow: () => number;
  private active = 0;
  private opened = 0;
  /** Wall clock at the start of the interval (reported), and monotonic clock (measures it). */
  private intervalStart: number;
  private intervalStartMono: number;
  private cpuMark = process.cpuUsage();
  private cpuMarkAt: number;
  private last: MetricsInterval | undefined;

  constructor(options: AgentMetricsOptions = {}) {
    this.latencyBucketsUs = options.latencyBucketsUs ?? DEFAULT_LATENCY_BUCKETS_US;
    this.batchSizeBuckets = options.batchBuckets ?? DEFAULT_BATCH_BUCKETS;
    this.now = options.now ?? Date.now;
    this.monotonicNow = options.monotonicNow ?? options.now ?? (() => performance.now());
    this.intervalStart = this.now();
    this.intervalStartMono = this.monotonicNow();
    this.cpuMarkAt = this.intervalStartMono;
  }

  onRequest(outcome: RequestOutcome): void {
    const m = this.metricsFor(outcome.model, outcome.version);
    m.requests += 1;
    switch (outcome.status) {
      case 'OK': {
        m.success += 1;
        const timings = outcome.timings;
        if (timings) {
          m.queue.record(timings.queueUs);
          m.infer.record(timings.inferUs);
          m.total.record(timings.totalUs);
        }
        break;
      }
      case 'ERROR':
        m.errors += 1;
        break;
      case 'DROPPED':
        m.dropped += 1;
        break;
      case 'DEADLINE_EXCEEDED':
        m.deadlineMisses += 1;
        break;
    }
  }

  onExecution(record: ExecutionRecord): void {
    const m = this.metricsFor(record.model, record.version);
    m.executions += 1;
    m.inferences += record.batchSize;
    m.batch.record(record.batchSize);
  }

  /**
   * A version's state follows the runtime's events, with two rules that keep the figures true: a failed load
   * or reload never changes a version that serves (the runtime keeps serving it; the failure is counted and
   * listed in `model_events`), and a version that no longer serves (unloaded, replaced by a switch, or failed
   * without ever serving) is reported once more and then forgotten, histograms freed.
   */
  onModelEvent(event: ModelEvent): void {
    this.noteEvent(event);
    if (event.version === undefined && (event.provider !== undefined || event.variant !== undefined)) {
      this.modelDefaults.set(event.model, { provider: event.provider, variant: event.variant });
    }
    const known = this.byModel.get(event.model);
    switch (event.type) {
      case 'model-ready': {
        // Unversioned: the runtime never sends one, but keep the old meaning (every version seen).
        const targets = event.version !== undefined ? [this.metricsFor(event.model, event.version)] : [...(known?.values() ?? [])];
        for (const m of targets) {
          if (event.provider !== undefined) m.provider = event.provider;
          if (event.variant !== undefined) m.variant = event.variant;
          m.state = 'ready';
          m.reason = undefined;
          m.retiring = false;
        }
        break;
      }
      case 'model-failed': {
        this.loadFailuresByModel.set(event.model, (this.loadFailuresByModel.get(event.model) ?? 0) + 1);
        // Without a version there is nothing on disk to name; a version that serves keeps serving.
        if (event.version === undefined) break;
        const m = known?.get(event.version);
        if (m?.state === 'ready') break;
        const failed = m ?? this.metricsFor(event.model, event.version);
        if (event.provider !== undefined) failed.provider = event.provider;
        if (event.variant !== undefined) failed.variant = event.variant;
        failed.state = 'failed';
        failed.reason = event.reason;
        failed.retiring = true;
        break;
      }
      case 'model-unavailable': {
        // Still loaded: not retiring, a reload (model-ready) brings it back.
        const m = event.version !== undefined ? known?.get(event.version) : undefined;
        if (m) {
          m.state = 'unavailable';
          m.reason = event.reason;
        }
        break;
      }
      case 'model-unloaded': {
        // Never creates an entry: an unload can arrive after the version was already reported gone.
        const one = event.version !== undefined ? known?.get(event.version) : undefined;
        const targets = event.version !== undefined ? (one ? [one] : []) : [...(known?.values() ?? [])];
        for (const m of targets) {
          m.state = 'unloaded';
          m.reason = event.reason;
          m.retiring = true;
        }
        break;
      }
    }
  }

  /** Failed loads and reloads of the model since start (`edge_agent_model_load_failures_total`). */
  loadFailures(): IterableIterator<[model: string, failures: number]> {
    return this.loadFailuresByModel.entries();
  }

  private noteEvent(event: ModelEvent): void {
    if (this.events.length >= MAX_MODEL_EVENTS_PER_INTERVAL) {
      this.eventsOmitted += 1;
      return;
    }
    this.events.push({ at: this.now(), type: event.type, model: event.model, version: event.version ?? null, reason: event.reason ?? null });
  }

  streamOpened(): void {
    this.active += 1;
    this.opened += 1;
  }

  streamClosed(): void {
    if (this.active > 0) this.active -= 1;
  }

  get activeStreams(): number {
    return this.active;
  }

  get streamsOpened(): number {
    return this.opened;
  }

  /** Every model version seen, for cumulative views (Prometheus). */
  *models(): IterableIterator<ModelMetrics> {
    for (const versions of this.byModel.values()) yield* versions.values();
  }

  /** The last closed interval (what /v1/status shows), undefined before the first. */
  get lastInterval(): MetricsInterval | undefined {
    return this.last;
  }

  /**
   * Ends the current reporting interval: percentiles, counts and rates since the previous call. Versions that
   * no longer serve (unloaded, replaced, failed without serving) are reported this once more and then forgotten.
   */
  closeInterval(): MetricsInterval {
    const endedAt = this.now();
    const endedAtMono = this.monotonicNow();
    const seconds = Math.max((endedAtMono - this.intervalStartMono) / 1000, 1e-3);
    const models: ModelIntervalReport[] = [];
    for (const [name, versions] of this.byModel) {
      for (const [version, m] of versions) {
        const b = m.baseline;
        models.push({
          model: m.model,
          version: m.version,
          state: m.state,
          ...(m.state !== 'ready' && m.reason !== undefined ? { reason: m.reason } : {}),
          provider: m.provider ?? null,
          variant: m.variant ?? null,
          requests: m.requests - b.requests,
          success: m.success - b.success,
          errors: m.errors - b.errors,
          dropped: m.dropped - b.dropped,
          deadline_misses: m.deadlineMisses - b.deadlineMisses,
          throughput_rps: (m.success - b.success) / seconds,
          latency_us: { queue: m.queue.closeInterval(), infer: m.infer.closeInterval(), total: m.total.closeInterval() },
          batch: m.batch.closeInterval(),
        });
        m.baseline = { requests: m.requests, success: m.success, errors: m.errors, dropped: m.dropped, deadlineMisses: m.deadlineMisses, inferences: m.inferences };
        if (m.retiring) {
          m.destroy();
          versions.delete(version);
        }
      }
      if (versions.size === 0) this.byModel.delete(name);
    }
    models.sort((a, b) => (a.model < b.model ? -1 : a.model > b.model ? 1 : a.version - b.version));
    const interval: MetricsInterval = {
      started_at: this.intervalStart,
      ended_at: endedAt,
      seconds,
      models,
      model_events: this.events,
      model_events_omitted: this.eventsOmitted,
      streams: { active: this.active, opened: this.opened },
      process: this.sampleProcess(),
    };
    this.events = [];
    this.eventsOmitted = 0;
    this.intervalStart = endedAt;
    this.intervalStartMono = endedAtMono;
    this.last = interval;
    return interval;
  }

  /** RSS, heap, and CPU since the previous interval. */
  private sampleProcess(): ProcessUsage {
    const at = this.monotonicNow();
    const cpu = process.cpuUsage(this.cpuMark);
    const wallMs = Math.max(at - this.cpuMarkAt, 1);
    this.cpuMark = process.cpuUsage();
    this.cpuMarkAt = at;
    const mem = process.memoryUsage();
    return {
      rss_bytes: mem.rss,
      heap_used_bytes: mem.heapUsed,
      cpu_percent: ((cpu.user + cpu.system) / 1000 / wallMs) * 100,
      cpu_cores: availableParallelism(),
    };
  }

  /** Frees the histograms. */
  close(): void {
    for (const m of this.models()) m.destroy();
    this.byModel.clear();
  }

  private metricsFor(model: string, version: number): ModelMetrics {
    let versions = this.byModel.get(model);
    if (versions === undefined) {
      versions = new Map();
      this.byModel.set(model, versions);
    }
    let m = versions.get(version);
    if (m === undefined) {
      m = new ModelMetrics(model, version, this.latencyBucketsUs, this.batchSizeBuckets);
      const defaults = this.modelDefaults.get(model);
      m.provider = defaults?.provider;
      m.variant = defaults?.variant;
      versions.set(version, m);
    }
    return m;
  }
}
