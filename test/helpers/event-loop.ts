import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';

/** Share of the next `ms` the event loop spent not waiting in the OS for I/O (Node's event-loop utilisation). */
export async function utilisation(ms: number): Promise<number> {
  const start = performance.eventLoopUtilization();
  await new Promise((r) => setTimeout(r, ms));
  return performance.eventLoopUtilization(start).utilization;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** One event-loop turn: a spin that should stop has seen its reason by then (its immediate was queued first). */
export const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

/** Waits for a condition driven by real events; the timeout only turns a hang into a failure. */
export async function until(what: string, cond: () => boolean, timeoutMs = 20_000): Promise<void> {
  const start = Date.now();
  while (!cond()) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A process is gone when /proc no longer has it, or only as a zombie waiting for its reaper. */
export function gone(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] === 'Z';
  } catch {
    return true;
  }
}
