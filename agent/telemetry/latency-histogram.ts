import * as hdr from 'hdr-histogram-js';

/**
 * HdrHistogram with 3 significant digits: every value is kept in a bin at most 1/1024 of its size wide
 * (values below 2048 µs exactly), so a reported percentile is never below the exact nearest-rank percentile
 * of the recorded (integer µs) samples and never more than 1/1024 ≈ 0.098% above it. Memory is fixed
 * (~95 KiB per histogram for the 1 µs … 1 h range), whatever the sample count.
 */
export const HISTOGRAM_SIGNIFICANT_DIGITS = 3;
export const HISTOGRAM_RELATIVE_ERROR = 1 / 1024;
/** Largest latency tracked; longer ones are recorded as this (and still counted exactly in max and sum). */
export const HISTOGRAM_MAX_US = 3_600_000_000;

/** Prometheus bucket bounds (µs) of the `edge_agent_*_duration_us` histograms. */
export const DEFAULT_LATENCY_BUCKETS_US: readonly number[] = [
  50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 10_000_000,
];
export const DEFAULT_BATCH_BUCKETS: readonly number[] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

let wasmState: 'untried' | 'ready' | 'unavailable' = 'untried';

/**
 * One interval histogram. The WebAssembly build records in ~35 ns against ~100 ns for the JS one (the
 * runtime records three per request), so it is used where it initialises; the JS build is the fallback.
 */
function buildHdr(): hdr.Histogram {
  if (wasmState === 'untried') {
    try {
      hdr.initWebAssemblySync();
      wasmState = 'ready';
    } catch {
      wasmState = 'unavailable';
    }
  }
  return hdr.build({
    bitBucketSize: 32,
    autoResize: false,
    lowestDiscernibleValue: 1,
    highestTrackableValue: HISTOGRAM_MAX_US,
    numberOfSignificantValueDigits: HISTOGRAM_SIGNIFICANT_DIGITS,
    useWebAssembly: wasmState === 'ready',
  });
}

/** Percentiles of one interval, µs. Zeros when nothing was recorded (count says so). */
export interface LatencySummary {
  readonly count: number;
  readonly p50: number;
  readonly p90: number;
  readonly p99: number;
  /** Exact, not binned. */
  readonly max: number;
  readonly mean: number;
}

export const EMPTY_LATENCY: LatencySummary = { count: 0, p50: 0, p90: 0, p99: 0, max: 0, mean: 0 };

/** Counts per bucket of a cumulative Prometheus histogram (not cumulative across buckets; +Inf last). */
export interface BucketCounts {
  readonly bounds: readonly number[];
  readonly counts: Float64Array;
  readonly sum: number;
  readonly count: number;
}

/**
 * Latency of one kind (queue, inference, total) for one model version: an HDR histogram per reporting
 * interval for percentiles, plus cumulative fixed buckets, sum and count for Prometheus. `record` is on the
 * request path: a bounded bucket scan and one histogram write.
 */
export class LatencyRecorder implements BucketCounts {
  private readonly histogram = buildHdr();
  readonly counts: Float64Array;
  sum = 0;
  count = 0;
  private intervalCount = 0;
  private intervalSum = 0;
  private intervalMax = 0;

  constructor(readonly bounds: readonly number[] = DEFAULT_LATENCY_BUCKETS_US) {
    this.counts = new Float64Array(bounds.length + 1);
  }

  record(us: number): void {
    const v = us > 0 ? us : 0;
    const b = this.bounds;
    let i = 0;
    while (i < b.length && v > b[i]!) i += 1;
    this.counts[i]! += 1;
    this.sum += v;
    this.count += 1;
    this.intervalSum += v;
    this.intervalCount += 1;
    if (v > this.intervalMax) this.intervalMax = v;
    this.histogram.recordValue(v < HISTOGRAM_MAX_US ? Math.round(v) : HISTOGRAM_MAX_US);
  }

  /** Percentiles since the last call, then starts a new interval. */
  closeInterval(): LatencySummary {
    if (this.intervalCount === 0) return EMPTY_LATENCY;
    const h = this.histogram;
    const summary: LatencySummary = {
      count: this.intervalCount,
      p50: h.getValueAtPercentile(50),
      p90: h.getValueAtPercentile(90),
      p99: h.getValueAtPercentile(99),
      max: this.intervalMax,
      mean: this.intervalSum / this.intervalCount,
    };
    h.reset();
    this.intervalCount = 0;
    this.intervalSum = 0;
    this.intervalMax = 0;
    return summary;
  }

  /** Frees the histogram (the WebAssembly build lives outside the JS heap). */
  destroy(): void {
    this.histogram.destroy();
  }
}

/** Batch sizes of one model version: cumulative buckets for Prometheus, per-interval distribution. */
export class BatchSizeRecorder implements BucketCounts {
  readonly counts: Float64Array;
  sum = 0;
  count = 0;
  private intervalCount = 0;
  private intervalSum = 0;
  private intervalMax = 0;
  private intervalSizes = new Map<number, number>();

  constructor(readonly bounds: readonly number[] = DEFAULT_BATCH_BUCKETS) {
    this.counts = new Float64Array(bounds.length + 1);
  }

  record(size: number): void {
    const b = this.bounds;
    let i = 0;
    while (i < b.length && size > b[i]!) i += 1;
    this.counts[i]! += 1;
    this.sum += size;
    this.count += 1;
    this.intervalSum += size;
    this.intervalCount += 1;
    if (size > this.intervalMax) this.intervalMax = size;
    this.intervalSizes.set(size, (this.intervalSizes.get(size) ?? 0) + 1);
  }

  closeInterval(): BatchSummary {
    const sizes: Record<string, number> = {};
    for (const [size, n] of [...this.intervalSizes].sort((a, b) => a[0] - b[0])) sizes[String(size)] = n;
    const summary: BatchSummary = {
      executions: this.intervalCount,
      mean: this.intervalCount === 0 ? 0 : this.intervalSum / this.intervalCount,
      max: this.intervalMax,
      sizes,
    };
    this.intervalCount = 0;
    this.intervalSum = 0;
    this.intervalMax = 0;
    this.intervalSizes = new Map();
    return summary;
  }
}

export interface BatchSummary {
  /** `session.run` calls in the interval. */
  readonly executions: number;
  readonly mean: number;
  readonly max: number;
  /** Executions by batch size. */
  readonly sizes: Readonly<Record<string, number>>;
}
