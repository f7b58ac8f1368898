import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import * as ort from 'onnxruntime-node';
import { InvalidInputError } from '../errors.js';
import { calibrateRanges, type CalibrationMethod, type Feeds } from './calibrate.js';
import { loadSamples, splitHeldOut, subsample, type ImageOptions, type ModelInputSpec, type Sample } from './calibration-data.js';
import { convertFloat16 } from './convert-fp16.js';
import { compareOutputs, createSession, medianLatencies, runAll, type Accuracy, type RunOutputs } from './evaluate.js';
import { modelInputs, requireGraph } from './graph-analysis.js';
import { OpsetUpgradeError } from './opset-upgrade.js';
import { decodeModel, encodeModel, DataType, valueInfoShape, type ModelProto } from './onnx-graph.js';
import { cloneModel, prepareModel } from './prepare-graph.js';
import { equalizeCrossLayer } from './cross-layer-equalization.js';
import { calibrationTensors, planQuantization, quantizeInt8, type QuantizationPlan } from './quantize-int8.js';
import { REPORT_SUFFIX, sha256Hex, type CompressedVariant, type ModelReport, type VariantReport } from './variant-report.js';

/** Options of `edge-agent optimize MODEL.onnx --calibration DIR|FILE …`, already parsed. */
export interface OptimizeOptions {
  readonly model: string;
  /** Directory of images / .npy files, or one .npy file. */
  readonly calibration: string;
  /** Where the variants and report go; default: beside the model. */
  readonly out?: string;
  readonly formats?: readonly CompressedVariant[];
  /** Node names kept in float32 in the int8 variant. */
  readonly exclude?: readonly string[];
  /** Keep the layers that hurt most in float until the held-back validation passes the bound. */
  readonly autoExclude?: boolean;
  /** Activation range calibration; default 'percentile'. */
  readonly method?: CalibrationMethod;
  /** For 'percentile'; default 99.99. */
  readonly percentile?: number;
  /** Cross-layer equalization of Conv→Conv pairs before int8 quantization; default true. */
  readonly equalize?: boolean;
  /** Share of calibration sources put aside for the report; default 0.25. */
  readonly heldOutFraction?: number;
  /** Accuracy bound on output cosine; default 0.99. */
  readonly minCosine?: number;
  /** Bound on top-1 agreement for classifier outputs; default 0.99. */
  readonly minTop1?: number;
  readonly image?: ImageOptions;
  /** Cap on calibration samples (spread evenly over the set); default 64. */
  readonly maxCalibrationSamples?: number;
  /** Timed runs per variant for the median latency; default 50. */
  readonly latencyRuns?: number;
  /** Provider for accuracy and latency runs; default 'cpu'. */
  readonly provider?: string;
  readonly log?: (line: string) => void;
}

export interface OptimizeResult {
  readonly report: ModelReport;
  readonly reportFile: string;
  readonly files: readonly string[];
  /** The report as a printable table. */
  readonly table: string;
}

const ALL_FORMATS: readonly CompressedVariant[] = ['int8', 'fp16'];

function inputSpecs(model: ModelProto): ModelInputSpec[] {
  return modelInputs(requireGraph(model)).map((v) => {
    const { elemType, dims } = valueInfoShape(v);
    return { name: v.name ?? '', elemType, dims: dims ?? [] };
  });
}

function readOnnx(file: string): { bytes: Uint8Array; model: ModelProto } {
  if (!existsSync(file) || !statSync(file).isFile()) throw new InvalidInputError(`model file ${file} does not exist`);
  const bytes = readFileSync(file);
  try {
    return { bytes, model: decodeModel(bytes) };
  } catch (err) {
    throw new InvalidInputError(`${file} is not an ONNX model: ${(err as Error).message}`, { cause: err });
  }
}

function hasFloatWeights(model: ModelProto): boolean {
  return requireGraph(model).initializer.some((t) => t.dataType === DataType.FLOAT && (t.dims ?? []).length > 0);
}

