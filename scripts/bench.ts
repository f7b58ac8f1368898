import { cpus, loadavg, tmpdir } from 'node:os';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { Command } from 'commander';
import * as ort from 'onnxruntime-node';
import { parse } from 'yaml';
import { agentConfigSchema } from '../agent/config/index.js';
import { applyHeapGrowingPercent } from '../agent/v8-heap.js';
import { bareFeeds, EQUAL_REL, openBareSession, outputsDiff, referenceSequence, runsAtBatch8, type BenchProvider, type Outputs } from './bench/bare.js';
import { measureColdStart, measureRss } from './bench/lifecycle.js';
import { measureCompressed } from './bench/compressed.js';
import { measureInstall } from './bench/install.js';
import { measureReload } from './bench/reload.js';
import {
  bareLatencyProbe, bareLoad, openKServeLoad, openKServeProbe, openNativeLoad, openNativeProbe,
  type KServeTarget, type LatencyProbe, type LoadProbe, type LoadWindow,
} from './bench/load.js';
import { processCpuNs, startAgent, startHelperServer, type RunningAgent, type ServerHandle } from './bench/processes.js';
import {
  renderReport, type Api, type BenchReport, type Transport,
} from './bench/report.js';
import { inRounds, median, round1, Rounds, summarize, type WarmupRounds, type Window } from './bench/stats.js';
import { evaluateTargets } from './bench/targets.js';
import { batchingOptions, workload, WORKLOAD_NAMES } from './bench/workloads.js';

/**
 * `npm run bench`: the agent measured against its limits — onnxruntime in-process (`bare`), a no-inference
 * gRPC echo (the transport floor) and a naive server a user would write — with the same models and frames in
 * every row. Figures only: nothing here passes or fails (test/bench.test.ts runs `--quick` for structure).
 */

const SECTIONS = ['bare', 'echo', 'latency', 'execution', 'throughput', 'naive', 'rss', 'coldstart', 'reload', 'install', 'compressed'] as const;
type Section = (typeof SECTIONS)[number];

export interface BenchOptions {
  readonly quick: boolean;
  readonly workloads: readonly string[];
  readonly providers: readonly BenchProvider[];
  readonly sections: readonly Section[];
  readonly streams: readonly number[];
  readonly rssFrames: number;
  readonly coldReps: number;
  /** Size of the model the reload row loads again, in MB. */
  readonly reloadMb: number;
  /** Rounds of alternating blocks (latency and throughput); undefined: the mode's default. */
  readonly rounds?: number;
  /** Put bare's outputs for the frame (batch 1, three steps) in the JSON, for cross-provider comparison. */
  readonly referenceOutputs: boolean;
  /** Run the agent children under --cpu-prof, profiles written here. */
  readonly cpuProfDir?: string;
  /** Merged over every agent's config (YAML from --agent-config). */
  readonly agentConfig?: Readonly<Record<string, unknown>>;
  /** dynamic_batching.max_queue_delay_us for the batching-on model configs (default: the agent's). */
  readonly queueDelayUs?: number;
  /** The latency clients' busy poll while a result is awaited (EdgeAgentClient busyPollUs); 0: off. */
  readonly clientPollUs: number;
  /** What the load generator (this process) runs with: agent/v8-heap.ts. */
  readonly loadGeneratorHeapGrowingPercent: number;
  readonly log: (line: string) => void;
}

/** Frames each latency row checks against bare (a stateful model's outputs change step by step). */
const CAPTURE = 3;

interface Timing {
  latencyRounds: number;
  /** Untimed rounds before the first latency rows of a run, and before each later set of rows. */
  latencyWarmup: { first: WarmupRounds; next: WarmupRounds };
  latency: Window; throughputRounds: number; throughput: LoadWindow }

