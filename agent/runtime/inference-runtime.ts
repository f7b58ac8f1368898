import { join } from 'node:path';
import type { RuntimeConfig } from '../config/index.js';
import { errorMessage, InvalidInputError, ModelLoadError, ModelNotFoundError, UnavailableError } from '../errors.js';
import type { Logger } from '../logger.js';
import type { ModelEntry, ModelRepository } from '../models/index.js';
import { loadModelVersion, type VariantChooser } from './model-loader.js';
import { ModelScheduler, type LoadedModel } from './model-scheduler.js';
import type {
  InferenceRequest, InferenceResult, InferenceRuntimeApi, ModelInfo, ModelState, ModelStatistics, RuntimeObserver,
} from './types.js';

export interface ActivateOptions {
  /** Progress for a deployment's status ('loading' includes warm-up, which is part of loading here). */
  readonly onPhase?: (phase: 'loading' | 'validating') => void;
  /**
   * Runs against the new version after warm-up and before the switch; a rejection leaves the current version
   * serving and the new one is released.
   */
  readonly validate?: (submit: (request: InferenceRequest) => Promise<InferenceResult>, model: LoadedModel) => Promise<void>;
}

export interface InferenceRuntimeOptions {
  readonly repository: ModelRepository;
  readonly config: RuntimeConfig;
  /** Data dir: the optimised-graph cache lives under `<dataDir>/cache`. */
  readonly dataDir: string;
  readonly log: Logger;
  readonly observer?: RuntimeObserver;
  readonly chooseVariant?: VariantChooser;
}

interface ModelSlot {
  entry: ModelEntry;
  state: ModelState;
  reason?: string;
  /** The version that serves requests without an explicit version. */
  active?: ModelScheduler;
  /**
   * Versions still draining after a switch, until each has closed. A set, not a map by version: reloading the
   * same version twice in a row leaves two of them draining, and close/drain/unload must wait for both.
   */
  readonly others: Set<ModelScheduler>;
  /** Serialises load/unload/activate of this model. */
  op: Promise<unknown>;
}

/**
 * Every loaded model of the agent, behind the one interface both gRPC APIs (and the benchmark) use. Owns the
 * schedulers, loads and unloads from the repository, and switches versions atomically for deployments.
 */
export class InferenceRuntime implements InferenceRuntimeApi {
  private readonly slots = new Map<string, ModelSlot>();
  private ready = false;
  /** Set by close(): loads queued or finishing after it must not leave sessions (and worker threads) behind. */
  private closing = false;
  private sweeper: NodeJS.Timeout | undefined;
  /**
   * Sessions for load open in the background, one model at a time, and never while a model loads: a load times
   * its runs to place the model (`auto`), and the one-thread sessions' warm-up on the same cores once made tiny
   * read slower than its inline bound. Loads in progress (and start-up, which loads every model) hold them back.
   */
  private loadsInProgress = 0;
  private starting = false;
  private readonly underLoadWaiting: (() => Promise<void>)[] = [];
  private underLoadOpening: Promise<void> | undefined;

  constructor(private readonly options: InferenceRuntimeOptions) {}

  /** Loads every model in the repository; a model that fails is reported and the others still serve. */
  async start(): Promise<void> {
    const entries = this.options.repository.scan();
    for (const entry of entries) {
      this.slots.set(entry.name, { entry, state: 'LOADING', others: new Set(), op: Promise.resolve() });
    }
    this.starting = true;
    try {
      for (const entry of entries) await this.loadModel(entry.name).catch(() => undefined);
    } finally {
      this.starting = false;
    }
    this.openNextUnderLoad();
    const idle = this.options.config.sequence_idle_timeout_s * 1000;
    this.sweeper = setInterval(() => {
      for (const slot of this.slots.values()) slot.active?.sequences.sweep();
    }, Math.min(idle / 2, 10_000));
    this.sweeper.unref();
    this.ready = true;
  }

  isReady(): boolean {
    return this.ready;
  }

  private slot(model: string): ModelSlot {
    const slot = this.slots.get(model);
    if (!slot) throw new ModelNotFoundError(model);
    return slot;
  }

