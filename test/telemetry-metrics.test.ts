import t from 'tap';
import { createServer } from 'node:net';
import { AgentMetrics } from '../agent/telemetry/agent-metrics.js';
import { LatencyRecorder, HISTOGRAM_RELATIVE_ERROR, BatchSizeRecorder } from '../agent/telemetry/latency-histogram.js';
import { createPrometheusRegistry } from '../agent/telemetry/prometheus-metrics.js';
import { LocalHttpServer } from '../agent/telemetry/local-http-server.js';
import { buildStatusReport, type StatusReport, type StatusSnapshot } from '../agent/telemetry/status-report.js';
import { runStatusCommand, formatStatus } from '../agent/telemetry/status-command.js';
import { DeviceMonitor } from '../agent/telemetry/device-monitor.js';
import { MemoryOutbox } from '../agent/store/outbox-memory.js';
import type { Tensor } from '../agent/runtime/index.js';
import { FrameDroppedError, DeadlineExceededError, InvalidInputError } from '../agent/errors.js';
import { parsePrometheusText, sampleValue } from './helpers/prometheus-text.js';
import { startRuntime, copyDemoRepo } from './helpers/runtime.js';
import { mulberry32 as seeded } from '../scripts/demo-models.js';

/** Nearest-rank percentile: the smallest sample with at least p% of the samples at or below it. */
function exactPercentile(sorted: readonly number[], p: number): number {
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[rank - 1]!;
}

t.test('the Prometheus text parser rejects what Prometheus rejects', async (t) => {
  const ok = '# HELP a_total A.\n# TYPE a_total counter\na_total{x="1"} 3\n\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3.5\nh_count 2\n';
  const fams = parsePrometheusText(ok);
  t.equal(sampleValue(fams, 'a_total', 'a_total', { x: '1' }), 3);
  t.equal(fams.get('h')?.type, 'histogram');
  const bad: [string, RegExp][] = [
    ['a 1', /newline/],
    ['a{x="1"} 1\na{x="1"} 2\n', /duplicate series/],
    ['a{x="\\q"} 1\n', /invalid escape/],
    ['a{x="1} 1\n', /unterminated|expected/],
    ['1a 1\n', /invalid metric name/],
    ['a one\n', /invalid value/],
    ['a 1\n# TYPE a counter\n', /TYPE for a after its samples/],
    ['# TYPE a counter\n# TYPE a gauge\n', /second TYPE/],
    ['# TYPE a counter\na -1\n', /counter value must be >= 0/],
    ['a 1\nb 1\na{y="2"} 1\n', /not contiguous/],
    ['# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n', /not cumulative/],
    ['# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n', /no \+Inf bucket/],
    ['# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 3\n', /!= _count/],
    ['a{le="1"} 1\n', /'le' label outside a histogram/],
    ['a{x="1",x="2"} 1\n', /given twice/],
  ];
  for (const [text, err] of bad) t.throws(() => parsePrometheusText(text), { message: err }, JSON.stringify(text));
});

