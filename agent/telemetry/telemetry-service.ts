import type { MqttClient } from 'mqtt';
import type { Registry } from 'prom-client';
import type { TelemetryConfig, TelemetryOutboxConfig } from '../config/telemetry-schema.js';
import type { Logger } from '../logger.js';
import type { Outbox, OutboxBounds } from '../store/outbox.js';
import type { AgentMetrics } from './agent-metrics.js';
import { DeviceMonitor } from './device-monitor.js';
import type { SpawnFn } from './device-tool.js';
import { LocalHttpServer } from './local-http-server.js';
import { OutboxPublisher } from './outbox-publisher.js';
import { createPrometheusRegistry } from './prometheus-metrics.js';
import { buildStatusReport, type StatusReport, type StatusSnapshot } from './status-report.js';
import { TelemetryReporter, telemetryTopic } from './telemetry-reporter.js';

/** The outbox options of `telemetry.outbox`: `SqliteOutbox.open(db, outboxOptions(config.telemetry.outbox))`. */
export function outboxOptions(config: TelemetryOutboxConfig): { bounds: OutboxBounds; syncIntervalMs: number } {
  return {
    bounds: { maxRows: config.max_rows, maxBytes: config.max_bytes, maxAgeMs: config.max_age_s * 1000 },
    syncIntervalMs: config.sync_interval_s * 1000,
  };
}

export interface TelemetryServiceOptions {
  readonly config: TelemetryConfig;
  /** The runtime's observer and the server's stream counter. */
  readonly metrics: AgentMetrics;
  readonly deviceId: string;
  readonly agentVersion: string;
  /** `fleet.topic_prefix`; records go to `{prefix}/devices/{id}/telemetry`. */
  readonly topicPrefix?: string;
  /** Shared with the fleet (deployment statuses). Without one nothing is kept or published. */
  readonly outbox?: Outbox;
  /** Models and fleet state for /v1/status, asked per request. */
  readonly statusSource: () => StatusSnapshot;
  readonly logger?: Logger;
  /** Tests: a device monitor that plays recorded tool output. */
  readonly devices?: DeviceMonitor;
  readonly spawn?: SpawnFn;
  /** When the agent started, on the monotonic clock (`performance.now()`, ms): uptime survives clock steps. */
  readonly startedAt?: number;
}

/**
 * Telemetry's parts wired together: the interval reporter (records into the outbox), the outbox publisher
 * (once the fleet hands over its MQTT client) and the local listener (/metrics, /v1/status).
 */
export class TelemetryService {
  readonly registry: Registry;
  readonly devices: DeviceMonitor;
  private readonly reporter: TelemetryReporter;
  private readonly http: LocalHttpServer | undefined;
  private publisher: OutboxPublisher | undefined;
  private readonly startedAt: number;
  private started = false;
  /** The device monitor is ours to close unless the caller handed one in. */
  private readonly ownsDevices: boolean;

  constructor(private readonly options: TelemetryServiceOptions) {
    const { config } = options;
    this.startedAt = options.startedAt ?? performance.now();
    this.ownsDevices = options.devices === undefined;
    this.devices = options.devices ?? new DeviceMonitor({
      nvidiaSmi: config.device.nvidia_smi,
      tegrastats: config.device.tegrastats,
      thermal: config.device.thermal,
      commandTimeoutMs: config.device.command_timeout_ms,
      ...(options.spawn ? { spawn: options.spawn } : {}),
    });
    this.reporter = new TelemetryReporter({
      metrics: options.metrics,
      deviceId: options.deviceId,
      agentVersion: options.agentVersion,
      topic: telemetryTopic(options.topicPrefix ?? 'edge', options.deviceId),
      intervalMs: config.interval_s * 1000,
      devices: this.devices,
      startedAt: this.startedAt,
      ...(options.outbox ? { outbox: options.outbox } : {}),
      ...(options.logger ? { logger: options.logger } : {}),
    });
    this.registry = createPrometheusRegistry({
      metrics: options.metrics,
      devices: this.devices,
      publisher: () => this.publisher?.stats(),
      ...(options.outbox ? { outbox: options.outbox } : {}),
    });
    this.http = config.enabled && config.http.enabled
      ? new LocalHttpServer({
        host: config.http.host,
        port: config.http.port,
        registry: this.registry,
        status: () => this.statusReport(),
        ...(options.logger ? { logger: options.logger } : {}),
      })
      : undefined;
  }

  /** Applies a new `telemetry.interval_s` without a restart (SIGHUP). */
  setInterval(seconds: number): void {
    this.reporter.setIntervalMs(seconds * 1000);
  }

  /** Base URL of the local listener once started (`edge-agent status --url`). */
  get httpUrl(): string | undefined {
    return this.http?.url;
  }

  async start(): Promise<void> {
    if (this.started || !this.options.config.enabled) return;
    if (this.http) {
      const bound = await this.http.start();
      // With `port: 0` this line is the only way to find the listener (and `edge-agent status --url`).
      this.options.logger?.info({ url: this.http.url, host: bound.host, port: bound.port }, 'telemetry HTTP listener ready');
    }
    this.reporter.start();
    this.started = true;
  }

  /**
   * Starts draining the outbox through the fleet's client (deployment statuses too, so this runs even with
   * telemetry disabled). The client stays the fleet's: the publisher never connects or ends it.
   */
  attachMqtt(client: MqttClient): void {
    if (this.publisher) throw new Error('telemetry: an MQTT client is already attached');
    if (!this.options.outbox) throw new Error('telemetry: attachMqtt needs an outbox');
    const { outbox: o } = this.options.config;
    this.publisher = new OutboxPublisher({
      client,
      outbox: this.options.outbox,
      ratePerSecond: o.drain_rate_per_s,
      maxInFlight: o.max_in_flight,
      ...(this.options.logger ? { logger: this.options.logger } : {}),
    });
    this.publisher.start();
  }

  /** Stops publishing (before the fleet ends its client); entries without a PUBACK stay for next time. */
  async detachMqtt(): Promise<void> {
    const p = this.publisher;
    this.publisher = undefined;
    await p?.stop();
  }

  /**
   * Writes one last record, stops the listener, the publisher and the device tools (for good: no start again).
   * The outbox is the caller's to close.
   */
  async stop(): Promise<void> {
    if (this.started) {
      await this.reporter.stop();
      await this.reporter.tick().catch((err: unknown) => this.options.logger?.warn({ err }, 'final telemetry record not stored'));
      await this.http?.stop();
      this.started = false;
    }
    await this.detachMqtt();
    if (this.ownsDevices) await this.devices.close();
  }

  statusReport(): StatusReport {
    return buildStatusReport({
      snapshot: this.options.statusSource(),
      metrics: this.options.metrics,
      devices: this.devices,
      startedAt: this.startedAt,
      ...(this.options.outbox ? { outbox: this.options.outbox } : {}),
      ...(this.publisher ? { publisher: this.publisher.stats() } : {}),
    });
  }
}