  private scheduler(model: string, version: number | undefined): ModelScheduler {
    const slot = this.slot(model);
    const active = slot.active;
    if (!active) {
      if (slot.state === 'UNAVAILABLE' && slot.reason) throw new UnavailableError(`model '${model}' is not available: ${slot.reason}`);
      throw new UnavailableError(`model '${model}' is ${slot.state.toLowerCase()}`);
    }
    if (version === undefined || version === active.model.version) return active;
    const other = [...slot.others].reverse().find((o) => o.model.version === version);
    if (other) return other;
    if (slot.entry.versions.some((v) => v.version === version)) {
      throw new UnavailableError(`model '${model}' version ${version} is on disk but not loaded (serving version ${active.model.version})`);
    }
    throw new ModelNotFoundError(model, version);
  }

  submit(model: string, version: number | undefined, request: InferenceRequest): Promise<InferenceResult> {
    let s: ModelScheduler;
    try {
      s = this.scheduler(model, version);
      if (s.stateful && !request.sequence) {
        throw new InvalidInputError(`model '${model}' is stateful: requests must belong to a stream or a sequence (sequence_id)`);
      }
    } catch (err) {
      return Promise.reject(err);
    }
    return s.submit(request);
  }

  private info(slot: ModelSlot, s: ModelScheduler | undefined): ModelInfo {
    const m = s?.model;
    const cfg = slot.entry.config;
    // A loaded version whose instances all stopped (their worker threads keep dying) serves nothing.
    const failure = slot.state === 'READY' ? s?.failure : undefined;
    const reason = failure ?? slot.reason;
    return {
      name: slot.entry.name,
      version: m?.version ?? slot.entry.servedVersion ?? 0,
      versions: slot.entry.versions.map((v) => v.version),
      state: failure ? 'UNAVAILABLE' : slot.state,
      ...(reason ? { reason } : {}),
      inputs: m?.inputs ?? [],
      outputs: m?.outputs ?? [],
      state_tensors: m?.state ?? [],
      provider: m?.provider ?? '',
      variant: m?.variant ?? '',
      maxBatchSize: m ? (m.maxBatchSize > 0 ? m.maxBatchSize : cfg?.max_batch_size ?? 0) : 0,
      batching: (m?.maxBatchSize ?? 0) > 0,
      instanceCount: m?.instances.length ?? cfg?.instance_count ?? 1,
      instancesUnderLoad: s?.sessionCounts.underLoad ?? 0,
      path: m?.path ?? slot.entry.dir,
      ...(cfg?.default_qos ? { defaultQos: cfg.default_qos } : {}),
    };
  }

  modelInfo(model: string, version?: number): ModelInfo {
    const slot = this.slot(model);
    if (version === undefined) return this.info(slot, slot.active);
    return this.info(slot, this.scheduler(model, version));
  }

  listModels(): readonly ModelInfo[] {
    // The repository may have gained models since start (RepositoryIndex shows them as unloaded).
    for (const entry of this.options.repository.scan()) {
      if (!this.slots.has(entry.name)) this.slots.set(entry.name, { entry, state: 'UNAVAILABLE', reason: 'not loaded', others: new Set(), op: Promise.resolve() });
    }
    return [...this.slots.values()].sort((a, b) => a.entry.name.localeCompare(b.entry.name)).map((s) => this.info(s, s.active));
  }

  private serialize<T>(slot: ModelSlot, fn: () => Promise<T>): Promise<T> {
    const run = (): Promise<T> => (this.closing ? Promise.reject(shuttingDown(slot.entry.name)) : fn());
    const next = slot.op.then(run, run);
    slot.op = next.catch(() => undefined);
    return next;
  }

  /** (Re)loads a model from the repository and makes its served version active; the old one drains first. */
  loadModel(model: string): Promise<void> {
    const entry = this.options.repository.read(model);
    if (!entry) return Promise.reject(new ModelNotFoundError(model));
    let slot = this.slots.get(model);
    if (!slot) {
      slot = { entry, state: 'LOADING', others: new Set(), op: Promise.resolve() };
      this.slots.set(model, slot);
    }
    const s = slot;
    return this.serialize(s, async () => {
      const serving = s.entry;
      s.entry = this.options.repository.read(model) ?? entry;
      await this.loadServedVersion(s).catch((err: unknown) => {
        // The version that still serves keeps the entry it was loaded with (a config reload compares against it).
        if (s.active) s.entry = serving;
        throw err;
      });
    });
  }

