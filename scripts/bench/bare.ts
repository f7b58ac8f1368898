import { performance } from 'node:perf_hooks';
import * as ort from 'onnxruntime-node';
import { allocate, type Tensor, type TensorData } from '../../agent/runtime/index.js';
import { relativeDiff, round1, type LatencySummary } from './stats.js';
import type { Workload } from './workloads.js';

export type BenchProvider = 'cpu' | 'webgpu' | 'cuda';

/** Outputs by name, as plain arrays (what the JSON carries and the comparisons read). */
export type Outputs = Record<string, { dims: number[]; data: number[] }>;

export function plainOutputs(out: Readonly<Record<string, { dims: readonly number[]; data: unknown }>>): Outputs {
  const r: Outputs = {};
  for (const [name, t] of Object.entries(out)) r[name] = { dims: [...t.dims], data: Array.from(t.data as ArrayLike<number | bigint>, Number) };
  return r;
}

/** The session the `bare` rows use: what the agent builds, minus the agent (same optimisation level, threads). */
export async function openBareSession(file: string, provider: BenchProvider): Promise<ort.InferenceSession> {
  try {
    return await ort.InferenceSession.create(file, {
      executionProviders: [provider === 'cpu' ? 'cpu' : ({ name: provider } as ort.InferenceSession.ExecutionProviderConfig)],
      graphOptimizationLevel: 'all',
      logSeverityLevel: 3,
    });
  } catch (err) {
    throw new Error(`onnxruntime cannot open ${file} with the ${provider} execution provider: ${(err as Error).message.split('\n')[0]}`);
  }
}

function repeat(t: Tensor, rows: number): ort.Tensor {
  const one = t.data;
  const data = allocate(t.dtype, one.length * rows);
  for (let r = 0; r < rows; r++) (data as unknown as { set(a: ArrayLike<unknown>, o: number): void }).set(one as unknown as ArrayLike<unknown>, r * one.length);
  return new ort.Tensor(t.dtype, data as ort.Tensor.DataType, [rows, ...t.shape.slice(1)]);
}

/** Feeds for `rows` copies of the workload's frame (state: zeros, streams stacked on its batch axis). */
export function bareFeeds(w: Workload, rows: number, state?: Readonly<Record<string, TensorData>>): Record<string, ort.Tensor> {
  const feeds: Record<string, ort.Tensor> = {};
  for (const [name, t] of Object.entries(w.inputs)) {
    feeds[name] = w.unbatchedInputs.includes(name) || rows === 1 ? new ort.Tensor(t.dtype, t.data as ort.Tensor.DataType, [...t.shape]) : repeat(t, rows);
  }
  for (const s of w.state) {
    const shape = s.shape.map((d, i) => (i === s.batchAxis ? rows : d));
    const data = state?.[s.input] ?? allocate(s.dtype, shape.reduce((a, b) => a * b, 1));
    feeds[s.input] = new ort.Tensor(s.dtype, data as ort.Tensor.DataType, shape);
  }
  return feeds;
}

/**
 * What the agent must answer for the workload's frame sent `steps` times on one fresh stream: the same output
 * each step for a stateless model, the state-carrying sequence for a stateful one.
 */
export async function referenceSequence(session: ort.InferenceSession, w: Workload, steps: number): Promise<Outputs[]> {
  const out: Outputs[] = [];
  let state: Record<string, TensorData> | undefined;
  for (let i = 0; i < steps; i++) {
    const r = await session.run(bareFeeds(w, 1, state));
    const visible: Record<string, ort.Tensor> = {};
    for (const [name, t] of Object.entries(r)) if (!w.state.some((s) => s.output === name)) visible[name] = t;
    out.push(plainOutputs(visible));
    if (w.state.length > 0) {
      state = {};
      for (const s of w.state) state[s.input] = (r[s.output] as ort.Tensor).data as TensorData;
    }
  }
  return out;
}

export interface BareResult {
  /** Batch-1 latency, pooled over the latency rounds (p50: median of the rounds'). */
  readonly b1: LatencySummary;
  /** Frames/s back to back at batch 1 and batch 8 (median over the throughput rounds); undefined: not measured,
   * or the model has a fixed batch of 1. */
  readonly b1_fps: number | undefined;
  readonly b8_fps: number | undefined;
}

/** Whether the model runs at batch 8 (a fixed batch dimension refuses it). */
export async function runsAtBatch8(session: ort.InferenceSession, w: Workload): Promise<boolean> {
  if (!w.batchable && w.state.length === 0) return false;
  try {
    await session.run(bareFeeds(w, 8));
    return true;
  } catch {
    return false;
  }
}

/** Time from nothing to the first result in this process (for scale next to the agent's cold start). */
export async function bareFirstResultMs(file: string, w: Workload, provider: BenchProvider): Promise<number> {
  const t0 = performance.now();
  const s = await openBareSession(file, provider);
  await s.run(bareFeeds(w, 1));
  const ms = performance.now() - t0;
  await s.release();
  return round1(ms);
}

/** Outputs equal bare's when no element differs by more than this, relative to the tensor's largest magnitude. */
export const EQUAL_REL = 1e-5;

/** The largest relative difference between two output sequences (every tensor of every step). */
export function outputsDiff(actual: readonly Outputs[], reference: readonly Outputs[]): number {
  if (actual.length === 0 || actual.length > reference.length) return Number.POSITIVE_INFINITY;
  let worst = 0;
  actual.forEach((step, i) => {
    const ref = reference[i] as Outputs;
    for (const [name, r] of Object.entries(ref)) {
      const a = step[name];
      worst = Math.max(worst, a && a.dims.join() === r.dims.join() ? relativeDiff(a.data, r.data) : Number.POSITIVE_INFINITY);
    }
  });
  return worst;
}

