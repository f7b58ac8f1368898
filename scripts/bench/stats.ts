import { performance } from 'node:perf_hooks';

/** Latency samples in microseconds, summarised at the percentiles the benchmark reports. */
export interface LatencySummary {
  readonly n: number;
  readonly p50_us: number;
  readonly p99_us: number;
  readonly mean_us: number;
}

/** Nearest-rank percentile of ascending samples. */
export function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank] as number;
}

export function summarize(samplesUs: readonly number[]): LatencySummary {
  const sorted = Float64Array.from(samplesUs).sort();
  let sum = 0;
  for (const s of sorted) sum += s;
  return {
    n: sorted.length,
    p50_us: round1(percentile(sorted, 50)),
    p99_us: round1(percentile(sorted, 99)),
    mean_us: round1(sorted.length > 0 ? sum / sorted.length : Number.NaN),
  };
}

export function round1(x: number): number {
  return Math.round(x * 10) / 10;
}

/** A measurement window: `warmupMs` of untimed work, then at least `minSamples` and at least `durationMs`. */
export interface Window {
  readonly warmupMs: number;
  readonly durationMs: number;
  readonly minSamples: number;
  /** Hard cap, so a fast path does not collect millions of samples. */
  readonly maxSamples: number;
}

/** Runs `step` back to back through `window` and returns each timed step's duration in µs (with a warm-up
 * window, at least one untimed step first; with none, every step is timed). */
export async function timeLoop(window: Window, step: () => Promise<void>): Promise<number[]> {
  if (window.warmupMs > 0) {
    const warmEnd = performance.now() + window.warmupMs;
    do await step(); while (performance.now() < warmEnd);
  }
  const samples: number[] = [];
  const end = performance.now() + window.durationMs;
  for (;;) {
    const t0 = performance.now();
    await step();
    samples.push((performance.now() - t0) * 1000);
    if (samples.length >= window.maxSamples) break;
    if (samples.length >= window.minSamples && performance.now() >= end) break;
  }
  return samples;
}

/** Largest absolute difference relative to the reference's largest magnitude (0 when both are all zero). */
export function relativeDiff(actual: ArrayLike<number | bigint>, reference: ArrayLike<number | bigint>): number {
  if (actual.length !== reference.length) return Number.POSITIVE_INFINITY;
  let maxDiff = 0;
  let scale = 0;
  for (let i = 0; i < reference.length; i++) {
    const a = Number(actual[i]);
    const b = Number(reference[i]);
    maxDiff = Math.max(maxDiff, Math.abs(a - b));
    scale = Math.max(scale, Math.abs(b));
  }
  if (!Number.isFinite(maxDiff)) return Number.POSITIVE_INFINITY;
  return scale === 0 ? maxDiff : maxDiff / scale;
}

/** Plain-text table with right-aligned numbers. */
export function formatTable(header: readonly string[], rows: readonly (readonly (string | number | undefined)[])[]): string {
  const cells = [header, ...rows].map((r) => r.map((c) => (c === undefined ? '' : typeof c === 'number' ? formatNumber(c) : c)));
  const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  const line = (r: readonly string[]): string => r.map((c, i) => (i === 0 ? c.padEnd(widths[i] as number) : c.padStart(widths[i] as number))).join('  ');
  return [line(cells[0] as string[]), widths.map((w) => '-'.repeat(w)).join('  '), ...cells.slice(1).map(line)].join('\n');
}

export function formatNumber(x: number): string {
  if (!Number.isFinite(x)) return 'n/a';
  if (Number.isInteger(x)) return x.toString();
  if (Math.abs(x) >= 1000) return Math.round(x).toString();
  if (Math.abs(x) >= 10) return x.toFixed(1);
  return x.toFixed(2);
}

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

/** Per-round blocks of one participant: p50 per round, every sample pooled. */
export class Rounds {
  readonly p50s: number[] = [];
  readonly values: number[] = [];
  readonly batches: number[] = [];
  readonly all: number[] = [];
  add(samplesUs: readonly number[], value?: number, batch?: number): void {
    this.p50s.push(summarize(samplesUs).p50_us);
    for (const x of samplesUs) this.all.push(x);
    if (value !== undefined) this.values.push(value);
    if (batch !== undefined) this.batches.push(batch);
  }
  summary(): LatencySummary & { p50_median: number } {
    const s = summarize(this.all);
    return { ...s, p50_median: round1(median(this.p50s)) };
  }
}

/** Untimed rounds before the measured ones: at least `rounds`, and more until `minMs` have passed. */
export interface WarmupRounds {
  readonly rounds: number;
  readonly minMs: number;
}

/**
 * Runs each probe's block in turn, `rounds` times, rotating the order so none always follows the same one,
 * after untimed warm-up rounds (`measured` is false in them). On the development VM the first seconds of
 * load after a pause run slower: tiny's inference took 50 µs a frame instead of 33 after a 5 s pause, and the
 * first rows measured read 50–70 µs worse than the same rows measured later, until about 4 s of warm-up.
 */
export async function inRounds<P>(
  rounds: number, probes: readonly { key: string; probe: P }[], block: (p: P, key: string, measured: boolean) => Promise<void>,
  warmup: WarmupRounds = { rounds: 0, minMs: 0 },
): Promise<void> {
  const warmUntil = performance.now() + warmup.minMs;
  let r = 0;
  for (; r < warmup.rounds || (warmup.minMs > 0 && performance.now() < warmUntil); r++) await oneRound(r, probes, block, false);
  for (let m = 0; m < rounds; m++, r++) await oneRound(r, probes, block, true);
}

async function oneRound<P>(r: number, probes: readonly { key: string; probe: P }[], block: (p: P, key: string, measured: boolean) => Promise<void>, measured: boolean): Promise<void> {
  for (let i = 0; i < probes.length; i++) {
    const { key, probe } = probes[(i + r) % probes.length] as { key: string; probe: P };
    await block(probe, key, measured);
  }
}