  private async loadServedVersion(s: ModelSlot): Promise<void> {
    const model = s.entry.name;
    const version = s.entry.servedVersion;
    const ve = s.entry.versions.find((v) => v.version === version);
    if (!ve) {
      const reason = s.entry.configError ?? (s.entry.config?.version !== undefined ? `pinned version ${s.entry.config.version} is not on disk` : 'no version folder with a model.onnx');
      if (!s.active) { s.state = 'UNAVAILABLE'; s.reason = reason; }
      const err = new ModelLoadError(model, s.entry.dir, reason);
      // The version attempted, when there is one (a pinned version not on disk), so telemetry reports the failure
      // against it and not against the version that keeps serving.
      const attempted = s.entry.config?.version;
      this.options.log.error({ model, ...(attempted !== undefined ? { version: attempted } : {}), path: s.entry.dir, err: err.message }, 'model failed to load');
      this.options.observer?.onModelEvent?.({ type: 'model-failed', model, ...(attempted !== undefined ? { version: attempted } : {}), reason });
      throw err;
    }
    await this.activateLoaded(s, ve.version);
  }

  /**
   * Loads and warms `version` while the current version keeps serving, then switches in one step: frames
   * accepted before the switch finish on the old version, frames after it run on the new one.
   */
  activate(model: string, version: number, options: ActivateOptions = {}): Promise<void> {
    let slot: ModelSlot | undefined = this.slots.get(model);
    if (!slot) {
      const entry = this.options.repository.read(model);
      if (!entry) return Promise.reject(new ModelNotFoundError(model));
      slot = { entry, state: 'LOADING', others: new Set(), op: Promise.resolve() };
      this.slots.set(model, slot);
    }
    const s = slot;
    return this.serialize(s, async () => {
      const serving = s.entry;
      s.entry = this.options.repository.read(model) ?? s.entry;
      await this.activateLoaded(s, version, options).catch((err: unknown) => {
        // The version that still serves keeps the entry it was loaded with (a config reload compares against it).
        if (s.active) s.entry = serving;
        throw err;
      });
    });
  }

  private async activateLoaded(slot: ModelSlot, version: number, options: ActivateOptions = {}): Promise<void> {
    this.loadsInProgress++;
    try {
      // Counted first, so no open starts meanwhile; one already opening is waited for.
      await this.underLoadOpening;
      await this.loadAndSwitch(slot, version, options);
    } finally {
      this.loadsInProgress--;
      this.openNextUnderLoad();
    }
  }

  /** Opens the next model's sessions for load, if nothing loads and none are opening. */
  private openNextUnderLoad(): void {
    if (this.starting || this.closing || this.loadsInProgress > 0 || this.underLoadOpening) return;
    const next = this.underLoadWaiting.shift();
    if (!next) return;
    this.underLoadOpening = next().finally(() => {
      this.underLoadOpening = undefined;
      this.openNextUnderLoad();
    });
  }

