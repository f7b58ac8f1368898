import { setFlagsFromString } from 'node:v8';

/**
 * How far V8 lets the JS heap grow past its live size before the next full collection. V8 counts external
 * memory allocated since the last mark-compact (ArrayBuffers: every frame's bytes, and every buffer a worker
 * transfers back) against that limit, and sizes the limit from the live heap alone: with the agent's ~20 MB
 * live heap its own choice (×1.3–1.4) started a full collection every ~27 frames of 150 KB (31 per 800
 * frames, each ~15 ms of main-thread marking and pause; the agent's main thread spent 1.6 ms of CPU a frame).
 * At 300 % (×4) it was 5 per 800 frames and 1.0 ms a frame; the price is a heap that may reach ~4× its live
 * size (~80 MB here) between collections.
 *
 * Process-wide, so it is applied by the process entry (the `serve` command), not by an Agent (tests build
 * several in one process). A `--heap-growing-percent` given to node itself wins: that is the operator's.
 * Returns the percentage in force (0: V8's own heuristic).
 */
export function applyHeapGrowingPercent(percent: number, execArgv: readonly string[] = process.execArgv): number {
  const given = execArgv.find((a) => /^--heap[-_]growing[-_]percent(=|$)/.test(a));
  if (given !== undefined) return Number(given.split('=')[1] ?? Number.NaN);
  if (percent > 0) setFlagsFromString(`--heap-growing-percent=${percent}`);
  return percent;
}
