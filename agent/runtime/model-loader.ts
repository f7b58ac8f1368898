import { createHash, randomFillSync } from 'node:crypto';
import { mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus } from 'node:os';
import { dirname, join } from 'node:path';
import type { ProviderOptions, ExecutionProviderName } from '../config/index.js';
import { errorMessage, ModelLoadError } from '../errors.js';
import type { Logger } from '../logger.js';
import type { ModelConfig, ModelEntry, ModelVersionEntry } from '../models/index.js';
import type { LoadedModel } from './model-scheduler.js';
import { digestModelFile, type ModelDigest } from './model-digest.js';
import { ORT_VERSION, type GraphOptimizationLevel, type SessionRequest } from './session-factory.js';
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
  /** `auto`: the longest session open that still keeps a model on the event loop. */
  readonly inlineMaxOpenMs: number;
  /** Waits before each restart of a worker thread that died (runtime.worker_restart_delays_ms). */
  readonly workerRestartDelaysMs?: readonly number[];
  /** Told when one of this load's worker instances gives up restarting its thread. */
  readonly onInstanceStopped?: () => void;
}

/** Picks the file variant to serve. `auto` prefers what the variant selector allows (see compress/). */
export type VariantChooser = (args: { provider: string; version: ModelVersionEntry; config: ModelConfig }) => 'fp32' | 'int8' | 'fp16';

const DEFAULT_MAX_BATCH = 32;
/** Runs timed per size when `auto` decides where a model runs and with how many threads. */
const TIMED_RUNS = 7;

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

/**
 * An inline run blocks the event loop until it returns. Warming and timing a model inline (a new version
 * while the old one serves, or a thousand warm-up runs) therefore yields a loop turn before each run, so the
 * frames of streams already being served are read and answered in between.
 */
function yieldIfInline(instance: SessionInstance): Promise<void> | undefined {
  return instance.synchronous ? new Promise((resolve) => setImmediate(resolve)) : undefined;
}

interface Placement {
  readonly provider: ExecutionProviderName;
  readonly execution: ExecutionMode;
  readonly intraOpThreads: number;
  /** Inline only: the most rows a stacked run may hold (absent: max_batch_size). */
  readonly maxStackedRows?: number;
}

/** Everything the measured placement depends on: the files, the settings that shape it, and this machine. */
function placementKey(digests: readonly ModelDigest[], providers: readonly ExecutionProviderName[], config: ModelConfig, defaults: LoaderDefaults, threads: number): string {
  const h = createHash('sha256');
  for (const d of digests) h.update(d.sha256);
  h.update(JSON.stringify({
    providers, ort: ORT_VERSION, level: config.graph_optimization ?? defaults.graphOptimization, threads,
    instances: config.instance_count, inlineMaxRunUs: defaults.inlineMaxRunUs, inlineMaxOpenMs: defaults.inlineMaxOpenMs, maxBatch: config.max_batch_size,
    batching: config.dynamic_batching?.enabled, warmup: config.warmup,
    providerOptions: { ...defaults.providerOptions, intra_op_threads: undefined }, cpu: cpus()[0]?.model, cores: availableParallelism(),
  }));
  return h.digest('hex').slice(0, 32);
}

function readPlacement(file: string): Placement | undefined {
  try {
    const p = JSON.parse(readFileSync(file, 'utf8')) as Partial<Placement>;
    if (typeof p.provider !== 'string' || (p.execution !== 'inline' && p.execution !== 'worker') || typeof p.intraOpThreads !== 'number') return undefined;
    if (p.maxStackedRows !== undefined && !(Number.isInteger(p.maxStackedRows) && p.maxStackedRows >= 1)) return undefined;
    return p as Placement;
  } catch {
    return undefined; // none yet, or unreadable: measure again
  }
}

function storePlacement(file: string, p: Placement): void {
  try {
    mkdirSync(dirname(file), { recursive: true });
    const tmp = `${file}.tmp-${process.pid}`;
    writeFileSync(tmp, JSON.stringify(p));
    renameSync(tmp, file);
  } catch {
    // A read-only or full data dir costs the next start its measuring, nothing else.
  }
}

