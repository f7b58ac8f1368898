import { setFlagsFromString } from 'node:v8';

/**
 * How far V8 lets the JS heap grow past its live size before the next full collection. V8 sizes that limit
 * from the live heap and its own GC-speed estimate (×1.3–1.4 for the agent's ~20 MB, by its trace), while
 * every frame churns buffers through external memory (the frame's bytes, the batch buffer a worker transfers
 * back): under a stream of 150 KB frames it ran a full collection every ~27 frames (31 per 800, each ~15 ms
 * of main-thread marking and pause), and the agent's main thread spent 1.6 ms of CPU a frame. At 300 % (×4):
 * 3–5 per 800 frames and 0.6–1.0 ms a frame. The price is a heap that may reach ~4× its live size (~80 MB
 * here) between collections.
 *
 * Process-wide, so it is applied by the process entry (the `serve` command), not by an Agent (tests build
 * several in one process). A `--heap-growing-percent` given to node itself wins: that is the operator's.
 * Returns the percentage in force (0: V8's own heuristic).
 */
export function applyHeapGrowingPercent(percent: number, execArgv: readonly string[] = process.execArgv): number {
  const at = execArgv.findIndex((a) => /^--heap[-_]growing[-_]percent(=|$)/.test(a));
  if (at >= 0) {
    const flag = execArgv[at] as string;
    return Number(flag.includes('=') ? flag.slice(flag.indexOf('=') + 1) : execArgv[at + 1]);
  }
  if (percent > 0) setFlagsFromString(`--heap-growing-percent=${percent}`);
  return percent;
}
