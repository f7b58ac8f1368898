import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';

/**
 * The report written beside the variants (`<base>.report.json`, i.e. `model.report.json` in a model version
 * directory) and the serving decision made from it. One file covers every variant of the model, each with the
 * sha256 of the file it measured, so a variant replaced after the report was written is not trusted.
 */

export type VariantName = 'fp32' | 'int8' | 'fp16';
export type CompressedVariant = Exclude<VariantName, 'fp32'>;

export const REPORT_SUFFIX = '.report.json';

/**
 * A measured number. JSON has no Infinity or NaN: the report writes them as the strings "Infinity",
 * "-Infinity" and "NaN" (see `stringifyReport`), and a report written before that held `null` there. Both read
 * back as numbers, NaN for null, so one non-finite measurement (an fp32 output that is ±Inf) never makes a
 * report unreadable; NaN then fails every bound it is checked against.
 */
const measured = z.union([z.number(), z.enum(['Infinity', '-Infinity', 'NaN']), z.null()])
  .transform((v): number => (v === null ? NaN : typeof v === 'number' ? v : Number(v)));

const outputAccuracySchema = z.object({
  name: z.string(),
  cosine: measured,
  minCosine: measured,
  maxAbsError: measured,
  top1Agreement: measured.optional(),
});

const accuracySchema = z.object({
  samples: z.number().int().nonnegative(),
  cosine: measured,
  minSampleCosine: measured,
  maxAbsError: measured,
  top1Agreement: measured.optional(),
  outputs: z.array(outputAccuracySchema),
});

/** fp16's largest finite value; a tensor beyond it is ±Inf on a real half-precision kernel. */
export const FLOAT16_MAX = 65504;

/**
 * The fp16 range check: the magnitude of every float tensor (graph inputs, weights, activations) measured in
 * float32 on the calibration and held-out inputs. Tensors above `limit` are kept in float32 in the fp16
 * variant (the nodes that produce or read them run between Casts). A CPU run cannot show an fp16 overflow,
 * since onnxruntime's CPU provider runs most fp16 nodes in float32; this check is what lets a report measured
 * on a CPU vouch for the variant on a GPU provider.
 */
const fp16RangeSchema = z.object({
  checked: z.literal(true),
  /** Magnitude above which a tensor is kept in float32: fp16's max with headroom for unseen inputs. */
  limit: measured,
  samples: z.number(),
  /** Largest magnitude among the tensors left in float16. */
  maxAbsInFloat16: measured,
  keptFloat32: z.array(z.object({ tensor: z.string(), maxAbs: measured, nodes: z.array(z.string()) })),
});

const variantReportSchema = z.object({
  variant: z.enum(['int8', 'fp16']),
  file: z.string(),
  sha256: z.string(),
  sizeBytes: z.number(),
  provider: z.string(),
  accuracy: accuracySchema,
  latencyMs: z.object({ fp32: measured, variant: measured, speedup: measured, runs: z.number() }),
  passes: z.boolean(),
  layers: z.object({
    quantized: z.array(z.string()),
    flow: z.number(),
    keptFloat: z.array(z.string()),
    absorbed: z.number(),
  }).optional(),
  calibration: z.object({
    method: z.string(),
    percentile: z.number().optional(),
    samples: z.number(),
    sources: z.number(),
  }).optional(),
  /** fp16 only; absent in reports written before the check existed (their fp16 is not trusted on GPUs). */
  fp16Range: fp16RangeSchema.optional(),
  /** When this entry was measured; a report rewritten for one format keeps the other's entry and its time. */
  measuredAt: z.string().optional(),
});

/**
 * The report's frame. Variant entries are parsed one by one (`variantReportSchema`), so one entry that does
 * not parse loses that variant only.
 */