t.test(`histogram percentiles are within ${(HISTOGRAM_RELATIVE_ERROR * 100).toFixed(3)}% of the exact ones`, async (t) => {
  const rnd = seeded(42);
  const rec = new LatencyRecorder();
  t.teardown(() => rec.destroy());
  const samples: number[] = [];
  // Log-normal-ish latencies from 50 µs to several seconds: exercises many HDR buckets.
  for (let i = 0; i < 100_000; i += 1) {
    const v = Math.round(Math.exp(Math.log(50) + rnd() * rnd() * Math.log(100_000)));
    samples.push(v);
    rec.record(v);
  }
  const sorted = [...samples].sort((a, b) => a - b);
  const s = rec.closeInterval();
  t.equal(s.count, samples.length);
  t.equal(s.max, sorted.at(-1), 'max is exact');
  t.ok(Math.abs(s.mean - samples.reduce((a, b) => a + b, 0) / samples.length) < 1e-6, 'mean is exact');
  for (const [p, got] of [[50, s.p50], [90, s.p90], [99, s.p99]] as const) {
    const exact = exactPercentile(sorted, p);
    t.ok(got >= exact, `p${p}: ${got} >= exact ${exact}`);
    t.ok(got - exact <= exact * HISTOGRAM_RELATIVE_ERROR, `p${p}: ${got} within ${HISTOGRAM_RELATIVE_ERROR} of ${exact} (off by ${((got - exact) / exact * 100).toFixed(4)}%)`);
  }
  t.ok(sorted.at(-1)! > 2048 * 16, 'the sample reaches values where bins are wider than 1 µs');
  const small = new LatencyRecorder();
  t.teardown(() => small.destroy());
  for (let v = 1; v <= 1000; v += 1) small.record(v);
  const ss = small.closeInterval();
  t.same([ss.p50, ss.p90, ss.p99], [500, 900, 990], 'below 2048 µs the percentiles are exact');
  t.same(small.closeInterval(), { count: 0, p50: 0, p90: 0, p99: 0, max: 0, mean: 0 }, 'an interval without samples is empty');
  t.equal(small.count, 1000, 'the cumulative count for Prometheus keeps counting across intervals');
});

t.test('fixed buckets count exactly at their bounds', async (t) => {
  const rec = new LatencyRecorder([100, 1000]);
  t.teardown(() => rec.destroy());
  for (const v of [99, 100, 101, 1000, 1001, 5_000_000_000]) rec.record(v);
  t.same([...rec.counts], [2, 2, 2], 'le=100 holds 99 and 100; le=1000 holds 101 and 1000; +Inf the rest');
  const b = new BatchSizeRecorder([1, 4]);
  for (const s of [1, 1, 3, 4, 8]) b.record(s);
  t.same([...b.counts], [2, 2, 1]);
  t.same(b.closeInterval(), { executions: 5, mean: 3.4, max: 8, sizes: { '1': 2, '3': 1, '4': 1, '8': 1 } });
});

t.test('intervals: counts by outcome, throughput, provider and variant, unloaded versions forgotten', async (t) => {
  let clock = 1_000_000;
  const m = new AgentMetrics({ now: () => clock });
  t.teardown(() => m.close());
  m.onModelEvent({ type: 'model-ready', model: 'cls', version: 2, provider: 'webgpu', variant: 'fp16' });
  for (let i = 0; i < 30; i += 1) m.onRequest({ model: 'cls', version: 2, status: 'OK', timings: { queueUs: 10 + i, inferUs: 100 + i, totalUs: 120 + i } });
  m.onRequest({ model: 'cls', version: 2, status: 'ERROR' });
  m.onRequest({ model: 'cls', version: 2, status: 'DROPPED' });
  m.onRequest({ model: 'cls', version: 2, status: 'DROPPED' });
  m.onRequest({ model: 'cls', version: 2, status: 'DEADLINE_EXCEEDED' });
  m.onExecution({ model: 'cls', version: 2, batchSize: 8, inferUs: 500, handedAhead: false, underLoad: false });
  m.onExecution({ model: 'cls', version: 2, batchSize: 22, inferUs: 900, handedAhead: true, underLoad: true });
  m.streamOpened();
  m.streamOpened();
  m.streamClosed();
  clock += 10_000;
  const i1 = m.closeInterval();
  t.equal(i1.seconds, 10);
  const r = i1.models[0]!;
  t.same(
    { model: r.model, version: r.version, provider: r.provider, variant: r.variant, state: r.state, requests: r.requests, success: r.success, errors: r.errors, dropped: r.dropped, deadline_misses: r.deadline_misses, throughput_rps: r.throughput_rps },
    { model: 'cls', version: 2, provider: 'webgpu', variant: 'fp16', state: 'ready', requests: 34, success: 30, errors: 1, dropped: 2, deadline_misses: 1, throughput_rps: 3 },
  );
  t.same([r.latency_us.total.p50, r.latency_us.total.max, r.latency_us.queue.count], [134, 149, 30]);
  t.same(r.batch, { executions: 2, mean: 15, max: 22, sizes: { '8': 1, '22': 1 } });
  t.same(i1.streams, { active: 1, opened: 2 });
  t.ok(i1.process.rss_bytes > 0);
  t.equal(m.lastInterval, i1);

  m.onRequest({ model: 'cls', version: 2, status: 'OK', timings: { queueUs: 1, inferUs: 2, totalUs: 3 } });
  m.onModelEvent({ type: 'model-unloaded', model: 'cls' });
  clock += 5_000;
  const i2 = m.closeInterval();
  t.same([i2.models[0]!.requests, i2.models[0]!.state, i2.models[0]!.throughput_rps], [1, 'unloaded', 0.2], 'deltas, not totals; the unload is reported once');
  t.same(m.closeInterval().models, [], 'then the version is forgotten');
});

