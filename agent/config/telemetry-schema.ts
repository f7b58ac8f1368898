import { z } from 'zod';

const host = z.string().min(1).refine((s) => !/[\s/]/.test(s), { message: 'expected a host name or IP address' });

export const telemetryHttpSchema = z.strictObject({
  /** `/metrics` (Prometheus) and `/v1/status` (edge-agent status). */
  enabled: z.boolean().default(true),
  /** Loopback by default: the figures are for the device and a local Prometheus agent. */
  host: host.default('127.0.0.1'),
  /** Triton's metrics port. */
  port: z.number().int().min(0).max(65_535).default(8002),
});

export const telemetryOutboxSchema = z.strictObject({
  /** Entries kept while the broker is unreachable; the oldest telemetry goes first when full. */
  max_rows: z.number().int().min(1).max(1_000_000).default(10_000),
  /** Payload bytes kept. */
  max_bytes: z.number().int().min(1024).default(16 * 1024 * 1024),
  /** Telemetry older than this is dropped (deployment statuses never are). */
  max_age_s: z.number().positive().default(7 * 24 * 3600),
  /**
   * At most this long between WAL fsyncs of outbox writes (synchronous=NORMAL): what a power cut can take
   * back. Deployment statuses are synced at once. 0: only SQLite's own checkpoints (~1000 WAL pages).
   */
  sync_interval_s: z.number().min(0).default(60),
  /** Publishes per second at most while draining a backlog, so live traffic still flows. */
  drain_rate_per_s: z.number().positive().default(20),
  /** Entries published and awaiting their PUBACK at once. */
  max_in_flight: z.number().int().min(1).max(1000).default(8),
});

export const telemetryDeviceSchema = z.strictObject({
  /** GPU utilisation, memory, temperature via `nvidia-smi --query-gpu` (skipped when not installed). */
  nvidia_smi: z.boolean().default(true),
  /** Jetson readings via `tegrastats` (skipped when not installed). */
  tegrastats: z.boolean().default(true),
  /** CPU/SoC temperatures from /sys/class/thermal. */
  thermal: z.boolean().default(true),
  /** A tool that does not answer within this is skipped for that interval. */
  command_timeout_ms: z.number().int().positive().default(3000),
});

export const telemetrySchema = z.strictObject({
  /** Off: no records, no outbox use for telemetry, no listener (the runtime still counts for health checks). */
  enabled: z.boolean().default(true),
  /** One telemetry record per interval to `{fleet.topic_prefix}/devices/{id}/telemetry`. */
  interval_s: z.number().min(0.05).max(86_400).default(10),
  http: telemetryHttpSchema.default(telemetryHttpSchema.parse({})),
  outbox: telemetryOutboxSchema.default(telemetryOutboxSchema.parse({})),
  device: telemetryDeviceSchema.default(telemetryDeviceSchema.parse({})),
});

export type TelemetryConfig = z.infer<typeof telemetrySchema>;
export type TelemetryHttpConfig = z.infer<typeof telemetryHttpSchema>;
export type TelemetryOutboxConfig = z.infer<typeof telemetryOutboxSchema>;
export type TelemetryDeviceConfig = z.infer<typeof telemetryDeviceSchema>;
