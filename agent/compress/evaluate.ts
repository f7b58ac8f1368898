import * as ort from 'onnxruntime-node';
import type { Feeds } from './calibrate.js';
import { float16BitsToFloat32 } from './onnx-graph.js';

/** Accuracy and speed of a variant against the fp32 model, measured on held-out inputs. */

export interface OutputAccuracy {
  readonly name: string;
  /**
   * Cosine similarity between fp32 and variant outputs over all samples taken together (one long vector), so
   * each sample weighs by its output's energy. A per-sample mean would not do: where the model finds nothing
   * (a probability map of ~1e-7 on a crop without text, no face in the frame) both outputs are rounding noise,
   * their cosine is arbitrary, and even a bit-exact re-export of the fp32 graph scored 0.93 on such inputs.
   */
  readonly cosine: number;
  /** Worst single sample's cosine similarity. */
  readonly minCosine: number;
  readonly maxAbsError: number;
  /** Share of rows whose argmax matches fp32 (rank-2 [N, classes] outputs only). */
  readonly top1Agreement?: number;
}

export interface Accuracy {
  readonly samples: number;
  /** The worst output's cosine (over all samples): the figure the accuracy bound is checked against. */
  readonly cosine: number;
  readonly minSampleCosine: number;
  readonly maxAbsError: number;
  readonly top1Agreement?: number;
  readonly outputs: readonly OutputAccuracy[];
}

export interface OutputValues {
  readonly dims: readonly number[];
  readonly data: Float32Array;
}

export type RunOutputs = Readonly<Record<string, OutputValues>>;

export function toFloat32(t: ort.Tensor): Float32Array {
  const d = t.data;
  if (d instanceof Float32Array) return d;
  if (t.type === 'float16' && d instanceof Uint16Array) return Float32Array.from(d, float16BitsToFloat32);
  if (d instanceof BigInt64Array || d instanceof BigUint64Array) return Float32Array.from(d, (v) => Number(v));
  if (typeof d === 'string' || Array.isArray(d)) throw new TypeError(`output of type ${t.type} cannot be compared numerically`);
  return Float32Array.from(d as ArrayLike<number>);
}

export async function createSession(model: Uint8Array, provider = 'cpu'): Promise<ort.InferenceSession> {
  return ort.InferenceSession.create(model, {
    executionProviders: [provider as 'cpu'],
    logSeverityLevel: 3,
  });
}

export async function runAll(session: ort.InferenceSession, samples: readonly Feeds[]): Promise<RunOutputs[]> {
  const all: RunOutputs[] = [];
  for (const feeds of samples) {
    // The error comes back in the rejection; onnxruntime's own log line would only print it twice.
    const out = await session.run(feeds, { logSeverityLevel: 4 });
    const values: Record<string, OutputValues> = {};
    for (const name of session.outputNames) values[name] = { dims: [...out[name]!.dims], data: toFloat32(out[name]!) };
    all.push(values);
  }
  return all;
}

export function cosineSimilarity(a: Float32Array, b: Float32Array): number {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!, y = b[i]!;
    dot += x * y; na += x * x; nb += y * y;
  }
  return cosineFromSums(dot, na, nb);
}

function cosineFromSums(dot: number, na: number, nb: number): number {
  if (na === 0 && nb === 0) return 1;
  if (na === 0 || nb === 0) return 0;
  const c = dot / Math.sqrt(na * nb);
  return Number.isFinite(c) ? c : 0;
}

function argmaxRows(v: OutputValues): number[] {
  const rows = v.dims[0] ?? 1;
  const cols = v.data.length / rows;
  const out: number[] = [];
  for (let r = 0; r < rows; r++) {
    let best = 0;
    for (let c = 1; c < cols; c++) if (v.data[r * cols + c]! > v.data[r * cols + best]!) best = c;
    out.push(best);
  }
  return out;
}

/** Whether an output looks like class scores: rank 2, [N, classes ≥ 2]. */
export function isClassScores(dims: readonly number[]): boolean {
  return dims.length === 2 && (dims[1] ?? 0) >= 2;
}

export function compareOutputs(reference: readonly RunOutputs[], variant: readonly RunOutputs[]): Accuracy {
  if (reference.length === 0 || reference.length !== variant.length) {
    throw new RangeError(`cannot compare ${variant.length} variant runs with ${reference.length} reference runs`);
  }
  const names = Object.keys(reference[0]!);
  const outputs: OutputAccuracy[] = names.map((name) => {
    let dot = 0, refNorm = 0, varNorm = 0, min = 1, maxAbs = 0, agree = 0, rows = 0;
    let classes = true;
    reference.forEach((ref, i) => {
      const r = ref[name]!;
      const v = variant[i]![name];
      if (!v || v.data.length !== r.data.length) {
        throw new RangeError(`output '${name}': variant has ${v?.data.length ?? 0} values, fp32 has ${r.data.length}`);
      }
      min = Math.min(min, cosineSimilarity(r.data, v.data));
      for (let k = 0; k < r.data.length; k++) {
        const x = r.data[k]!, y = v.data[k]!;
        dot += x * y; refNorm += x * x; varNorm += y * y;
      }
      for (let k = 0; k < r.data.length; k++) {
        const e = Math.abs(r.data[k]! - v.data[k]!);
        if (e > maxAbs || Number.isNaN(e)) maxAbs = Number.isNaN(e) ? Infinity : e;
      }
      classes &&= isClassScores(r.dims);
      if (classes) {
        const a = argmaxRows(r), b = argmaxRows(v);
        a.forEach((x, j) => { if (x === b[j]) agree++; });
        rows += a.length;
      }
    });
    return {
      name, cosine: cosineFromSums(dot, refNorm, varNorm), minCosine: min, maxAbsError: maxAbs,
      ...(classes && rows > 0 ? { top1Agreement: agree / rows } : {}),
    };
  });
  const top1 = outputs.filter((o) => o.top1Agreement !== undefined).map((o) => o.top1Agreement!);
  return {
    samples: reference.length,
    cosine: Math.min(...outputs.map((o) => o.cosine)),
    minSampleCosine: Math.min(...outputs.map((o) => o.minCosine)),
    maxAbsError: Math.max(...outputs.map((o) => o.maxAbsError)),
    ...(top1.length > 0 ? { top1Agreement: Math.min(...top1) } : {}),
    outputs,
  };
}

/**
 * Median latency (ms) of one `run` per session on the same feeds. Sessions take turns in blocks of runs, so a
 * neighbour's load spike hits every variant alike; within a block only one session works, because each
 * session's idle thread pool spins for a while after a run and would steal the cores of a run interleaved
 * right behind it.
 */
export async function medianLatencies(
  sessions: Readonly<Record<string, ort.InferenceSession>>,
  feeds: Feeds,
  runs = 50,
  rounds = 5,
): Promise<Record<string, number>> {
  const names = Object.keys(sessions);
  const times: Record<string, number[]> = Object.fromEntries(names.map((n) => [n, []]));
  const perBlock = Math.max(1, Math.ceil(runs / rounds));
  for (let r = 0; r < rounds; r++) {
    for (const n of names) {
      const s = sessions[n]!;
      for (let i = 0; i < 3; i++) await s.run(feeds);
      for (let i = 0; i < perBlock && times[n]!.length < runs; i++) {
        const t0 = performance.now();
        await s.run(feeds);
        times[n]!.push(performance.now() - t0);
      }
    }
  }
  return Object.fromEntries(names.map((n) => [n, median(times[n]!)]));
}

export function median(values: readonly number[]): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
