// Telemetry's cost on throughput (issue 6: ≤ 2 %), measured side by side in one run: the runtime serving `tiny`
// from N concurrent in-process streams with no observer, a no-op observer, and the agent's AgentMetrics, in
// interleaved rounds so every arm sees the same machine load. Also the observer's hot path in ns per request.
//   node dist/scripts/bench/telemetry-overhead.js [streams]
import { AgentMetrics } from '../../agent/telemetry/agent-metrics.js';
import { runtimeSchema } from '../../agent/config/schema.js';
import { silentLogger } from '../../agent/logger.js';
import { ModelRepository } from '../../agent/models/index.js';
import { InferenceRuntime } from '../../agent/runtime/index.js';
import type { RuntimeObserver, Tensor } from '../../agent/runtime/index.js';
import { mkdtempSync, cpSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { findPackageRoot } from '../../agent/package-root.js';

// 1. hot path micro-benchmark
const m = new AgentMetrics();
const N = 2_000_000;
const timings = { queueUs: 35, inferUs: 480, totalUs: 540 };
for (let r = 0; r < 3; r++) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < N; i++) {
    m.onRequest({ model: 'tiny', version: 1, status: 'OK', timings: { queueUs: timings.queueUs + (i & 255), inferUs: timings.inferUs + (i & 1023), totalUs: timings.totalUs + (i & 4095) } });
    if ((i & 7) === 0) m.onExecution({ model: 'tiny', version: 1, batchSize: 8, inferUs: 480, handedAhead: false, underLoad: false });
  }
  const ns = Number(process.hrtime.bigint() - t0) / N;
  console.log(`observer hot path: ${ns.toFixed(0)} ns per request (incl. 1/8 execution)`);
}
m.close();

// 2. runtime throughput with and without the observer
const repo = join(mkdtempSync(join(tmpdir(), 'tel-bench-')), 'models');
cpSync(join(findPackageRoot(dirname(fileURLToPath(import.meta.url))), 'edge-config', 'models', 'tiny'), join(repo, 'tiny'), { recursive: true });
const cpuPerFrame: number[] = [];
async function run(observer: RuntimeObserver | undefined, ms: number, streams: number): Promise<number> {
  const config = runtimeSchema.parse({ execution_providers: ['cpu'] });
  const rt = new InferenceRuntime({ repository: new ModelRepository(repo), config, dataDir: mkdtempSync(join(tmpdir(), 'tel-data-')), log: silentLogger(), ...(observer ? { observer } : {}) });
  await rt.start();
  const x: Tensor = { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(0.5) };
  let done = 0;
  const c0 = process.cpuUsage();
  const until = performance.now() + ms;
  await Promise.all(Array.from({ length: streams }, async () => {
    while (performance.now() < until) { await rt.submit('tiny', undefined, { inputs: { x } }); done++; }
  }));
  const c = process.cpuUsage(c0);
  await rt.close();
  cpuPerFrame.push((c.user + c.system) / done);
  return done / (ms / 1000);
}
const streams = Number(process.argv[2] ?? 8);
await run(undefined, 1000, streams);
const arms: Record<string, number[]> = { off: [], noop: [], metrics: [] };
const cpu: Record<string, number[]> = { off: [], noop: [], metrics: [] };
const order = ['off', 'metrics', 'noop', 'metrics', 'off', 'noop', 'off', 'metrics', 'noop', 'noop', 'metrics', 'off', 'metrics', 'off', 'noop'];
for (const arm of order) {
  const metrics = arm === 'metrics' ? new AgentMetrics() : undefined;
  const observer: RuntimeObserver | undefined = arm === 'off' ? undefined : arm === 'noop' ? { onRequest() {}, onExecution() {}, onModelEvent() {} } : metrics;
  arms[arm]!.push(await run(observer, 2500, streams));
  cpu[arm]!.push(cpuPerFrame.at(-1)!);
  metrics?.close();
}
const med = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;
const res = Object.fromEntries(Object.entries(arms).map(([k, v]) => [k, { runs: v.map(Math.round), median: Math.round(med(v)) }]));
console.log(JSON.stringify(Object.fromEntries(Object.entries(cpu).map(([k, v]) => [k, { cpu_us_per_frame: v.map((x) => x.toFixed(2)), median: med(v).toFixed(2) }]))));
console.log('cpu cost of metrics vs off: ' + ((med(cpu.metrics!) / med(cpu.off!) - 1) * 100).toFixed(2) + '%, vs noop: ' + ((med(cpu.metrics!) / med(cpu.noop!) - 1) * 100).toFixed(2) + '%');
console.log(JSON.stringify({ streams, ...res, metrics_vs_off_pct: ((1 - med(arms.metrics!) / med(arms.off!)) * 100).toFixed(2), metrics_vs_noop_pct: ((1 - med(arms.metrics!) / med(arms.noop!)) * 100).toFixed(2) }));