export interface LoadOutcome {
  readonly model: LoadedModel;
  readonly graphCache: string;
  readonly skipped: readonly { provider: string; reason: string }[];
  readonly warmupMs: number;
  /** Where the instances run (what `auto` chose). */
  readonly execution: ExecutionMode;
  /** onnxruntime intra-op threads of each instance; 0: onnxruntime's default (a thread per core). */
  readonly intraOpThreads: number;
  /** `auto` placed the model from what an earlier start measured (the placement cache). */
  readonly placementCached: boolean;
  /** Sessions that serve instead of `model.instances` while several streams feed the model, opened later. */
  readonly underLoad?: UnderLoadPlan;
}

/** The sessions `instances_under_load` asks for: how many, their threads, and how to open and warm them. */
export interface UnderLoadPlan {
  readonly count: number;
  readonly intraOpThreads: number;
  /** Opens and warms them one after another; releases what it opened if one fails. */
  open(): Promise<SessionInstance[]>;
}

/** `instances_under_load: auto` stays off for larger files: each extra session holds its own copy of the weights. */
const UNDER_LOAD_AUTO_MAX_FILE_BYTES = 64 * 1024 * 1024;
const UNDER_LOAD_AUTO_MAX_COUNT = 4;

/** How many under-load sessions a worker model gets, and with how many threads each (undefined: none). */
function underLoadShape(config: ModelConfig, provider: ExecutionProviderName, configuredThreads: number, path: string): { count: number; intraOpThreads: number } | undefined {
  // A GPU serves every session from one device: narrower CPU thread pools change nothing there.
  if (provider !== 'cpu') return undefined;
  const cores = availableParallelism();
  let count: number;
  if (config.instances_under_load === 'auto') {
    if (cores < 2 || config.instance_count !== 1 || configuredThreads > 0) return undefined;
    let bytes: number;
    try {
      bytes = statSync(path).size;
    } catch {
      return undefined;
    }
    if (bytes > UNDER_LOAD_AUTO_MAX_FILE_BYTES) return undefined;
    count = Math.min(cores, UNDER_LOAD_AUTO_MAX_COUNT);
  } else {
    count = config.instances_under_load;
  }
  return count > 0 ? { count, intraOpThreads: Math.max(1, Math.floor(cores / count)) } : undefined;
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
  const configuredThreads = config.intra_op_threads ?? defaults.providerOptions.intra_op_threads;
  // Several instances each with onnxruntime's default pool (a thread per core) would oversubscribe the CPU and
  // fight over it; unless told otherwise, each gets its share of the cores.
  const instanceThreads = configuredThreads > 0 || config.instance_count === 1 ? configuredThreads
    : Math.max(1, Math.floor(availableParallelism() / config.instance_count));
  // Each file is hashed at most once per load, in chunks, when the graph cache or the placement key needs it:
  // every session of the load reuses the digest instead of reading the whole file again.
  const digests = new Map<string, Promise<ModelDigest>>();
  const digestOf = (file: string): Promise<ModelDigest> => {
    let d = digests.get(file);
    if (!d) digests.set(file, d = digestModelFile(file));
    return d;
  };
  const request = async (path: string, providerList: LoaderDefaults['providers'], intraOpThreads = instanceThreads) => ({
    model: entry.name, path, providers: providerList, providerOptions: { ...defaults.providerOptions, intra_op_threads: intraOpThreads },
    graphOptimization: config.graph_optimization ?? defaults.graphOptimization,
    ...(defaults.cacheDir ? { cacheDir: defaults.cacheDir, digest: await digestOf(path) } : {}),
  });
  // A worker instance logs its thread's death and restarts under the model's name.
  const openInstance = (req: SessionRequest, mode: ExecutionMode): Promise<SessionInstance> => createInstance(req, mode, {
    log: log.child({ model: entry.name }), ...(defaults.workerRestartDelaysMs ? { respawnDelaysMs: defaults.workerRestartDelaysMs } : {}),
    ...(defaults.onInstanceStopped ? { onStopped: defaults.onInstanceStopped } : {}),
  });
  try {
    // The first instance decides the provider; the variant is chosen for that provider, then every instance opens it.
    // `auto` loads and warms in worker threads first: a slow model (or a new version loading while the old one
    // serves) must never block the event loop, even once. It moves inline only if warm-up shows it is fast.
    // A start that finds what an earlier load of these same files on this machine measured (provider, where
    // the model runs, its threads) opens the model there at once, skipping the probing and timing. Only unchanged
    // files hit (a restart, a reload): a new version is new bytes, so it is always probed in a worker first.
    const variantFiles = Object.values(versionEntry.variants).filter((f): f is string => f !== undefined).sort();
    const placementFile = defaults.execution === 'auto' && defaults.cacheDir
      ? join(defaults.cacheDir, 'placement', `${entry.name}-${placementKey(await Promise.all(variantFiles.map(digestOf)), providers, config, defaults, instanceThreads)}.json`)
      : undefined;
    let placed = placementFile ? readPlacement(placementFile) : undefined;
    let firstMode: ExecutionMode = placed?.execution ?? (defaults.execution === 'auto' ? 'worker' : defaults.execution);
    let probe: SessionInstance;
    try {
      probe = await openInstance(await request(fp32Path, placed ? [placed.provider] : providers, placed?.intraOpThreads), firstMode);
    } catch (err) {
      if (!placed) throw err;
      // The recorded provider no longer opens (a GPU gone): place the model from scratch.
      placed = undefined;
      firstMode = 'worker';
      probe = await openInstance(await request(fp32Path, providers), firstMode);
    }
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
      const s = await openInstance(await request(path, [provider], placed?.intraOpThreads), firstMode);
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
    const inputsBatch = stacked.length > 0 && stacked.every((i) => i.shape[0] === -1) && state.every((s) => allInputs.find((i) => i.name === s.input)?.shape[s.batchAxis] === -1);
    // A batched run's outputs are split along their first dimension, so every output needs one there: a
    // constant (a detector's anchors), a reduction over the batch or a transposed output would otherwise hand
    // each frame a slice of the others'.
    const unbatchedOutput = outputs.find((o) => o.shape[0] !== -1);
    const configured = config.max_batch_size ?? (inputsBatch && !unbatchedOutput ? DEFAULT_MAX_BATCH : 0);
    if (configured > 0 && !inputsBatch) {
      throw new ModelLoadError(entry.name, path, `max_batch_size ${configured} needs a dynamic first dimension on every input, but the model's inputs are ${inputs.map((i) => `${i.name}[${i.shape.join(',')}]`).join(', ')}`);
    }
    if (configured > 0 && unbatchedOutput) {
      throw new ModelLoadError(entry.name, path, `max_batch_size ${configured} needs a dynamic first dimension on every output (a batch's results are split along it), but output '${unbatchedOutput.name}' has shape [${unbatchedOutput.shape.join(',')}]`);
    }
    if (inputsBatch && unbatchedOutput && config.max_batch_size === undefined) {
      log.info({ model: entry.name, output: unbatchedOutput.name, shape: unbatchedOutput.shape }, 'dynamic batching off: an output has no dynamic first dimension to split a batch along');
    }
    let batching = configured > 0 && (config.dynamic_batching?.enabled ?? true);
    /**
     * A dynamic first dimension need not be the batch (NonMaxSuppression's [K,3] boxes, a Reshape to [-1,…]
     * that merges rows), which only a run shows: each warm-up run at `rows` must return `rows` rows in every
     * output. Batching that was only a default is turned off; one the config asked for fails the load.
     */
    const checkBatchRows = (result: Readonly<Record<string, FeedTensor>>, rows: number): void => {
      if (!batching) return;
      const wrong = outputs.find((o) => result[o.name]?.dims[0] !== rows);
      if (!wrong) return;
      const dims = result[wrong.name]?.dims ?? [];
      const returned = dims.length > 0 ? `${dims[0]} (shape [${dims.join(',')}])` : `a scalar`;
      if (config.max_batch_size !== undefined) {
        throw new ModelLoadError(entry.name, path, `max_batch_size ${configured} needs output '${wrong.name}' to have one row per input row (a batch's results are split along its first dimension), but a warm-up run fed ${rows} rows and it returned ${returned}`);
      }
      batching = false;
      log.warn({ model: entry.name, output: wrong.name, rows_fed: rows, rows_returned: dims[0] ?? null }, 'dynamic batching off: a warm-up run returned another row count than it was fed, so this output\'s first dimension is not the batch (max_batch_size: 0 in config.yaml says so and skips the check)');
    };
    const t0 = performance.now();
    const feedsFor = (rows: number): Record<string, FeedTensor> =>
      warmupFeeds(inputs, state, rows, config.warmup.inputs === 'random', config.warmup.fill, config.warmup.shapes);
    const warm = async (list: readonly SessionInstance[]): Promise<void> => {
      for (const instance of list) {
        for (let r = 0; r < config.warmup.runs; r++) {
          for (const rows of batching ? [1, configured] : [1]) {
            await yieldIfInline(instance);
            checkBatchRows(await instance.run(feedsFor(rows)), rows);
          }
        }
      }
    };
    /** A warm instance's typical run at `rows`: the median of a few. */
    const typicalRunUs = async (instance: SessionInstance, rows: number): Promise<number> => {
      const feeds = feedsFor(rows);
      const times: number[] = [];
      for (let i = 0; i < TIMED_RUNS; i++) {
        await yieldIfInline(instance);
        const t = performance.now();
        await instance.run(feeds);
        times.push((performance.now() - t) * 1000);
      }
      times.sort((a, b) => a - b);
      return times[times.length >> 1] as number;
    };
    /**
     * The most rows an inline run may hold: the largest size (1, 2, 4, … up to max_batch_size) whose typical
     * run stays under the bound, 0 if even a lone frame does not. Stops at the first size over it.
     */
    const inlineRows = async (instance: SessionInstance): Promise<number> => {
      let fits = 0;
      for (let rows = 1; fits < Math.max(1, batching ? configured : 1); rows = Math.min(rows * 2, configured)) {
        if (await typicalRunUs(instance, rows) > defaults.inlineMaxRunUs) break;
        fits = rows;
      }
      return fits;
    };
    /**
     * An inline session is opened on the event loop, at this load and at every reload, so a model that took
     * long to open stays in a worker however fast it runs: a 256 MB embedding table ran in microseconds but
     * held the event loop 545-588 ms each time it loaded inline. The worker's open may include optimising the
     * graph on a first load, so the check errs towards the worker.
     */
    const opensFast = (instance: SessionInstance): boolean => {
      if (instance.info.openMs <= defaults.inlineMaxOpenMs) return true;
      log.info({ model: entry.name, open_ms: Math.round(instance.info.openMs), inline_max_open_ms: defaults.inlineMaxOpenMs }, 'execution auto: stays in a worker, its session opens too slowly for the event loop');
      return false;
    };
    await warm(instances);
    // Without warm-up runs the row check still needs one run, and a cached placement never skips it.
    if (batching && config.warmup.runs === 0) {
      const rows = Math.min(2, configured);
      checkBatchRows(await (instances[0] as SessionInstance).run(feedsFor(rows)), rows);
    }
    let execution = firstMode;
    let intraOpThreads = instanceThreads;
    let maxStackedRows: number | undefined;
    let rowsInline = 0;
    // Timed in the worker, so a run's time includes the thread hop: a model under the threshold even with it is
    // certainly fast enough to run on the event loop, where the hop is saved. A median, not one warm-up run:
    // a model that loads while others load and warm would otherwise be judged on their noise.
    // A model whose lone frame fits the bound but whose full batch does not (Silero: ~100 µs alone, over 1 ms
    // at 8 or 16 rows with the hop) runs inline with smaller stacked runs. In the bench Silero's p50 at 1 stream
    // fell from 527-800 to 308-356 µs and 32 streams gained 38-57 %. It needs room for two rows, or it would give
    // up batching for the saved hop.
    if (placed) {
      execution = placed.execution;
      intraOpThreads = placed.intraOpThreads;
      if (batching) maxStackedRows = placed.maxStackedRows;
    } else if (defaults.execution === 'auto' && config.warmup.runs > 0 && opensFast(instances[0] as SessionInstance)
      && (rowsInline = await inlineRows(instances[0] as SessionInstance)) >= (batching ? Math.min(2, configured) : 1)) {
      const workers = instances.splice(0);
      await Promise.all(workers.map((s) => s.release()));
      // onnxruntime's default intra-op pool fans each run out to a thread per core, and with spinning off every
      // run pays for waking them: on a short model that costs more than it saves (the 4 KiB demo MLP ran 77 µs
      // a frame in the agent on the pool, 41 µs on one thread). Unless the config sets the thread count, both
      // are measured at batch 1 (a lone frame's latency is what inline execution is for) and the faster is kept.
      // The graph cache makes the extra open cheap.
      const candidates = instanceThreads > 0 ? [instanceThreads] : [0, 1];
      let best: { instance: SessionInstance; threads: number; us: number } | undefined;
      for (const threads of candidates) {
        const instance = await openInstance(await request(path, [provider], threads), 'inline');
        await warm([instance]);
        const us = candidates.length > 1 ? await typicalRunUs(instance, 1) : 0;
        if (!best || us < best.us) {
          await best?.instance.release();
          best = { instance, threads, us };
        } else {
          await instance.release();
        }
      }
      const chosen = best as { instance: SessionInstance; threads: number };
      instances.push(chosen.instance);
      while (instances.length < config.instance_count) instances.push(await openInstance(await request(path, [provider], chosen.threads), 'inline'));
      await warm(instances.slice(1));
      execution = 'inline';
      intraOpThreads = chosen.threads;
      if (batching && rowsInline < configured) maxStackedRows = rowsInline;
    }
    if (placementFile && !placed && config.warmup.runs > 0) {
      storePlacement(placementFile, { provider, execution, intraOpThreads, ...(maxStackedRows !== undefined ? { maxStackedRows } : {}) });
    }
    const shape = execution === 'worker' ? underLoadShape(config, provider, configuredThreads, path) : undefined;
    const underLoad: UnderLoadPlan | undefined = shape && {
      ...shape,
      open: async () => {
        const opened: SessionInstance[] = [];
        try {
          for (let k = 0; k < shape.count; k++) {
            const s = await openInstance(await request(path, [provider], shape.intraOpThreads), 'worker');
            opened.push(s);
            await warm([s]);
          }
          return opened;
        } catch (err) {
          await Promise.all(opened.map((s) => s.release().catch(() => undefined)));
          throw err;
        }
      },
    };
    const model: LoadedModel = {
      name: entry.name, version: versionEntry.version, path, provider, variant,
      inputs, outputs, state,
      maxBatchSize: batching ? configured : 0,
      preferredBatchSizes: config.dynamic_batching?.preferred_batch_sizes ?? [],
      maxQueueDelayUs: config.dynamic_batching?.max_queue_delay_us ?? 0,
      instances,
      ...(maxStackedRows !== undefined ? { maxStackedRows } : {}),
    };
    return {
      model, graphCache, skipped: probe.info.skipped, warmupMs: performance.now() - t0, execution, intraOpThreads, placementCached: placed !== undefined,
      ...(underLoad ? { underLoad } : {}),
    };
  } catch (err) {
    await Promise.all(instances.map((s) => s.release().catch(() => undefined)));
    if (err instanceof ModelLoadError) throw err;
    throw new ModelLoadError(entry.name, fp32Path, errorMessage(err), { cause: err });
  }
}
