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

/**
 * Watches a newly activated version until `until` (ms since epoch): the first reading that breaches the limits
 * ends the watch. The p99 comparison needs the previous version's p99 from before the switch (0/absent: skipped).
 */
export async function watchHealth(
  target: DeploymentTarget,
  model: string,
  version: number,
  window: { readonly startedAt: number; readonly until: number; readonly previousP99Us?: number },
  config: FleetHealthConfig,
  signal: AbortSignal,
): Promise<HealthOutcome> {
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
      window_s: config.duration_s,
      watched_s: Math.round((Date.now() - window.startedAt) / 100) / 10,
    };
  };
  for (;;) {
    const figures = read();
    const breach = judgeHealth(figures);
    if (breach !== undefined) return { verdict: 'breached', reason: breach, figures };
    const left = window.until - Date.now();
    if (left <= 0) return { verdict: 'passed', figures };
    await sleep(Math.min(config.poll_ms, left), signal);
  }
}
