import { accessSync, constants as fsConstants, existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import * as ort from 'onnxruntime-node';
import { InvalidInputError } from '../errors.js';
import { writeFileDurably } from '../store/index.js';
import { calibrateRanges, type CalibrationMethod, type Feeds } from './calibrate.js';
import {
  imageLayout, imageNormalization, imageSize, loadSamples, splitHeldOut, subsample, type ImageOptions, type ModelInputSpec, type Sample,
} from './calibration-data.js';
import { convertFloat16 } from './convert-fp16.js';
import { checkFloat16Range } from './fp16-range.js';
import { compareOutputs, createSession, medianLatencies, runAll, type Accuracy, type RunOutputs } from './evaluate.js';
import { modelInputs, requireGraph, subgraphsOf } from './graph-analysis.js';
import { OpsetUpgradeError } from './opset-upgrade.js';
import { decodeModel, encodeModel, DataType, valueInfoShape, type IGraphProto, type ModelProto } from './onnx-graph.js';
import { cloneModel, prepareModel } from './prepare-graph.js';
import { equalizeCrossLayer } from './cross-layer-equalization.js';
import { calibrationTensors, planQuantization, quantizeInt8, type QuantizationPlan } from './quantize-int8.js';
import {
  parseReport, REPORT_SUFFIX, sha256Hex, stringifyReport, variantFileMismatch, type CompressedVariant, type ModelReport, type VariantReport,
} from './variant-report.js';

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
/** A sample's source when it was read from an image (npy rows carry '#row' or end in .npy). */
const IMAGE_SOURCE = /\.(png|jpe?g|ppm|pgm|pnm)$/i;

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
    const message = (err as Error).message;
    throw new InvalidInputError(`${file} is ${message.startsWith('not an ONNX model') ? message : `not an ONNX model: ${message}`}`, { cause: err });
  }
}

function hasFloatWeights(model: ModelProto): boolean {
  return requireGraph(model).initializer.some((t) => t.dataType === DataType.FLOAT && (t.dims ?? []).length > 0);
}

/** Why a model has no float32 weight initializers to compress: where its weights are instead. */
function noWeightsReason(file: string, model: ModelProto): string {
  const graph = requireGraph(model);
  const inSubgraphs: string[] = [];
  let subgraphFloats = 0;
  const visit = (g: IGraphProto, owner: string): void => {
    for (const n of g.node ?? []) {
      if (owner && n.opType === 'Constant') subgraphFloats++;
      for (const sub of subgraphsOf(n)) {
        const here = `${n.opType} ${n.name || '?'}`;
        subgraphFloats += (sub.initializer ?? []).filter((t) => t.dataType === DataType.FLOAT && (t.dims ?? []).length > 0).length;
        if (!inSubgraphs.includes(here)) inSubgraphs.push(here);
        visit(sub, here);
      }
    }
  };
  visit(graph, '');
  if (subgraphFloats > 0) {
    return `${file} has no float32 weights in its main graph to compress: its ${subgraphFloats} constant(s) sit inside the subgraphs of ${inSubgraphs.slice(0, 3).join(', ')}${inSubgraphs.length > 3 ? ', …' : ''}, which optimize does not rewrite`;
  }
  const types = new Set(graph.initializer.map((t) => t.dataType));
  const quantized = types.has(DataType.INT8) || types.has(DataType.UINT8) || graph.node.some((n) => /^(QuantizeLinear|DequantizeLinear|QLinear|DynamicQuantize|MatMulInteger|ConvInteger)/.test(n.opType ?? ''));
  if (quantized) return `${file} has no float32 weights to compress: it is already quantized (int8/uint8 weights or Quantize/DequantizeLinear nodes)`;
  if (types.has(DataType.FLOAT16)) return `${file} has no float32 weights to compress: its weights are already half precision`;
  return `${file} has no float32 weights to compress: no float32 initializer of rank ≥ 1 (weights fed as graph inputs or computed at run time are not compressed)`;
}

