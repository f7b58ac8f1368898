import { randomFillSync } from 'node:crypto';
import type { ProviderOptions, ExecutionProviderName } from '../config/index.js';
import { errorMessage, ModelLoadError } from '../errors.js';
import type { Logger } from '../logger.js';
import type { ModelConfig, ModelEntry, ModelVersionEntry } from '../models/index.js';
import type { LoadedModel } from './model-scheduler.js';
import type { GraphOptimizationLevel } from './session-factory.js';
import { createInstance, type ExecutionMode, type FeedTensor, type SessionInstance, type ValueInfo } from './session-instance.js';
import { allocate, elementCount, isDType, type TensorSpec } from './tensor.js';
import type { StateSpec } from './types.js';

export interface LoaderDefaults {
  readonly providers: readonly ExecutionProviderName[];
  readonly providerOptions: ProviderOptions;
  readonly graphOptimization: GraphOptimizationLevel;
  /** Where optimised graphs are cached; undefined disables the cache. */
  readonly cacheDir?: string;
  readonly execution: ExecutionMode | 'auto';
  /** `auto`: the slowest warm-up run that still keeps a model on the event loop. */
  readonly inlineMaxRunUs: number;
}

/** Picks the file variant to serve. `auto` prefers what the variant selector allows (see compress/). */
export type VariantChooser = (args: { provider: string; version: ModelVersionEntry; config: ModelConfig }) => 'fp32' | 'int8' | 'fp16';

const DEFAULT_MAX_BATCH = 32;

function specsFrom(model: string, path: string, meta: readonly ValueInfo[], kind: string): TensorSpec[] {
  return meta.map((m) => {
    if (!m.isTensor || !m.type) throw new ModelLoadError(model, path, `${kind} '${m.name}' is not a tensor (sequences and maps are not served)`);
    if (!isDType(m.type)) throw new ModelLoadError(model, path, `${kind} '${m.name}' has element type ${m.type}, which the agent does not serve`);
    return { name: m.name, dtype: m.type, shape: (m.shape ?? []).map((d) => (typeof d === 'number' && d >= 0 ? d : -1)) };
  });
}

function stateSpecs(model: string, path: string, config: ModelConfig, inputs: TensorSpec[], outputs: TensorSpec[]): StateSpec[] {
  return config.state.map((s) => {
    const input = inputs.find((i) => i.name === s.input);
    const output = outputs.find((o) => o.name === s.output);
    if (!input) throw new ModelLoadError(model, path, `config state.input '${s.input}' is not an input of the model`);
    if (!output) throw new ModelLoadError(model, path, `config state.output '${s.output}' is not an output of the model`);
    if (input.dtype !== output.dtype) throw new ModelLoadError(model, path, `state '${s.input}' is ${input.dtype} but '${s.output}' is ${output.dtype}`);
    if (s.batch_axis >= input.shape.length) throw new ModelLoadError(model, path, `state '${s.input}': batch_axis ${s.batch_axis} is past its rank ${input.shape.length}`);
    const shape = input.shape.map((d, i) => (i === s.batch_axis ? 1 : d));
    if (shape.some((d) => d < 0)) throw new ModelLoadError(model, path, `state '${s.input}' has a dynamic dimension besides its batch axis ${s.batch_axis}: its size must be fixed`);
    return { input: s.input, output: s.output, dtype: input.dtype, shape, batchAxis: s.batch_axis };
  });
}

function warmupFeeds(
  inputs: readonly TensorSpec[], state: readonly StateSpec[], rows: number, random: boolean, fill: Readonly<Record<string, number>>,
  shapes: Readonly<Record<string, readonly number[]>>,
): Record<string, FeedTensor> {
  const feeds: Record<string, FeedTensor> = {};
  for (const spec of inputs) {
    const given = shapes[spec.name];
    const shape = given && given.length === spec.shape.length
      ? given.map((d, i) => (i === 0 && spec.shape[0] === -1 ? rows : d))
      : spec.shape.map((d, i) => (i === 0 && d === -1 ? rows : d === -1 ? 1 : d));
    const data = allocate(spec.dtype, elementCount(shape));
    const value = fill[spec.name];
    if (value !== undefined) {
      if (data instanceof BigInt64Array || data instanceof BigUint64Array) data.fill(BigInt(Math.trunc(value)));
      else data.fill(value);
    } else if (random) {
      if (data instanceof Float32Array || data instanceof Float64Array) for (let i = 0; i < data.length; i++) data[i] = Math.random() * 2 - 1;
      else if (!(data instanceof BigInt64Array || data instanceof BigUint64Array)) randomFillSync(data);
    }
    feeds[spec.name] = { dtype: spec.dtype, data, dims: shape };
  }
  for (const st of state) {
    const shape = st.shape.map((d, i) => (i === st.batchAxis ? rows : d));
    feeds[st.input] = { dtype: st.dtype, data: allocate(st.dtype, elementCount(shape)), dims: shape };
  }
  return feeds;
}

export interface LoadOutcome {
  readonly model: LoadedModel;
  readonly graphCache: string;
  readonly skipped: readonly { provider: string; reason: string }[];
  readonly warmupMs: number;
  /** Where the instances run (what `auto` chose). */
  readonly execution: ExecutionMode;
}

/**
 * Creates the sessions of one model version (instance_count of them), derives its tensors from onnxruntime's
 * metadata and the config, and warms every instance so the first real frame pays no lazy initialisation.
 */
