import type { Outbox } from '../store/outbox.js';
import type { AgentMetrics, ModelIntervalReport } from './agent-metrics.js';
import type { DeviceMonitor, DeviceReadings } from './device-monitor.js';
import type { PublisherStats } from './outbox-publisher.js';
import { summarizeOutbox, type OutboxSummary } from './telemetry-reporter.js';

/** A model as the composition root knows it (the runtime's ModelInfo fits). */
export interface StatusModel {
  readonly name: string;
  readonly version: number;
  readonly state: string;
  readonly provider?: string;
  readonly variant?: string;
  readonly reason?: string;
}

export interface FleetStatus {
  readonly connected: boolean;
  readonly broker?: string;
  /** ISO 8601, last time the connection came up. */
  readonly last_connected_at?: string | null;
  /** Deployment being worked on, if any. */
  readonly pending_deployment?: string | null;
  /** Command payloads that did not verify since start (a fleet signing with the wrong key shows here). */
  readonly commands_rejected?: { readonly total: number; readonly last_reason: string | null; readonly last_command_id: string | null };
}

/** What only the composition root knows; `statusSource` returns it on each /v1/status request. */
export interface StatusSnapshot {
  readonly agentVersion: string;
  readonly deviceId: string;
  readonly models: readonly StatusModel[];
  /** null: the agent runs without a `fleet:` section. */
  readonly fleet: FleetStatus | null;
}

export type ModelFigures = Omit<ModelIntervalReport, 'model' | 'version' | 'state' | 'reason' | 'provider' | 'variant'>;

/** The JSON body of `GET /v1/status` (what `edge-agent status --json` prints). */
export interface StatusReport {
  readonly agent: {
    readonly version: string;
    readonly device_id: string;
    readonly pid: number;
    readonly uptime_s: number;
    readonly rss_bytes: number;
    /** Over the last telemetry interval; null before the first. */
    readonly cpu_percent: number | null;
    readonly active_streams: number;
  };
  readonly models: readonly (StatusModel & { readonly figures: ModelFigures | null })[];
  /** The interval the figures cover; null before the first interval closed. */
  readonly interval: { readonly ended_at: string; readonly seconds: number } | null;
  readonly outbox: (OutboxSummary & { readonly in_flight: number; readonly published: number; readonly republished: number }) | null;
  readonly fleet: FleetStatus | null;
  readonly device: DeviceReadings | null;
}

export interface StatusReportSources {
  readonly snapshot: StatusSnapshot;
  readonly metrics: AgentMetrics;
  readonly outbox?: Outbox;
  readonly publisher?: PublisherStats;
  readonly devices?: DeviceMonitor;
  /** When the agent started, on the monotonic clock (`performance.now()`, ms). */
  readonly startedAt: number;
  readonly now?: number;
}

export function buildStatusReport(s: StatusReportSources): StatusReport {
  const now = s.now ?? Date.now();
  const last = s.metrics.lastInterval;
  const figures = new Map<string, ModelIntervalReport>();
  for (const m of last?.models ?? []) figures.set(`${m.model}\u0000${m.version}`, m);
  return {
    agent: {
      version: s.snapshot.agentVersion,
      device_id: s.snapshot.deviceId,
      pid: process.pid,
      uptime_s: Math.max(0, (performance.now() - s.startedAt) / 1000),
      rss_bytes: process.memoryUsage.rss(),
      cpu_percent: last ? last.process.cpu_percent : null,
      active_streams: s.metrics.activeStreams,
    },
    models: s.snapshot.models.map((m) => {
      const f = figures.get(`${m.name}\u0000${m.version}`);
      let own: ModelFigures | null = null;
      if (f) {
        const { model: _m, version: _v, state: _s, reason: _r, provider: _p, variant: _va, ...rest } = f;
        own = rest;
      }
      return {
        name: m.name,
        version: m.version,
        state: m.state,
        ...(m.provider !== undefined ? { provider: m.provider } : f?.provider ? { provider: f.provider } : {}),
        ...(m.variant !== undefined ? { variant: m.variant } : f?.variant ? { variant: f.variant } : {}),
        ...(m.reason !== undefined ? { reason: m.reason } : {}),
        figures: own,
      };
    }),
    interval: last ? { ended_at: new Date(last.ended_at).toISOString(), seconds: last.seconds } : null,
    outbox: s.outbox
      ? { ...summarizeOutbox(s.outbox.stats(), now), in_flight: s.publisher?.inFlight ?? 0, published: s.publisher?.published ?? 0, republished: s.publisher?.republished ?? 0 }
      : null,
    fleet: s.snapshot.fleet,
    device: s.devices?.latest ?? null,
  };
}