export async function runOptimize(options: OptimizeOptions): Promise<OptimizeResult> {
  const log = options.log ?? (() => {});
  const formats = options.formats && options.formats.length > 0 ? [...new Set(options.formats)] : [...ALL_FORMATS];
  for (const f of formats) if (!ALL_FORMATS.includes(f)) throw new InvalidInputError(`unknown format '${f}'; use int8 and/or fp16`);
  const minCosine = options.minCosine ?? 0.99;
  const minTop1 = options.minTop1 ?? 0.99;
  const provider = options.provider ?? 'cpu';
  const modelFile = resolve(options.model);
  const { bytes: fp32Bytes, model: source } = readOnnx(modelFile);

  let prepared: ReturnType<typeof prepareModel>;
  try {
    prepared = prepareModel(source);
  } catch (err) {
    if (err instanceof OpsetUpgradeError) throw new InvalidInputError(`${modelFile}: ${err.message}`, { cause: err });
    throw err;
  }
  const model = prepared.model;
  if (!hasFloatWeights(model)) {
    throw new InvalidInputError(`${modelFile} has no float32 weights to compress (is it already quantized or half precision?)`);
  }
  const fullPlan = planQuantization(model, { exclude: options.exclude ?? [] });
  if (formats.includes('int8') && fullPlan.compute.length === 0 && fullPlan.excluded.length === 0) {
    throw new InvalidInputError(`${modelFile} has no Conv, MatMul or Gemm with float32 weights to quantize to int8`);
  }
  const known = new Set(requireGraph(model).node.map((n) => n.name));
  const unknown = (options.exclude ?? []).filter((n) => !known.has(n));
  if (unknown.length > 0) throw new InvalidInputError(`--exclude names no node of the model: ${unknown.join(', ')}`);

  const inputs = inputSpecs(model);
  const samples = await loadSamples(resolve(options.calibration), inputs, options.image ?? {});
  if (samples.length < 2) {
    throw new InvalidInputError(`calibration set ${options.calibration} has ${samples.length} sample; at least 2 are needed (calibration and held-out)`);
  }
  const split = splitHeldOut(samples, options.heldOutFraction ?? 0.25);
  const calibration = subsample(split.calibration, options.maxCalibrationSamples ?? 64);
  const sources = (s: readonly Sample[]): number => new Set(s.map((x) => x.source)).size;
  log(`samples: ${calibration.length} for calibration (${sources(split.calibration)} sources), ${split.heldOut.length} held out (${sources(split.heldOut)} sources)`);

  const fp32Session = await createSession(fp32Bytes, provider);
  const heldOutFeeds = split.heldOut.map((s) => s.feeds);
  const reference = await runAll(fp32Session, heldOutFeeds);

  const outDir = resolve(options.out ?? dirname(modelFile));
  mkdirSync(outDir, { recursive: true });
  const base = basename(modelFile).replace(/\.onnx$/i, '');
  const files: string[] = [];
  const variants: Partial<Record<CompressedVariant, VariantReport>> = {};
  const built: Partial<Record<CompressedVariant, { bytes: Uint8Array; session: ort.InferenceSession; accuracy: Accuracy; extra: Partial<VariantReport> }>> = {};
  const notes = [...prepared.notes];

  if (formats.includes('int8')) {
    const method = options.method ?? 'percentile';
    const int8Source = cloneModel(model);
    if (options.equalize ?? true) {
      const pairs = equalizeCrossLayer(int8Source);
      if (pairs > 0) notes.push(`int8: cross-layer equalization of ${pairs} Conv→Conv pairs`);
    }
    const tensors = calibrationTensors(int8Source);
    log(`int8: calibrating ${tensors.length} tensors on ${calibration.length} samples (${method})`);
    const ranges = await calibrateRanges(int8Source, tensors, calibration.map((s) => s.feeds), {
      method, ...(options.percentile !== undefined ? { percentile: options.percentile } : {}),
    });
    let plan = fullPlan;
    if (options.autoExclude) {
      const validation = subsample(calibration, 16).map((s) => s.feeds);
      plan = await autoExclude(int8Source, ranges, plan, validation, await runAll(fp32Session, validation), {
        provider, minCosine, minTop1, exclude: options.exclude ?? [], log,
      });
    }
    const q = quantizeInt8(int8Source, ranges, plan);
    const bytes = encodeModel(q.model);
    const session = await createSession(bytes, provider);
    const accuracy = compareOutputs(reference, await runAll(session, heldOutFeeds));
    built.int8 = {
      bytes, session, accuracy, extra: {
        layers: { quantized: [...plan.compute], flow: plan.flow.length, keptFloat: [...plan.excluded], absorbed: q.absorbed.length },
        calibration: {
          method, ...(method === 'percentile' ? { percentile: options.percentile ?? 99.99 } : {}),
          samples: calibration.length, sources: sources(split.calibration),
        },
      },
    };
  }
  if (formats.includes('fp16')) {
    const bytes = encodeModel(convertFloat16(model));
    const session = await createSession(bytes, provider);
    const accuracy = compareOutputs(reference, await runAll(session, heldOutFeeds));
    built.fp16 = { bytes, session, accuracy, extra: {} };
  }

  const sessions: Record<string, ort.InferenceSession> = { fp32: fp32Session };
  for (const [v, b] of Object.entries(built)) sessions[v] = b.session;
  const runs = options.latencyRuns ?? 50;
  const latency = await medianLatencies(sessions, heldOutFeeds[0]!, runs);
  for (const [v, b] of Object.entries(built) as [CompressedVariant, NonNullable<(typeof built)[CompressedVariant]>][]) {
    const file = `${base}.${v}.onnx`;
    writeFileSync(join(outDir, file), b.bytes);
    files.push(join(outDir, file));
    variants[v] = {
      variant: v, file, sha256: sha256Hex(b.bytes), sizeBytes: b.bytes.length, provider,
      accuracy: { ...b.accuracy, outputs: [...b.accuracy.outputs] },
      latencyMs: { fp32: latency.fp32!, variant: latency[v]!, speedup: latency.fp32! / latency[v]!, runs },
      passes: passesBound(b.accuracy, minCosine, minTop1),
      ...b.extra,
    };
  }
  for (const s of Object.values(sessions)) await s.release();

  const report: ModelReport = {
    formatVersion: 1,
    model: { file: basename(modelFile), sha256: sha256Hex(fp32Bytes), sizeBytes: fp32Bytes.length },
    createdAt: new Date().toISOString(),
    onnxruntime: ort.env.versions.node ?? ort.env.versions.common,
    minCosine,
    heldOut: { samples: split.heldOut.length, sources: sources(split.heldOut) },
    notes,
    variants,
  };
  const reportFile = join(outDir, `${base}${REPORT_SUFFIX}`);
  writeFileSync(reportFile, `${JSON.stringify(report, null, 2)}\n`);
  files.push(reportFile);
  return { report, reportFile, files, table: formatReportTable(report) };
}

