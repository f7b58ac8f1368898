#!/usr/bin/env node
// Soak test (not part of CI): N native streams at a fixed frame rate for M minutes against a running agent,
// with the model reloaded through KServe RepositoryModelLoad every few seconds. Every interval it prints the
// latency percentiles of that interval and the agent's RSS (from /proc/<pid>/status); at the end, the whole
// run's percentiles, the RSS trend and whether any frame was lost (every sent seq must get a result).
//
//   npm run build && node dist/agent/cli.js serve --config edge-config/agent.yaml \
//       --listen 127.0.0.1:50999 --data-dir /tmp/soak-var &
//   node dist/scripts/soak.js --address 127.0.0.1:50999 --pid $! --streams 4 --rate 50 --minutes 10
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { Command } from 'commander';
import * as hdr from 'hdr-histogram-js';
import { EdgeAgentClient, type FrameResult, type SensorStreamHandle } from '../agent/client/index.js';
import { allocate, elementCount, type Tensor } from '../agent/runtime/index.js';
import { PROTO_DIR } from '../agent/server/index.js';

const int = (v: string): number => Number.parseInt(v, 10);
const o = new Command('soak')
  .description('N streams for M minutes with periodic model reloads; latency percentiles, RSS, lost frames')
  .option('-a, --address <addr>', "agent address: 'host:port' or 'unix:/path'", '127.0.0.1:50051')
  .option('-m, --model <name>', 'model every stream sends to', 'tiny')
  .option('-s, --streams <n>', 'concurrent streams', int, 4)
  .option('-r, --rate <fps>', 'frames per second per stream', Number, 50)
  .option('-t, --minutes <m>', 'how long to run', Number, 10)
  .option('--max-in-flight <n>', 'frames the agent may hold per stream', int, 8)
  .option('--reload-every <s>', 'RepositoryModelLoad of the model every this many seconds (0: never)', Number, 30)
  .option('--report-every <s>', 'seconds between progress lines', Number, 30)
  .option('--pid <pid>', "the agent's pid, for its RSS (from /proc)", int)
  .option('--json <file>', 'also write the intervals and the summary as JSON')
  .parse()
  .opts<{ address: string; model: string; streams: number; rate: number; minutes: number; maxInFlight: number; reloadEvery: number; reportEvery: number; pid?: number; json?: string }>();

const histogram = (): hdr.Histogram => hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: 3 });
const ms = (us: number): string => (us / 1000).toFixed(2);
const sleep = (t: number) => new Promise((r) => setTimeout(r, t));

function rssMiB(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : undefined;
  } catch {
    return undefined; // the agent is gone: reported as such
  }
}

// ---- KServe client for the reloads ----
const kserveDir = join(PROTO_DIR, 'inference');
const KServe = (grpc.loadPackageDefinition(protoLoader.loadSync(join(kserveDir, 'grpc_service.proto'), { includeDirs: [kserveDir], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true })) as unknown as {
  inference: { GRPCInferenceService: grpc.ServiceClientConstructor };
}).inference.GRPCInferenceService;
const kserve = new KServe(o.address, grpc.credentials.createInsecure()) as unknown as grpc.Client & { RepositoryModelLoad(req: object, cb: (err: grpc.ServiceError | null) => void): void };

// ---- totals ----
const total = histogram();
let interval = histogram();
const statuses: Record<string, number> = {};
let intervalStatuses: Record<string, number> = {};
let sent = 0;
let answered = 0;
let streamFailures = 0;
let lateSends = 0;
const lost: { stream: number; seq: number }[] = [];
const reloads = { ok: 0, failed: 0, maxMs: 0, errors: [] as string[] };
const samples: object[] = [];

const client = new EdgeAgentClient({ address: o.address });
const probe = await client.openStream({ model: o.model, maxInFlight: o.maxInFlight });
const info = probe.opened;
probe.end();
const inputs: Record<string, Tensor> = {};
for (const spec of info.inputs) {
  const shape = spec.shape.map((d) => (d < 0 ? 1 : d));
  const data = allocate(spec.dtype, elementCount(shape));
  if (data instanceof Float32Array) for (let i = 0; i < data.length; i++) data[i] = Math.sin(i * 0.01);
  inputs[spec.name] = { dtype: spec.dtype, shape, data };
}
console.log(`soak: ${o.streams} streams x ${o.rate} frames/s to ${info.model} v${info.version} (${info.provider}) at ${o.address} for ${o.minutes} min; reload every ${o.reloadEvery || '-'} s; agent pid ${o.pid ?? '? (no RSS)'}`);

const t0 = performance.now();
const endAt = t0 + o.minutes * 60_000;
const rss0 = rssMiB(o.pid);

/** One sensor: sends at the rate until the end, then waits for every result. A stream that fails is counted,
 * its unanswered frames are counted as lost, and the sensor reopens (as a real one would). */
