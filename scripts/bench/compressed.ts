import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type * as ort from 'onnxruntime-node';
import { cosineSimilarity, encodeNpy, runOptimize } from '../../agent/compress/index.js';
import { bareFeeds, openBareSession, plainOutputs, type BenchProvider } from './bare.js';
import type { AgentBase } from './lifecycle.js';
import { bareLoad, openKServeLoad, openNativeLoad, openNativeProbe, type LoadProbe, type LoadWindow } from './load.js';
import { startAgent, startHelperServer, type RunningAgent, type ServerHandle } from './processes.js';
import { inRounds, median, round1 } from './stats.js';
import { mulberry32 } from '../demo-models.js';
import type { Workload } from './workloads.js';

export interface CompressedResult {
  readonly workload: string;
  /** What the agent's `variant: auto` serves, from its log. */
  readonly served_variant: string;
  /** `edge-agent optimize`'s report of the int8 variant against fp32 on frames it held out of calibration. */
  readonly held_out: { readonly samples: number; readonly cosine: number; readonly top1: number | null };
  /** The agent's outputs for the bench's frame against bare onnxruntime's fp32 outputs. */
  readonly cosine_vs_bare_fp32: number;
  /** Frames/s, median of the rounds, with the range. */
  readonly fps: Readonly<Record<CompressedRow, number>>;
  readonly fps_range: Readonly<Record<CompressedRow, readonly [number, number]>>;
  /** agent (int8) at 8 streams over the naive server (fp32) at 8. */
  readonly vs_naive: number;
}

export type CompressedRow = 'bare_fp32_b8' | 'bare_int8_b8' | 'agent_int8_8' | 'naive_fp32_8';

/** Calibration frames drawn like the bench's own frame (uniform in [-1, 1)), never that frame itself. */
const CALIBRATION_FRAMES = 48;

/**
 * Model compression, end to end: the same fp32 model file, and beside it the int8 variant `edge-agent optimize`
 * builds from it, in the agent's repository. The agent serves the variant (`variant: auto`), and its 8 streams
 * are measured against the naive server and bare onnxruntime running the fp32 file, and bare running the
 * variant, in alternating rounds. The other rows of the bench all run the fp32 model: this one is not part of
 * their targets, it shows what the variant adds on top.
 */
export async function measureCompressed(
  w: Workload, agentBase: AgentBase, provider: BenchProvider, rounds: number, window: LoadWindow, log: (line: string) => void,
): Promise<CompressedResult> {
  const work = mkdtempSync(join(tmpdir(), 'edge-bench-compressed-'));
  let agent: RunningAgent | undefined;
  let naive: ServerHandle | undefined;
  const sessions: ort.InferenceSession[] = [];
  const probes: { key: CompressedRow; probe: LoadProbe }[] = [];
  try {
    const repo = join(work, 'models');
    w.install(repo, true);
    const fp32File = w.modelFile(repo);
    const [name, frame] = Object.entries(w.inputs)[0] as [string, (typeof w.inputs)[string]];
    const count = frame.data.length;
    const rand = mulberry32(0xca1b);
    const calibration = new Float32Array(CALIBRATION_FRAMES * count).map(() => rand() * 2 - 1);
    const calibrationFile = join(work, 'calibration.npy');
    writeFileSync(calibrationFile, encodeNpy([CALIBRATION_FRAMES, ...frame.shape.slice(1)], calibration));
    log(`compressed ${w.name}: building the int8 variant (edge-agent optimize, ${CALIBRATION_FRAMES} calibration frames for input '${name}')`);
    const optimized = await runOptimize({ model: fp32File, calibration: calibrationFile, formats: ['int8'], latencyRuns: 20, provider });
    const int8 = optimized.report.variants.int8;
    if (!int8) throw new Error(`optimize built no int8 variant of ${w.name}`);

    log(`compressed ${w.name}: starting the agent and the naive server`);
    agent = await startAgent({ ...agentBase, repo }, performance.now());
    const ready = agent.server.stdoutTail().split('\n').find((l) => l.includes('"model ready"') && l.includes(`"model":"${w.name}"`));
    const servedVariant = ready ? String((JSON.parse(ready) as { variant?: string }).variant ?? 'unknown') : 'unknown';
    naive = await startHelperServer('naive-server', 'naive-server', [`${w.name}=${fp32File}`]);

    const fp32 = await openBareSession(fp32File, provider);
    const variant = await openBareSession(join(repo, w.name, '1', int8.file), provider);
    sessions.push(fp32, variant);
    const reference = plainOutputs(await fp32.run(bareFeeds(w, 1)));
    const check = await openNativeProbe(agent.tcp, w.name, w.inputs, 1);
    const served = check.outputs[0] ?? {};
    await check.close();
    const cosines = Object.entries(reference).map(([k, r]) => (served[k] ? cosineSimilarity(Float32Array.from(served[k].data), Float32Array.from(r.data)) : 0));

    probes.push(
      { key: 'bare_fp32_b8', probe: bareLoad(fp32, bareFeeds(w, 8), 8) },
      { key: 'bare_int8_b8', probe: bareLoad(variant, bareFeeds(w, 8), 8) },
      { key: 'agent_int8_8', probe: await openNativeLoad(agent.tcp, w.name, w.inputs, 8) },
      { key: 'naive_fp32_8', probe: openKServeLoad({ address: naive.tcp, model: w.name, inputs: w.inputs, carryState: [] }, 8) },
    );
    const fps = new Map<CompressedRow, number[]>(probes.map((p) => [p.key, []]));
    await inRounds(rounds, probes, async (probe, key) => {
      log(`compressed ${w.name} ${key}`);
      (fps.get(key as CompressedRow) as number[]).push((await probe.block(window)).fps);
    });
    const med = (k: CompressedRow): number => round1(median(fps.get(k) as number[]));
    const rows = probes.map((p) => p.key);
    return {
      workload: w.name,
      served_variant: servedVariant,
      held_out: { samples: int8.accuracy.samples, cosine: Math.round(int8.accuracy.cosine * 1e6) / 1e6, top1: int8.accuracy.top1Agreement ?? null },
      cosine_vs_bare_fp32: Math.round(Math.min(...cosines) * 1e6) / 1e6,
      fps: Object.fromEntries(rows.map((k) => [k, med(k)])) as Record<CompressedRow, number>,
      fps_range: Object.fromEntries(rows.map((k) => [k, [Math.min(...(fps.get(k) as number[])), Math.max(...(fps.get(k) as number[]))]])) as Record<CompressedRow, [number, number]>,
      vs_naive: Math.round((med('agent_int8_8') / med('naive_fp32_8')) * 100) / 100,
    };
  } finally {
    for (const p of probes) await p.probe.close();
    for (const s of sessions) await s.release();
    await agent?.stop();
    await naive?.stop();
    rmSync(work, { recursive: true, force: true });
  }
}