  private async loadAndSwitch(slot: ModelSlot, version: number, options: ActivateOptions): Promise<void> {
    const model = slot.entry.name;
    const ve = slot.entry.versions.find((v) => v.version === version);
    if (!ve) throw new ModelNotFoundError(model, version);
    if (!slot.active) slot.state = 'LOADING';
    const t0 = performance.now();
    try {
      const cfg = this.options.config;
      options.onPhase?.('loading');
      // Set once this version's scheduler exists; an instance can only give up after that (its first restart
      // follows a death while serving).
      let installed: ModelScheduler | undefined;
      const outcome = await loadModelVersion(slot.entry, ve, {
        providers: cfg.execution_providers, providerOptions: cfg.provider_options, graphOptimization: cfg.graph_optimization, execution: cfg.execution, inlineMaxRunUs: cfg.inline_max_run_us, inlineMaxOpenMs: cfg.inline_max_open_ms,
        workerRestartDelaysMs: cfg.worker_restart_delays_ms,
        onInstanceStopped: () => { if (installed) this.instanceStopped(slot, installed); },
        ...(cfg.graph_cache ? { cacheDir: join(this.options.dataDir, 'cache') } : {}),
      }, this.options.log, this.options.chooseVariant);
      const scheduler = new ModelScheduler(outcome.model, {
        maxQueue: cfg.max_queue, sequenceIdleTimeoutMs: cfg.sequence_idle_timeout_s * 1000, maxSequences: cfg.max_sequences,
        refuseNonFinite: cfg.non_finite_inputs === 'refuse', maxTensorBytes: cfg.max_tensor_bytes, observer: this.options.observer, log: this.options.log,
      });
      installed = scheduler;
      // close() may have begun while this version loaded (or validated): release it rather than install it.
      const refuseIfClosing = async (): Promise<void> => {
        if (!this.closing) return;
        await scheduler.close();
        throw shuttingDown(model);
      };
      await refuseIfClosing();
      options.onPhase?.('validating');
      if (options.validate) {
        try {
          await options.validate((request) => scheduler.submit(request), outcome.model);
        } catch (err) {
          await scheduler.close();
          throw err;
        }
      }
      await refuseIfClosing();
      const previous = slot.active;
      slot.active = scheduler;
      slot.state = 'READY';
      delete slot.reason;
      const m = outcome.model;
      this.options.log.info({
        model, version: m.version, provider: m.provider, variant: m.variant, instances: m.instances.length,
        max_batch_size: m.maxBatchSize, ...(m.maxStackedRows !== undefined ? { max_stacked_rows: m.maxStackedRows } : {}), graph_cache: outcome.graphCache, execution: outcome.execution,
        intra_op_threads: outcome.intraOpThreads || 'onnxruntime default', placement_cached: outcome.placementCached, load_ms: Math.round(performance.now() - t0), warmup_ms: Math.round(outcome.warmupMs),
      }, 'model ready');
      this.options.observer?.onModelEvent?.({ type: 'model-ready', model, version: m.version, provider: m.provider, variant: m.variant });
      const underLoad = outcome.underLoad;
      if (underLoad) {
        // Opened in the background once the model first sees load: READY (and cold start) does not wait for
        // sessions that only pay under load, and a model that never sees load never holds them.
        const openUnderLoad = (): Promise<void> => {
          this.options.log.debug({ model, version: m.version, instances_under_load: underLoad.count }, 'opening instances under load');
          return scheduler.addUnderLoadInstances(() => underLoad.open()).then((joined) => {
            if (joined > 0) this.options.log.info({ model, version: m.version, instances_under_load: joined, intra_op_threads: underLoad.intraOpThreads }, 'instances under load ready');
          }, (err: unknown) => {
            this.options.log.warn({ model, version: m.version, err: errorMessage(err) }, 'instances under load failed to open: the configured instances serve alone');
          });
        };
        scheduler.whenLoaded(() => {
          this.underLoadWaiting.push(openUnderLoad);
          this.openNextUnderLoad();
        });
      }
      if (previous && previous !== scheduler) {
        slot.others.add(previous);
        void previous.close().finally(() => {
          slot.others.delete(previous);
          this.reportRetired(slot, previous.model.version, m.version);
        });
      }
    } catch (err) {
      if (!slot.active) { slot.state = 'UNAVAILABLE'; slot.reason = errorMessage(err); }
      this.options.log.error({ model, version, err: errorMessage(err) }, 'model failed to load');
      this.options.observer?.onModelEvent?.({ type: 'model-failed', model, version, reason: errorMessage(err) });
      throw err;
    }
  }

  /**
   * A worker instance gave up restarting its thread. Once none of the serving version's instances will run
   * again the model no longer serves: observers (health watchers, telemetry's model events) are told now,
   * not when someone next asks.
   */
  private instanceStopped(slot: ModelSlot, scheduler: ModelScheduler): void {
    const reason = scheduler.failure;
    if (this.closing || slot.active !== scheduler || reason === undefined) return;
    this.options.log.error({ model: slot.entry.name, version: scheduler.model.version, reason }, 'model unavailable: no inference instance will run again until it is reloaded');
    this.options.observer?.onModelEvent?.({ type: 'model-unavailable', model: slot.entry.name, version: scheduler.model.version, reason });
  }

  /**
   * Tells observers that a version replaced by a switch no longer serves, once its last scheduler has answered
   * everything it accepted (so no request of it is reported after this). Not while the same version serves
   * again or still drains elsewhere (a reload of the same version), nor once the runtime is closing.
   */
  private reportRetired(slot: ModelSlot, version: number, replacedBy: number): void {
    if (this.closing || slot.active?.model.version === version) return;
    for (const o of slot.others) if (o.model.version === version) return;
    this.options.observer?.onModelEvent?.({ type: 'model-unloaded', model: slot.entry.name, version, reason: `replaced by version ${replacedBy}` });
  }

