import * as ort from 'onnxruntime-node';
import { requireGraph } from './graph-analysis.js';
import { cloneModel } from './prepare-graph.js';
import { DataType, encodeModel, valueInfo, type ModelProto } from './onnx-graph.js';

/** One set of model inputs, by name. */
export type Feeds = Record<string, ort.Tensor>;

export interface TensorRange {
  readonly min: number;
  readonly max: number;
}

export type CalibrationMethod = 'minmax' | 'percentile' | 'mse';

export interface CalibrationOptions {
  readonly method?: CalibrationMethod;
  /**
   * For 'percentile': the share of values (in %) kept inside the range on each side; default 99.99.
   * 'mse' picks, per tensor, the clipping range with the least expected uint8 quantization error instead.
   */
  readonly percentile?: number;
  /** Histogram resolution for 'percentile'; default 2048 bins. */
  readonly bins?: number;
}

/**
 * A copy of the model whose graph outputs also expose the given intermediate float tensors, so one
 * onnxruntime run yields every activation that needs a range.
 */
export function exposeTensors(model: ModelProto, tensors: readonly string[]): ModelProto {
  const copy = cloneModel(model);
  const graph = requireGraph(copy);
  const existing = new Set(graph.output.map((o) => o.name));
  for (const name of tensors) if (!existing.has(name)) graph.output.push(valueInfo(name, DataType.FLOAT));
  return copy;
}

/**
 * Per-tensor value ranges of `tensors` over the calibration samples, read by running the model with those
 * tensors exposed as outputs. 'minmax' keeps the extremes; 'percentile' clips each tail at the given
 * percentile of a histogram built in a second pass over the samples (so one outlier does not stretch the
 * scale of a whole layer).
 */
export async function calibrateRanges(
  model: ModelProto,
  tensors: readonly string[],
  samples: readonly Feeds[],
  options: CalibrationOptions = {},
): Promise<Map<string, TensorRange>> {
  if (samples.length === 0) throw new RangeError('calibration needs at least one sample');
  const ranges = new Map<string, { min: number; max: number }>();
  if (tensors.length === 0) return ranges;
  // Graph inputs cannot be fetched as outputs; their values are the feeds themselves.
  const inputs = new Set(requireGraph(model).input.map((i) => i.name));
  const fetched = tensors.filter((t) => !inputs.has(t));
  const session = await ort.InferenceSession.create(encodeModel(exposeTensors(model, fetched)), { logSeverityLevel: 3 });
  const run = async (feeds: Feeds): Promise<Record<string, Float32Array>> => {
    const out = fetched.length > 0 ? await session.run(feeds, fetched) : {};
    const values: Record<string, Float32Array> = {};
    for (const name of tensors) {
      const t = inputs.has(name) ? feeds[name] : out[name];
      if (!t || t.type !== 'float32') throw new TypeError(`calibration tensor '${name}' is not float32`);
      values[name] = t.data as Float32Array;
    }
    return values;
  };
  try {
    for (const feeds of samples) {
      const out = await run(feeds);
      for (const name of tensors) {
        const data = out[name]!;
        const r = ranges.get(name) ?? { min: Infinity, max: -Infinity };
        for (let i = 0; i < data.length; i++) {
          const v = data[i]!;
          if (v < r.min) r.min = v;
          if (v > r.max) r.max = v;
        }
        ranges.set(name, r);
      }
    }
    if ((options.method ?? 'minmax') === 'minmax') return ranges;

    const bins = options.bins ?? 2048;
    const keep = (options.percentile ?? 99.99) / 100;
    const histograms = new Map<string, Float64Array>();
    for (const name of tensors) histograms.set(name, new Float64Array(bins));
    for (const feeds of samples) {
      const out = await run(feeds);
      for (const name of tensors) {
        const { min, max } = ranges.get(name)!;
        const h = histograms.get(name)!;
        const width = (max - min) / bins;
        const data = out[name]!;
        if (width <= 0) { h[0]! += data.length; continue; }
        for (let i = 0; i < data.length; i++) {
          const b = Math.min(bins - 1, Math.floor((data[i]! - min) / width));
          h[b]! += 1;
        }
      }
    }
    const clipped = new Map<string, TensorRange>();
    for (const name of tensors) {
      const { min, max } = ranges.get(name)!;
      clipped.set(name, options.method === 'mse'
        ? mseRange(histograms.get(name)!, min, max)
        : percentileRange(histograms.get(name)!, min, max, keep));
    }
    return clipped;
  } finally {
    await session.release();
  }
}

/** The [low, high] range holding `keep` of the histogram's mass on each side (bin edges, conservative). */
export function percentileRange(histogram: Float64Array, min: number, max: number, keep: number): TensorRange {
  const total = histogram.reduce((a, b) => a + b, 0);
  if (total === 0 || max <= min) return { min, max };
  const tail = total * (1 - keep);
  const width = (max - min) / histogram.length;
  let acc = 0;
  let lo = 0;
  while (lo < histogram.length - 1 && acc + histogram[lo]! <= tail) acc += histogram[lo++]!;
  acc = 0;
  let hi = histogram.length - 1;
  while (hi > lo && acc + histogram[hi]! <= tail) acc += histogram[hi--]!;
  return { min: min + lo * width, max: min + (hi + 1) * width };
}

/**
 * The uint8 range [lo, hi] (always holding 0) that minimises the histogram's expected squared error: values
 * outside are clipped (error = distance to the bound), values inside are rounded (error Δ²/12, Δ = (hi−lo)/255).
 * Coordinate descent over a grid of candidate bounds, two rounds for each side.
 */
export function mseRange(histogram: Float64Array, min: number, max: number, levels = 255, candidates = 96): TensorRange {
  const bins = histogram.length;
  if (!(max > min)) return { min, max };
  const width = (max - min) / bins;
  const centre = (b: number): number => min + (b + 0.5) * width;
  const error = (lo: number, hi: number): number => {
    const step = (hi - lo) / levels;
    const inside = (step * step) / 12;
    let e = 0;
    for (let b = 0; b < bins; b++) {
      const n = histogram[b]!;
      if (n === 0) continue;
      const v = centre(b);
      e += n * (v < lo ? (lo - v) ** 2 : v > hi ? (v - hi) ** 2 : inside);
    }
    return e;
  };
  let lo = Math.min(0, min), hi = Math.max(0, max);
  for (let round = 0; round < 2; round++) {
    if (max > 0) {
      let best = hi, bestErr = Infinity;
      for (let i = 1; i <= candidates; i++) {
        const h = (max * i) / candidates;
        const e = error(lo, h);
        if (e < bestErr) { bestErr = e; best = h; }
      }
      hi = best;
    }
    if (min < 0) {
      let best = lo, bestErr = Infinity;
      for (let i = 1; i <= candidates; i++) {
        const l = (min * i) / candidates;
        const e = error(l, hi);
        if (e < bestErr) { bestErr = e; best = l; }
      }
      lo = best;
    }
  }
  return { min: lo, max: hi };
}
