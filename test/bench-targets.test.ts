import t from 'tap';
import type { BenchReport, LatencyRow, ThroughputRow } from '../scripts/bench/report.js';
import { evaluateTargets } from '../scripts/bench/targets.js';

// The target table's arithmetic on a hand-made report: each verdict and each reference follows from the rows
// given, so a wrong formula (or a reference read from the wrong row) fails here rather than misleading a note.

function latency(over: Partial<LatencyRow>): LatencyRow {
  return {
    workload: 'classifier', frame_bytes: 150528, api: 'native_stream', transport: 'tcp', execution: 'worker', config: 'default',
    client_poll_us: 1000, p50_us: 3700, p99_us: 8000, n: 400, rounds: 6, bare_p50_us: 2700, echo_p50_us: 240,
    overhead_us: 1000, own_cost_us: 760, own_cost_range_us: [500, 900], cpu_us_per_frame: undefined, bare_cpu_us_per_frame: undefined,
    agent_inference_us: undefined, agent_total_us: undefined, own_cpu_us: undefined, outputs_equal: true, max_rel_diff: 0,
    ...over,
  };
}

function throughput(workload: string, fps: number, bareB1: number, bareB8: number | undefined): ThroughputRow {
  return {
    workload, server: 'agent', api: 'native_stream', batching: bareB8 !== undefined, streams: 8, fps, fps_range: [fps, fps], p50_us: 1, p99_us: 1,
    mean_batch: undefined, bare_b1_fps: bareB1, bare_b8_fps: bareB8, cpu_us_per_frame: undefined, bare_b1_cpu_us: undefined, bare_b8_cpu_us: undefined,
  };
}

function report(latencyRows: LatencyRow[], throughputRows: ThroughputRow[], naive: BenchReport['naive']): BenchReport {
  return {
    meta: { client_poll_us: 1000 } as BenchReport['meta'],
    workloads: {}, bare: {}, echo: [], latency: latencyRows, throughput: throughputRows, naive, targets: [],
  };
}

t.test('own cost: the verdict reads the agent row; the reference is the plain echo+run server by the same formula', async (t) => {
  const rows = evaluateTargets(report([
    latency({ transport: 'tcp', own_cost_us: 760, echo_run_p50_us: 3400, over_echo_run_us: 300 }),
    latency({ transport: 'unix', own_cost_us: 30, echo_run_p50_us: 2960 }),
  ], [], []));
  const tcp = rows.find((r) => r.name === 'own cost p50, native tcp, classifier (150528 B)');
  t.equal(tcp?.met, false, '760 µs misses 50');
  t.match(tcp?.value, /760 µs \(over echo\+run: 300 µs\)/);
  // 3400 − 2700 − 240 = 460 µs: the plain server misses too.
  t.same(tcp?.reference, { value: 'plain server (echo+run): 460 µs', met: false });
  const unix = rows.find((r) => r.name === 'own cost p50, native unix, classifier (150528 B)');
  t.equal(unix?.met, true, '30 µs meets 50');
  // 2960 − 2700 − 240 = 20 µs.
  t.same(unix?.reference, { value: 'plain server (echo+run): 20 µs', met: true });
});

t.test('own cost without an echo+run row has no reference', async (t) => {
  const rows = evaluateTargets(report([latency({ workload: 'tiny', frame_bytes: 4096, own_cost_us: -2 })], [], []));
  const row = rows.find((r) => r.name === 'own cost p50, native tcp, tiny (4096 B)');
  t.equal(row?.met, true);
  t.equal(row?.reference, undefined, 'nothing to compare with');
});

t.test('2x naive: the ceiling is bare onnxruntime at its best batch size, from the same run', async (t) => {
  const rows = evaluateTargets(report([], [
    throughput('classifier', 297, 362, 370),
    throughput('blazeface', 704, 1004, undefined),
  ], [
    { workload: 'classifier', naive_fps: 212, agent_fps: 297, ratio: 1.4 },
    { workload: 'blazeface', naive_fps: 308, agent_fps: 704, ratio: 2.29 },
  ]));
  const cls = rows.find((r) => r.name === 'classifier 8 streams vs naive');
  t.equal(cls?.met, false);
  // 370 / 212 = 1.745: even bare batch 8 is under twice the naive server.
  t.same(cls?.reference, { value: 'bare onnxruntime: 1.75x (370 frames/s at batch 8)', met: false });
  const bf = rows.find((r) => r.name === 'blazeface 8 streams vs naive');
  t.equal(bf?.met, true);
  // A fixed-batch model: batch 1 is its best; 1004 / 308 = 3.26.
  t.same(bf?.reference, { value: 'bare onnxruntime: 3.26x (1004 frames/s at batch 1)', met: true });
});
