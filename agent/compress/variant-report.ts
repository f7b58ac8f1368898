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

const outputAccuracySchema = z.object({
  name: z.string(),
  cosine: z.number(),
  minCosine: z.number(),
  maxAbsError: z.number(),
  top1Agreement: z.number().optional(),
});

const accuracySchema = z.object({
  samples: z.number().int().nonnegative(),
  cosine: z.number(),
  minSampleCosine: z.number(),
  maxAbsError: z.number(),
  top1Agreement: z.number().optional(),
  outputs: z.array(outputAccuracySchema),
});

const variantReportSchema = z.object({
  variant: z.enum(['int8', 'fp16']),
  file: z.string(),
  sha256: z.string(),
  sizeBytes: z.number(),
  provider: z.string(),
  accuracy: accuracySchema,
  latencyMs: z.object({ fp32: z.number(), variant: z.number(), speedup: z.number(), runs: z.number() }),
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
});

export const modelReportSchema = z.object({
  formatVersion: z.literal(1),
  model: z.object({ file: z.string(), sha256: z.string(), sizeBytes: z.number() }),
  createdAt: z.string(),
  onnxruntime: z.string(),
  minCosine: z.number(),
  heldOut: z.object({ samples: z.number(), sources: z.number() }),
  notes: z.array(z.string()),
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

/**
 * The reports of the variants in a model version directory whose files still match what was measured.
 * Never throws for a bad or missing report: the variant is then simply not available for `auto`.
 */
export function readVariantReports(versionDir: string, modelFile = 'model.onnx'): AvailableVariants {
  const base = modelFile.replace(/\.onnx$/, '');
  const reportFile = join(versionDir, `${base}${REPORT_SUFFIX}`);
  if (!existsSync(reportFile)) return {};
  const ignored: string[] = [];
  let report: ModelReport;
  try {
    const parsed = modelReportSchema.safeParse(JSON.parse(readFileSync(reportFile, 'utf8')));
    if (!parsed.success) return { ignored: [`${reportFile}: not a variant report (${parsed.error.issues[0]?.message ?? 'invalid'})`] };
    report = parsed.data;
  } catch (err) {
    return { ignored: [`${reportFile}: unreadable (${(err as Error).message})`] };
  }
  const fp32 = join(versionDir, modelFile);
  if (!existsSync(fp32) || sha256Hex(readFileSync(fp32)) !== report.model.sha256) {
    return { ignored: [`${reportFile}: written for another ${modelFile} (hash differs); its variants are stale`] };
  }
  const found: { int8?: VariantReport; fp16?: VariantReport } = {};
  for (const v of ['int8', 'fp16'] as const) {
    const r = report.variants[v];
    if (!r) continue;
    const file = join(versionDir, r.file);
    if (!existsSync(file)) { ignored.push(`${v}: ${file} is missing`); continue; }
    if (sha256Hex(readFileSync(file)) !== r.sha256) { ignored.push(`${v}: ${file} changed since it was measured`); continue; }
    found[v] = r;
  }
  return ignored.length > 0 ? { ...found, ignored } : found;
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
 * not slower than fp32; otherwise fp32.
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
  if (report.provider === input.provider && report.latencyMs.speedup < 1) {
    return { variant: 'fp32', reason: `${wanted} was slower than fp32 on ${input.provider} (${report.latencyMs.speedup.toFixed(2)}x)` };
  }
  return { variant: wanted, reason: `${wanted} passes (cosine ${acc.cosine.toFixed(4)}, ${report.latencyMs.speedup.toFixed(2)}x on ${report.provider})` };
}

export function chooseVariant(input: VariantChoiceInput): VariantName {
  return decideVariant(input).variant;
}
