import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync, utimesSync } from 'node:fs';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import type { ExecutionProviderName, ProviderOptions } from '../config/index.js';
import { errorMessage, ModelLoadError } from '../errors.js';
import { digestIsCurrent, digestModelFile, type ModelDigest } from './model-digest.js';
import { openOrtSession, type OrtSession } from './ort-session.js';

export type GraphOptimizationLevel = 'disabled' | 'basic' | 'extended' | 'all';

export interface SessionRequest {
  readonly model: string;
  readonly path: string;
  readonly providers: readonly ExecutionProviderName[];
  readonly providerOptions: ProviderOptions;
  readonly graphOptimization: GraphOptimizationLevel;
  /** Folder for optimised graphs (and TensorRT engines); undefined disables the cache. */
  readonly cacheDir?: string;
  /** The model file's digest, if the caller has taken it: used while the file is unchanged, saving a re-read. */
  readonly digest?: ModelDigest;
}

export interface CreatedSession {
  readonly session: OrtSession;
  readonly provider: ExecutionProviderName;
  /** Providers tried before the one that served, with onnxruntime's reason. */
  readonly skipped: readonly { provider: ExecutionProviderName; reason: string }[];
  /** 'hit': loaded the cached optimised graph; 'stored': optimised now and cached; 'off': no cache. */
  readonly graphCache: 'hit' | 'stored' | 'off';
  /** How long creating the session held the thread that created it, provider fallback included. */
  readonly openMs: number;
}

export const ORT_VERSION: string = ort.env.versions.node ?? ort.env.versions.common;

// onnxruntime prints each provider it cannot load to stderr itself; the agent logs the same reason once, as
// structured JSON, so its own printing is limited to fatal errors.
ort.env.logLevel = 'fatal';

/**
 * Providers whose libraries or device are missing on this machine: that does not change while the process
 * runs, so later models skip them at once instead of failing (and logging) again.
 */
const unavailableProviders = new Map<ExecutionProviderName, string>();
const MACHINE_WIDE_FAILURE = /shared library|adapter|libvulkan|not (?:built|compiled|supported) |no.*device/i;

function providerConfig(name: ExecutionProviderName, o: ProviderOptions, cacheDir: string | undefined): ort.InferenceSession.ExecutionProviderConfig {
  switch (name) {
    case 'cuda':
      return { name: 'cuda', deviceId: o.device_id };
    case 'tensorrt': {
      // Engine building takes minutes on a Jetson; the cache under the data dir makes it a one-time cost.
      const trt: Record<string, unknown> = { name: 'tensorrt', deviceId: o.device_id, trt_fp16_enable: o.trt_fp16, trt_int8_enable: o.trt_int8 };
      if (cacheDir) Object.assign(trt, { trt_engine_cache_enable: true, trt_engine_cache_path: join(cacheDir, 'tensorrt') });
      return trt as unknown as ort.InferenceSession.ExecutionProviderConfig;
    }
    case 'webgpu':
      return { name: 'webgpu' } as ort.InferenceSession.ExecutionProviderConfig;
    case 'cpu':
      return { name: 'cpu' };
  }
}

/**
 * The graph cache key: the model's content (its SHA-256), the provider, onnxruntime's version and the
 * optimisation level — an optimised graph at level 'all' holds provider- and hardware-specific fused kernels,
 * so any change there must miss the cache.
 */
function graphCacheKey(modelSha256: string, provider: string, level: GraphOptimizationLevel): string {
  return createHash('sha256').update(`${modelSha256}\0${provider}\0${ORT_VERSION}\0${level}`).digest('hex').slice(0, 32);
}

/**
 * Optimised graphs kept per model, most recently used first: the served variant of the active version, one
 * still draining or pinned beside it, and their fallbacks. Each is about the size of its model and every fleet
 * update adds one, so without a bound the cache would fill an edge device's disk. A version whose graph was
 * dropped is optimised again when it next loads.
 */
export const GRAPHS_KEPT_PER_MODEL = 4;

/** Best effort: a cache that cannot be pruned (a read-only or vanished folder) never fails a model load. */
function pruneGraphCache(dir: string, model: string): void {
  const prefix = `${model}-`;
  try {
    const entries: { path: string; usedAt: number }[] = [];
    for (const name of readdirSync(dir)) {
      // `<model>-<key>.onnx` exactly: not another model whose name starts with this one's, nor a `.tmp-` file.
      if (!name.startsWith(prefix) || !/^[0-9a-f]{32}\.onnx$/.test(name.slice(prefix.length))) continue;
      try {
        entries.push({ path: join(dir, name), usedAt: statSync(join(dir, name)).mtimeMs });
      } catch {
        // removed meanwhile by another instance's pruning
      }
    }
    entries.sort((a, b) => b.usedAt - a.usedAt);
    for (const e of entries.slice(GRAPHS_KEPT_PER_MODEL)) rmSync(e.path, { force: true });
  } catch {
    // the next store tries again
  }
}

