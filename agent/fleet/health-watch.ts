import type { FleetHealthConfig } from '../config/fleet-schema.js';
import type { DeploymentTarget } from './deployment-target.js';
import { sleep } from './file-io.js';

export interface HealthFigures {
  readonly requests: number;
  readonly errors: number;
  readonly error_rate: number;
  readonly p99_us: number;
  readonly previous_p99_us?: number;
  readonly p99_factor?: number;
  readonly max_error_rate: number;
  readonly max_p99_factor: number;
  readonly min_requests: number;
  readonly window_s: number;
  readonly watched_s: number;
}

export type HealthOutcome =
  | { readonly verdict: 'passed'; readonly figures: HealthFigures }
  | { readonly verdict: 'breached'; readonly reason: string; readonly figures: HealthFigures };

/** Judges one reading; undefined while the version looks healthy (or has served too few requests to tell). */
export function judgeHealth(figures: HealthFigures): string | undefined {
  if (figures.requests < figures.min_requests) return undefined;
  if (figures.error_rate > figures.max_error_rate) {
    return `error rate ${(figures.error_rate * 100).toFixed(1)}% (${figures.errors}/${figures.requests}) exceeds ${(figures.max_error_rate * 100).toFixed(1)}%`;
  }
  if (figures.p99_factor !== undefined && figures.p99_factor > figures.max_p99_factor) {
    return `p99 latency ${Math.round(figures.p99_us)} us is ${figures.p99_factor.toFixed(2)}x the previous version's ${Math.round(figures.previous_p99_us ?? 0)} us (limit ${figures.max_p99_factor}x)`;
  }
  return undefined;
}

/** How often, at most, a running window records what is left of it (a restart resumes from the last record). */
export const HEALTH_CHECKPOINT_MS = 5000;

export interface HealthWindow {
  /** The whole window, as set at activation. */
  readonly windowMs: number;
  /** What is left of it as this watch starts: all of it, or what was recorded before a restart. */
  readonly leftMs: number;
  /** The previous version's p99 from before the switch (0/absent: the p99 comparison is skipped). */
  readonly previousP99Us?: number;
}

/**
 * Watches a newly activated version for what is left of its window: the first reading that breaches the limits
 * ends the watch. Time is measured with the monotonic clock, so a wall-clock step (NTP syncing after boot, an
 * operator setting the date) neither ends the window early nor stretches it. `checkpoint` is handed the time
 * left every HEALTH_CHECKPOINT_MS, to be recorded as a duration (never as a wall-clock deadline).
 */
export async function watchHealth(
  target: DeploymentTarget,
  model: string,
  version: number,
  window: HealthWindow,
  config: FleetHealthConfig,
  signal: AbortSignal,
  checkpoint?: (leftMs: number) => Promise<void>,
): Promise<HealthOutcome> {
  const startedAt = performance.now();
  const watchedBefore = Math.max(0, window.windowMs - window.leftMs);
  const elapsed = (): number => performance.now() - startedAt;
  const read = (): HealthFigures => {
    const h = target.versionHealth(model, version);
    const prev = window.previousP99Us !== undefined && window.previousP99Us > 0 ? window.previousP99Us : undefined;
    return {
      requests: h.requests,
      errors: h.errors,
      error_rate: h.requests > 0 ? h.errors / h.requests : 0,
      p99_us: h.p99Us,
      ...(prev !== undefined ? { previous_p99_us: prev, p99_factor: h.p99Us / prev } : {}),
      max_error_rate: config.max_error_rate,
      max_p99_factor: config.max_p99_factor,
      min_requests: config.min_requests,
      window_s: window.windowMs / 1000,
      watched_s: Math.round((watchedBefore + elapsed()) / 100) / 10,
    };
  };
  let lastCheckpoint = startedAt;
  for (;;) {
    const figures = read();
    const breach = judgeHealth(figures);
    if (breach !== undefined) return { verdict: 'breached', reason: breach, figures };
    const left = window.leftMs - elapsed();
    if (left <= 0) return { verdict: 'passed', figures };
    if (checkpoint && performance.now() - lastCheckpoint >= HEALTH_CHECKPOINT_MS) {
      lastCheckpoint = performance.now();
      await checkpoint(left);
    }
    await sleep(Math.min(config.poll_ms, left), signal);
  }
}