/** Refuses option values that would make every measurement meaningless (NaN bounds, NaN inputs). */
function validateOptions(options: OptimizeOptions): void {
  const inRange = (name: string, v: number | undefined, ok: (x: number) => boolean, what: string): void => {
    if (v !== undefined && !(typeof v === 'number' && ok(v))) throw new InvalidInputError(`${name} must be ${what}, got ${String(v)}`);
  };
  inRange('minCosine (--min-cosine)', options.minCosine, (x) => x > 0 && x <= 1, 'a number in (0, 1]');
  inRange('minTop1', options.minTop1, (x) => x >= 0 && x <= 1, 'a number in [0, 1]');
  inRange('percentile', options.percentile, (x) => x > 0 && x <= 100, 'a number in (0, 100]');
  inRange('heldOutFraction', options.heldOutFraction, (x) => x > 0 && x < 1, 'a number in (0, 1)');
  inRange('maxCalibrationSamples', options.maxCalibrationSamples, (x) => Number.isInteger(x) && x >= 1, 'a whole number ≥ 1');
  inRange('latencyRuns', options.latencyRuns, (x) => Number.isInteger(x) && x >= 1, 'a whole number ≥ 1');
  inRange('image crops', options.image?.crops, (x) => Number.isInteger(x) && x >= 0, 'a whole number ≥ 0');
  const methods: readonly CalibrationMethod[] = ['percentile', 'minmax', 'mse'];
  if (options.method !== undefined && !methods.includes(options.method)) {
    throw new InvalidInputError(`calibration method '${String(options.method)}' is not one of ${methods.join(', ')}`);
  }
  imageNormalization(options.image?.normalize);
  imageSize(options.image?.size);
}

