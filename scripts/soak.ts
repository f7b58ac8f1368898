#!/usr/bin/env node
// Soak test (not part of CI): N native streams at a fixed frame rate for M minutes, with the model reloaded
// through KServe RepositoryModelLoad every few seconds, and optionally signed fleet deployments of new versions
// over MQTT chunks and broker crashes. Every interval it prints the latency percentiles of that interval and the
// agent's RSS (from /proc/<pid>/status); at the end, the whole run's percentiles, the RSS trend, whether any
// frame was lost (every sent seq must get a result), the deployments' outcomes, the version switches the
// streams saw, and whether any telemetry record was lost (every seq between the first and last seen arrived).
//
// Without --address the soak runs its own stack: mosquitto on a free port, and the agent (dist/agent/cli.js)
// with a fleet section trusting a key made for this run. With --address it drives an agent already running
// (deployments then need --broker and the agent's --device-id and trusted key; broker restarts need its own).
//
//   npm run build && node dist/scripts/soak.js --streams 4 --rate 50 --minutes 10 \
//       --deploy-every 60 --broker-restart-every 90
//   node dist/scripts/soak.js --address 127.0.0.1:50999 --pid <agent pid> --minutes 10   # reloads only
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { Command } from 'commander';
import * as hdr from 'hdr-histogram-js';
import { EdgeAgentClient, syntheticInputs, type FrameResult, type SensorStreamHandle } from '../agent/client/index.js';
import { PROTO_DIR } from '../agent/server/index.js';
import { SoakAgent, ROOT } from './soak/soak-agent.js';
import { freePort, SoakBroker } from './soak/soak-broker.js';
import { SOAK_KEY_ID, SoakFleet, type DeploymentOutcome } from './soak/soak-fleet.js';

const int = (v: string): number => Number.parseInt(v, 10);
const o = new Command('soak')
  .description('N streams for M minutes with periodic model reloads; latency percentiles, RSS, lost frames')
  .option('-a, --address <addr>', "a running agent: 'host:port' or 'unix:/path' (absent: the soak starts mosquitto and an agent)")
  .option('-m, --model <name>', 'model every stream sends to', 'tiny')
  .option('-s, --streams <n>', 'concurrent streams', int, 4)
  .option('-r, --rate <fps>', 'frames per second per stream', Number, 50)
  .option('-t, --minutes <m>', 'how long to run', Number, 10)
  .option('--max-in-flight <n>', 'frames the agent may hold per stream', int, 8)
  .option('--reload-every <s>', 'RepositoryModelLoad of the model every this many seconds (0: never)', Number, 30)
  .option('--report-every <s>', 'seconds between progress lines', Number, 30)
  .option('--pid <pid>', "the agent's pid, for its RSS (from /proc)", int)
  .option('--deploy-every <s>', 'a signed fleet deployment of the next version of the model every this many seconds (0: never)', Number, 0)
  .option('--broker-restart-every <s>', 'SIGKILL the soak\'s mosquitto every this many seconds, restart it 3 s later (0: never)', Number, 0)
  .option('--health-s <s>', 'health window of each deployment (own agent only)', Number, 15)
  .option('--broker <url>', 'with --address: the broker the agent uses, for deployments and telemetry')
  .option('--device-id <id>', 'the agent\'s fleet device id', 'soak-device')
  .option('--json <file>', 'also write the intervals and the summary as JSON')
  .parse()
  .opts<{ address?: string; model: string; streams: number; rate: number; minutes: number; maxInFlight: number; reloadEvery: number; reportEvery: number; pid?: number; json?: string; deployEvery: number; brokerRestartEvery: number; healthS: number; broker?: string; deviceId: string }>();

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

