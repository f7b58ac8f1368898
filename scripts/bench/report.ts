import type { BareResult, Outputs } from './bare.js';
import type { CompressedResult } from './compressed.js';
import type { InstallResult } from './install.js';
import type { ReloadResult } from './reload.js';
import { formatNumber, formatTable } from './stats.js';

export type Api = 'native_stream' | 'kserve_stream' | 'kserve_unary';
export type Transport = 'tcp' | 'unix';

/** Rows are measured in rounds, alternating with `bare` and `echo`: p50 is the median of the rounds' p50s. */
export interface EchoRow {
  readonly frame: string;
  readonly frame_bytes: number;
  readonly api: Api;
  readonly transport: Transport;
  /** The client's busy poll while awaiting a result (µs; 0: it sleeps until the answer wakes it). */
  readonly client_poll_us: number;
  readonly p50_us: number;
  /** Pooled over every round. */
  readonly p99_us: number;
  readonly n: number;
  readonly rounds: number;
  /** On-CPU time of the echo process per frame, all threads and main thread (µs). */
  readonly cpu_us_per_frame: { total: number; main: number } | undefined;
}

export interface LatencyRow {
  readonly workload: string;
  readonly frame_bytes: number;
  readonly api: Api;
  readonly transport: Transport;
  /** Where inference ran: a worker thread or the event loop (as the agent logged it). */
  readonly execution: 'worker' | 'inline';
  /** `default`: the agent's default configuration (what the targets read); `forced`: runtime.execution set. */
  readonly config: 'default' | 'forced';
  /** As in EchoRow; own cost is taken against the echo row with the same client. */
  readonly client_poll_us: number;
  readonly p50_us: number;
  readonly p99_us: number;
  readonly n: number;
  readonly rounds: number;
  /** bare batch-1 and echo p50 measured in the same rounds (medians). */
  readonly bare_p50_us: number;
  readonly echo_p50_us: number | undefined;
  /** Median over rounds of (p50 − bare p50). */
  readonly overhead_us: number;
  /** Median over rounds of (p50 − bare p50 − echo p50), same frame, API and transport: what the agent itself adds. */
  readonly own_cost_us: number | undefined;
  /** Smallest and largest per-round own cost: how much the shared machine moved it. */
  readonly own_cost_range_us: [number, number] | undefined;
  /**
   * Native rows with the polling client: p50 of the echo server that runs bare's session once per frame on its
   * event loop (transport + one inference run, nothing else: the least a server can do per frame), and the
   * median over rounds of (p50 − that). On this VM a round trip with 3 ms of work in it costs far more than
   * echo's plus bare's, whatever the work is; this compares the agent with a server that pays the same.
   */
  readonly echo_run_p50_us?: number | undefined;
  readonly over_echo_run_us?: number | undefined;
  /** On-CPU time of the agent process per frame (all threads; main thread), and of bare's process. */
  readonly cpu_us_per_frame: { total: number; main: number } | undefined;
  readonly bare_cpu_us_per_frame: number | undefined;
  /** The agent's own timings (native streams; p50): its inference run (thread hop included in worker mode), and
   * decoded frame → result ready. The rest of a round trip is gRPC, the event loop and the client. */
  readonly agent_inference_us: number | undefined;
  readonly agent_total_us: number | undefined;
  /** Agent CPU − echo CPU − bare CPU per frame: the agent's own work in CPU time, which sharing the cores
   * inflates far less than latency. */
  readonly own_cpu_us: number | undefined;
  /** The agent's outputs for the same frames equal bare onnxruntime's (relative 1e-5). */
  readonly outputs_equal: boolean;
  readonly max_rel_diff: number;
}

export interface ThroughputRow {
  readonly workload: string;
  readonly server: 'agent' | 'naive';
  readonly api: 'native_stream' | 'kserve_unary';
  /** null: the model cannot batch (fixed batch 1 or a scalar input), so on and off are the same config. */
  readonly batching: boolean | null;
  readonly streams: number;
  /** Median over rounds; the range is the smallest and largest round. */
  readonly fps: number;
  readonly fps_range: [number, number];
  readonly p50_us: number;
  readonly p99_us: number;
  readonly mean_batch: number | undefined;
  /** bare batch 1 and batch 8 in the same rounds (medians). */
  readonly bare_b1_fps: number;
  readonly bare_b8_fps: number | undefined;
  /** On-CPU µs per frame: the server process (all threads) and the load generator (this process). With the
   * cores shared, throughput depends on how much CPU each process got; CPU per frame does not. */
  readonly cpu_us_per_frame: { server: number; client: number } | undefined;
  readonly bare_b1_cpu_us: number | undefined;
  readonly bare_b8_cpu_us: number | undefined;
}