/** The output folder, created and writable, checked before any calibration or timing work is spent. */
function writableOutDir(outDir: string): void {
  try {
    mkdirSync(outDir, { recursive: true });
    if (!statSync(outDir).isDirectory()) throw new Error('not a directory');
    accessSync(outDir, fsConstants.W_OK);
  } catch (err) {
    throw new InvalidInputError(`output folder ${outDir} is not a writable directory (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, { cause: err });
  }
}

/**
 * Entries of the report already in `reportFile` worth keeping on a run that rebuilds only some formats: those
 * written for the same fp32 model whose variant file is still the one they measured.
 */
function previousEntries(reportFile: string, outDir: string, modelSha: string, rebuilt: readonly CompressedVariant[], log: (line: string) => void): {
  entries: Partial<Record<CompressedVariant, VariantReport>>; notes: string[];
} {
  const entries: Partial<Record<CompressedVariant, VariantReport>> = {};
  const notes: string[] = [];
  if (!existsSync(reportFile) || ALL_FORMATS.every((f) => rebuilt.includes(f))) return { entries, notes };
  let previous: ReturnType<typeof parseReport>;
  try {
    previous = parseReport(readFileSync(reportFile, 'utf8'));
  } catch (err) {
    log(`previous report ${reportFile} not kept: ${(err as Error).message}`);
    return { entries, notes };
  }
  if (previous.report.model.sha256 !== modelSha) {
    log(`previous report ${reportFile} not kept: it was written for another fp32 model`);
    return { entries, notes };
  }
  for (const v of ALL_FORMATS) {
    if (rebuilt.includes(v)) continue;
    const entry = previous.report.variants[v];
    if (!entry) continue;
    const why = variantFileMismatch(outDir, entry);
    if (why) { log(`previous ${v} entry not kept: ${why}`); continue; }
    entries[v] = { ...entry, measuredAt: entry.measuredAt ?? previous.report.createdAt };
    notes.push(`${v}: entry kept from the report of ${entries[v].measuredAt} (${entry.file} unchanged)`);
  }
  for (const m of previous.invalid) log(`previous report: ${m}`);
  return { entries, notes };
}

export async function runOptimize(options: OptimizeOptions): Promise<OptimizeResult> {
  const log = options.log ?? (() => {});
  const formats = options.formats && options.formats.length > 0 ? [...new Set(options.formats)] : [...ALL_FORMATS];
  for (const f of formats) if (!ALL_FORMATS.includes(f)) throw new InvalidInputError(`unknown format '${f}'; use int8 and/or fp16`);
  validateOptions(options);
  const minCosine = options.minCosine ?? 0.99;
  const minTop1 = options.minTop1 ?? 0.99;
  const provider = options.provider ?? 'cpu';
  const modelFile = resolve(options.model);
  const { bytes: fp32Bytes, model: source } = readOnnx(modelFile);
  const outDir = resolve(options.out ?? dirname(modelFile));
  writableOutDir(outDir);

  let prepared: ReturnType<typeof prepareModel>;
  try {
    // Only int8 needs opset ≥ 13 (per-channel QDQ); an fp16-only run leaves the opset as it is.
    prepared = prepareModel(source, { upgradeOpset: formats.includes('int8') });
  } catch (err) {
    if (err instanceof OpsetUpgradeError) {
      const hint = formats.includes('fp16') ? '; int8 needs opset 13 — --formats fp16 does not upgrade' : '';
      throw new InvalidInputError(`${modelFile}: ${err.message}${hint}`, { cause: err });
    }
    throw err;
  }
  const model = prepared.model;
  if (!hasFloatWeights(model)) throw new InvalidInputError(noWeightsReason(modelFile, model));
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

  let fp32Session: ort.InferenceSession;
  try {
    fp32Session = await createSession(fp32Bytes, provider);
  } catch (err) {
    throw new InvalidInputError(`onnxruntime cannot load ${modelFile} on ${provider}: ${(err as Error).message}`, { cause: err });
  }
  const heldOutFeeds = split.heldOut.map((s) => s.feeds);
  let reference: RunOutputs[];
  try {
    reference = await runAll(fp32Session, heldOutFeeds);
  } catch (err) {
    await fp32Session.release();
    throw new InvalidInputError(`${modelFile} fails on the calibration inputs (${describeFeeds(heldOutFeeds[0] ?? {})})${samples.some((x) => IMAGE_SOURCE.test(x.source)) ? imageSizeHint(inputs, options) : ''}: ${(err as Error).message}`, { cause: err });
  }

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
    const session = await variantSession('int8', bytes, provider);
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
    let range: Awaited<ReturnType<typeof checkFloat16Range>>;
    try {
      range = await checkFloat16Range(model, [...calibration, ...split.heldOut].map((s) => s.feeds));
    } catch (err) {
      throw new Error(`fp16: the range check could not read the model's float tensors, so no fp16 variant is certified (try --formats int8): ${(err as Error).message}`, { cause: err });
    }
    const kept = range.check.keptFloat32;
    log(`fp16: range check on ${range.check.samples} samples: ${kept.length === 0
      ? `every tensor within ±${range.check.limit} (largest ${range.check.maxAbsInFloat16.toPrecision(3)})`
      : `${kept.length} tensor(s) beyond ±${range.check.limit} kept in float32: ${kept.slice(0, 5).map((k) => `${k.tensor} (${k.maxAbs.toPrecision(3)})`).join(', ')}${kept.length > 5 ? ', …' : ''}`}`);
    const bytes = encodeModel(convertFloat16(model, { keepFloat32: range.keepNodes }));
    const session = await variantSession('fp16', bytes, provider);
    const accuracy = compareOutputs(reference, await runAll(session, heldOutFeeds));
    built.fp16 = { bytes, session, accuracy, extra: { fp16Range: { ...range.check, keptFloat32: kept.map((k) => ({ ...k, nodes: [...k.nodes] })) } } };
  }

  const sessions: Record<string, ort.InferenceSession> = { fp32: fp32Session };
  for (const [v, b] of Object.entries(built)) sessions[v] = b.session;
  const runs = options.latencyRuns ?? 50;
  const latency = await medianLatencies(sessions, heldOutFeeds[0]!, runs);
  const createdAt = new Date().toISOString();
  const reportFile = join(outDir, `${base}${REPORT_SUFFIX}`);
  const modelSha = sha256Hex(fp32Bytes);
  const previous = previousEntries(reportFile, outDir, modelSha, formats, log);
  Object.assign(variants, previous.entries);
  notes.push(...previous.notes);
  for (const [v, b] of Object.entries(built) as [CompressedVariant, NonNullable<(typeof built)[CompressedVariant]>][]) {
    const file = `${base}.${v}.onnx`;
    await writeFileDurably(join(outDir, file), b.bytes);
    files.push(join(outDir, file));
    variants[v] = {
      variant: v, file, sha256: sha256Hex(b.bytes), sizeBytes: b.bytes.length, provider,
      accuracy: { ...b.accuracy, outputs: [...b.accuracy.outputs] },
      latencyMs: { fp32: latency.fp32!, variant: latency[v]!, speedup: latency.fp32! / latency[v]!, runs },
      passes: passesBound(b.accuracy, minCosine, minTop1),
      ...b.extra,
      measuredAt: createdAt,
    };
  }
  for (const s of Object.values(sessions)) await s.release();

  const report: ModelReport = {
    formatVersion: 1,
    model: { file: basename(modelFile), sha256: modelSha, sizeBytes: fp32Bytes.length },
    createdAt,
    onnxruntime: ort.env.versions.node ?? ort.env.versions.common,
    minCosine,
    heldOut: { samples: split.heldOut.length, sources: sources(split.heldOut) },
    notes,
    variants,
  };
  await writeFileDurably(reportFile, stringifyReport(report));
  files.push(reportFile);
  return { report, reportFile, files, table: formatReportTable(report) };
}