// ---- the stack under soak: given, or started here ----
let broker: SoakBroker | undefined;
let fleet: SoakFleet | undefined;
let agent: SoakAgent | undefined;
let workDir: string | undefined;
let address: string;
let agentPid = o.pid;
if (o.address === undefined) {
  workDir = mkdtempSync(join(tmpdir(), 'edge-soak-'));
  broker = new SoakBroker(await freePort(), workDir);
  await broker.start();
  fleet = await SoakFleet.connect(broker.url, o.deviceId);
  const port = await freePort();
  agent = await SoakAgent.start({ dir: workDir, model: o.model, port, brokerUrl: broker.url, deviceId: o.deviceId, trustedKeys: { [SOAK_KEY_ID]: fleet.publicKey }, healthS: o.healthS });
  address = `127.0.0.1:${port}`;
  agentPid = agent.pid;
  console.log(`soak: mosquitto ${broker.url} (pid ${broker.pid}), agent ${address} (pid ${agentPid}), files in ${workDir}`);
} else {
  address = o.address;
  if (o.brokerRestartEvery > 0) throw new Error('--broker-restart-every needs the soak\'s own broker: leave out --address');
  if (o.deployEvery > 0) {
    if (!o.broker) throw new Error('--deploy-every with --address needs --broker (and the agent must trust a key the soak makes: use the soak\'s own agent instead)');
    fleet = await SoakFleet.connect(o.broker, o.deviceId);
  }
}
if (fleet && o.deployEvery > 0) {
  // The demo model's bytes under a new version number each time: the agent keys versions by number, not by hash.
  await fleet.serve(workDir ?? mkdtempSync(join(tmpdir(), 'edge-soak-')), readFileSync(join(ROOT, 'edge-config', 'models', o.model, '1', 'model.onnx')), 16384);
}

// ---- KServe client for the reloads ----
const kserveDir = join(PROTO_DIR, 'inference');
const KServe = (grpc.loadPackageDefinition(protoLoader.loadSync(join(kserveDir, 'grpc_service.proto'), { includeDirs: [kserveDir], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true })) as unknown as {
  inference: { GRPCInferenceService: grpc.ServiceClientConstructor };
}).inference.GRPCInferenceService;
const kserve = new KServe(address, grpc.credentials.createInsecure()) as unknown as grpc.Client & { RepositoryModelLoad(req: object, cb: (err: grpc.ServiceError | null) => void): void };

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
/** Result version changes within one stream, and every version seen in results. */
let versionSwitches = 0;
const versionsSeen = new Set<number>();
const brokerRestarts = { done: 0, failed: 0, at: [] as number[] };

const client = new EdgeAgentClient({ address });
const probe = await client.openStream({ model: o.model, maxInFlight: o.maxInFlight });
const info = probe.opened;
probe.end();
const inputs = syntheticInputs(info.inputs);
console.log(`soak: ${o.streams} streams x ${o.rate} frames/s to ${info.model} v${info.version} (${info.provider}) at ${address} for ${o.minutes} min; reload every ${o.reloadEvery || '-'} s; deploy every ${o.deployEvery || '-'} s; broker restart every ${o.brokerRestartEvery || '-'} s; agent pid ${agentPid ?? '? (no RSS)'}`);

const t0 = performance.now();
const endAt = t0 + o.minutes * 60_000;
const rss0 = rssMiB(agentPid);

/** One sensor: sends at the rate until the end, then waits for every result. A stream that fails is counted,
 * its unanswered frames are counted as lost, and the sensor reopens (as a real one would). */