export interface NaiveRow {
  readonly workload: string;
  readonly naive_fps: number;
  readonly agent_fps: number;
  readonly ratio: number;
}

export interface RssResult {
  readonly frames: number;
  readonly fps: number;
  readonly ready_kb: number;
  /** After a warm-up of `warmup_frames` (grpc buffers, JIT and allocator pools settled). */
  readonly before_kb: number;
  readonly after_kb: number;
  readonly warmup_frames: number;
  /** RSS after each twentieth of the run. */
  readonly samples_kb: number[];
  readonly first_quarter_kb: number;
  readonly last_quarter_kb: number;
  /** Last quarter's median over the first quarter's: where V8's deferred collections stand, not only growth. */
  readonly quarter_growth_pct: number;
  /** Last reading over the reading after warm-up, neither after a collection. */
  readonly raw_growth_pct: number;
  /** RSS after a full collection, after the warm-up and after the frames. */
  readonly collected_before_kb: number;
  readonly collected_after_kb: number;
  /** The JS heap's live objects at those two readings. */
  readonly heap_used_before_kb: number;
  readonly heap_used_after_kb: number;
  /** collected_after_kb over collected_before_kb: what the process kept from the frames. */
  readonly growth_pct: number;
}

export interface ColdStartRuns {
  readonly median_ms: number;
  readonly ready_median_ms: number;
  readonly runs_ms: number[];
  /** Sum of the agent's logged per-model load times (session creation, from the cache or not), per run. */
  readonly model_load_median_ms: number;
  readonly model_load_runs_ms: number[];
  /** model:graph_cache as the agent logged it ('stored' on an empty data dir, 'hit' from the cache). */
  readonly graph_cache: string[];
}

export interface ColdStartResult {
  /** The agent's session factory alone, per model: empty cache folder (optimise + store) vs stored graph (median ms). */
  readonly session_create_ms: Record<string, { empty_ms: number; cached_ms: number }>;
  readonly model: string;
  readonly models_in_repository: string[];
  readonly empty: ColdStartRuns;
  readonly cached: ColdStartRuns;
  readonly saved_ms: number;
  /** In-process onnxruntime: create the session and run one frame, no agent (for scale). */
  readonly bare_first_result_ms: number;
}

export interface TargetRow {
  readonly name: string;
  readonly target: string;
  readonly value: string;
  readonly met: boolean | null;
  /**
   * A reference on the same measure, from the same run, and whether it meets the target. Own cost: the
   * echo+run server's (a plain server: the transport and one run of bare's session per frame, without the
   * agent's scheduling, hops or busy polling). 2x naive: bare onnxruntime's own throughput, the ceiling of any
   * server running that model here. Absent: the run measured no reference.
   */
  readonly reference?: { readonly value: string; readonly met: boolean };
}

export interface BenchReport {
  meta: {
    date: string;
    node: string;
    onnxruntime: string;
    cpus: number;
    cpu_model: string;
    providers: string[];
    quick: boolean;
    sections: string[];
    loadavg_start: number[];
    loadavg_end: number[];
    duration_s: number;
    served_by: Record<string, string>;
    /** --agent-config overrides merged over every agent's config, if any. */
    agent_config: Record<string, unknown> | null;
    /** --queue-delay-us: max_queue_delay_us of the batching-on configs (null: the agent's default). */
    queue_delay_us: number | null;
    /** --client-poll-us: the latency clients' busy poll (0: they sleep); the target rows read these rows. */
    client_poll_us: number;
    /** The load generator's V8 heap growth (agent/v8-heap.ts; the agents get theirs from their config). */
    load_generator_heap_growing_percent: number;
    notes: string[];
  };
  /** batchable: the agent batches it (max_batch_size > 0 as it logged); before an agent ran, whether the model has a batch dimension. */
  workloads: Record<string, { description: string; frame_bytes: number; batchable: boolean; stateful: boolean; inputs: Record<string, number[]> }>;
  bare: Record<string, BareResult & { reference?: Outputs[] }>;
  echo: EchoRow[];
  latency: LatencyRow[];
  throughput: ThroughputRow[];
  naive: NaiveRow[];
  rss?: RssResult;
  cold_start?: ColdStartResult;
  reload?: ReloadResult;
  install?: InstallResult;
  compressed?: CompressedResult;
  targets: TargetRow[];
}

