import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import type { MqttClient } from 'mqtt';
import { connectAgentClient, MosquittoBroker, startPersistentBroker, startEdgeOnlyBroker, subscribePersistent, watchInFlight } from './helpers/mosquitto.js';
import { until } from './helpers/event-loop.js';
import { tempDir } from './helpers/runtime.js';
import { Database } from '../agent/store/database.js';
import { SqliteOutbox } from '../agent/store/outbox-sqlite.js';
import { MemoryOutbox } from '../agent/store/outbox-memory.js';
import type { Outbox } from '../agent/store/outbox.js';
import { AgentMetrics } from '../agent/telemetry/agent-metrics.js';
import { OutboxPublisher } from '../agent/telemetry/outbox-publisher.js';
import { OutboxStatusSink } from '../agent/telemetry/outbox-status-sink.js';
import { TelemetryReporter, telemetryTopic, type TelemetryRecord } from '../agent/telemetry/telemetry-reporter.js';
import { TelemetryService, outboxOptions } from '../agent/telemetry/telemetry-service.js';
import type { StatusReport } from '../agent/telemetry/status-report.js';
import { telemetrySchema } from '../agent/config/telemetry-schema.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const INTERVAL_MS = 100;


interface Tap { teardown(fn: () => unknown): void }



/** The fleet side: a persistent QoS 1 subscription to every device's telemetry. */
class TelemetrySink {
  private constructor(readonly client: MqttClient, readonly arrivals: TelemetryRecord[]) {}

  static async connect(t: Tap, url: string, clientId: string): Promise<TelemetrySink> {
    const arrivals: TelemetryRecord[] = [];
    const client = await subscribePersistent(t, url, clientId, 'edge/devices/+/telemetry', (topic, payload) => {
      if (topic.endsWith('/telemetry')) arrivals.push(JSON.parse(payload.toString('utf8')) as TelemetryRecord);
    });
    return new TelemetrySink(client, arrivals);
  }

  get maxSeq(): number {
    return this.arrivals.reduce((m, r) => Math.max(m, r.seq), 0);
  }

  /** Sequence numbers in first-arrival order, and how many arrivals were repeats. */
  firstArrivals(): { order: number[]; duplicates: number } {
    const seen = new Set<number>();
    const order: number[] = [];
    for (const r of this.arrivals) {
      if (seen.has(r.seq)) continue;
      seen.add(r.seq);
      order.push(r.seq);
    }
    return { order, duplicates: this.arrivals.length - order.length };
  }
}

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from + 1 }, (_, i) => from + i);
}


async function sqliteOutbox(t: Tap, file?: string): Promise<{ outbox: SqliteOutbox; db: Database }> {
  const db = await Database.open(file ?? join(tempDir(t, 'edge-tel-db-'), 'agent.db'));
  const outbox = await SqliteOutbox.open(db);
  t.teardown(async () => { await outbox.close(); await db.close(); });
  return { outbox, db };
}

function feedTraffic(t: Tap, metrics: AgentMetrics): void {
  const timer = setInterval(() => {
    metrics.onRequest({ model: 'classifier', version: 1, status: 'OK', timings: { queueUs: 30, inferUs: 500, totalUs: 560 } });
    metrics.onExecution({ model: 'classifier', version: 1, batchSize: 1, inferUs: 500, handedAhead: false, underLoad: false });
  }, 5);
  t.teardown(() => clearInterval(timer));
}