  /**
   * Re-reads every loaded model's config.yaml (SIGHUP). Batching settings apply to the running version at
   * once; any other changed key needs the model reloaded (KServe RepositoryModelLoad, a deployment, or a
   * restart), which is reported rather than done behind the streams' backs.
   */
  reloadModelConfigs(): { applied: string[]; needsReload: string[] } {
    const applied: string[] = [];
    const needsReload: string[] = [];
    for (const slot of this.slots.values()) {
      const active = slot.active;
      if (!active) continue;
      const fresh = this.options.repository.read(slot.entry.name);
      if (!fresh?.config) {
        if (fresh?.configError) needsReload.push(`${slot.entry.name}: ${fresh.configError}`);
        continue;
      }
      const before = slot.entry.config;
      const strip = (c: typeof before): string => JSON.stringify({ ...c, dynamic_batching: undefined });
      const b = fresh.config.dynamic_batching;
      const next = { maxQueueDelayUs: b?.max_queue_delay_us ?? 0, preferredBatchSizes: b?.preferred_batch_sizes ?? [] };
      const now = active.batchingSettings;
      if (next.maxQueueDelayUs !== now.maxQueueDelayUs || JSON.stringify(next.preferredBatchSizes) !== JSON.stringify(now.preferredBatchSizes)) {
        active.setBatching(next);
        applied.push(`${slot.entry.name}.dynamic_batching`);
      }
      if (strip(before) !== strip(fresh.config) || (b?.enabled ?? true) !== (before?.dynamic_batching?.enabled ?? true)) {
        needsReload.push(`${slot.entry.name}: config.yaml changed beyond batching delays (reload the model to apply)`);
      } else {
        slot.entry = { ...slot.entry, config: fresh.config };
      }
    }
    return { applied, needsReload };
  }

  unloadModel(model: string): Promise<void> {
    let slot: ModelSlot;
    try {
      slot = this.slot(model);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.serialize(slot, async () => {
      const active = slot.active;
      slot.state = 'UNLOADING';
      const closing = [active, ...slot.others].filter((s): s is ModelScheduler => s !== undefined);
      await Promise.all(closing.map((s) => s.close()));
      slot.active = undefined;
      slot.others.clear();
      slot.state = 'UNAVAILABLE';
      slot.reason = 'unloaded';
      this.options.log.info({ model }, 'model unloaded');
      this.options.observer?.onModelEvent?.({ type: 'model-unloaded', model });
    });
  }

  endSequence(id: string): void {
    for (const slot of this.slots.values()) {
      slot.active?.sequences.end(id);
      for (const o of slot.others) o.sequences.end(id);
    }
  }

  statistics(model?: string, version?: number): readonly ModelStatistics[] {
    if (model !== undefined) return [this.scheduler(model, version).statistics()];
    const out: ModelStatistics[] = [];
    for (const slot of this.slots.values()) if (slot.active) out.push(slot.active.statistics());
    return out;
  }

  /** Requests queued or running across every model. */
  inFlight(): number {
    let n = 0;
    for (const slot of this.slots.values()) {
      n += slot.active?.inFlight ?? 0;
      for (const o of slot.others) n += o.inFlight;
    }
    return n;
  }

  /** Stops accepting and waits for every accepted request to be answered. */
  async drain(): Promise<void> {
    const all: ModelScheduler[] = [];
    for (const slot of this.slots.values()) {
      if (slot.active) all.push(slot.active);
      all.push(...slot.others);
    }
    await Promise.all(all.map((s) => s.drain(shuttingDown(s.model.name).message)));
  }

  /**
   * Stops every model: accepted frames are answered, then sessions are released. A load, reload or deployment
   * still running finishes first and releases what it opened, so no worker thread outlives the runtime (one
   * left running kept the process alive, and exiting under it aborted in onnxruntime's native code).
   */
  async close(): Promise<void> {
    this.closing = true;
    if (this.sweeper) clearInterval(this.sweeper);
    this.ready = false;
    const all: Promise<void>[] = [];
    for (const slot of this.slots.values()) {
      if (slot.active) all.push(slot.active.close());
      for (const o of slot.others) all.push(o.close());
      slot.active = undefined;
      slot.others.clear();
      slot.state = 'UNAVAILABLE';
    }
    await Promise.all(all);
    await Promise.all([...this.slots.values()].map((slot) => slot.op));
  }
}

function shuttingDown(model: string): UnavailableError {
  return new UnavailableError(`model '${model}': the inference runtime is shutting down`);
}