/**
 * Creates an onnxruntime session on the first provider of the preference list that works. onnxruntime throws
 * at creation when a provider's libraries or device are missing and never falls back by itself, so each is
 * tried in turn and the reasons are kept for the log.
 */
export async function createSession(req: SessionRequest): Promise<CreatedSession> {
  const t0 = performance.now();
  const created = await openOnFirstProvider(req);
  return { ...created, openMs: performance.now() - t0 };
}

async function openOnFirstProvider(req: SessionRequest): Promise<Omit<CreatedSession, 'openMs'>> {
  const skipped: { provider: ExecutionProviderName; reason: string }[] = [];
  let digest: ModelDigest | undefined;
  for (const provider of req.providers) {
    const known = unavailableProviders.get(provider);
    if (known !== undefined) {
      skipped.push({ provider, reason: known });
      continue;
    }
    const base: ort.InferenceSession.SessionOptions = {
      executionProviders: [providerConfig(provider, req.providerOptions, req.cacheDir)],
      graphOptimizationLevel: req.graphOptimization,
      // Fatal only: a run onnxruntime refuses (a bad index in a client's frame) is answered with its error and
      // logged by the agent; at ERROR every such request also printed a raw line, a way to flood journald.
      logSeverityLevel: 4,
    };
    if (req.providerOptions.intra_op_threads > 0) base.intraOpNumThreads = req.providerOptions.intra_op_threads;
    if (req.providerOptions.inter_op_threads > 0) base.interOpNumThreads = req.providerOptions.inter_op_threads;
    // Spinning, when asked for, stops as each run returns: left on, onnxruntime's threads spin on through the
    // gap before the next frame and take the cores gRPC needs to receive it (alone, the classifier at 1 ms
    // gaps: 5.6-6.2 ms CPU per run stopped, 6.6-8.1 ms left spinning).
    const spin = req.providerOptions.allow_spinning ? '1' : '0';
    base.extra = { session: { intra_op: { allow_spinning: spin }, inter_op: { allow_spinning: spin }, force_spinning_stop: spin } };
    try {
      // TensorRT compiles whole subgraphs; such a graph cannot be serialised, and TensorRT has its own engine cache.
      if (req.cacheDir && provider !== 'tensorrt' && req.graphOptimization !== 'disabled') {
        digest ??= req.digest && digestIsCurrent(req.digest, req.path) ? req.digest : await digestModelFile(req.path);
        const dir = join(req.cacheDir, 'graphs');
        const cached = join(dir, `${req.model}-${graphCacheKey(digest.sha256, provider, req.graphOptimization)}.onnx`);
        if (existsSync(cached)) {
          try {
            // Already optimised: loading it with optimisation off is what saves the start-up time.
            const session = await openOrtSession(cached, { ...base, graphOptimizationLevel: 'disabled' });
            const now = new Date();
            try { utimesSync(cached, now, now); } catch { /* pruned meanwhile: this session has it loaded */ }
            return { session, provider, skipped, graphCache: 'hit' };
          } catch {
            rmSync(cached, { force: true }); // a stale or truncated cache file is rebuilt below
          }
        }
        mkdirSync(dir, { recursive: true });
        const tmp = `${cached}.tmp-${process.pid}`;
        try {
          const session = await openOrtSession(req.path, { ...base, optimizedModelFilePath: tmp });
          if (existsSync(tmp)) {
            renameSync(tmp, cached);
            pruneGraphCache(dir, req.model);
          }
          return { session, provider, skipped, graphCache: existsSync(cached) ? 'stored' : 'off' };
        } catch (err) {
          rmSync(tmp, { force: true });
          // Some providers refuse to serialise their optimised graph; they still serve without the cache.
          if (!/serializ/i.test(errorMessage(err))) throw err;
        }
      }
      const session = await openOrtSession(req.path, base);
      return { session, provider, skipped, graphCache: 'off' };
    } catch (err) {
      const reason = errorMessage(err).split('\n')[0] ?? 'unknown';
      if (provider !== 'cpu' && MACHINE_WIDE_FAILURE.test(reason)) unavailableProviders.set(provider, reason);
      skipped.push({ provider, reason });
    }
  }
  // The last provider's reason is the one about the model itself (the earlier ones are usually missing libraries).
  const last = skipped.at(-1);
  const earlier = skipped.slice(0, -1);
  throw new ModelLoadError(
    req.model,
    req.path,
    `no execution provider could load it: ${last ? `${last.provider}: ${last.reason}` : 'no providers configured'}`
      + (earlier.length > 0 ? ` (also tried ${earlier.map((s) => `${s.provider}: ${s.reason}`).join('; ')})` : ''),
  );
}