const reportFrameSchema = z.object({
  formatVersion: z.literal(1),
  model: z.object({ file: z.string(), sha256: z.string(), sizeBytes: z.number() }),
  createdAt: z.string(),
  onnxruntime: z.string(),
  minCosine: measured,
  heldOut: z.object({ samples: z.number(), sources: z.number() }),
  notes: z.array(z.string()),
  variants: z.record(z.string(), z.unknown()),
});

export const modelReportSchema = reportFrameSchema.extend({
  variants: z.object({ int8: variantReportSchema.optional(), fp16: variantReportSchema.optional() }),
});

export type VariantReport = z.infer<typeof variantReportSchema>;
export type ModelReport = z.infer<typeof modelReportSchema>;

export interface AvailableVariants {
  readonly int8?: VariantReport;
  readonly fp16?: VariantReport;
  /** Why a report or variant found on disk was not taken (stale hash, missing file, unreadable JSON). */
  readonly ignored?: readonly string[];
}

export function sha256Hex(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

/** The report as JSON text, with non-finite numbers as strings (JSON.stringify would write null). */
export function stringifyReport(report: ModelReport): string {
  return `${JSON.stringify(report, (_key, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? String(v) : v), 2)}\n`;
}

export interface ParsedReport {
  /** The report with the variant entries that parsed. */
  readonly report: ModelReport;
  /** Why an entry was left out. */
  readonly invalid: readonly string[];
}

/** Parses report JSON text; throws a TypeError naming the problem when the frame itself is not a report. */
export function parseReport(text: string): ParsedReport {
  const frame = reportFrameSchema.safeParse(JSON.parse(text));
  if (!frame.success) {
    const issue = frame.error.issues[0];
    throw new TypeError(`not a variant report (${issue ? `${issue.path.join('.') || 'top level'}: ${issue.message}` : 'invalid'})`);
  }
  const variants: { int8?: VariantReport; fp16?: VariantReport } = {};
  const invalid: string[] = [];
  for (const v of ['int8', 'fp16'] as const) {
    const raw = frame.data.variants[v];
    if (raw === undefined) continue;
    const parsed = variantReportSchema.safeParse(raw);
    if (parsed.success && parsed.data.variant === v) { variants[v] = parsed.data; continue; }
    const issue = parsed.success ? undefined : parsed.error.issues[0];
    invalid.push(`${v}: entry is not a variant report (${issue ? `${issue.path.join('.')}: ${issue.message}` : `it describes ${parsed.data?.variant}`})`);
  }
  return { report: { ...frame.data, variants }, invalid };
}

/**
 * The reports of the variants in a model version directory whose files still match what was measured.
 * Never throws for a bad or missing report: the variant is then simply not available for `auto`.
 */
export function readVariantReports(versionDir: string, modelFile = 'model.onnx'): AvailableVariants {
  const base = modelFile.replace(/\.onnx$/, '');
  const reportFile = join(versionDir, `${base}${REPORT_SUFFIX}`);
  if (!existsSync(reportFile)) return {};
  let parsed: ParsedReport;
  try {
    parsed = parseReport(readFileSync(reportFile, 'utf8'));
  } catch (err) {
    const message = (err as Error).message;
    return { ignored: [`${reportFile}: ${message.startsWith('not a variant report') ? message : `unreadable (${message})`}`] };
  }
  const { report } = parsed;
  const ignored = parsed.invalid.map((m) => `${reportFile}: ${m}`);
  const fp32 = join(versionDir, modelFile);
  if (!existsSync(fp32) || sha256Hex(readFileSync(fp32)) !== report.model.sha256) {
    return { ignored: [`${reportFile}: written for another ${modelFile} (hash differs); its variants are stale`] };
  }
  const found: { int8?: VariantReport; fp16?: VariantReport } = {};
  for (const v of ['int8', 'fp16'] as const) {
    const r = report.variants[v];
    if (!r) continue;
    const why = variantFileMismatch(versionDir, r);
    if (why) { ignored.push(`${v}: ${why}`); continue; }
    found[v] = r;
  }
  return ignored.length > 0 ? { ...found, ignored } : found;
}

/** Why the file an entry measured is no longer the one in `dir`, or undefined when it still is. */
export function variantFileMismatch(dir: string, r: VariantReport): string | undefined {
  const file = join(dir, r.file);
  if (!existsSync(file)) return `${file} is missing`;
  if (sha256Hex(readFileSync(file)) !== r.sha256) return `${file} changed since it was measured`;
  return undefined;
}

/** Providers that run fp16 well; every other provider name is treated as a CPU. */
export const GPU_PROVIDERS: ReadonlySet<string> = new Set(['cuda', 'tensorrt', 'webgpu', 'dml', 'rocm', 'migraphx', 'coreml']);

export interface VariantChoiceInput {
  /** The execution provider the model's session runs on ('cpu', 'cuda', 'webgpu', …). */
  readonly provider: string;
  readonly available: AvailableVariants;
  readonly requested: 'auto' | VariantName;
  /** Accuracy bound on the held-out output cosine; default 0.99. */
  readonly minCosine?: number;
  /** Bound on top-1 agreement, for variants whose report has one; default 0.99. */
  readonly minTop1?: number;
}

export interface VariantDecision {
  readonly variant: VariantName;
  readonly reason: string;
}

/**
 * What to serve. An explicit request is served as asked. `auto` wants fp16 on GPU providers and int8 on CPU,
 * and takes it only when its report passes the accuracy bound and, where it was timed on this provider, it is
 * not slower than fp32; otherwise fp32. fp16 measured on a CPU is trusted on a GPU provider only with the fp16
 * range check (`fp16Range`): the CPU provider computes fp16 nodes in float32, so its accuracy says nothing
 * about overflow.
 */
export function decideVariant(input: VariantChoiceInput): VariantDecision {
  if (input.requested !== 'auto') return { variant: input.requested, reason: `requested ${input.requested}` };
  const wanted: CompressedVariant = GPU_PROVIDERS.has(input.provider) ? 'fp16' : 'int8';
  const report = input.available[wanted];
  if (!report) return { variant: 'fp32', reason: `no measured ${wanted} variant for provider ${input.provider}` };
  const minCosine = input.minCosine ?? 0.99;
  const minTop1 = input.minTop1 ?? 0.99;
  const acc = report.accuracy;
  if (!(acc.cosine >= minCosine)) {
    return { variant: 'fp32', reason: `${wanted} cosine ${acc.cosine.toFixed(4)} is below the bound ${minCosine}` };
  }
  if (acc.top1Agreement !== undefined && !(acc.top1Agreement >= minTop1)) {
    return { variant: 'fp32', reason: `${wanted} top-1 agreement ${(acc.top1Agreement * 100).toFixed(1)}% is below ${(minTop1 * 100).toFixed(1)}%` };
  }
  if (wanted === 'fp16' && !GPU_PROVIDERS.has(report.provider) && !report.fp16Range?.checked) {
    return {
      variant: 'fp32',
      reason: `fp16 was measured on ${report.provider} without an fp16 range check, which cannot show an overflow of half-precision kernels; run edge-agent optimize again`,
    };
  }
  if (report.provider === input.provider && report.latencyMs.speedup < 1) {
    return { variant: 'fp32', reason: `${wanted} was slower than fp32 on ${input.provider} (${report.latencyMs.speedup.toFixed(2)}x)` };
  }
  const kept = wanted === 'fp16' ? report.fp16Range?.keptFloat32.length ?? 0 : 0;
  return {
    variant: wanted,
    reason: `${wanted} passes (cosine ${acc.cosine.toFixed(4)}, ${report.latencyMs.speedup.toFixed(2)}x on ${report.provider}${kept > 0 ? `, ${kept} tensor(s) beyond fp16 range kept in float32` : ''})`,
  };
}

export function chooseVariant(input: VariantChoiceInput): VariantName {
  return decideVariant(input).variant;
}