t.test('a real runtime: /metrics parses and its counters match the requests sent; /v1/status and the status command', async (t) => {
  const metrics = new AgentMetrics();
  t.teardown(() => metrics.close());
  const rt = await startRuntime(t, copyDemoRepo(t, ['tiny']), {}, metrics);
  const rnd = seeded(7);
  const frame = (): Tensor => {
    const data = new Float32Array(1024);
    for (let i = 0; i < data.length; i += 1) data[i] = rnd();
    return { dtype: 'float32', shape: [1, 1024], data };
  };
  const OK = 40;
  await Promise.all(Array.from({ length: OK }, () => rt.submit('tiny', undefined, { inputs: { x: frame() } })));
  let errors = 0;
  for (let i = 0; i < 3; i += 1) {
    await rt.submit('tiny', undefined, { inputs: { x: { dtype: 'float32', shape: [1, 3], data: new Float32Array(3) } } }).catch((e: unknown) => { if (e instanceof InvalidInputError) errors += 1; });
  }
  let late = 0;
  await rt.submit('tiny', undefined, { inputs: { x: frame() }, deadline: performance.now() - 1 }).catch((e: unknown) => { if (e instanceof DeadlineExceededError) late += 1; });
  // LATEST_ONLY: a burst on one stream; frames overtaken while queued are dropped.
  const stream = {};
  const burst = await Promise.allSettled(Array.from({ length: 20 }, () => rt.submit('tiny', undefined, { inputs: { x: frame() }, qos: 'LATEST_ONLY', streamKey: stream })));
  const dropped = burst.filter((r) => r.status === 'rejected' && r.reason instanceof FrameDroppedError).length;
  const burstOk = burst.filter((r) => r.status === 'fulfilled').length;
  t.equal(errors, 3);
  t.equal(late, 1, 'the runtime refused the late frame');
  t.ok(dropped > 0, `LATEST_ONLY dropped ${dropped} of the burst`);
  const success = OK + burstOk;
  const failure = errors + late + dropped;

  const outbox = new MemoryOutbox();
  await outbox.enqueue({ kind: 'telemetry', topic: 'edge/devices/d/telemetry', payload: (s) => JSON.stringify({ seq: s.seq }) });
  const registry = createPrometheusRegistry({ metrics, outbox, devices: new DeviceMonitor({ nvidiaSmi: false, tegrastats: false, thermal: false }) });
  const snapshot = (): StatusSnapshot => ({ agentVersion: '0.1.0-test', deviceId: 'dev-metrics', models: rt.listModels(), fleet: { connected: true, broker: 'mqtt://127.0.0.1:1883' } });
  const server = new LocalHttpServer({
    port: 0,
    registry,
    status: () => buildStatusReport({ snapshot: snapshot(), metrics, outbox, startedAt: performance.now() - 65_000 }),
  });
  await server.start();
  t.teardown(() => server.stop());

  const res = await fetch(`${server.url}/metrics`);
  t.equal(res.status, 200);
  t.match(res.headers.get('content-type'), /^text\/plain; version=0\.0\.4/);
  const fams = parsePrometheusText(await res.text());
  const lbl = { model: 'tiny', version: '1' };
  t.equal(fams.get('nv_inference_request_success')?.type, 'counter');
  t.equal(sampleValue(fams, 'nv_inference_request_success', 'nv_inference_request_success', lbl), success, `success = ${success}`);
  t.equal(sampleValue(fams, 'nv_inference_request_failure', 'nv_inference_request_failure', lbl), failure, `failure = ${failure}`);
  t.equal(sampleValue(fams, 'nv_inference_count', 'nv_inference_count', lbl), success, 'every successful request was one inference row');
  const execs = sampleValue(fams, 'nv_inference_exec_count', 'nv_inference_exec_count', lbl)!;
  t.ok(execs >= Math.ceil(success / 32) && execs <= success, `executions ${execs} between ${Math.ceil(success / 32)} and ${success}`);
  t.equal(sampleValue(fams, 'edge_agent_request_errors_total', 'edge_agent_request_errors_total', lbl), 3);
  t.equal(sampleValue(fams, 'edge_agent_deadline_misses_total', 'edge_agent_deadline_misses_total', lbl), 1);
  t.equal(sampleValue(fams, 'edge_agent_requests_dropped_total', 'edge_agent_requests_dropped_total', lbl), dropped);
  for (const name of ['nv_inference_request_duration_us', 'nv_inference_queue_duration_us', 'nv_inference_compute_infer_duration_us']) {
    t.equal(fams.get(name)?.type, 'counter');
    t.ok(sampleValue(fams, name, name, lbl)! > 0, `${name} accumulates`);
  }
  const hist = fams.get('edge_agent_request_duration_us');
  t.equal(hist?.type, 'histogram');
  t.equal(sampleValue(fams, 'edge_agent_request_duration_us', 'edge_agent_request_duration_us_count', lbl), success);
  t.equal(sampleValue(fams, 'edge_agent_request_duration_us', 'edge_agent_request_duration_us_bucket', { ...lbl, le: '+Inf' }), success);
  t.equal(sampleValue(fams, 'edge_agent_batch_size', 'edge_agent_batch_size_count', lbl), execs);
  t.equal(sampleValue(fams, 'edge_agent_batch_size', 'edge_agent_batch_size_sum', lbl), success);
  t.equal(sampleValue(fams, 'edge_agent_model_info', 'edge_agent_model_info', { ...lbl, provider: 'cpu', variant: rt.modelInfo('tiny').variant, state: 'ready' }), 1, 'provider and variant from the model-ready event');
  t.equal(sampleValue(fams, 'edge_agent_outbox_rows', 'edge_agent_outbox_rows', {}), 1);
  t.ok(sampleValue(fams, 'process_resident_memory_bytes', 'process_resident_memory_bytes', {})! > 0, 'process metrics');

  metrics.closeInterval();
  const st = await fetch(`${server.url}/v1/status`);
  t.equal(st.status, 200);
  const report = (await st.json()) as StatusReport;
  t.equal(report.agent.device_id, 'dev-metrics');
  const tiny = report.models.find((m) => m.name === 'tiny');
  t.equal(tiny?.provider, 'cpu');
  t.equal(tiny?.figures?.success, success);
  t.ok((tiny?.figures?.latency_us.total.p99 ?? 0) >= (tiny?.figures?.latency_us.total.p50 ?? Infinity), 'p99 >= p50');
  t.equal(report.outbox?.rows, 1);
  t.same(report.fleet, { connected: true, broker: 'mqtt://127.0.0.1:1883' });

  const printed: string[] = [];
  t.equal(await runStatusCommand({ url: server.url!, json: false, out: (s) => printed.push(s) }), 0);
  const text = printed.join('');
  t.match(text, /^edge-agent 0\.1\.0-test on dev-metrics: up 1m 5s/);
  t.match(text, /fleet: +connected to mqtt:\/\/127\.0\.0\.1:1883/);
  t.match(text, /outbox: +1 entry waiting/);
  const row = text.split('\n').find((l) => l.startsWith('tiny '));
  t.ok(row, 'a row for the model');
  t.match(row!, new RegExp(`^tiny\\s+1\\s+READY\\s+cpu\\s+\\S+\\s+[\\d.]+\\s+[\\d.]+\\s+[\\d.]+\\s+[\\d.]+\\s+[\\d.]+\\s+3\\s+${dropped}\\s+1$`));
  const json: string[] = [];
  t.equal(await runStatusCommand({ url: `${server.url!}/`, json: true, out: (s) => json.push(s) }), 0);
  t.equal((JSON.parse(json.join('')) as StatusReport).models.length, report.models.length, '--json prints the status document');

  const miss = await fetch(`${server.url}/nope`);
  t.equal(miss.status, 404);
  t.match(((await miss.json()) as { error: string }).error, /no such path '\/nope'/);
  t.equal((await fetch(`${server.url}/metrics`, { method: 'POST' })).status, 405);
});

