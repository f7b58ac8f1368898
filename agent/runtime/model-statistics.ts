import type { ModelStatistics } from './types.js';

const NS_PER_MS = 1e6;

interface Duration {
  count: number;
  ns: number;
}

/**
 * Triton's per-model counters for one model version (KServe `ModelStatistics`): requests as batch rows,
 * executions as `session.run` calls, and cumulative durations in ns. Times are `performance.now()` ms.
 */
export class ModelStatisticsRecorder {
  private lastInference = 0;
  private inferenceCount = 0;
  private executionCount = 0;
  private readonly success: Duration = { count: 0, ns: 0 };
  private readonly fail: Duration = { count: 0, ns: 0 };
  private readonly queue: Duration = { count: 0, ns: 0 };
  private readonly computeInput: Duration = { count: 0, ns: 0 };
  private readonly computeInfer: Duration = { count: 0, ns: 0 };
  private readonly computeOutput: Duration = { count: 0, ns: 0 };

  constructor(private readonly name: string, private readonly version: number) {}

  /** One `session.run` of `rows` rows: assembling its inputs, the run itself, splitting its outputs. */
  execution(rows: number, startedAt: number, runStart: number, runEnd: number, done: number): void {
    this.executionCount++;
    this.inferenceCount += rows;
    this.lastInference = Date.now();
    add(this.computeInput, runStart - startedAt);
    add(this.computeInfer, runEnd - runStart);
    add(this.computeOutput, done - runEnd);
  }

  /** A request answered: its time queued, and from enqueue to answer. */
  succeeded(queuedMs: number, totalMs: number): void {
    add(this.queue, queuedMs);
    add(this.success, totalMs);
  }

  /** A request refused or failed (Triton counts it; its duration is not kept). */
  failed(): void {
    this.fail.count++;
  }

  snapshot(): ModelStatistics {
    return {
      name: this.name, version: this.version, lastInference: this.lastInference,
      inferenceCount: this.inferenceCount, executionCount: this.executionCount,
      success: { ...this.success }, fail: { ...this.fail }, queue: { ...this.queue },
      computeInput: { ...this.computeInput }, computeInfer: { ...this.computeInfer }, computeOutput: { ...this.computeOutput },
    };
  }
}

function add(d: Duration, ms: number): void {
  d.count++;
  d.ns += ms * NS_PER_MS;
}