t.test('records arrive in order with contiguous sequence numbers, each removed after its PUBACK', async (t) => {
  const broker = await MosquittoBroker.start();
  t.teardown(() => broker.close());
  const sink = await TelemetrySink.connect(t, broker.url, 'sink-order');
  const { outbox } = await sqliteOutbox(t);
  const client = await connectAgentClient(t, broker.url);
  const metrics = new AgentMetrics();
  feedTraffic(t, metrics);
  const publisher = new OutboxPublisher({ client, outbox, ratePerSecond: 1000, maxInFlight: 4 });
  const reporter = new TelemetryReporter({ metrics, outbox, deviceId: 'dev-order', agentVersion: '0.1.0-test', topic: telemetryTopic('edge', 'dev-order'), intervalMs: INTERVAL_MS });
  publisher.start();
  reporter.start();
  await until('10 records', () => sink.arrivals.length >= 10);
  await reporter.stop();
  await publisher.drained();
  await publisher.stop();
  const { order, duplicates } = sink.firstArrivals();
  t.same(order, range(1, order.length), 'seq 1..n in arrival order, no gap');
  t.equal(duplicates, 0, 'no duplicates without an outage');
  t.equal(outbox.stats().rows, 0, 'every acknowledged record left the outbox');
  const rec = sink.arrivals[sink.arrivals.length - 1]!;
  t.equal(rec.device_id, 'dev-order');
  t.equal(rec.dropped, 0);
  t.match(rec.ts, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  const model = rec.models.find((m) => m.model === 'classifier');
  t.ok(model, 'record carries the model figures');
  t.ok(sink.arrivals.some((r) => (r.models[0]?.success ?? 0) > 0), 'requests counted in some interval');
  t.equal(publisher.stats().acknowledged, order.length);
});

t.test('broker down for several intervals, then back: every record arrives, none missing', async (t) => {
  const broker = await startPersistentBroker(t, 'edge-mq-persist-');
  const sink = await TelemetrySink.connect(t, broker.url, 'sink-outage');
  const { outbox } = await sqliteOutbox(t);
  const client = await connectAgentClient(t, broker.url);
  const metrics = new AgentMetrics();
  feedTraffic(t, metrics);
  let lastStored = 0;
  outbox.onEnqueued((e) => { lastStored = e.seq; });
  const publisher = new OutboxPublisher({ client, outbox, ratePerSecond: 50, maxInFlight: 4 });
  const reporter = new TelemetryReporter({ metrics, outbox, deviceId: 'dev-outage', agentVersion: '0.1.0-test', topic: telemetryTopic('edge', 'dev-outage'), intervalMs: INTERVAL_MS });
  publisher.start();
  reporter.start();
  await until('3 records before the outage', () => sink.maxSeq >= 3);
  await broker.stop('SIGTERM');
  const storedAtOutage = lastStored;
  await until('8 intervals stored while the broker is down', () => lastStored >= storedAtOutage + 8);
  t.ok(outbox.stats().rows >= 8, `records wait in the outbox (${outbox.stats().rows})`);
  await broker.start();
  const target = lastStored + 3;
  await until(`records up to seq ${target}`, () => sink.maxSeq >= target);
  await reporter.stop();
  await publisher.drained();
  await publisher.stop();
  await until('the last record', () => sink.maxSeq >= lastStored);
  const { order, duplicates } = sink.firstArrivals();
  t.same(order, range(1, lastStored), `all ${lastStored} records arrived, in order`);
  t.comment(`duplicates after the outage: ${duplicates} (publisher republished ${publisher.stats().republished})`);
  t.ok(duplicates <= publisher.stats().republished + 4, 'duplicates come only from entries that were in flight at the outage');
  t.ok(sink.arrivals.every((r) => r.dropped === 0), 'nothing dropped within the bounds');
  t.equal(outbox.stats().rows, 0);
});

t.test('SIGKILL while offline, restart, broker back: no gap', async (t) => {
  const broker = await startPersistentBroker(t, 'edge-mq-persist-');
  const sink = await TelemetrySink.connect(t, broker.url, 'sink-kill');
  const dbFile = join(tempDir(t, 'edge-kill-'), 'agent.db');
  const script = join(HERE, 'fixtures', 'telemetry', 'outbox-agent.ts');
  // The child runs TypeScript the way this test does: same loader flags, without tap's coverage/mock hooks.
  const loader = process.execArgv.filter((a) => !a.includes('@tapjs/processinfo') && !a.includes('@tapjs/mock'));

  const startAgent = (): { child: ChildProcess; stored: number[] } => {
    const env = { ...process.env };
    delete env['NODE_OPTIONS'];
    const child = spawn(process.execPath, [...loader, script, dbFile, broker.url, 'dev-kill', String(INTERVAL_MS)], { stdio: ['ignore', 'pipe', 'inherit'], env });
    const stored: number[] = [];
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const msg = JSON.parse(line) as { event: string; seq?: number };
      if (msg.event === 'stored' && msg.seq !== undefined) stored.push(msg.seq);
    });
    t.teardown(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL'); });
    return { child, stored };
  };
  const kill = (child: ChildProcess): Promise<void> => new Promise((r) => { child.once('exit', () => r()); child.kill('SIGKILL'); });

  const a = startAgent();
  await until('first agent publishes 3 records', () => sink.maxSeq >= 3);
  await broker.stop('SIGTERM');
  const atOutage = a.stored.at(-1) ?? 0;
  await until('first agent stores 5 records offline', () => (a.stored.at(-1) ?? 0) >= atOutage + 5);
  await kill(a.child);
  const lastOfA = a.stored.at(-1)!;
  t.ok(a.stored.length > 0);

  const b = startAgent();
  await until('second agent stores 3 records offline', () => b.stored.length >= 3);
  t.ok(b.stored[0]! > lastOfA, `numbering continues after the kill (${lastOfA} → ${b.stored[0]})`);
  await broker.start();
  const target = b.stored.at(-1)! + 2;
  await until(`records up to seq ${target}`, () => sink.maxSeq >= target);
  await kill(b.child);
  const { order, duplicates } = sink.firstArrivals();
  const max = order.length;
  t.same(order, range(1, max), `seq 1..${max} all arrived in order across the SIGKILL (duplicates: ${duplicates})`);
  t.ok(max >= target, 'records from both processes arrived');
  const epochOf = (seq: number): number => sink.arrivals.find((r) => r.seq === seq)!.epoch;
  t.ok(epochOf(lastOfA) < epochOf(b.stored[0]!), 'the restarted process numbers in a new epoch');
  t.ok(sink.arrivals.every((r) => r.dropped === 0));
});