t.test('status command: an agent that is not there, or that answers with an error', async (t) => {
  const port = await new Promise<number>((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => { const p = (s.address() as { port: number }).port; s.close(() => resolve(p)); });
  });
  const errs: string[] = [];
  t.equal(await runStatusCommand({ url: `http://127.0.0.1:${port}`, json: false, err: (s) => errs.push(s), out: () => undefined }), 1);
  t.match(errs.join(''), /cannot reach http:\/\/127\.0\.0\.1:\d+\/v1\/status \(ECONNREFUSED\)\. Is the agent running/);

  const metrics = new AgentMetrics();
  const broken = new LocalHttpServer({ port: 0, registry: createPrometheusRegistry({ metrics, defaultMetrics: false }), status: () => { throw new Error('status source failed'); } });
  await broken.start();
  t.teardown(() => broken.stop());
  const errs2: string[] = [];
  t.equal(await runStatusCommand({ url: broken.url!, json: false, err: (s) => errs2.push(s), out: () => undefined }), 1);
  t.match(errs2.join(''), /answered 500: status source failed/);

  const clash = new LocalHttpServer({ port: broken.address!.port, registry: createPrometheusRegistry({ metrics, defaultMetrics: false }), status: () => { throw new Error('x'); } });
  await t.rejects(clash.start(), /address already in use \(telemetry\.http\.port\)/);
});

