import type { Logger } from '../logger.js';
import type { Outbox, OutboxStamp, OutboxStats } from '../store/outbox.js';
import type { AgentMetrics, ModelEventReport, ModelIntervalReport, MetricsInterval } from './agent-metrics.js';
import type { DeviceMonitor, DeviceReadings } from './device-monitor.js';

export interface OutboxSummary {
  readonly rows: number;
  readonly bytes: number;
  readonly dropped_total: number;
  /** Age of the oldest entry waiting for the broker, 0 when empty. */
  readonly oldest_age_s: number;
}

/**
 * One telemetry record, as published on `{prefix}/devices/{id}/telemetry` (JSON). `seq` counts this device's
 * telemetry records from 1 and survives restarts; a gap means records were dropped by the outbox bounds, and
 * `dropped` says how many went since the previous record that arrived (summed over all records received it
 * equals every drop). A repeated `seq` is a duplicate (sent again after a lost PUBACK) and can be ignored.
 */
export interface TelemetryRecord {
  readonly seq: number;
  /** Changes when the agent's outbox is reopened; (epoch, seq) identifies a record even after a power cut. */
  readonly epoch: number;
  /** ISO 8601 UTC, when the record was made. */
  readonly ts: string;
  readonly device_id: string;
  readonly agent_version: string;
  readonly dropped: number;
  readonly dropped_total: number;
  readonly interval: { readonly started_at: string; readonly seconds: number };
  readonly agent: {
    readonly pid: number;
    readonly uptime_s: number;
    readonly rss_bytes: number;
    readonly heap_used_bytes: number;
    readonly cpu_percent: number;
    readonly cpu_cores: number;
    readonly active_streams: number;
    readonly streams_opened: number;
    readonly outbox: OutboxSummary | null;
  };
  readonly models: readonly ModelIntervalReport[];
  /** Loads, failed loads and retirements of model versions during the interval, oldest first. */
  readonly model_events: readonly (Omit<ModelEventReport, 'at'> & { readonly ts: string })[];
  /** Events beyond the per-interval bound, counted only. */
  readonly model_events_omitted: number;
  readonly device: DeviceReadings | null;
}

export function summarizeOutbox(stats: OutboxStats, now: number): OutboxSummary {
  return {
    rows: stats.rows,
    bytes: stats.bytes,
    dropped_total: stats.droppedTotal,
    oldest_age_s: stats.oldestCreatedAt === null ? 0 : Math.max(0, (now - stats.oldestCreatedAt) / 1000),
  };
}

export function telemetryTopic(topicPrefix: string, deviceId: string): string {
  return `${topicPrefix}/devices/${deviceId}/telemetry`;
}

export interface TelemetryReporterOptions {
  readonly metrics: AgentMetrics;
  readonly deviceId: string;
  readonly agentVersion: string;
  /** Where records go, normally `telemetryTopic(prefix, deviceId)`. */
  readonly topic: string;
  readonly intervalMs: number;
  /** Without one, intervals are still closed (for /v1/status and /metrics) but nothing is published. */
  readonly outbox?: Outbox;
  readonly devices?: DeviceMonitor;
  readonly logger?: Logger;
  /** Wall clock, ms since epoch. */
  readonly now?: () => number;
  /** When the agent started (uptime), on the monotonic clock (`performance.now()`, ms). */
  readonly startedAt?: number;
  /** Monotonic clock for uptime (default `performance.now`). */
  readonly monotonicNow?: () => number;
}

/**
 * Every interval: reads the device, closes the metrics interval and writes one telemetry record into the
 * outbox (the publisher takes it from there). Ticks never overlap; a slow tick delays the next one.
 */
export class TelemetryReporter {
  private intervalMs: number;
  private timer: NodeJS.Timeout | undefined;
  private running = false;
  private inTick: Promise<unknown> = Promise.resolve();
  private readonly now: () => number;
  private readonly startedAt: number;
  private readonly monotonicNow: () => number;

  constructor(private readonly options: TelemetryReporterOptions) {
    if (!(options.intervalMs > 0)) throw new RangeError(`telemetry interval must be positive, got ${options.intervalMs} ms`);
    this.intervalMs = options.intervalMs;
    this.now = options.now ?? Date.now;
    this.monotonicNow = options.monotonicNow ?? (() => performance.now());
    this.startedAt = options.startedAt ?? this.monotonicNow();
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    this.schedule();
  }

  /** A new interval (SIGHUP reload): the next record comes one new interval from now. */
  setIntervalMs(ms: number): void {
    if (!(ms > 0)) throw new RangeError(`telemetry interval must be positive, got ${ms} ms`);
    this.intervalMs = ms;
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
      this.schedule();
    }
  }

  /** Stops the timer and waits for a tick in progress (its record is stored before this resolves). */
  async stop(): Promise<void> {
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    await this.inTick;
  }

  /** One interval now: returns the record stored (undefined without an outbox, or if the bounds dropped it). */
  tick(): Promise<TelemetryRecord | undefined> {
    const run = this.inTick.then(() => this.report());
    this.inTick = run.catch(() => undefined);
    return run;
  }

  private schedule(): void {
    if (!this.running) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.tick()
        .catch((err: unknown) => this.options.logger?.warn({ err }, 'telemetry record could not be stored'))
        .finally(() => this.schedule());
    }, this.intervalMs);
    this.timer.unref();
  }

  private async report(): Promise<TelemetryRecord | undefined> {
    const { metrics, outbox, devices } = this.options;
    const device = devices ? await devices.read().catch((err: unknown) => {
      this.options.logger?.debug({ err }, 'device readings failed');
      return undefined;
    }) : undefined;
    const interval = metrics.closeInterval();
    if (!outbox) return undefined;
    let record: TelemetryRecord | undefined;
    const entry = await outbox.enqueue({
      kind: 'telemetry',
      topic: this.options.topic,
      retain: false,
      payload: (stamp) => {
        record = this.buildRecord(stamp, interval, device ?? null, outbox);
        return JSON.stringify(record);
      },
    });
    return entry ? record : undefined;
  }

  private buildRecord(stamp: OutboxStamp, interval: MetricsInterval, device: DeviceReadings | null, outbox: Outbox): TelemetryRecord {
    const now = this.now();
    return {
      seq: stamp.seq,
      epoch: stamp.epoch,
      ts: new Date(now).toISOString(),
      device_id: this.options.deviceId,
      agent_version: this.options.agentVersion,
      dropped: stamp.dropped,
      dropped_total: stamp.droppedTotal,
      interval: { started_at: new Date(interval.started_at).toISOString(), seconds: interval.seconds },
      agent: {
        pid: process.pid,
        uptime_s: Math.max(0, (this.monotonicNow() - this.startedAt) / 1000),
        rss_bytes: interval.process.rss_bytes,
        heap_used_bytes: interval.process.heap_used_bytes,
        cpu_percent: interval.process.cpu_percent,
        cpu_cores: interval.process.cpu_cores,
        active_streams: interval.streams.active,
        streams_opened: interval.streams.opened,
        outbox: summarizeOutbox(outbox.stats(), now),
      },
      models: interval.models,
      model_events: interval.model_events.map(({ at, ...e }) => ({ ts: new Date(at).toISOString(), ...e })),
      model_events_omitted: interval.model_events_omitted,
      device,
    };
  }
}