t.test('in flight never exceeds max_in_flight; the rate bound holds on a frozen clock', async (t) => {
  const broker = await MosquittoBroker.start();
  t.teardown(() => broker.close());
  const outbox: Outbox = new MemoryOutbox();
  for (let i = 0; i < 30; i += 1) {
    await outbox.enqueue({ kind: 'telemetry', topic: 'edge/devices/dev-rate/telemetry', payload: (s) => JSON.stringify({ seq: s.seq }) });
  }
  const client = await connectAgentClient(t, broker.url);
  const inFlight = watchInFlight(client);
  let clock = 0;
  const publisher = new OutboxPublisher({ client, outbox, ratePerSecond: 10, maxInFlight: 3, now: () => clock });
  publisher.start();
  await until('the burst is acknowledged', () => publisher.stats().acknowledged >= 3);
  await new Promise((r) => setTimeout(r, 200));
  t.equal(publisher.stats().published, 3, 'with the clock frozen only the burst (max_in_flight tokens) is sent');
  clock += 1000; // one second: ten more tokens, but the bucket holds at most max_in_flight
  await until('the refill is spent', () => publisher.stats().acknowledged >= 6);
  await new Promise((r) => setTimeout(r, 200));
  t.equal(publisher.stats().published, 6, 'a refill allows at most the bucket size');
  while (publisher.stats().acknowledged < 30) {
    const before = publisher.stats().acknowledged;
    clock += 1000;
    await until('the next refill is spent', () => publisher.stats().acknowledged >= Math.min(30, before + 3));
    t.ok(publisher.stats().published <= before + 3, 'never more than the bucket per refill');
  }
  await publisher.drained();
  await publisher.stop();
  t.equal(publisher.stats().published, 30);
  t.ok(inFlight.max <= 3, `at most 3 unacknowledged publishes on the wire (saw ${inFlight.max})`);
  t.equal(outbox.stats().rows, 0);
});

t.test('deployment statuses keep their retain flag and their order among telemetry', async (t) => {
  const broker = await MosquittoBroker.start();
  t.teardown(() => broker.close());
  const outbox = new MemoryOutbox({ bounds: { maxRows: 4 } });
  const kinds: string[] = [];
  for (let i = 0; i < 6; i += 1) {
    await outbox.enqueue({ kind: 'telemetry', topic: 'edge/devices/d/telemetry', payload: (s) => JSON.stringify({ seq: s.seq, dropped: s.dropped }) });
    if (i % 2 === 0) {
      await outbox.enqueue({ kind: 'deployment-status', topic: `edge/devices/d/deployments/dep${i}/status`, retain: true, payload: (s) => JSON.stringify({ seq: s.seq, deployment_id: `dep${i}`, state: 'accepted' }) });
    }
  }
  kinds.push(...(await outbox.peek(0, 100)).map((e) => e.kind));
  t.same(kinds.filter((k) => k === 'deployment-status').length, 3, 'all three statuses survived the bound of 4 rows');
  const client = await connectAgentClient(t, broker.url);
  const publisher = new OutboxPublisher({ client, outbox, ratePerSecond: 1000, maxInFlight: 2 });
  publisher.start();
  await publisher.drained();
  await publisher.stop();
  // A late subscriber sees the retained statuses: they were published with retain.
  const late = await connectAgentClient(t, broker.url);
  const retained: string[] = [];
  late.on('message', (topic, payload, packet) => { if (packet.retain) retained.push(`${topic} ${(JSON.parse(payload.toString()) as { state: string }).state}`); });
  await new Promise<void>((r) => late.subscribe('edge/devices/d/deployments/+/status', { qos: 1 }, () => r()));
  await until('3 retained statuses', () => retained.length >= 3, 5000);
  t.same(retained.sort(), ['edge/devices/d/deployments/dep0/status accepted', 'edge/devices/d/deployments/dep2/status accepted', 'edge/devices/d/deployments/dep4/status accepted']);
});