t.test('status summary: stand-alone agent, no interval yet, device readings', async (t) => {
  const text = formatStatus({
    agent: { version: '1.2.3', device_id: 'jetson-7', pid: 42, uptime_s: 3 * 3600 + 125, rss_bytes: 191_000_000, cpu_percent: null, active_streams: 1 },
    models: [{ name: 'vad', version: 3, state: 'FAILED', reason: 'model file is not ONNX', figures: null }],
    interval: null,
    outbox: null,
    fleet: null,
    device: { read_at: 0, gpus: [{ index: 0, source: 'tegrastats', utilization_percent: 61, memory_used_mib: 3012, memory_total_mib: 7620, temperature_c: 52.5 }], thermal: [{ zone: 'thermal_zone0', type: 'cpu-thermal', temperature_c: 47.25 }], sources: ['tegrastats', 'thermal'] },
  });
  t.match(text, /up 3h 2m, pid 42, RSS 182\.2 MiB, CPU n\/a, 1 stream\n/);
  t.match(text, /fleet: +not configured \(stand-alone\)/);
  t.match(text, /vad\s+3\s+FAILED\s+-\s+-\s+-/);
  t.match(text, /vad v3: model file is not ONNX/);
  t.match(text, /no interval closed yet/);
  t.match(text, /gpu 0 \(tegrastats\): 61% busy, 2\.9\/7\.4 GiB, 52\.5 °C/);
  t.match(text, /thermal: cpu-thermal 47\.3 °C/);
});
