import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { agentConfigSchema } from '../../agent/config/index.js';
import { createSession } from '../../agent/runtime/index.js';
import { bareFirstResultMs, EQUAL_REL, outputsDiff, type BenchProvider, type Outputs } from './bare.js';
import { fullCollection, INSPECT_FLAG, inspectorUrl } from './inspector.js';
import { firstResultAt, nativeFlood } from './load.js';
import { startAgent, type AgentSpec } from './processes.js';
import type { ColdStartResult, ColdStartRuns, RssResult } from './report.js';
import { median, round1 } from './stats.js';
import { workload, type Workload } from './workloads.js';

/** What every agent the bench starts shares (providers, node flags, config overrides). */
export type AgentBase = Omit<AgentSpec, 'repo' | 'execution' | 'dataDir'>;

/**
 * RSS of a long run: a fresh agent with the tiny model, 8 native streams with 8 frames in flight each; a
 * warm-up, then `frames` frames in 20 chunks with an RSS reading after each. The growth is judged on two
 * readings taken after a full collection (through the agent's inspector), before and after the frames: the
 * chunk readings in between follow V8's deferred collections and are reported beside it.
 */
export async function measureRss(repo: string, agentBase: AgentBase, frames: number, log: (line: string) => void): Promise<RssResult> {
  const tiny = workload('tiny');
  tiny.install(repo, true);
  const agent = await startAgent({ ...agentBase, repo, nodeArgs: [...(agentBase.nodeArgs ?? []), INSPECT_FLAG] }, performance.now());
  try {
    const inspector = inspectorUrl(agent.server);
    const readyKb = agent.server.rssKb();
    const warmup = Math.min(50_000, Math.max(1000, Math.round(frames / 4)));
    log(`RSS: ${warmup} warm-up frames, then ${frames} in 20 chunks`);
    await nativeFlood(agent.unix, 'tiny', tiny.inputs, 8, 8, warmup);
    const beforeKb = agent.server.rssKb();
    const collectedBefore = await fullCollection(agent.server, inspector);
    // The readings after each chunk show V8's deferred collections (old space filling with garbage), reported
    // beside the growth as quarter medians; the growth itself compares the two collected readings.
    const chunk = Math.ceil(frames / 20);
    const samples: number[] = [];
    let done = 0;
    const t1 = performance.now();
    while (done < frames) {
      await nativeFlood(agent.unix, 'tiny', tiny.inputs, 8, 8, chunk);
      done += chunk;
      samples.push(agent.server.rssKb());
    }
    const fps = round1(done / ((performance.now() - t1) / 1000));
    const collectedAfter = await fullCollection(agent.server, inspector);
    const q = Math.max(1, Math.floor(samples.length / 4));
    const first = median(samples.slice(0, q));
    const last = median(samples.slice(-q));
    const afterKb = samples[samples.length - 1] as number;
    const pct = (a: number, b: number): number => round1(((b - a) / a) * 100);
    return {
      frames: done, fps, ready_kb: readyKb, before_kb: beforeKb, after_kb: afterKb, warmup_frames: warmup,
      samples_kb: samples, first_quarter_kb: first, last_quarter_kb: last,
      quarter_growth_pct: pct(first, last),
      raw_growth_pct: pct(beforeKb, afterKb),
      collected_before_kb: collectedBefore.rssKb, collected_after_kb: collectedAfter.rssKb,
      heap_used_before_kb: collectedBefore.heapUsedKb, heap_used_after_kb: collectedAfter.heapUsedKb,
      growth_pct: pct(collectedBefore.rssKb, collectedAfter.rssKb),
    };
  } finally {
    await agent.stop();
  }
}

export interface ColdStartOptions {
  readonly workloads: readonly Workload[];
  readonly repo: string;
  readonly agentBase: AgentBase;
  readonly reps: number;
  readonly providers: readonly BenchProvider[];
  readonly references: ReadonlyMap<string, Outputs[]>;
  readonly log: (line: string) => void;
  readonly note: (line: string) => void;
}

/**
 * Cold start: process spawn → first result of the first workload, with an empty data dir (no graph cache) and
 * again with the one that run left (cache present), `reps` times each, interleaved; then the session factory
 * alone with and without the cache, per model.
 */
