import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { Outbox } from '../store/outbox.js';
import type { AgentMetrics, ModelMetrics } from './agent-metrics.js';
import type { DeviceMonitor } from './device-monitor.js';
import type { BucketCounts } from './latency-histogram.js';
import type { PublisherStats } from './outbox-publisher.js';

type ModelLabel = 'model' | 'version';
type HistogramSnapshot = Awaited<ReturnType<Histogram<ModelLabel>['get']>>;

/**
 * A Prometheus histogram whose buckets the agent already counts on the request path (see LatencyRecorder):
 * prom-client's own `observe` hashes labels per call, too slow for every request, so this subclass only
 * renders the counts it is handed at scrape time.
 */
class PrecountedHistogram extends Histogram<ModelLabel> {
  constructor(name: string, help: string, bounds: readonly number[], private readonly source: () => Iterable<{ labels: Record<ModelLabel, string>; counts: BucketCounts }>) {
    super({ name, help, labelNames: ['model', 'version'], buckets: [...bounds], registers: [] });
  }

  override async get(): Promise<HistogramSnapshot> {
    return this.snapshot();
  }

  /** prom-client's registry calls this one when present. */
  async getForPromString(): Promise<HistogramSnapshot> {
    return this.snapshot();
  }

  private snapshot(): HistogramSnapshot {
    const values: HistogramSnapshot['values'] = [];
    for (const { labels, counts } of this.source()) {
      let acc = 0;
      counts.bounds.forEach((bound, i) => {
        acc += counts.counts[i]!;
        values.push({ labels: { ...labels, le: bound }, value: acc, metricName: `${this.name}_bucket` } as HistogramSnapshot['values'][number]);
      });
      values.push({ labels: { ...labels, le: '+Inf' }, value: counts.count, metricName: `${this.name}_bucket` } as HistogramSnapshot['values'][number]);
      values.push({ labels, value: counts.sum, metricName: `${this.name}_sum` });
      values.push({ labels, value: counts.count, metricName: `${this.name}_count` });
    }
    return { name: this.name, help: this.help, type: 'histogram' as unknown as HistogramSnapshot['type'], values, aggregator: 'sum', collect: () => undefined };
  }

  declare readonly name: string;
  declare readonly help: string;
}

export interface PrometheusSources {
  readonly metrics: AgentMetrics;
  readonly outbox?: Outbox;
  readonly devices?: DeviceMonitor;
  readonly publisher?: () => PublisherStats | undefined;
  /** prom-client's process and Node.js metrics (process_cpu_seconds_total, process_resident_memory_bytes…). */
  readonly defaultMetrics?: boolean;
}

function labelsOf(m: ModelMetrics): Record<ModelLabel, string> {
  return { model: m.model, version: String(m.version) };
}

/**
 * The registry behind `/metrics`: Triton's `nv_inference_*` names and labels where Triton has the figure
 * (counters of requests and cumulative durations in µs, labels `model` and `version`), the agent's own under
 * `edge_agent_`. Values are read from AgentMetrics at scrape time; nothing here runs per request.
 */