async function sensor(id: number): Promise<void> {
  const period = 1000 / o.rate;
  let seq = 0;
  let lastVersion: number | undefined;
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
        if (r.status === 'OK') {
          if (lastVersion !== undefined && r.version !== lastVersion) versionSwitches++;
          lastVersion = r.version;
          versionsSeen.add(r.version);
        }
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

async function deployer(): Promise<void> {
  if (!fleet || o.deployEvery <= 0) return;
  let version = info.version;
  // Slots on a fixed grid from the start: the time a deployment takes does not stretch the period.
  for (let slot = t0 + o.deployEvery * 1000; slot < endAt; slot += o.deployEvery * 1000) {
    if (performance.now() < slot) await sleep(slot - performance.now());
    version++;
    const r = await fleet.deploy(o.model, version, 60_000 + o.healthS * 1000);
    console.log(`deploy v${r.version} ${r.deploymentId}: ${r.result}${r.reason ? ` (${r.reason})` : ''}${r.activeAfterMs !== undefined ? `, active after ${r.activeAfterMs} ms` : ''}`);
    // A deployment that took longer than the period starts the next one right away.
    const behind = performance.now() - (slot + o.deployEvery * 1000);
    if (behind > 0) console.log(`deployer: ${Math.round(behind / 1000)} s behind its schedule`);
  }
}

async function brokerRestarter(): Promise<void> {
  if (!broker || o.brokerRestartEvery <= 0) return;
  for (let slot = t0 + o.brokerRestartEvery * 1000; slot + 3000 < endAt; slot += o.brokerRestartEvery * 1000) {
    if (performance.now() < slot) await sleep(slot - performance.now());
    await broker.kill('SIGKILL');
    brokerRestarts.at.push(Math.round((performance.now() - t0) / 1000));
    await sleep(3000);
    try {
      await broker.start();
      brokerRestarts.done++;
      console.log(`broker: SIGKILL and restart #${brokerRestarts.done} at t=${brokerRestarts.at[brokerRestarts.at.length - 1]}s (pid ${broker.pid})`);
    } catch (err) {
      brokerRestarts.failed++;
      console.log(`broker: restart failed: ${(err as Error).message}`);
    }
  }
}

const reporter = setInterval(() => {
  const rss = rssMiB(agentPid);
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

await Promise.all([...Array.from({ length: o.streams }, (_, i) => sensor(i)), reloader(), deployer(), brokerRestarter()]);
clearInterval(reporter);
client.close();
kserve.close();
// The last records (and any backlog from the last outage) still have to arrive: two intervals and a margin.
if (fleet) await sleep(8000);
const telemetry = fleet?.telemetrySummary();

const rssEnd = rssMiB(agentPid);
const agentExit = agent ? await agent.stop() : undefined;
await fleet?.close();
await broker?.kill('SIGTERM');
const outcomes: DeploymentOutcome[] = fleet?.outcomes ?? [];
const deployments = {
  ok: outcomes.filter((d) => d.result === 'active').length,
  failed: outcomes.filter((d) => d.result === 'failed').length,
  rolled_back: outcomes.filter((d) => d.result === 'rolled_back').length,
  timeout: outcomes.filter((d) => d.result === 'timeout').length,
  max_active_after_ms: Math.max(0, ...outcomes.map((d) => d.activeAfterMs ?? 0)),
  problems: outcomes.filter((d) => d.result !== 'active').map((d) => `v${d.version} ${d.result}: ${d.reason ?? ''}`),
};
const telemetryGaps = telemetry ? telemetry.epochs.reduce((n, e) => n + e.missing.length, 0) : 0;

const rssSeries = samples.map((s) => (s as { rss_mib: number | null }).rss_mib).filter((v): v is number => v !== null);
const summary = {
  minutes: o.minutes, streams: o.streams, rate: o.rate, model: o.model, sent, answered, statuses,
  lost: lost.length, lost_examples: lost.slice(0, 10), stream_failures: streamFailures, late_sends: lateSends,
  latency_ms: { p50: Number(ms(total.getValueAtPercentile(50))), p90: Number(ms(total.getValueAtPercentile(90))), p99: Number(ms(total.getValueAtPercentile(99))), p999: Number(ms(total.getValueAtPercentile(99.9))), max: Number(ms(total.maxValue)), mean: Number(ms(total.mean)) },
  rss_mib: { start: rss0 === undefined ? null : Math.round(rss0), end: rssEnd === undefined ? null : Math.round(rssEnd), min: rssSeries.length ? Math.min(...rssSeries) : null, max: rssSeries.length ? Math.max(...rssSeries) : null },
  reloads: { ok: reloads.ok, failed: reloads.failed, max_ms: Math.round(reloads.maxMs), errors: reloads.errors.slice(0, 5) },
  agent_alive: agentPid === undefined ? null : rssEnd !== undefined,
  agent_exit_code: agentExit ?? null,
  deployments, version_switches: versionSwitches, versions_seen: [...versionsSeen].sort((a, b) => a - b),
  broker_restarts: { ...brokerRestarts },
  telemetry: telemetry ? { ...telemetry, gaps: telemetryGaps } : null,
};
// A rollback is the health check doing its job (reported, not a failure); failed or stuck deployments are.
const passed = lost.length === 0 && streamFailures === 0 && reloads.failed === 0 && deployments.failed === 0 && deployments.timeout === 0
  && telemetryGaps === 0 && brokerRestarts.failed === 0 && (agentExit === undefined || agentExit === 0) && summary.agent_alive !== false;
console.log('\nsummary');
console.log(`  frames: sent ${sent}, answered ${answered} ${JSON.stringify(statuses)}; lost ${lost.length}${lost.length ? ` e.g. ${JSON.stringify(lost.slice(0, 5))}` : ''}`);
console.log(`  latency (send to result, OK frames): p50 ${summary.latency_ms.p50} p90 ${summary.latency_ms.p90} p99 ${summary.latency_ms.p99} p99.9 ${summary.latency_ms.p999} max ${summary.latency_ms.max} ms`);
console.log(`  agent RSS: start ${summary.rss_mib.start ?? '?'} MiB, end ${summary.rss_mib.end ?? '?'} MiB, range ${summary.rss_mib.min ?? '?'}..${summary.rss_mib.max ?? '?'} MiB`);
console.log(`  reloads: ${reloads.ok} ok, ${reloads.failed} failed, slowest ${summary.reloads.max_ms} ms; stream failures ${streamFailures}; sends more than one period late ${lateSends}`);
if (fleet) {
  console.log(`  deployments: ${deployments.ok} ok (active, health passed), ${deployments.failed} failed, ${deployments.rolled_back} rolled back, ${deployments.timeout} timed out; slowest to active ${deployments.max_active_after_ms} ms; ${fleet.chunksSent} chunks served${deployments.problems.length ? `; ${deployments.problems.slice(0, 5).join('; ')}` : ''}`);
}
console.log(`  version switches seen in results: ${versionSwitches} (versions ${summary.versions_seen.join(', ')})`);
if (broker) console.log(`  broker restarts: ${brokerRestarts.done} (SIGKILL at t=${brokerRestarts.at.join(', ')} s)${brokerRestarts.failed ? `, ${brokerRestarts.failed} failed to restart` : ''}`);
if (telemetry) {
  console.log(`  telemetry: ${telemetry.received} records received, ${telemetry.distinct} distinct, ${telemetry.duplicates} duplicates; gaps ${telemetryGaps}; ${telemetry.epochs.map((e) => `epoch ${e.epoch}: seq ${e.first}..${e.last}${e.missing.length ? ` missing ${e.missing.slice(0, 20).join(',')}` : ''}`).join('; ')}`);
}
if (telemetryGaps > 0 && fleet) {
  const gapped = fleet.telemetry;
  console.log(`  telemetry arrivals (wall clock): ${gapped.map((r) => `${r.seq}@${new Date(r.at).toISOString().slice(11, 23)}`).join(' ')}`);
  console.log(`  soak client (re)connected at: ${fleet.connectedAt.map((t) => new Date(t).toISOString().slice(11, 23)).join(', ')}`);
}
if (broker && !passed) console.log(`  mosquitto log: ${broker.logFile}`);
if (agentExit !== undefined) console.log(`  agent: SIGTERM exit code ${agentExit}${passed ? '' : `; log ${agent?.logFile}`}`);
console.log(passed ? '  PASS: every frame sent got a result, no deployment failed or stuck, no telemetry record missing' : '  FAIL: see above');
if (o.json) writeFileSync(o.json, JSON.stringify({ summary, intervals: samples }, null, 2));
if (passed && workDir) rmSync(workDir, { recursive: true, force: true });
process.exit(passed ? 0 : 1);
