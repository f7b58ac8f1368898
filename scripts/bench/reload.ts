import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { DataType, encodeModel, floatTensor, makeModel, makeNode, valueInfo } from '../../agent/compress/onnx-graph.js';
import { KServeBenchClient } from './kserve-client.js';
import { openNativeProbe } from './load.js';
import type { AgentBase } from './lifecycle.js';
import { startAgent } from './processes.js';
import { round1, summarize, type LatencySummary } from './stats.js';
import { workload } from './workloads.js';

export interface ReloadResult {
  /** Size of the model file that is loaded again. */
  readonly model_mb: number;
  /** RepositoryModelLoad's round trip: hashing, session creation (graph cache hit) and warm-up. */
  readonly reload_ms: number;
  /** Tiny's frames on one native stream over the unix socket, before the reload and while it runs. */
  readonly steady: LatencySummary & { readonly max_us: number };
  readonly during: LatencySummary & { readonly max_us: number };
}

const K = 1024;

/**
 * A MatMul [1,1024] x [1024,M] whose weights make a file of about `mb` MB: the size of a typical vision model
 * on a Jetson, cheap to run (a fixed batch of 1, so warm-up is a few runs of one row).
 */
function largeModel(mb: number): Uint8Array {
  const m = Math.max(1, Math.round((mb * 1024 * 1024) / (4 * K)));
  const w = new Float32Array(K * m);
  for (let i = 0; i < w.length; i++) w[i] = ((i * 2654435761) % 1000) / 1e6;
  return encodeModel(makeModel({
    docString: 'edge-agent bench: a large model for the reload row',
    graph: {
      name: 'large', nodes: [makeNode('MatMul', ['x', 'w'], ['y'], {}, 'mm')], initializers: [floatTensor('w', [K, m], w)],
      inputs: [valueInfo('x', DataType.FLOAT, [1, K])], outputs: [valueInfo('y', DataType.FLOAT, [1, m])],
    },
  }));
}

const withMax = (samples: readonly number[]): LatencySummary & { max_us: number } => ({ ...summarize(samples), max_us: round1(Math.max(...samples)) });

/**
 * A new version of a large model loading beside one that serves is what a fleet update does. The row shows
 * what that costs the streams being served: the tiny model's frames, closed-loop, for `steadyMs` before the
 * load and for as long as it takes (the agent was started with both, so the graph cache is warm).
 */
export async function measureReload(agentBase: AgentBase, mb: number, steadyMs: number, log: (line: string) => void): Promise<ReloadResult> {
  const repo = mkdtempSync(join(tmpdir(), 'edge-bench-reload-'));
  try {
    const tiny = workload('tiny');
    tiny.install(repo, true);
    log(`reload: building a ${mb} MB model`);
    const bytes = largeModel(mb);
    mkdirSync(join(repo, 'large', '1'), { recursive: true });
    writeFileSync(join(repo, 'large', '1', 'model.onnx'), bytes);
    writeFileSync(join(repo, 'large', 'config.yaml'), '# bench: the reload row\nwarmup:\n  runs: 1\n');
    const agent = await startAgent({ ...agentBase, repo }, performance.now());
    const kserve = new KServeBenchClient(agent.unix);
    const probe = await openNativeProbe(agent.unix, 'tiny', tiny.inputs, 0);
    try {
      const window = { warmupMs: 0, durationMs: 25, minSamples: 1, maxSamples: 100_000 };
      await probe.block({ ...window, durationMs: 200 });
      log('reload: steady');
      const steady = await probe.block({ ...window, durationMs: steadyMs });
      log('reload: loading the large model again');
      let done = false;
      const t0 = performance.now();
      const reload = kserve.repositoryModelLoad('large').finally(() => { done = true; });
      const during: number[] = [];
      while (!done) during.push(...await probe.block(window));
      await reload;
      const reloadMs = performance.now() - t0;
      return { model_mb: round1(bytes.length / (1024 * 1024)), reload_ms: round1(reloadMs), steady: withMax(steady), during: withMax(during) };
    } finally {
      await probe.close();
      kserve.close();
      await agent.stop();
    }
  } finally {
    rmSync(repo, { recursive: true, force: true });
  }
}