t.test('outage past the bound: oldest telemetry dropped and counted, deployment statuses all delivered', async (t) => {
  const broker = await startPersistentBroker(t, 'edge-mq-persist-');
  const sink = await TelemetrySink.connect(t, broker.url, 'sink-bound');
  const statuses: string[] = [];
  const statusSeqs: number[] = [];
  await new Promise<void>((r) => sink.client.subscribe('edge/devices/+/deployments/+/status', { qos: 1 }, () => r()));
  sink.client.on('message', (topic, payload) => {
    if (!topic.endsWith('/status')) return;
    const status = JSON.parse(payload.toString()) as { state: string; seq: number };
    statuses.push(status.state);
    statusSeqs.push(status.seq);
  });
  const db = await Database.open(join(tempDir(t, 'edge-bound-'), 'agent.db'));
  const outbox = await SqliteOutbox.open(db, { bounds: { maxRows: 12 } });
  t.teardown(async () => { await outbox.close(); await db.close(); });
  const client = await connectAgentClient(t, broker.url);
  const metrics = new AgentMetrics();
  let lastStored = 0;
  outbox.onEnqueued((e) => { if (e.kind === 'telemetry') lastStored = e.seq; });
  const publisher = new OutboxPublisher({ client, outbox, ratePerSecond: 200, maxInFlight: 2 });
  const reporter = new TelemetryReporter({ metrics, outbox, deviceId: 'dev-bound', agentVersion: 't', topic: telemetryTopic('edge', 'dev-bound'), intervalMs: INTERVAL_MS });
  publisher.start();
  reporter.start();
  await until('2 records before the outage', () => sink.maxSeq >= 2);
  // Nothing in flight when the link goes: an entry whose PUBACK is lost and that the bound then drops is
  // counted as dropped although it arrived, which would make the exact comparison below over-count.
  await reporter.stop();
  await publisher.drained();
  await broker.stop('SIGTERM');
  reporter.start();
  const states = ['accepted', 'downloading', 'verifying', 'loading', 'warming', 'validating', 'active'];
  const storedAtOutage = lastStored;
  const statusSink = new OutboxStatusSink(outbox); // what the fleet code is given
  for (const state of states) {
    await statusSink.enqueue('deployment-status', 'edge/devices/dev-bound/deployments/dep-1/status', { deployment_id: 'dep-1', state, ts: new Date().toISOString() }, true);
  }
  await until('15 intervals stored while down', () => lastStored >= storedAtOutage + 15);
  t.ok(outbox.stats().rows <= 12, `the bound holds (${outbox.stats().rows} rows: ${states.length} statuses + telemetry)`);
  t.ok(outbox.stats().droppedTotal > 0, 'telemetry was dropped');
  await broker.start();
  const target = lastStored + 2;
  await until(`telemetry up to seq ${target}`, () => sink.maxSeq >= target);
  await reporter.stop();
  await publisher.drained();
  await publisher.stop();
  await until('all statuses', () => statuses.length >= states.length);
  t.same(statuses.slice(0, states.length), states, 'every deployment status arrived, in order');
  t.same(statusSeqs.slice(0, states.length), range(1, states.length), 'statuses carry their own sequence');
  const { order } = sink.firstArrivals();
  const missing = range(1, order.at(-1)!).filter((s) => !order.includes(s));
  t.ok(missing.length > 0, `records were dropped (${missing.length})`);
  t.same([...order].sort((a, b) => a - b), order, 'what arrived, arrived in order');
  const reported = sink.arrivals.filter((r, i, all) => all.findIndex((x) => x.seq === r.seq) === i).reduce((s, r) => s + r.dropped, 0);
  t.equal(reported, missing.length, 'the dropped counts in the records that arrived account for every missing seq');
  t.equal(sink.arrivals.at(-1)!.dropped_total, outbox.stats().droppedTotal);
});