export async function loadModelVersion(
  entry: ModelEntry, versionEntry: ModelVersionEntry, defaults: LoaderDefaults, log: Logger, chooseVariant?: VariantChooser,
): Promise<LoadOutcome> {
  const config = entry.config;
  if (!config) throw new ModelLoadError(entry.name, entry.dir, entry.configError ?? 'invalid config.yaml');
  const providers = config.execution_providers ?? defaults.providers;
  const fp32Path = versionEntry.variants.fp32 ?? Object.values(versionEntry.variants)[0] as string;

  const instances: SessionInstance[] = [];
  const request = (path: string, providerList: LoaderDefaults['providers']) => ({
    model: entry.name, path, providers: providerList, providerOptions: defaults.providerOptions,
    graphOptimization: config.graph_optimization ?? defaults.graphOptimization,
    ...(defaults.cacheDir ? { cacheDir: defaults.cacheDir } : {}),
  });
  try {
    // The first instance decides the provider; the variant is chosen for that provider, then every instance opens it.
    // `auto` loads and warms in worker threads first: a slow model (or a new version loading while the old one
    // serves) must never block the event loop, even once. It moves inline only if warm-up shows it is fast.
    const firstMode: ExecutionMode = defaults.execution === 'auto' ? 'worker' : defaults.execution;
    const probe = await createInstance(request(fp32Path, providers), firstMode);
    const provider = probe.info.provider;
    if (probe.info.skipped.length > 0) log.info({ model: entry.name, provider, skipped: probe.info.skipped }, 'execution providers skipped before the one that serves');
    let variant: 'fp32' | 'int8' | 'fp16' = 'fp32';
    let path = fp32Path;
    const wanted = chooseVariant ? chooseVariant({ provider, version: versionEntry, config })
      : config.variant === 'auto' ? 'fp32' : config.variant;
    let graphCache: string = probe.info.graphCache;
    if (wanted !== 'fp32' && versionEntry.variants[wanted]) {
      await probe.release();
      variant = wanted;
      path = versionEntry.variants[wanted] as string;
    } else {
      instances.push(probe);
    }
    while (instances.length < config.instance_count) {
      const s = await createInstance(request(path, [provider]), firstMode);
      if (instances.length === 0) graphCache = s.info.graphCache;
      instances.push(s);
    }
    const first = instances[0] as SessionInstance;
    const allInputs = specsFrom(entry.name, path, first.info.inputMetadata, 'input');
    const allOutputs = specsFrom(entry.name, path, first.info.outputMetadata, 'output');
    const state = stateSpecs(entry.name, path, config, allInputs, allOutputs);
    const inputs = allInputs.filter((i) => !state.some((s) => s.input === i.name));
    const outputs = allOutputs.filter((o) => !state.some((s) => s.output === o.name));
    // Scalar inputs (a sample rate) have no batch dimension: frames batch when their values agree (request
    // validation puts the value in the batch key) and the run gets the value once.
    const stacked = inputs.filter((i) => i.shape.length > 0);
    const dynamicBatch = stacked.length > 0 && stacked.every((i) => i.shape[0] === -1) && state.every((s) => allInputs.find((i) => i.name === s.input)?.shape[s.batchAxis] === -1);
    const configured = config.max_batch_size ?? (dynamicBatch ? DEFAULT_MAX_BATCH : 0);
    if (configured > 0 && !dynamicBatch) {
      throw new ModelLoadError(entry.name, path, `max_batch_size ${configured} needs a dynamic first dimension on every input, but the model's inputs are ${inputs.map((i) => `${i.name}[${i.shape.join(',')}]`).join(', ')}`);
    }
    const batching = configured > 0 && (config.dynamic_batching?.enabled ?? true);
    const model: LoadedModel = {
      name: entry.name, version: versionEntry.version, path, provider, variant,
      inputs, outputs, state,
      maxBatchSize: batching ? configured : 0,
      preferredBatchSizes: config.dynamic_batching?.preferred_batch_sizes ?? [],
      maxQueueDelayUs: config.dynamic_batching?.max_queue_delay_us ?? 0,
      instances,
    };
    const t0 = performance.now();
    const sizes = batching ? [1, configured] : [1];
    /** Warms every instance; returns the slowest run of the last round (the first pays lazy initialisation). */
    const warm = async (): Promise<number> => {
      let slowestUs = 0;
      for (const instance of instances) {
        for (let r = 0; r < config.warmup.runs; r++) {
          for (const rows of sizes) {
            const t = performance.now();
            await instance.run(warmupFeeds(inputs, state, rows, config.warmup.inputs === 'random', config.warmup.fill, config.warmup.shapes));
            if (r === config.warmup.runs - 1) slowestUs = Math.max(slowestUs, (performance.now() - t) * 1000);
          }
        }
      }
      return slowestUs;
    };
    const slowestUs = await warm();
    let execution = firstMode;
    // Timed in the worker, so a run's time includes the thread hop: a model under the threshold even with it is
    // certainly fast enough to run on the event loop, where the hop is saved.
    if (defaults.execution === 'auto' && config.warmup.runs > 0 && slowestUs <= defaults.inlineMaxRunUs) {
      const workers = instances.splice(0);
      await Promise.all(workers.map((s) => s.release()));
      // The graph cache makes the second open cheap; warming a fast model inline takes microseconds.
      for (let i = 0; i < config.instance_count; i++) instances.push(await createInstance(request(path, [provider]), 'inline'));
      await warm();
      execution = 'inline';
    }
    return { model, graphCache, skipped: probe.info.skipped, warmupMs: performance.now() - t0, execution };
  } catch (err) {
    await Promise.all(instances.map((s) => s.release().catch(() => undefined)));
    if (err instanceof ModelLoadError) throw err;
    throw new ModelLoadError(entry.name, fp32Path, errorMessage(err), { cause: err });
  }
}
