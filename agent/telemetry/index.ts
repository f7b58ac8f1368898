export { AgentMetrics, ModelMetrics, MAX_MODEL_EVENTS_PER_INTERVAL } from './agent-metrics.js';
export type { AgentMetricsOptions, MetricsInterval, ModelEvent, ModelEventReport, ModelIntervalReport, ModelTelemetryState, ProcessUsage } from './agent-metrics.js';
export {
  LatencyRecorder,
  BatchSizeRecorder,
  HISTOGRAM_RELATIVE_ERROR,
  HISTOGRAM_SIGNIFICANT_DIGITS,
  HISTOGRAM_MAX_US,
  DEFAULT_LATENCY_BUCKETS_US,
  DEFAULT_BATCH_BUCKETS,
} from './latency-histogram.js';
export type { LatencySummary, BatchSummary } from './latency-histogram.js';
export { DeviceMonitor } from './device-monitor.js';
export type { DeviceMonitorOptions, DeviceReadings } from './device-monitor.js';
export { DeviceOutputError } from './device-tool.js';
export type { SpawnFn } from './device-tool.js';
export { NvidiaSmiCollector, parseNvidiaSmi, NVIDIA_SMI_ARGS } from './nvidia-smi.js';
export type { GpuReading } from './nvidia-smi.js';
export { TegrastatsCollector, parseTegrastats } from './tegrastats.js';
export type { TegrastatsReading } from './tegrastats.js';
export { ThermalZoneReader } from './thermal-zones.js';
export type { ThermalZoneReading } from './thermal-zones.js';
export { OutboxPublisher } from './outbox-publisher.js';
export { OutboxStatusSink } from './outbox-status-sink.js';
export type { OutboxPublisherOptions, PublisherStats } from './outbox-publisher.js';
export { TelemetryReporter, telemetryTopic } from './telemetry-reporter.js';
export type { TelemetryRecord, TelemetryReporterOptions, OutboxSummary } from './telemetry-reporter.js';
export { createPrometheusRegistry } from './prometheus-metrics.js';
export type { PrometheusSources } from './prometheus-metrics.js';
export { LocalHttpServer } from './local-http-server.js';
export type { LocalHttpServerOptions } from './local-http-server.js';
export { buildStatusReport } from './status-report.js';
export type { StatusReport, StatusSnapshot, StatusModel, FleetStatus } from './status-report.js';
export { runStatusCommand, formatStatus } from './status-command.js';
export type { StatusCommandOptions } from './status-command.js';
export { TelemetryService, outboxOptions } from './telemetry-service.js';
export type { TelemetryServiceOptions } from './telemetry-service.js';