const fmt = (x: number | undefined): string => (x === undefined ? 'n/a' : formatNumber(x));
const clientCell = (pollUs: number): string => (pollUs > 0 ? `polls ${pollUs} µs` : 'sleeps');
const cpuCell = (c: { total: number; main: number } | undefined): string => (c ? `${formatNumber(c.total)} (${formatNumber(c.main)})` : 'n/a');

/** The human-readable report: one table per section, then the targets. */
export function renderReport(r: BenchReport): string {
  const out: string[] = [];
  const m = r.meta;
  out.push(`edge-agent benchmark — ${m.date}, node ${m.node}, onnxruntime ${m.onnxruntime}, ${m.cpus}× ${m.cpu_model}, providers ${m.providers.join(',')}${m.quick ? ' (--quick)' : ''}`);
  out.push(`load average at start ${m.loadavg_start.map((x) => x.toFixed(2)).join(' ')}, at end ${m.loadavg_end.map((x) => x.toFixed(2)).join(' ')}; ${m.duration_s.toFixed(0)} s`);
  if (m.agent_config) out.push(`agent config overrides: ${JSON.stringify(m.agent_config)}`);
  out.push(`load generator (this process): V8 heap growing ${m.load_generator_heap_growing_percent} %, as the agent's default; latency clients ${m.client_poll_us > 0 ? `poll ${m.client_poll_us} µs` : 'sleep'} while awaiting a result`);
  if (m.queue_delay_us !== null) out.push(`batching-on configs: dynamic_batching.max_queue_delay_us ${m.queue_delay_us}`);
  for (const n of m.notes) out.push(`note: ${n}`);
  out.push('');
  out.push(formatTable(['workload', 'frame bytes', 'agent batches', 'stateful', 'served by'],
    Object.entries(r.workloads).map(([k, w]) => [k, w.frame_bytes, w.batchable ? 'yes' : 'no', w.stateful ? 'yes' : 'no', m.served_by[k] ?? ''])));
  if (Object.keys(r.bare).length > 0) {
    out.push('', 'bare: onnxruntime session.run in-process');
    out.push(formatTable(['workload', 'b1 p50 µs', 'b1 p99 µs', 'b1 frames/s', 'b8 frames/s', 'b8/b1'],
      Object.entries(r.bare).map(([k, b]) => [k, b.b1.p50_us, b.b1.p99_us, fmt(b.b1_fps), fmt(b.b8_fps), b.b8_fps && b.b1_fps ? fmt(b.b8_fps / b.b1_fps) : 'n/a'])));
  }
  if (r.echo.length > 0) {
    out.push('', 'echo: no-inference service, same grpc-js stack and frame (the transport floor), 1 client closed-loop');
    out.push(formatTable(['frame', 'bytes', 'api', 'transport', 'client', 'p50 µs', 'p99 µs', 'cpu µs/frame (main)', 'n', 'rounds'],
      r.echo.map((e) => [e.frame, e.frame_bytes, e.api, e.transport, clientCell(e.client_poll_us), e.p50_us, e.p99_us, cpuCell(e.cpu_us_per_frame), e.n, e.rounds])));
  }
  if (r.latency.length > 0) {
    out.push('', 'latency: agent as a child process, 1 stream/client closed-loop, in rounds alternating with bare and echo');
    out.push('(own cost = p50 − bare p50 − echo p50 of the same round and client, median over rounds; range: min..max round)');
    out.push('(client: polls while its result is awaited, as a latency-critical caller would (EdgeAgentClient busyPollUs), or sleeps)');
    out.push('(cpu: on-CPU µs per frame of the agent process, all threads (main thread); own cpu = agent − echo − bare cpu)');
    out.push('(agent run/total: p50 of the agent\'s own timings per frame — its inference run, and frame decoded → result ready)');
    out.push('(echo+run: the echo server running bare\'s session once per native frame on its event loop; over echo+run: p50 − its p50, same rounds and client)');
    out.push(formatTable(['workload', 'api', 'transport', 'execution (config)', 'client', 'p50 µs', 'p99 µs', 'bare p50', 'echo p50', 'over bare µs', 'own cost µs', 'own cost range', 'echo+run p50', 'over echo+run µs', 'agent run/total', 'cpu µs/frame', 'own cpu µs', 'outputs = bare', 'n'],
      r.latency.map((l) => [l.workload, l.api, l.transport, `${l.execution} (${l.config})`, clientCell(l.client_poll_us), l.p50_us, l.p99_us, l.bare_p50_us, fmt(l.echo_p50_us), l.overhead_us, fmt(l.own_cost_us),
        l.own_cost_range_us ? `${fmt(l.own_cost_range_us[0])}..${fmt(l.own_cost_range_us[1])}` : 'n/a', fmt(l.echo_run_p50_us), fmt(l.over_echo_run_us),
        l.agent_inference_us === undefined ? 'n/a' : `${fmt(l.agent_inference_us)}/${fmt(l.agent_total_us)}`, cpuCell(l.cpu_us_per_frame), fmt(l.own_cpu_us),
        l.outputs_equal ? 'yes' : `NO (${l.max_rel_diff.toExponential(1)})`, l.n])));
  }
  if (r.throughput.length > 0) {
    out.push('', 'throughput: concurrent closed-loop streams (native) or unary clients (KServe), one connection, over TCP;');
    out.push('in rounds alternating with bare batch 1 and batch 8 (frames/s: median over rounds; vs bare: same rounds)');
    out.push('(cpu: on-CPU µs per frame of the server process + the load generator; bare b1/b8: onnxruntime alone)');
    out.push(formatTable(['workload', 'server', 'api', 'batching', 'streams', 'frames/s', 'range', 'p50 µs', 'p99 µs', 'mean batch', 'vs bare b1', 'vs bare b8', 'cpu server+client', 'bare cpu b1/b8'],
      r.throughput.map((t) => [t.workload, t.server, t.api, t.batching === null ? 'n/a' : t.batching ? 'on' : 'off', t.streams, t.fps, `${fmt(t.fps_range[0])}..${fmt(t.fps_range[1])}`,
        t.p50_us, t.p99_us, fmt(t.mean_batch), `${fmt((100 * t.fps) / t.bare_b1_fps)}%`, t.bare_b8_fps ? `${fmt((100 * t.fps) / t.bare_b8_fps)}%` : 'n/a',
        t.cpu_us_per_frame ? `${fmt(t.cpu_us_per_frame.server)}+${fmt(t.cpu_us_per_frame.client)}` : 'n/a', `${fmt(t.bare_b1_cpu_us)}/${fmt(t.bare_b8_cpu_us)}`])));
  }
  if (r.naive.length > 0) {
    out.push('', 'naive baseline: 8 concurrent unary KServe clients on the naive server vs the agent at 8 native streams (batching on)');
    out.push(formatTable(['workload', 'naive frames/s', 'agent frames/s', 'agent/naive'], r.naive.map((n) => [n.workload, n.naive_fps, n.agent_fps, `${fmt(n.ratio)}x`])));
  }
  if (r.rss) {
    const s = r.rss;
    out.push('', `RSS (tiny, 8 native streams × 8 in flight): ready ${s.ready_kb} kB; after ${s.warmup_frames} warm-up frames ${s.before_kb} kB; then ${s.frames} frames at ${fmt(s.fps)} frames/s:`);
    out.push(`  every ${Math.round(s.frames / s.samples_kb.length)} frames (kB): ${s.samples_kb.join(' ')}`);
    out.push(`  first-quarter median ${s.first_quarter_kb} kB → last-quarter median ${s.last_quarter_kb} kB: ${fmt(s.quarter_growth_pct)}% (last reading vs after warm-up: ${fmt(s.raw_growth_pct)}%), as V8 defers full collections`);
    out.push(`  after a full collection: RSS ${s.collected_before_kb} → ${s.collected_after_kb} kB, growth ${fmt(s.growth_pct)}%; live JS heap ${s.heap_used_before_kb} → ${s.heap_used_after_kb} kB`);
  }
  if (r.cold_start) {
    const c = r.cold_start;
    out.push('', `cold start (process spawn → first ${c.model} result; repository: ${c.models_in_repository.join(', ')}), median of ${c.empty.runs_ms.length}:`);
    out.push(formatTable(['data dir', 'first result ms', 'ready ms', 'model loads ms', 'runs ms (first result)', 'model loads, runs ms', 'graph cache'], [
      ['empty (no graph cache)', c.empty.median_ms, c.empty.ready_median_ms, c.empty.model_load_median_ms, c.empty.runs_ms.map(fmt).join(' '), c.empty.model_load_runs_ms.map(fmt).join(' '), c.empty.graph_cache.join(' ')],
      ['warm (graph cache)', c.cached.median_ms, c.cached.ready_median_ms, c.cached.model_load_median_ms, c.cached.runs_ms.map(fmt).join(' '), c.cached.model_load_runs_ms.map(fmt).join(' '), c.cached.graph_cache.join(' ')],
    ]));
    out.push(`cache saves ${fmt(c.saved_ms)} ms to first result; in-process onnxruntime open + first run of ${c.model}: ${fmt(c.bare_first_result_ms)} ms`);
    out.push(`session creation by the agent's session factory (median ms, empty cache → from cache): ${Object.entries(c.session_create_ms).map(([k, v]) => `${k} ${fmt(v.empty_ms)} → ${fmt(v.cached_ms)}`).join(', ')}`);
  }
  if (r.reload) {
    const l = r.reload;
    out.push('', `reload: a ${fmt(l.model_mb)} MB model loaded again (RepositoryModelLoad, ${fmt(l.reload_ms)} ms) while tiny serves 1 native stream over the unix socket`);
    out.push(formatTable(['tiny frames', 'n', 'p50 µs', 'p99 µs', 'max µs'], [
      ['steady', l.steady.n, l.steady.p50_us, l.steady.p99_us, l.steady.max_us],
      ['during the reload', l.during.n, l.during.p50_us, l.during.p99_us, l.during.max_us],
    ]));
  }
  if (r.install) {
    const i = r.install;
    out.push('', `install: a ${fmt(i.model_mb)} MB version written into the model repository (${i.crossed_filesystems ? 'from /dev/shm to another filesystem: copied' : 'same filesystem as the download: moved'}) and fsynced, while the event loop is watched`);
    const runs = (label: string, rs: readonly { duration_ms: number; longest_stall_ms: number }[]): (string | number)[] => [label, rs.map((x) => fmt(x.duration_ms)).join(' '), rs.map((x) => fmt(x.longest_stall_ms)).join(' ')];
    out.push(formatTable(['install', 'ms (each round)', 'longest event-loop stall ms'], [
      runs('agent (RuntimeDeploymentTarget.install)', i.agent),
      runs('the same copy + fsyncs, synchronous', i.synchronous),
    ]));
  }
  if (r.compressed) {
    const c = r.compressed;
    const top1 = c.held_out.top1 === null ? '' : `, top-1 agreement ${fmt(c.held_out.top1 * 100)} %`;
    out.push('', `compressed: ${c.workload}'s int8 variant, built by edge-agent optimize (held-out ${c.held_out.samples} frames: cosine ${c.held_out.cosine}${top1}); the agent serves '${c.served_variant}' (variant: auto), its outputs against bare fp32 have cosine ${c.cosine_vs_bare_fp32}`);
    const row = (label: string, k: keyof CompressedResult['fps']): (string | number)[] => [label, c.fps[k], `${fmt(c.fps_range[k][0])}..${fmt(c.fps_range[k][1])}`];
    out.push(formatTable(['row', 'frames/s', 'range'], [
      row('bare onnxruntime, fp32, batch 8', 'bare_fp32_b8'),
      row('bare onnxruntime, int8, batch 8', 'bare_int8_b8'),
      row('agent serving int8, 8 native streams', 'agent_int8_8'),
      row('naive server, fp32, 8 clients', 'naive_fp32_8'),
    ]));
    out.push(`agent (int8) at 8 streams: ${fmt(c.vs_naive)}x the naive server (fp32); not a target row: the targets compare the same fp32 model everywhere`);
  }
  if (r.targets.length > 0) {
    out.push('', 'targets (issue 4, on this machine)');
    out.push(formatTable(['target', 'goal', 'measured', 'met', 'reference (same run)', 'reference meets it'], r.targets.map((t) => [
      t.name, t.target, t.value, t.met === null ? 'n/a' : t.met ? 'yes' : 'NO', t.reference?.value ?? '', t.reference === undefined ? '' : t.reference.met ? 'yes' : 'NO',
    ])));
    out.push('(reference: for own cost, the echo+run server — transport plus one run of bare\'s session per frame, nothing of the agent;');
    out.push(' for 2x naive, bare onnxruntime at its best batch size — no server runs the model faster)');
  }
  return out.join('\n');
}