function timing(quick: boolean, rounds: number | undefined): Timing {
  return quick
    ? { latencyRounds: rounds ?? 1, latencyWarmup: { first: { rounds: 0, minMs: 0 }, next: { rounds: 0, minMs: 0 } }, latency: { warmupMs: 20, durationMs: 60, minSamples: 5, maxSamples: 2000 }, throughputRounds: rounds ?? 1, throughput: { warmupMs: 30, durationMs: 100 } }
    : { latencyRounds: rounds ?? 6, latencyWarmup: { first: { rounds: 1, minMs: 4000 }, next: { rounds: 1, minMs: 0 } }, latency: { warmupMs: 50, durationMs: 250, minSamples: 20, maxSamples: 20_000 }, throughputRounds: rounds ?? 3, throughput: { warmupMs: 300, durationMs: 1200 } };
}

interface Servers {
  echo?: ServerHandle;
  /** The echo server that also runs bare's session once per native frame: the floor for a model. */
  echoRun?: ServerHandle;
  /** The agent's default configuration (batching on / off); `inline` and `worker`: execution forced. */
  on?: RunningAgent;
  off?: RunningAgent;
  inline?: RunningAgent;
  worker?: RunningAgent;
  naive?: ServerHandle;
}

export async function runBench(o: BenchOptions): Promise<BenchReport> {
  const t0 = performance.now();
  const T = timing(o.quick, o.rounds);
  const has = (s: Section): boolean => o.sections.includes(s);
  if (o.queueDelayUs !== undefined) batchingOptions.queueDelayUs = o.queueDelayUs;
  const loads = o.workloads.map(workload);
  const work = mkdtempSync(join(tmpdir(), 'edge-bench-'));
  const repoOn = join(work, 'models-batching');
  const repoOff = join(work, 'models-no-batching');
  for (const w of loads) {
    w.install(repoOn, true);
    w.install(repoOff, false);
  }
  const report: BenchReport = {
    meta: {
      date: new Date().toISOString(), node: process.version, onnxruntime: ort.env.versions.common, cpus: cpus().length,
      cpu_model: cpus()[0]?.model ?? 'unknown', providers: [...o.providers], quick: o.quick, sections: [...o.sections],
      loadavg_start: loadavg(), loadavg_end: [], duration_s: 0, served_by: {}, agent_config: o.agentConfig ? { ...o.agentConfig } : null,
      queue_delay_us: o.queueDelayUs ?? null, client_poll_us: o.clientPollUs, load_generator_heap_growing_percent: o.loadGeneratorHeapGrowingPercent, notes: [],
    },
    workloads: Object.fromEntries(loads.map((w) => [w.name, {
      description: w.description, frame_bytes: w.frameBytes, batchable: w.batchable, stateful: w.state.length > 0,
      inputs: Object.fromEntries(Object.entries(w.inputs).map(([k, t]) => [k, [...t.shape]])),
    }])),
    bare: {}, echo: [], latency: [], throughput: [], naive: [], targets: [],
  };
  const provider = o.providers[0] as BenchProvider;
  const agentBase = {
    providers: o.providers,
    ...(o.cpuProfDir ? { nodeArgs: ['--cpu-prof', '--cpu-prof-dir', o.cpuProfDir] } : {}),
    ...(o.agentConfig ? { configOverrides: o.agentConfig } : {}),
  };
  const references = new Map<string, Outputs[]>();
  const sessions = new Map<string, ort.InferenceSession>();
  const servers: Servers = {};

  try {
    for (const w of loads) {
      const session = await openBareSession(w.modelFile(repoOn), provider);
      sessions.set(w.name, session);
      references.set(w.name, await referenceSequence(session, w, CAPTURE));
    }

    // Every server runs for the whole measuring phase (idle while another is measured), so rows can alternate.
    const start = async (label: string, spec: { repo: string; execution?: 'worker' | 'inline' }): Promise<RunningAgent> => {
      o.log(`starting agent (${label})`);
      return startAgent({ ...agentBase, ...spec }, performance.now());
    };
    if (has('echo')) {
      const outputsByModel: Record<string, { name: string; dtype: string; shape: number[] }[]> = {};
      for (const w of loads) outputsByModel[w.name] = Object.entries(references.get(w.name)?.[0] ?? {}).map(([name, t]) => ({ name, dtype: 'float32', shape: t.dims }));
      o.log('starting echo server');
      servers.echo = await startHelperServer('echo-server', 'echo-server', ['--unix', join(work, 'echo.sock'), '--outputs', JSON.stringify(outputsByModel)]);
      if (has('latency')) {
        o.log('starting echo server with inference (echo+run)');
        const run = Object.fromEntries(loads.map((w) => [w.name, w.modelFile(repoOn)]));
        servers.echoRun = await startHelperServer('echo-run-server', 'echo-server',
          ['--unix', join(work, 'echo-run.sock'), '--outputs', JSON.stringify(outputsByModel), '--run', JSON.stringify(run), '--provider', provider]);
      }
    }
    // The agent's default configuration is what the rows and the targets describe; its execution mode per model
    // (worker thread or event loop) is read from its log. The execution section adds agents forced to the
    // other mode, so both are reported for every model.
    if (has('latency') || has('throughput') || has('naive') || has('execution')) servers.on = await start('default config, batching on', { repo: repoOn });
    const modes: Record<string, 'worker' | 'inline'> = {};
    /** Whether the agent batches the model (max_batch_size > 0 in its log): then batching on/off rows exist. */
    const batches: Record<string, boolean> = {};
    for (const line of servers.on?.server.stdoutTail().split('\n') ?? []) {
      if (!line.includes('"model ready"')) continue;
      const m = JSON.parse(line) as { model: string; execution?: string; max_batch_size?: number };
      modes[m.model] = m.execution === 'inline' ? 'inline' : 'worker';
      batches[m.model] = (m.max_batch_size ?? 0) > 0;
      const info = report.workloads[m.model];
      if (info) info.batchable = batches[m.model] as boolean;
    }
    if (has('throughput') && loads.some((w) => batches[w.name])) servers.off = await start('default config, batching off', { repo: repoOff });
    if (has('execution') && loads.some((w) => modes[w.name] !== 'inline')) servers.inline = await start('inline', { repo: repoOn, execution: 'inline' });
    if (has('execution') && loads.some((w) => modes[w.name] !== 'worker')) servers.worker = await start('worker', { repo: repoOn, execution: 'worker' });
    if (has('naive')) {
      o.log('starting naive server');
      servers.naive = await startHelperServer('naive-server', 'naive-server', loads.map((w) => `${w.name}=${w.modelFile(repoOn)}`));
    }
    const servedBy = (servers.on ?? servers.inline)?.server.stdoutTail().split('\n').find((l) => l.includes('"edge-agent ready"'));
    for (const entry of (servedBy ? (JSON.parse(servedBy) as { ready: string[] }).ready : [])) {
      const [name, by] = entry.split('@') as [string, string];
      report.meta.served_by[name.split(':')[0] as string] = by;
    }

    const bareB1 = new Map<string, Rounds>();
    const bareFps = new Map<string, { b1: number[]; b8: number[] }>();

    // ---- latency: 1 client closed-loop; rounds of bare, echo, agent (worker), agent (inline) ----
    // Every client polls while its result is awaited (--client-poll-us), as a latency-critical caller would; for
    // the native API, echo and the agent are also measured with a client that sleeps, side by side.
    if (has('latency') || has('echo') || has('execution')) {
      let warmup = T.latencyWarmup.first;
      for (const w of loads) {
        const session = sessions.get(w.name) as ort.InferenceSession;
        const combos: [Api, Transport][] = [['native_stream', 'tcp'], ['native_stream', 'unix'], ['kserve_stream', 'tcp'], ['kserve_unary', 'tcp']];
        for (const [api, transport] of combos) {
          o.log(`latency ${w.name} ${api} ${transport}`);
          const open = async (target: { tcp: string; unix?: string }, sequence: boolean, pollUs = o.clientPollUs): Promise<LatencyProbe> => {
            const address = transport === 'unix' ? target.unix as string : target.tcp;
            if (api === 'native_stream') return openNativeProbe(address, w.name, w.inputs, CAPTURE, pollUs);
            return openKServeProbe({ address, model: w.name, inputs: w.inputs, sequence }, api === 'kserve_stream' ? 'stream' : 'unary', CAPTURE, pollUs);
          };
          const sleepingClient = api === 'native_stream' && o.clientPollUs > 0;
          const probes: { key: string; probe: LatencyProbe }[] = [{ key: 'bare', probe: bareLatencyProbe(session, bareFeeds(w, 1)) }];
          if (servers.echo) probes.push({ key: 'echo', probe: await open(servers.echo, false) });
          if (servers.echo && sleepingClient) probes.push({ key: 'echo-sleeping', probe: await open(servers.echo, false, 0) });
          if (servers.echoRun && api === 'native_stream') probes.push({ key: 'echo-run', probe: await open(servers.echoRun, false) });
          const mainMode = modes[w.name] ?? 'worker';
          if (servers.on && has('latency')) probes.push({ key: 'main', probe: await open(servers.on, w.state.length > 0) });
          if (servers.on && has('latency') && sleepingClient) probes.push({ key: 'main-sleeping', probe: await open(servers.on, w.state.length > 0, 0) });
          if (servers.inline && mainMode !== 'inline' && api === 'native_stream') probes.push({ key: 'inline', probe: await open(servers.inline, w.state.length > 0) });
          if (servers.worker && mainMode !== 'worker' && api === 'native_stream') probes.push({ key: 'worker', probe: await open(servers.worker, w.state.length > 0) });
          const rounds = new Map(probes.map((p) => [p.key, new Rounds()]));
          const pids: Record<string, number | undefined> = {
            bare: process.pid, echo: servers.echo?.server.pid, 'echo-sleeping': servers.echo?.server.pid, 'echo-run': servers.echoRun?.server.pid, main: servers.on?.server.pid, 'main-sleeping': servers.on?.server.pid,
            worker: servers.worker?.server.pid, inline: servers.inline?.server.pid,
          };
          const cpu = new Map(probes.map((p) => [p.key, { total: 0, main: 0, frames: 0 }]));
          await inRounds(T.latencyRounds, probes, async (probe, key, measured) => {
            if (!measured) {
              await probe.block(T.latency);
              probe.agentTimings?.inferenceUs.splice(0);
              probe.agentTimings?.totalUs.splice(0);
              return;
            }
            const pid = pids[key] as number;
            const c0 = processCpuNs(pid);
            const n0 = probe.count;
            (rounds.get(key) as Rounds).add(await probe.block(T.latency));
            const c1 = processCpuNs(pid);
            const acc = cpu.get(key) as { total: number; main: number; frames: number };
            acc.total += c1.total - c0.total;
            acc.main += c1.main - c0.main;
            acc.frames += probe.count - n0;
          }, warmup);
          warmup = T.latencyWarmup.next;
          for (const p of probes) await p.probe.close();
          const cpuPerFrame = (key: string): { total: number; main: number } | undefined => {
            const c = cpu.get(key);
            return c && c.frames > 0 ? { total: round1(c.total / c.frames / 1000), main: round1(c.main / c.frames / 1000) } : undefined;
          };

          const bare = rounds.get('bare') as Rounds;
          const b = bareB1.get(w.name) ?? new Rounds();
          b.p50s.push(...bare.p50s);
          for (const x of bare.all) b.all.push(x);
          bareB1.set(w.name, b);
          for (const key of ['echo', 'echo-sleeping'] as const) {
            const echo = rounds.get(key);
            if (!echo) continue;
            const e = echo.summary();
            report.echo.push({
              frame: w.name, frame_bytes: w.frameBytes, api, transport, client_poll_us: key === 'echo' ? o.clientPollUs : 0,
              p50_us: e.p50_median, p99_us: e.p99_us, n: e.n, rounds: echo.p50s.length, cpu_us_per_frame: cpuPerFrame(key),
            });
          }
          for (const key of ['main', 'main-sleeping', 'worker', 'inline'] as const) {
            const agent = rounds.get(key);
            if (!agent) continue;
            const sleeping = key === 'main-sleeping';
            const echoKey = sleeping ? 'echo-sleeping' : 'echo';
            const echo = rounds.get(echoKey);
            const execution = key === 'main' || sleeping ? mainMode : key;
            const probe = probes.find((p) => p.key === key)?.probe as LatencyProbe;
            const s = agent.summary();
            const over = agent.p50s.map((x, i) => x - (bare.p50s[i] as number));
            const own = echo ? over.map((x, i) => x - (echo.p50s[i] as number)) : undefined;
            // Against the floor for this model, with the same (polling) client: only rows of that client.
            const echoRun = sleeping ? undefined : rounds.get('echo-run');
            const overRun = echoRun ? agent.p50s.map((x, i) => x - (echoRun.p50s[i] as number)) : undefined;
            const diff = outputsDiff(probe.outputs, references.get(w.name) ?? []);
            const agentCpu = cpuPerFrame(key);
            const echoCpu = cpuPerFrame(echoKey);
            const bareCpu = cpuPerFrame('bare');
            report.latency.push({
              workload: w.name, frame_bytes: w.frameBytes, api, transport, execution, config: key === 'main' || sleeping ? 'default' : 'forced',
              client_poll_us: sleeping ? 0 : o.clientPollUs, p50_us: s.p50_median, p99_us: s.p99_us, n: s.n, rounds: agent.p50s.length,
              bare_p50_us: round1(median(bare.p50s)), echo_p50_us: echo ? round1(median(echo.p50s)) : undefined,
              overhead_us: round1(median(over)), own_cost_us: own ? round1(median(own)) : undefined,
              own_cost_range_us: own ? [round1(Math.min(...own)), round1(Math.max(...own))] : undefined,
              echo_run_p50_us: echoRun ? round1(median(echoRun.p50s)) : undefined,
              over_echo_run_us: overRun ? round1(median(overRun)) : undefined,
              cpu_us_per_frame: agentCpu, bare_cpu_us_per_frame: bareCpu?.total,
              agent_inference_us: probe.agentTimings?.inferenceUs.length ? summarize(probe.agentTimings.inferenceUs).p50_us : undefined,
              agent_total_us: probe.agentTimings?.totalUs.length ? summarize(probe.agentTimings.totalUs).p50_us : undefined,
              own_cpu_us: agentCpu && echoCpu && bareCpu ? round1(agentCpu.total - echoCpu.total - bareCpu.total) : undefined,
              outputs_equal: diff <= EQUAL_REL, max_rel_diff: diff,
            });
          }
        }
      }
    }

    // ---- throughput: concurrent closed loops; rounds of bare b1/b8, agent on/off at each stream count, naive ----
    if (has('throughput') || has('naive')) {
      const streamCounts = has('throughput') ? o.streams : [8];
      for (const w of loads) {
        const session = sessions.get(w.name) as ort.InferenceSession;
        o.log(`throughput ${w.name}: opening streams`);
        const probes: { key: string; probe: LoadProbe }[] = [{ key: 'bare1', probe: bareLoad(session, bareFeeds(w, 1), 1) }];
        if (await runsAtBatch8(session, w)) probes.push({ key: 'bare8', probe: bareLoad(session, bareFeeds(w, 8), 8) });
        const on = servers.on as RunningAgent;
        for (const n of streamCounts) {
          probes.push({ key: `on:${n}`, probe: await openNativeLoad(on.tcp, w.name, w.inputs, n) });
          if (servers.off && batches[w.name] && has('throughput')) probes.push({ key: `off:${n}`, probe: await openNativeLoad(servers.off.tcp, w.name, w.inputs, n) });
        }
        if (servers.naive) {
          const target: KServeTarget = { address: servers.naive.tcp, model: w.name, inputs: w.inputs, carryState: w.state };
          const check = await openKServeProbe(target, 'unary', CAPTURE);
          const diff = outputsDiff(check.outputs, references.get(w.name) ?? []);
          await check.close();
          if (diff > EQUAL_REL) report.meta.notes.push(`naive server's ${w.name} outputs differ from bare (relative ${diff})`);
          probes.push({ key: 'naive:8', probe: openKServeLoad(target, 8) });
          probes.push({ key: 'kserve:8', probe: openKServeLoad({ address: on.tcp, model: w.name, inputs: w.inputs, sequence: w.state.length > 0 }, 8) });
        }
        const rounds = new Map(probes.map((p) => [p.key, new Rounds()]));
        const serverPid = (key: string): number | undefined => {
          const kind = key.split(':')[0];
          return kind === 'on' || kind === 'kserve' ? servers.on?.server.pid : kind === 'off' ? servers.off?.server.pid : kind === 'naive' ? servers.naive?.server.pid : undefined;
        };
        const cpu = new Map(probes.map((p) => [p.key, { server: 0, client: 0, frames: 0 }]));
        await inRounds(T.throughputRounds, probes, async (probe, key) => {
          o.log(`throughput ${w.name} ${key}`);
          const pid = serverPid(key);
          const s0 = pid === undefined ? undefined : processCpuNs(pid);
          const c0 = processCpuNs(process.pid);
          const b = await probe.block(T.throughput);
          const c1 = processCpuNs(process.pid);
          const s1 = pid === undefined ? undefined : processCpuNs(pid);
          (rounds.get(key) as Rounds).add(b.samplesUs, b.fps, b.meanBatch);
          const acc = cpu.get(key) as { server: number; client: number; frames: number };
          // bare runs in this process: its CPU is the "server"; a served row's client is this process.
          if (s0 && s1) {
            acc.server += s1.total - s0.total;
            acc.client += c1.total - c0.total;
          } else {
            acc.server += c1.total - c0.total;
          }
          acc.frames += b.totalFrames;
        });
        const cpuOf = (key: string): { server: number; client: number } | undefined => {
          const c = cpu.get(key);
          return c && c.frames > 0 ? { server: round1(c.server / c.frames / 1000), client: round1(c.client / c.frames / 1000) } : undefined;
        };
        for (const p of probes) await p.probe.close();
        const fpsOf = (key: string): number | undefined => { const r = rounds.get(key); return r ? round1(median(r.values)) : undefined; };
        const b1 = fpsOf('bare1') as number;
        const b8 = fpsOf('bare8');
        bareFps.set(w.name, { b1: rounds.get('bare1')?.values ?? [], b8: rounds.get('bare8')?.values ?? [] });
        for (const [key, r] of rounds) {
          if (key.startsWith('bare')) continue;
          const [kind, n] = key.split(':') as [string, string];
          const s = r.summary();
          report.throughput.push({
            workload: w.name, server: kind === 'naive' ? 'naive' : 'agent', api: kind === 'naive' || kind === 'kserve' ? 'kserve_unary' : 'native_stream',
            batching: kind === 'naive' || !batches[w.name] ? null : kind !== 'off', streams: Number(n),
            fps: round1(median(r.values)), fps_range: [Math.min(...r.values), Math.max(...r.values)], p50_us: s.p50_us, p99_us: s.p99_us,
            mean_batch: r.batches.length ? round1(r.batches.reduce((a, x) => a + x, 0) / r.batches.length) : undefined,
            bare_b1_fps: b1, bare_b8_fps: b8,
            cpu_us_per_frame: cpuOf(key), bare_b1_cpu_us: cpuOf('bare1')?.server, bare_b8_cpu_us: cpuOf('bare8')?.server,
          });
        }
        const naive8 = fpsOf('naive:8');
        const agent8 = fpsOf('on:8');
        if (naive8 !== undefined && agent8 !== undefined) report.naive.push({ workload: w.name, naive_fps: naive8, agent_fps: agent8, ratio: Math.round((agent8 / naive8) * 100) / 100 });
      }
    }

    // ---- bare table: from the rounds above, or measured alone when those sections did not run ----
    if (has('bare')) {
      for (const w of loads) {
        const session = sessions.get(w.name) as ort.InferenceSession;
        let lat = bareB1.get(w.name);
        if (!lat) {
          lat = new Rounds();
          lat.add(await bareLatencyProbe(session, bareFeeds(w, 1)).block(T.latency));
        }
        let fps = bareFps.get(w.name);
        if (!fps) {
          const one = await bareLoad(session, bareFeeds(w, 1), 1).block(T.throughput);
          const eight = await runsAtBatch8(session, w) ? await bareLoad(session, bareFeeds(w, 8), 8).block(T.throughput) : undefined;
          fps = { b1: [one.fps], b8: eight ? [eight.fps] : [] };
        }
        const { p50_median, ...pooled } = lat.summary();
        report.bare[w.name] = {
          b1: { ...pooled, p50_us: p50_median },
          b1_fps: fps.b1.length ? round1(median(fps.b1)) : undefined, b8_fps: fps.b8.length ? round1(median(fps.b8)) : undefined,
          ...(o.referenceOutputs ? { reference: references.get(w.name) } : {}),
        };
      }
    }
  } finally {
    for (const s of [servers.echo, servers.echoRun, servers.on, servers.off, servers.inline, servers.worker, servers.naive]) await s?.stop();
    for (const s of sessions.values()) await s.release();
  }

  try {
    if (has('rss')) {
      o.log('RSS');
      report.rss = await measureRss(join(work, 'models-rss'), agentBase, o.rssFrames, o.log);
    }
    if (has('coldstart')) {
      report.cold_start = await measureColdStart({
        workloads: loads, repo: repoOn, agentBase, reps: o.coldReps, providers: o.providers, references, log: o.log,
        note: (n) => report.meta.notes.push(n),
      });
    }
    if (has('reload')) report.reload = await measureReload(agentBase, o.reloadMb, o.quick ? 100 : 2000, o.log);
    if (has('install')) report.install = await measureInstall(o.reloadMb, o.quick ? 1 : 3, o.log);
    const classifier = loads.find((w) => w.name === 'classifier');
    if (has('compressed') && classifier) report.compressed = await measureCompressed(classifier, agentBase, provider, T.throughputRounds, T.throughput, o.log);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  report.targets = evaluateTargets(report);
  report.meta.loadavg_end = loadavg();
  report.meta.duration_s = round1((performance.now() - t0) / 1000);
  const busiest = Math.max(report.meta.loadavg_start[0] ?? 0, report.meta.loadavg_end[0] ?? 0);
  if (busiest > report.meta.cpus * 0.5) {
    report.meta.notes.push(`the machine was shared (1-min load up to ${busiest.toFixed(2)} on ${report.meta.cpus} CPUs): rows were measured in alternating rounds so they saw the same load, but absolute figures are inflated`);
  }
  return report;
}

function list(value: string): string[] {
  return value.split(',').map((s) => s.trim()).filter(Boolean);
}

async function main(argv: readonly string[]): Promise<void> {
  // The load generator streams the same frames the agent receives and its V8 has the same trouble with them
  // (see agent/v8-heap.ts): untuned, its full collections took 0.3–1 ms of CPU a frame from the cores the
  // servers are measured on. It gets the agent's default, as a Node sensor process should.
  const loadGeneratorHeapGrowingPercent = applyHeapGrowingPercent(agentConfigSchema.parse({}).v8.heap_growing_percent);
  const program = new Command('bench')
    .description('edge-agent benchmark: bare onnxruntime, gRPC echo floor, the agent (native + KServe), a naive server')
    .option('--quick', 'CI-sized run (a few seconds per section; figures are not meaningful)', false)
    .option('--json', 'print one JSON object instead of the tables', false)
    .option('--out <file>', 'also write the JSON report to this file')
    .option('--workloads <list>', `comma-separated, from: ${WORKLOAD_NAMES.join(', ')} (default: tiny,classifier,blazeface,silero; --quick: tiny,classifier,filter)`)
    .option('--providers <list>', 'execution providers for the agent and bare (first one for bare): cpu, webgpu, cuda', 'cpu')
    .option('--sections <list>', `comma-separated, from: ${SECTIONS.join(', ')}`, SECTIONS.join(','))
    .option('--streams <list>', 'concurrent streams for the throughput rows', '1,8,32')
    .option('--rss-frames <n>', 'frames between the two RSS readings (default 200000; --quick 2000)')
    .option('--cold-reps <n>', 'cold-start repetitions of each kind (default 5; --quick 1)')
    .option('--reload-mb <n>', 'size of the model the reload row loads again beside a serving one, and the install row installs (default 256; --quick 4)')
    .option('--rounds <n>', 'rounds of alternating blocks for latency and throughput (default 6 and 3; --quick 1)')
    .option('--reference-outputs', "include bare's outputs in the JSON (for comparing providers)", false)
    .option('--cpu-prof <dir>', 'run the agent children with --cpu-prof, profiles into <dir>')
    .option('--queue-delay-us <n>', 'dynamic_batching.max_queue_delay_us in the batching-on model configs (default: the agent\'s, 0)')
    .option('--agent-config <file>', "YAML merged over the bench's agent config (e.g. runtime.provider_options.intra_op_threads)")
    .option('--client-poll-us <n>', 'latency clients poll this long while a result is awaited (0: they sleep; the native API is also measured sleeping)', '1000');
  program.parse(argv, { from: 'user' });
  const opts = program.opts<{ quick: boolean; json: boolean; out?: string; workloads?: string; providers: string; sections: string; streams: string; rssFrames?: string; coldReps?: string; reloadMb?: string; rounds?: string; referenceOutputs: boolean; cpuProf?: string; agentConfig?: string; queueDelayUs?: string; clientPollUs: string }>();
  const sections = list(opts.sections);
  for (const s of sections) if (!(SECTIONS as readonly string[]).includes(s)) throw new Error(`unknown section '${s}' (known: ${SECTIONS.join(', ')})`);
  const providers = list(opts.providers);
  for (const p of providers) if (!['cpu', 'webgpu', 'cuda'].includes(p)) throw new Error(`unknown provider '${p}' (cpu, webgpu, cuda)`);
  const positive = (v: string | undefined, fallback: number, what: string): number => {
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw new Error(`${what} must be a positive integer, got '${v}'`);
    return n;
  };
  const nonNegative = (v: string, what: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`${what} must be a whole number ≥ 0, got '${v}'`);
    return n;
  };
  const report = await runBench({
    quick: opts.quick,
    workloads: opts.workloads ? list(opts.workloads) : opts.quick ? ['tiny', 'classifier', 'filter'] : ['tiny', 'classifier', 'blazeface', 'silero'],
    providers: providers as BenchProvider[],
    sections: sections as Section[],
    streams: list(opts.streams).map((s) => positive(s, 1, '--streams')),
    rssFrames: positive(opts.rssFrames, opts.quick ? 2000 : 200_000, '--rss-frames'),
    coldReps: positive(opts.coldReps, opts.quick ? 1 : 5, '--cold-reps'),
    reloadMb: positive(opts.reloadMb, opts.quick ? 4 : 256, '--reload-mb'),
    ...(opts.rounds ? { rounds: positive(opts.rounds, 1, '--rounds') } : {}),
    referenceOutputs: opts.referenceOutputs,
    clientPollUs: nonNegative(opts.clientPollUs, '--client-poll-us'),
    loadGeneratorHeapGrowingPercent,
    ...(opts.cpuProf ? { cpuProfDir: resolve(opts.cpuProf) } : {}),
    ...(opts.queueDelayUs !== undefined ? { queueDelayUs: Number(opts.queueDelayUs) } : {}),
    ...(opts.agentConfig ? { agentConfig: parse(readFileSync(opts.agentConfig, 'utf8')) as Record<string, unknown> } : {}),
    log: (line) => process.stderr.write(`[bench] ${line}\n`),
  });
  const json = JSON.stringify(report, null, 2);
  if (opts.out) writeFileSync(opts.out, `${json}\n`);
  process.stdout.write(opts.json ? `${json}\n` : `${renderReport(report)}\n`);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`bench: ${err instanceof Error ? (process.env.BENCH_DEBUG ? err.stack : err.message) : String(err)}\n`);
    process.exit(1);
  });
}