/** A session for a variant just built; a graph onnxruntime refuses is a defect of this compressor, said so. */
async function variantSession(variant: CompressedVariant, bytes: Uint8Array, provider: string): Promise<ort.InferenceSession> {
  try {
    return await createSession(bytes, provider);
  } catch (err) {
    throw new Error(`the ${variant} variant built from this model does not load in onnxruntime (a limitation of optimize; try --formats ${variant === 'int8' ? 'fp16' : 'int8'}): ${(err as Error).message}`, { cause: err });
  }
}

/** Input shapes of one sample, for error messages: `x [1,3,320,320]`. */
function describeFeeds(feeds: Feeds): string {
  return Object.entries(feeds).map(([name, t]) => `${name} [${t.dims.join(',')}]`).join(', ');
}

/** For a model fed images whose height/width are dynamic: which size filled them, and how to change it. */
function imageSizeHint(inputs: readonly ModelInputSpec[], options: OptimizeOptions): string {
  if (inputs.length !== 1) return '';
  let layout: ReturnType<typeof imageLayout>;
  try {
    layout = imageLayout(inputs[0]!, options.image?.size);
  } catch {
    return '';
  }
  if (layout.filled.length === 0) return '';
  return `; images fill its dynamic ${layout.filled.join(' and ')} with ${layout.height}x${layout.width}${layout.defaultSize ? ' (the default)' : ''}: pass --size HxW (image.size) with the size it needs, or .npy samples`;
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
  // fp32's latency from an entry measured in this run, not one carried over from an earlier report.
  const entries = Object.values(report.variants).filter((v): v is VariantReport => !!v);
  const first = entries.find((v) => v.measuredAt === report.createdAt) ?? entries[0];
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
  const range = report.variants.fp16?.fp16Range;
  if (range && range.keptFloat32.length > 0) {
    lines.push(`fp16 tensors beyond ±${range.limit} kept in float32: ${range.keptFloat32.map((k) => `${k.tensor} (max |x| ${k.maxAbs.toPrecision(3)})`).join(', ')}`);
  }
  return lines.join('\n');
}