export async function measureColdStart(o: ColdStartOptions): Promise<ColdStartResult> {
  const first = o.workloads[0] as Workload;
  const runs = { empty: [] as number[], emptyReady: [] as number[], emptyLoad: [] as number[], cached: [] as number[], cachedReady: [] as number[], cachedLoad: [] as number[] };
  const cacheStates = { empty: new Set<string>(), cached: new Set<string>() };
  for (let rep = 0; rep < o.reps; rep++) {
    const dataDir = mkdtempSync(join(tmpdir(), 'edge-bench-cold-'));
    try {
      for (const kind of ['empty', 'cached'] as const) {
        o.log(`cold start ${rep + 1}/${o.reps} ${kind}`);
        const spawnedAt = performance.now();
        const agent = await startAgent({ ...o.agentBase, repo: o.repo, dataDir }, spawnedAt);
        const readyAt = performance.now();
        try {
          const r = await firstResultAt(agent.unix, first.name, first.inputs);
          const diff = outputsDiff([r.outputs], o.references.get(first.name) ?? []);
          if (diff > EQUAL_REL) o.note(`cold start ${kind}: first result differs from bare (relative ${diff})`);
          runs[kind].push(round1(r.at - spawnedAt));
          runs[kind === 'empty' ? 'emptyReady' : 'cachedReady'].push(round1(readyAt - spawnedAt));
          // The agent logs each model's load time and whether the graph cache served it: the part of a
          // cold start the cache can shorten, without process start-up's noise.
          let loadMs = 0;
          for (const line of agent.server.stdoutTail().split('\n')) {
            if (!line.includes('"model ready"')) continue;
            const m = JSON.parse(line) as { load_ms?: number; graph_cache?: string; model?: string };
            loadMs += m.load_ms ?? 0;
            if (m.model) (kind === 'empty' ? cacheStates.empty : cacheStates.cached).add(`${m.model}:${m.graph_cache ?? '?'}`);
          }
          runs[kind === 'empty' ? 'emptyLoad' : 'cachedLoad'].push(loadMs);
        } finally {
          await agent.stop();
        }
      }
    } finally {
      rmSync(dataDir, { recursive: true, force: true });
    }
  }
  const summary = (xs: number[], ready: number[], load: number[], states: Set<string>): ColdStartRuns => ({
    median_ms: round1(median(xs)), ready_median_ms: round1(median(ready)), runs_ms: xs,
    model_load_median_ms: round1(median(load)), model_load_runs_ms: load, graph_cache: [...states].sort(),
  });
  const empty = summary(runs.empty, runs.emptyReady, runs.emptyLoad, cacheStates.empty);
  const cached = summary(runs.cached, runs.cachedReady, runs.cachedLoad, cacheStates.cached);
  // The cache's own effect, without process and worker start-up: the agent's session factory creating each
  // model's session with an empty cache folder (optimise, then store) and again from the stored graph.
  const sessionCreate: Record<string, { empty_ms: number; cached_ms: number }> = {};
  const providerOptions = agentConfigSchema.parse({}).runtime.provider_options;
  for (const w of o.workloads) {
    const times = { empty: [] as number[], cached: [] as number[] };
    for (let rep = 0; rep < o.reps; rep++) {
      const cacheDir = mkdtempSync(join(tmpdir(), 'edge-bench-cache-'));
      try {
        for (const kind of ['empty', 'cached'] as const) {
          const t = performance.now();
          const created = await createSession({ model: w.name, path: w.modelFile(o.repo), providers: [...o.providers], providerOptions, graphOptimization: 'all', cacheDir });
          times[kind].push(performance.now() - t);
          if (created.graphCache !== (kind === 'empty' ? 'stored' : 'hit')) o.note(`graph cache for ${w.name}: expected ${kind === 'empty' ? 'stored' : 'hit'}, got ${created.graphCache}`);
          await created.session.release();
        }
      } finally {
        rmSync(cacheDir, { recursive: true, force: true });
      }
    }
    sessionCreate[w.name] = { empty_ms: round1(median(times.empty)), cached_ms: round1(median(times.cached)) };
  }
  return {
    session_create_ms: sessionCreate,
    model: first.name, models_in_repository: o.workloads.map((w) => w.name), empty, cached, saved_ms: round1(empty.median_ms - cached.median_ms),
    bare_first_result_ms: await bareFirstResultMs(first.modelFile(o.repo), first, o.providers[0] as BenchProvider),
  };
}
