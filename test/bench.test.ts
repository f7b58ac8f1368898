import t from 'tap';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { ROOT } from './helpers/runtime.js';

// The benchmark's CI-sized form, so `npm run bench` cannot rot: every row is produced, every figure is a finite
// number, and the agent's outputs equal onnxruntime's for the same frames. Timings are never asserted here.

const BENCH = join(ROOT, 'dist', 'scripts', 'bench.js');
const WORKLOADS = ['tiny', 'classifier', 'filter'];

t.setTimeout(600_000);

function runBench(args: readonly string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [BENCH, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

// The report, as JSON.parse gives it: the test walks it and checks each value it finds.
type Json = Record<string, any>;

const finite = (x: unknown): boolean => typeof x === 'number' && Number.isFinite(x);

t.test('bench --quick --json: every row, finite figures, agent outputs equal bare', async (t) => {
  const run = await runBench(['--quick', '--json', '--workloads', WORKLOADS.join(',')]);
  t.equal(run.code, 0, `bench exits 0; stderr: ${run.stderr.slice(-2000)}`);
  const r = JSON.parse(run.stdout) as Json;

  t.same(Object.keys(r.workloads).sort(), [...WORKLOADS].sort(), 'the workloads asked for');
  t.equal(r.meta.quick, true);
  t.equal(r.meta.client_poll_us, 1000, 'latency clients poll by default');
  t.equal(r.meta.load_generator_heap_growing_percent, 300, "the load generator runs with the agent's default heap growth");
  t.ok(finite(r.meta.cpus) && r.meta.loadavg_start.length === 3, 'machine and load recorded');

  for (const w of WORKLOADS) {
    const b = r.bare[w];
    t.ok(b, `bare row for ${w}`);
    t.ok(finite(b.b1.p50_us) && finite(b.b1.p99_us) && finite(b.b1_fps) && finite(b.b8_fps), `bare ${w}: finite batch-1 latency and batch-1/8 throughput`);
    t.ok(typeof r.meta.served_by[w] === 'string' && r.meta.served_by[w].length > 0, `provider that served ${w} reported`);

    for (const [api, transport] of [['native_stream', 'tcp'], ['native_stream', 'unix'], ['kserve_stream', 'tcp'], ['kserve_unary', 'tcp']]) {
      const echo = r.echo.find((e: Json) => e.frame === w && e.api === api && e.transport === transport && e.client_poll_us === r.meta.client_poll_us);
      t.ok(echo && finite(echo.p50_us) && finite(echo.p99_us) && echo.n > 0, `echo ${w} ${api} ${transport}`);
      const l = r.latency.find((x: Json) => x.workload === w && x.api === api && x.transport === transport && x.config === 'default' && x.client_poll_us === r.meta.client_poll_us);
      t.ok(l && finite(l.p50_us) && finite(l.p99_us) && finite(l.overhead_us) && finite(l.own_cost_us), `latency ${w} ${api} ${transport}: p50, p99, overhead, own cost`);
      t.ok(l && finite(l.own_cpu_us) && finite(l.cpu_us_per_frame?.total) && finite(l.cpu_us_per_frame?.main), `latency ${w} ${api} ${transport}: CPU per frame`);
      t.equal(l?.outputs_equal, true, `${w} over ${api}/${transport}: the agent's outputs equal bare onnxruntime's (max relative diff ${l?.max_rel_diff})`);
    }
    for (const transport of ['tcp', 'unix']) {
      const sleeping = r.latency.find((x: Json) => x.workload === w && x.api === 'native_stream' && x.transport === transport && x.config === 'default' && x.client_poll_us === 0);
      const sleepingEcho = r.echo.find((e: Json) => e.frame === w && e.api === 'native_stream' && e.transport === transport && e.client_poll_us === 0);
      t.ok(sleeping && finite(sleeping.own_cost_us) && sleepingEcho && finite(sleepingEcho.p50_us), `${w} native ${transport}: also measured with a client that sleeps, against an echo with the same client`);
      const polling = r.latency.find((x: Json) => x.workload === w && x.api === 'native_stream' && x.transport === transport && x.config === 'default' && x.client_poll_us === r.meta.client_poll_us);
      // The same client against the echo server that also runs bare's session once per frame.
      t.ok(polling && finite(polling.echo_run_p50_us) && polling.echo_run_p50_us > 0 && finite(polling.over_echo_run_us), `${w} native ${transport}: measured against the echo server that runs the model (echo+run)`);
      t.equal(sleeping?.echo_run_p50_us, undefined, `${w} native ${transport}: echo+run is only compared with the client it was measured with`);
      for (const execution of ['worker', 'inline']) {
        const l = r.latency.find((x: Json) => x.workload === w && x.api === 'native_stream' && x.transport === transport && x.execution === execution);
        t.ok(l && finite(l.p50_us) && finite(l.agent_inference_us) && l.outputs_equal === true, `${execution} execution ${w} ${transport}: measured, outputs equal bare`);
      }
    }
    for (const batching of [true, false]) {
      for (const streams of [1, 8, 32]) {
        const row = r.throughput.find((x: Json) => x.workload === w && x.server === 'agent' && x.api === 'native_stream' && x.batching === batching && x.streams === streams);
        t.ok(row && finite(row.fps) && row.fps > 0 && finite(row.mean_batch) && finite(row.cpu_us_per_frame?.server), `throughput ${w} batching ${batching ? 'on' : 'off'} ${streams} streams`);
        if (!batching && row) t.equal(row.mean_batch, 1, `batching off: every run holds one frame (${w}, ${streams} streams)`);
      }
    }
    const naive = r.throughput.find((x: Json) => x.workload === w && x.server === 'naive');
    t.ok(naive && finite(naive.fps) && naive.fps > 0, `naive server throughput for ${w}`);
    const agentUnary = r.throughput.find((x: Json) => x.workload === w && x.server === 'agent' && x.api === 'kserve_unary');
    t.ok(agentUnary && finite(agentUnary.fps) && agentUnary.fps > 0, `agent KServe unary throughput for ${w}`);
    const cmp = r.naive.find((x: Json) => x.workload === w);
    t.ok(cmp && finite(cmp.ratio) && cmp.ratio > 0, `agent vs naive ratio for ${w}`);
  }

  t.ok(r.rss && [r.rss.ready_kb, r.rss.before_kb, r.rss.after_kb, r.rss.growth_pct, r.rss.fps].every(finite) && r.rss.frames > 0, 'RSS before and after');
  t.ok(r.rss.samples_kb.length >= 4 && r.rss.samples_kb.every(finite), 'RSS sampled through the run');
  // Both collected readings come from the agent's inspector: a full collection cannot leave more live heap than
  // the process's whole RSS, and a heap of a loaded agent is more than a few MB.
  for (const k of ['before', 'after'] as const) {
    const rss = r.rss[`collected_${k}_kb`];
    const heap = r.rss[`heap_used_${k}_kb`];
    t.ok(finite(rss) && finite(heap) && heap > 1024 && heap < rss, `RSS and live heap after a full collection, ${k} the frames (${heap} of ${rss} kB)`);
  }
  t.equal(r.rss.growth_pct, Math.round(((r.rss.collected_after_kb - r.rss.collected_before_kb) / r.rss.collected_before_kb) * 1000) / 10, 'growth is judged on the collected readings');
  const c = r.cold_start;
  t.ok(c && finite(c.empty.median_ms) && finite(c.cached.median_ms) && finite(c.saved_ms) && finite(c.bare_first_result_ms), 'cold start, empty and cached data dir');
  t.ok(c.empty.runs_ms.length >= 1 && c.cached.runs_ms.length === c.empty.runs_ms.length, 'cold-start repetitions of each kind');
  t.same(c.empty.graph_cache.map((x: string) => x.split(':')[1]).filter((x: string) => x !== 'stored'), [], 'an empty data dir stores every optimised graph');
  t.same(c.cached.graph_cache.map((x: string) => x.split(':')[1]).filter((x: string) => x !== 'hit'), [], 'a warm data dir loads every graph from the cache');
  for (const w of WORKLOADS) t.ok(finite(c.session_create_ms[w]?.empty_ms) && finite(c.session_create_ms[w]?.cached_ms), `session creation with and without the cache: ${w}`);
  const rl = r.reload;
  t.ok(rl && finite(rl.model_mb) && rl.model_mb >= 3.5 && finite(rl.reload_ms) && rl.reload_ms > 0, 'reload: a multi-MB model loaded again, timed');
  for (const phase of ['steady', 'during'] as const) {
    t.ok(rl?.[phase].n > 0 && [rl[phase].p50_us, rl[phase].p99_us, rl[phase].max_us].every(finite), `reload: tiny's frames ${phase}`);
  }

  const ins = r.install;
  t.ok(ins && finite(ins.model_mb) && ins.model_mb >= 3.5 && typeof ins.crossed_filesystems === 'boolean', 'install: a multi-MB version, and whether it crossed filesystems');
  for (const kind of ['agent', 'synchronous'] as const) {
    t.ok(ins?.[kind].length === 1 && ins[kind].every((x: Json) => finite(x.duration_ms) && x.duration_ms > 0 && finite(x.longest_stall_ms)), `install: ${kind} timed, with its longest stall`);
  }

  const cz = r.compressed;
  t.equal(cz?.served_variant, 'int8', 'compressed: the agent serves the int8 variant optimize built');
  t.ok(cz && cz.held_out.cosine >= 0.99 && cz.cosine_vs_bare_fp32 >= 0.99, `compressed: int8 outputs close to fp32 (held out ${cz?.held_out.cosine}, served ${cz?.cosine_vs_bare_fp32})`);
  for (const k of ['bare_fp32_b8', 'bare_int8_b8', 'agent_int8_8', 'naive_fp32_8']) t.ok(finite(cz?.fps[k]) && cz.fps[k] > 0, `compressed: ${k} frames/s`);
  t.equal(cz?.vs_naive, Math.round((cz.fps.agent_int8_8 / cz.fps.naive_fp32_8) * 100) / 100, 'compressed: the ratio is computed from the rows');

  t.ok(r.targets.length >= 8, 'every target evaluated');
  for (const row of r.targets) t.ok(typeof row.value === 'string' && (row.met === null || typeof row.met === 'boolean'), `target '${row.name}' has a figure`);
  t.equal(r.targets.find((x: Json) => x.name === 'agent outputs equal bare')?.met, true, 'the equality check over every latency row holds');
  const referenced = r.targets.filter((x: Json) => /^own cost p50, native (tcp|unix), classifier/.test(x.name) || / 8 streams vs naive$/.test(x.name));
  t.ok(referenced.length >= 4, 'own-cost rows of the classifier and naive rows are there');
  for (const row of referenced) t.ok(typeof row.reference?.value === 'string' && typeof row.reference.met === 'boolean', `target '${row.name}' has its reference from the same run`);
});

t.test('bench refuses bad options with a message naming them', async (t) => {
  const run = await runBench(['--quick', '--sections', 'bare,warp']);
  t.not(run.code, 0);
  t.match(run.stderr, /unknown section 'warp'/);
  const missing = await runBench(['--quick', '--workloads', 'nonesuch']);
  t.not(missing.code, 0);
  t.match(missing.stderr, /unknown workload 'nonesuch'/);
  const poll = await runBench(['--quick', '--client-poll-us', '-5']);
  t.not(poll.code, 0);
  t.match(poll.stderr, /--client-poll-us must be a whole number ≥ 0, got '-5'/);
});
