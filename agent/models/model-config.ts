import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { EXECUTION_PROVIDERS } from '../config/index.js';
import { configErrorFrom, parseYaml } from '../config/index.js';
import { ConfigError } from '../errors.js';

const stateSchema = z.strictObject({
  /** Model input that receives the previous step's state. */
  input: z.string().min(1),
  /** Model output that holds the next state. */
  output: z.string().min(1),
  /** Axis along which streams' states are stacked when frames batch (Triton's sequence batching). */
  batch_axis: z.number().int().min(0).default(0),
});

/**
 * A model's `config.yaml`, with Triton's names where Triton has the concept. Every key is optional; unknown keys
 * are an error so a typo never silently falls back to a default.
 */
export const modelConfigSchema = z.strictObject({
  /** Serve this version instead of the highest one on disk. */
  version: z.number().int().positive().optional(),
  /** Largest batch one `session.run` may gather; 0 disables batching. Defaults to 32 when every input and
   * output has a dynamic first dimension that warm-up confirms is the batch, else 0. */
  max_batch_size: z.number().int().min(0).optional(),
  dynamic_batching: z
    .strictObject({
      enabled: z.boolean().default(true),
      preferred_batch_sizes: z.array(z.number().int().positive()).default([]),
      /** How long the oldest queued frame may wait for a fuller batch. 0: run what is there as soon as an
       * instance is free (batches still form under load while instances are busy). */
      max_queue_delay_us: z.number().int().min(0).default(0),
    })
    .optional(),
  instance_count: z.number().int().min(1).max(16).default(1),
  /** onnxruntime intra-op threads of each instance (overrides runtime.provider_options.intra_op_threads).
   * Unset with several instances: the CPU's cores are split between them. */
  intra_op_threads: z.number().int().min(0).max(256).optional(),
  /**
   * A CPU model in worker threads: this many extra sessions, the cores split between them, that serve instead
   * of the configured instances while several streams feed the model (the two kinds never run at once). A
   * lone stream keeps the wide session's latency; under load, sessions of one thread each lose nothing to
   * threads waiting on each other while gRPC and the clients take a core. `auto`: min(cores, 4) when the
   * machine has 2 or more cores, the model has one instance and no thread count set, and its file is at most
   * 64 MB (each session holds its own weights); 0: none. Opened in the background the first time the model
   * sees load, so a model that only ever serves one stream never holds them.
   */
  instances_under_load: z.union([z.literal('auto'), z.number().int().min(0).max(16)]).default('auto'),
  execution_providers: z.array(z.enum(EXECUTION_PROVIDERS)).min(1).optional(),
  graph_optimization: z.enum(['disabled', 'basic', 'extended', 'all']).optional(),
  state: z.array(stateSchema).default([]),
  warmup: z
    .strictObject({
      runs: z.number().int().min(0).default(2),
      inputs: z.enum(['zero', 'random']).default('zero'),
      /** Inputs that must hold a specific value to run at all (e.g. a sample rate): filled with it. */
      fill: z.record(z.string(), z.number()).default({}),
      /** One frame's shape per input, where the model has dynamic dimensions besides the batch one that must
       * hold a real size (an audio window): otherwise those warm up at size 1. */
      shapes: z.record(z.string(), z.array(z.number().int().positive())).default({}),
    })
    .default({ runs: 2, inputs: 'zero', fill: {}, shapes: {} }),
  default_qos: z.enum(['LOSSLESS', 'LATEST_ONLY']).optional(),
  variant: z.enum(['auto', 'fp32', 'int8', 'fp16']).default('auto'),
  /** Least output cosine similarity (vs fp32, from the variant's report) for `auto` to serve a variant. */
  min_cosine: z.number().min(0).max(1).default(0.99),
}).superRefine((c, ctx) => {
  // Triton refuses this too: a batch can never reach the preferred size, so every batch would wait out the delay.
  const max = c.max_batch_size;
  const preferred = c.dynamic_batching?.preferred_batch_sizes ?? [];
  const i = preferred.findIndex((n) => max !== undefined && n > max);
  if (i >= 0) {
    ctx.addIssue({ code: 'custom', path: ['dynamic_batching', 'preferred_batch_sizes', i], message: `${preferred[i]} is larger than max_batch_size ${max}` });
  }
});

export type ModelConfig = z.infer<typeof modelConfigSchema>;
export type StateConfig = z.infer<typeof stateSchema>;

export const MODEL_CONFIG_FILE = 'config.yaml';

/** Reads `<modelDir>/config.yaml` (absent → all defaults); errors name the file and the key. */
export function readModelConfig(modelDir: string): ModelConfig {
  const file = join(modelDir, MODEL_CONFIG_FILE);
  if (!existsSync(file)) return modelConfigSchema.parse({});
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(file, '', `cannot read: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  const raw = parseYaml(file, text);
  const result = modelConfigSchema.safeParse(raw ?? {});
  if (!result.success) throw configErrorFrom(file, result.error);
  return result.data;
}