async function sensor(id: number): Promise<void> {
  const period = 1000 / o.rate;
  let seq = 0;
  while (performance.now() < endAt) {
    let stream: SensorStreamHandle;
    try {
      stream = await client.openStream({ model: o.model, maxInFlight: o.maxInFlight });
    } catch (err) {
      streamFailures++;
      console.log(`stream ${id}: open failed: ${(err as Error).message}`);
      await sleep(1000);
      continue;
    }
    const sentAt = new Map<number, number>();
    let failed = false;
    const reading = (async () => {
      for await (const r of stream.results() as AsyncIterable<FrameResult>) {
        const start = sentAt.get(r.seq);
        if (start === undefined) continue;
        sentAt.delete(r.seq);
        answered++;
        statuses[r.status] = (statuses[r.status] ?? 0) + 1;
        intervalStatuses[r.status] = (intervalStatuses[r.status] ?? 0) + 1;
        if (r.status === 'OK') {
          const us = Math.max(1, Math.round((performance.now() - start) * 1000));
          total.recordValue(us);
          interval.recordValue(us);
        }
      }
    })().catch((err: Error) => {
      failed = true;
      streamFailures++;
      console.log(`stream ${id}: ended with ${err.message}`);
    });
    const first = performance.now();
    for (let k = 0; performance.now() < endAt && !failed; k++) {
      const wait = first + k * period - performance.now();
      if (wait > 0) await sleep(wait);
      else if (wait < -period) lateSends++;
      sentAt.set(seq, performance.now());
      sent++;
      // A send waiting on flow control must not outlive a stream that already failed.
      await Promise.race([stream.send({ seq, inputs }), reading]);
      seq++;
    }
    if (!failed) stream.end();
    await reading;
    for (const s of sentAt.keys()) lost.push({ stream: id, seq: s });
    if (!failed) return;
  }
}

async function reloader(): Promise<void> {
  if (o.reloadEvery <= 0) return;
  while (performance.now() + o.reloadEvery * 1000 < endAt) {
    await sleep(o.reloadEvery * 1000);
    const start = performance.now();
    await new Promise<void>((resolve) => kserve.RepositoryModelLoad({ model_name: o.model }, (err) => {
      const took = performance.now() - start;
      reloads.maxMs = Math.max(reloads.maxMs, took);
      if (err) { reloads.failed++; reloads.errors.push(err.message); } else reloads.ok++;
      resolve();
    }));
  }
}

const reporter = setInterval(() => {
  const rss = rssMiB(o.pid);
  const line = {
    t_s: Math.round((performance.now() - t0) / 1000), sent, answered, statuses: intervalStatuses,
    p50_ms: Number(ms(interval.getValueAtPercentile(50))), p90_ms: Number(ms(interval.getValueAtPercentile(90))),
    p99_ms: Number(ms(interval.getValueAtPercentile(99))), p999_ms: Number(ms(interval.getValueAtPercentile(99.9))), max_ms: Number(ms(interval.maxValue)),
    rss_mib: rss === undefined ? null : Math.round(rss), reloads: reloads.ok,
  };
  samples.push(line);
  console.log(`t=${String(line.t_s).padStart(4)}s sent=${sent} answered=${answered} ${JSON.stringify(intervalStatuses)} p50=${line.p50_ms} p90=${line.p90_ms} p99=${line.p99_ms} p99.9=${line.p999_ms} max=${line.max_ms} ms rss=${line.rss_mib ?? '?'} MiB reloads=${reloads.ok}`);
  interval = histogram();
  intervalStatuses = {};
}, o.reportEvery * 1000);

await Promise.all([...Array.from({ length: o.streams }, (_, i) => sensor(i)), reloader()]);
clearInterval(reporter);
client.close();
kserve.close();

const rssEnd = rssMiB(o.pid);
const rssSeries = samples.map((s) => (s as { rss_mib: number | null }).rss_mib).filter((v): v is number => v !== null);
const summary = {
  minutes: o.minutes, streams: o.streams, rate: o.rate, model: o.model, sent, answered, statuses,
  lost: lost.length, lost_examples: lost.slice(0, 10), stream_failures: streamFailures, late_sends: lateSends,
  latency_ms: { p50: Number(ms(total.getValueAtPercentile(50))), p90: Number(ms(total.getValueAtPercentile(90))), p99: Number(ms(total.getValueAtPercentile(99))), p999: Number(ms(total.getValueAtPercentile(99.9))), max: Number(ms(total.maxValue)), mean: Number(ms(total.mean)) },
  rss_mib: { start: rss0 === undefined ? null : Math.round(rss0), end: rssEnd === undefined ? null : Math.round(rssEnd), min: rssSeries.length ? Math.min(...rssSeries) : null, max: rssSeries.length ? Math.max(...rssSeries) : null },
  reloads: { ok: reloads.ok, failed: reloads.failed, max_ms: Math.round(reloads.maxMs), errors: reloads.errors.slice(0, 5) },
  agent_alive: o.pid === undefined ? null : rssEnd !== undefined,
};
console.log('\nsummary');
console.log(`  frames: sent ${sent}, answered ${answered} ${JSON.stringify(statuses)}; lost ${lost.length}${lost.length ? ` e.g. ${JSON.stringify(lost.slice(0, 5))}` : ''}`);
console.log(`  latency (send to result, OK frames): p50 ${summary.latency_ms.p50} p90 ${summary.latency_ms.p90} p99 ${summary.latency_ms.p99} p99.9 ${summary.latency_ms.p999} max ${summary.latency_ms.max} ms`);
console.log(`  agent RSS: start ${summary.rss_mib.start ?? '?'} MiB, end ${summary.rss_mib.end ?? '?'} MiB, range ${summary.rss_mib.min ?? '?'}..${summary.rss_mib.max ?? '?'} MiB`);
console.log(`  reloads: ${reloads.ok} ok, ${reloads.failed} failed, slowest ${summary.reloads.max_ms} ms; stream failures ${streamFailures}; sends more than one period late ${lateSends}`);
console.log(lost.length === 0 && streamFailures === 0 && reloads.failed === 0 ? '  PASS: every frame sent got a result' : '  FAIL: see above');
if (o.json) writeFileSync(o.json, JSON.stringify({ summary, intervals: samples }, null, 2));
process.exit(lost.length === 0 && streamFailures === 0 && reloads.failed === 0 ? 0 : 1);