export function createPrometheusRegistry(sources: PrometheusSources): Registry {
  const registry = new Registry();
  const { metrics } = sources;
  const models = (): ModelMetrics[] => [...metrics.models()];

  const modelCounter = (name: string, help: string, value: (m: ModelMetrics) => number): void => {
    registry.registerMetric(new Counter<ModelLabel>({
      name, help, labelNames: ['model', 'version'], registers: [],
      collect() {
        this.reset();
        for (const m of models()) this.inc(labelsOf(m), value(m));
      },
    }));
  };
  // Triton's per-model counters (https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/metrics.html).
  modelCounter('nv_inference_request_success', 'Number of successful inference requests, all batch sizes', (m) => m.success);
  modelCounter('nv_inference_request_failure', 'Number of failed inference requests (errors, LATEST_ONLY drops, deadline misses), all batch sizes', (m) => m.requests - m.success);
  modelCounter('nv_inference_count', 'Number of inferences performed (batch rows)', (m) => m.inferences);
  modelCounter('nv_inference_exec_count', 'Number of model executions performed (session.run calls)', (m) => m.executions);
  modelCounter('nv_inference_request_duration_us', 'Cumulative end-to-end inference request duration in microseconds (successful requests)', (m) => Math.round(m.total.sum));
  modelCounter('nv_inference_queue_duration_us', 'Cumulative inference queuing duration in microseconds (successful requests)', (m) => Math.round(m.queue.sum));
  modelCounter('nv_inference_compute_infer_duration_us', 'Cumulative compute inference duration in microseconds (successful requests)', (m) => Math.round(m.infer.sum));
  modelCounter('edge_agent_request_errors_total', 'Requests that failed with an error', (m) => m.errors);
  modelCounter('edge_agent_requests_dropped_total', 'LATEST_ONLY frames superseded by a newer frame before they ran', (m) => m.dropped);
  modelCounter('edge_agent_deadline_misses_total', 'Frames whose deadline passed before they could start', (m) => m.deadlineMisses);

  const hist = (name: string, help: string, bounds: readonly number[], pick: (m: ModelMetrics) => BucketCounts): void => {
    registry.registerMetric(new PrecountedHistogram(name, help, bounds, () => models().map((m) => ({ labels: labelsOf(m), counts: pick(m) }))));
  };
  const lat = metrics.latencyBucketsUs;
  hist('edge_agent_request_duration_us', 'End-to-end request latency in microseconds (successful requests)', lat, (m) => m.total);
  hist('edge_agent_queue_duration_us', 'Time queued before execution in microseconds (successful requests)', lat, (m) => m.queue);
  hist('edge_agent_compute_infer_duration_us', 'Inference (session.run) time per request in microseconds (successful requests)', lat, (m) => m.infer);
  hist('edge_agent_batch_size', 'Requests per execution (session.run)', metrics.batchSizeBuckets, (m) => m.batch);

  registry.registerMetric(new Gauge<ModelLabel | 'provider' | 'variant' | 'state'>({
    name: 'edge_agent_model_info', help: 'Served model versions: execution provider, file variant and state (value 1); a version no longer served shows once as unloaded or failed, then goes',
    labelNames: ['model', 'version', 'provider', 'variant', 'state'], registers: [],
    collect() {
      this.reset();
      for (const m of models()) this.set({ ...labelsOf(m), provider: m.provider ?? '', variant: m.variant ?? '', state: m.state }, 1);
    },
  }));
  // Per model, not per version: a version whose load failed is listed once and forgotten, its failures are not.
  registry.registerMetric(new Counter<'model'>({
    name: 'edge_agent_model_load_failures_total', help: 'Failed loads and reloads of the model (a version that keeps serving is still listed as ready)',
    labelNames: ['model'], registers: [],
    collect() {
      this.reset();
      for (const [model, failures] of metrics.loadFailures()) this.inc({ model }, failures);
    },
  }));
  registry.registerMetric(new Gauge({
    name: 'edge_agent_active_streams', help: 'Client streams open now', registers: [],
    collect() { this.set(metrics.activeStreams); },
  }));
  registry.registerMetric(new Counter({
    name: 'edge_agent_streams_opened_total', help: 'Client streams opened since start', registers: [],
    collect() { this.reset(); this.inc(metrics.streamsOpened); },
  }));

  const { outbox } = sources;
  if (outbox) {
    registry.registerMetric(new Gauge({
      name: 'edge_agent_outbox_rows', help: 'Entries waiting in the outbox for a PUBACK', registers: [],
      collect() { this.set(outbox.stats().rows); },
    }));
    registry.registerMetric(new Gauge({
      name: 'edge_agent_outbox_bytes', help: 'Payload bytes waiting in the outbox', registers: [],
      collect() { this.set(outbox.stats().bytes); },
    }));
    registry.registerMetric(new Counter({
      name: 'edge_agent_outbox_dropped_total', help: 'Outbox entries dropped by its bounds (oldest telemetry first)', registers: [],
      collect() { this.reset(); this.inc(outbox.stats().droppedTotal); },
    }));
  }
  const { publisher } = sources;
  if (publisher) {
    registry.registerMetric(new Counter({
      name: 'edge_agent_outbox_published_total', help: 'Outbox publishes (republishes after a reconnect included)', registers: [],
      collect() { this.reset(); this.inc(publisher()?.published ?? 0); },
    }));
    registry.registerMetric(new Gauge({
      name: 'edge_agent_fleet_connected', help: '1 when the MQTT client is connected', registers: [],
      collect() { this.set(publisher()?.connected ? 1 : 0); },
    }));
  }

  const { devices } = sources;
  if (devices) {
    const gpuGauge = (name: string, help: string, value: (g: NonNullable<DeviceMonitor['latest']>['gpus'][number]) => number | undefined): void => {
      registry.registerMetric(new Gauge<'gpu' | 'source'>({
        name, help, labelNames: ['gpu', 'source'], registers: [],
        collect() {
          this.reset();
          for (const g of devices.latest?.gpus ?? []) {
            const v = value(g);
            if (v !== undefined) this.set({ gpu: String(g.index), source: g.source }, v);
          }
        },
      }));
    };
    gpuGauge('edge_agent_gpu_utilization_ratio', 'GPU utilisation, 0..1 (nvidia-smi utilization.gpu, tegrastats GR3D)', (g) => (g.utilization_percent === undefined ? undefined : g.utilization_percent / 100));
    gpuGauge('edge_agent_gpu_memory_used_bytes', 'GPU memory used (shared RAM on Jetson)', (g) => (g.memory_used_mib === undefined ? undefined : g.memory_used_mib * 1024 * 1024));
    gpuGauge('edge_agent_gpu_memory_total_bytes', 'GPU memory total (shared RAM on Jetson)', (g) => (g.memory_total_mib === undefined ? undefined : g.memory_total_mib * 1024 * 1024));
    gpuGauge('edge_agent_gpu_temperature_celsius', 'GPU temperature', (g) => g.temperature_c);
    registry.registerMetric(new Gauge<'zone' | 'type'>({
      name: 'edge_agent_thermal_zone_celsius', help: 'Temperature of each /sys/class/thermal zone', labelNames: ['zone', 'type'], registers: [],
      collect() {
        this.reset();
        for (const z of devices.latest?.thermal ?? []) this.set({ zone: z.zone, type: z.type }, z.temperature_c);
      },
    }));
  }

  if (sources.defaultMetrics !== false) collectDefaultMetrics({ register: registry });
  return registry;
}