t.test('TelemetryService: wired as main.ts wires it', async (t) => {
  const broker = await MosquittoBroker.start();
  t.teardown(() => broker.close());
  const sink = await TelemetrySink.connect(t, broker.url, 'sink-service');
  const config = telemetrySchema.parse({ interval_s: 0.1, http: { port: 0 }, outbox: { max_rows: 100 }, device: { nvidia_smi: false, tegrastats: false } });
  const db = await Database.open(join(tempDir(t, 'edge-svc-'), 'agent.db'));
  const outbox = await SqliteOutbox.open(db, outboxOptions(config.outbox));
  t.teardown(async () => { await outbox.close(); await db.close(); });
  const metrics = new AgentMetrics();
  feedTraffic(t, metrics);
  metrics.onModelEvent({ type: 'model-ready', model: 'classifier', version: 1, provider: 'cpu', variant: 'fp32' });
  const client = await connectAgentClient(t, broker.url);
  const service = new TelemetryService({
    config, metrics, outbox, deviceId: 'dev-svc', agentVersion: '0.1.0', topicPrefix: 'edge',
    statusSource: () => ({ agentVersion: '0.1.0', deviceId: 'dev-svc', models: [{ name: 'classifier', version: 1, state: 'READY', provider: 'cpu', variant: 'fp32' }], fleet: { connected: client.connected, broker: broker.url } }),
  });
  await service.start();
  service.attachMqtt(client);
  t.throws(() => service.attachMqtt(client), /already attached/);
  await until('3 records through the service', () => sink.maxSeq >= 3);
  const status = (await (await fetch(`${service.httpUrl!}/v1/status`)).json()) as StatusReport;
  t.equal(status.models[0]?.provider, 'cpu');
  t.ok((status.models[0]?.figures?.success ?? 0) > 0, 'status shows the last interval');
  t.equal(status.fleet?.connected, true);
  t.ok(status.outbox !== null);
  const metricsText = await (await fetch(`${service.httpUrl!}/metrics`)).text();
  t.match(metricsText, /^edge_agent_fleet_connected 1$/m);
  let stored = 0;
  outbox.onEnqueued((e) => { stored = e.seq; });
  const url = service.httpUrl!;
  await service.stop();
  const storedAtStop = stored;
  t.ok(storedAtStop > 0, `stop writes a final record (seq ${storedAtStop}); the outbox keeps it if it was not sent yet`);
  await new Promise((r) => setTimeout(r, 300));
  t.equal(stored, storedAtStop, 'no records after stop');
  await t.rejects(fetch(`${url}/metrics`), { message: /fetch failed/ }, 'the listener is closed');
  const { order } = sink.firstArrivals();
  t.same(order, range(1, order.length));
});

t.test('an entry the broker refuses (MQTT 5 reason code) stays in the outbox and is retried, never deleted', async (t) => {
  const broker = await startEdgeOnlyBroker(t);
  const outbox = new MemoryOutbox();
  const put = (topic: string): Promise<unknown> => outbox.enqueue({ kind: 'telemetry', topic, payload: (s) => JSON.stringify({ seq: s.seq }) });
  await put('edge/devices/d/telemetry');
  await put('forbidden/devices/d/telemetry');
  await put('edge/devices/d/telemetry');
  const client = await connectAgentClient(t, broker.url);
  const publisher = new OutboxPublisher({ client, outbox, ratePerSecond: 1000, maxInFlight: 1, refusalBackoffMs: 20 });
  publisher.start();
  await until('three refusals', () => publisher.stats().refused >= 3);
  await publisher.stop();
  const left = await outbox.peek(0, 10);
  t.same(left.map((e) => e.seq), [2, 3], 'the first was acknowledged and removed; the refused one and the one behind it wait');
  t.equal(publisher.stats().acknowledged, 1);
  t.ok(publisher.stats().published >= 4, 'the refused entry was published again after each backoff');
});