function passesBound(a: Accuracy, minCosine: number, minTop1: number): boolean {
  return a.cosine >= minCosine && (a.top1Agreement === undefined || a.top1Agreement >= minTop1);
}

interface AutoExcludeOptions {
  readonly provider: string;
  readonly minCosine: number;
  readonly minTop1: number;
  readonly exclude: readonly string[];
  readonly log: (line: string) => void;
  /** Most layers it may keep in float before giving up; default: all. */
  readonly maxExcluded?: number;
}

/**
 * Keeps the layers whose quantization hurts most in float until the validation samples (calibration samples,
 * never the held-out ones) pass the bound. Damage is measured per layer by quantizing that layer alone; layers
 * are then excluded worst-first, one at a time at first and in growing steps later.
 */
export async function autoExclude(
  model: ModelProto,
  ranges: Parameters<typeof quantizeInt8>[1],
  plan: QuantizationPlan,
  validation: readonly Feeds[],
  reference: readonly RunOutputs[],
  options: AutoExcludeOptions,
): Promise<QuantizationPlan> {
  const evaluate = async (p: QuantizationPlan): Promise<Accuracy> => {
    const session = await createSession(encodeModel(quantizeInt8(model, ranges, p).model), options.provider);
    try {
      return compareOutputs(reference, await runAll(session, validation));
    } finally {
      await session.release();
    }
  };
  const describe = (a: Accuracy): string => `cosine ${a.cosine.toFixed(4)}${a.top1Agreement !== undefined ? `, top-1 ${(a.top1Agreement * 100).toFixed(1)}%` : ''}`;
  const full = await evaluate(plan);
  options.log(`auto-exclude: all layers int8 → ${describe(full)}`);
  if (passesBound(full, options.minCosine, options.minTop1)) return plan;

  const candidates = [...plan.compute, ...plan.flow];
  const damage: { name: string; score: number }[] = [];
  const sensitivityRefs = reference.slice(0, 8);
  const sensitivityFeeds = validation.slice(0, 8);
  for (const name of candidates) {
    const session = await createSession(encodeModel(quantizeInt8(model, ranges, planQuantization(model, { only: [name] })).model), options.provider);
    try {
      const a = compareOutputs(sensitivityRefs, await runAll(session, sensitivityFeeds));
      damage.push({ name, score: (1 - a.cosine) + (a.top1Agreement !== undefined ? 1 - a.top1Agreement : 0) });
    } finally {
      await session.release();
    }
  }
  damage.sort((a, b) => b.score - a.score);
  const max = Math.min(options.maxExcluded ?? candidates.length, candidates.length);
  let k = 0;
  let current = plan;
  while (k < max) {
    k = k < 8 ? k + 1 : Math.min(max, Math.ceil(k * 1.5));
    const excluded = [...options.exclude, ...damage.slice(0, k).map((d) => d.name)];
    current = planQuantization(model, { exclude: excluded });
    const a = await evaluate(current);
    options.log(`auto-exclude: ${k} layer(s) in float (${damage.slice(0, k).map((d) => d.name).slice(-3).join(', ')}…) → ${describe(a)}`);
    if (passesBound(a, options.minCosine, options.minTop1)) return current;
  }
  options.log('auto-exclude: the bound was not reached; keeping the last plan');
  return current;
}

export function formatReportTable(report: ModelReport): string {
  const rows: string[][] = [['variant', 'size', 'latency ms', 'speedup', 'cosine', 'min cosine', 'max abs err', 'top-1', 'passes']];
  const mb = (n: number): string => `${(n / 1e6).toFixed(2)} MB`;
  const first = Object.values(report.variants)[0];
  rows.push(['fp32', mb(report.model.sizeBytes), first ? first.latencyMs.fp32.toFixed(3) : '-', '1.00x', '1', '1', '0', '-', '-']);
  for (const r of Object.values(report.variants)) {
    if (!r) continue;
    rows.push([
      r.variant, mb(r.sizeBytes), r.latencyMs.variant.toFixed(3), `${r.latencyMs.speedup.toFixed(2)}x`,
      r.accuracy.cosine.toFixed(5), r.accuracy.minSampleCosine.toFixed(5), r.accuracy.maxAbsError.toPrecision(3),
      r.accuracy.top1Agreement !== undefined ? `${(r.accuracy.top1Agreement * 100).toFixed(1)}%` : '-', r.passes ? 'yes' : 'NO',
    ]);
  }
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  const lines = rows.map((r) => r.map((cell, c) => cell.padEnd(widths[c]!)).join('  ').trimEnd());
  lines.splice(1, 0, widths.map((w) => '-'.repeat(w)).join('  '));
  const provider = first?.provider ?? 'cpu';
  lines.push(`held-out: ${report.heldOut.samples} samples from ${report.heldOut.sources} sources; latency: median of ${first?.latencyMs.runs ?? 0} runs on ${provider}; bound: cosine ≥ ${report.minCosine}`);
  const kept = report.variants.int8?.layers?.keptFloat ?? [];
  if (kept.length > 0) lines.push(`int8 layers kept in float: ${kept.join(', ')}`);
  return lines.join('\n');
}
