import t, { type Test } from 'tap';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import type { MqttClient } from 'mqtt';
import { connectAgentClient, freePort, MosquittoBroker, startPersistentBroker, startEdgeOnlyBroker, subscribePersistent, watchInFlight } from './helpers/mosquitto.js';
import { until } from './helpers/event-loop.js';
import { tempDir } from './helpers/runtime.js';
import { Database } from '../agent/store/database.js';
import { MemoryOutbox } from '../agent/store/outbox-memory.js';
import { SqliteOutbox } from '../agent/store/outbox-sqlite.js';
import type { Outbox, OutboxMessage } from '../agent/store/outbox.js';
import { OutboxPublisher } from '../agent/telemetry/outbox-publisher.js';

/**
 * Protected entries (command results, deployment statuses) overtake a telemetry backlog on the way to the
 * broker, while each class keeps its order, QoS 1 and its no-loss guarantees across outages and restarts.
 * Real mosquitto, real SQLite files; order is judged by what a subscriber receives.
 */

interface Tap { teardown(fn: () => unknown): void }

const DEVICE = 'dev-prio';



function telemetry(n: number): OutboxMessage {
  return { kind: 'telemetry', topic: `edge/devices/${DEVICE}/telemetry`, payload: (s) => JSON.stringify({ kind: 'telemetry', seq: s.seq, n }) };
}

function commandResult(id: string): OutboxMessage {
  return { kind: 'command-result', topic: `edge/devices/${DEVICE}/commands/${id}/result`, payload: (s) => JSON.stringify({ kind: 'command-result', seq: s.seq, command_id: id }) };
}

function deploymentStatus(id: string, state: string): OutboxMessage {
  return { kind: 'deployment-status', topic: `edge/devices/${DEVICE}/deployments/${id}/status`, retain: true, payload: (s) => JSON.stringify({ kind: 'deployment-status', seq: s.seq, state }) };
}

interface Arrival { readonly kind: string; readonly seq: number }

/** The fleet side: a persistent QoS 1 subscription to everything the device sends. */
class FleetSink {
  private constructor(readonly client: MqttClient, readonly arrivals: Arrival[]) {}

  static async connect(t: Tap, url: string, clientId: string): Promise<FleetSink> {
    const arrivals: Arrival[] = [];
    const client = await subscribePersistent(t, url, clientId, `edge/devices/${DEVICE}/#`, (_topic, payload) => {
      arrivals.push(JSON.parse(payload.toString('utf8')) as Arrival);
    });
    return new FleetSink(client, arrivals);
  }

  /** First arrival of each (kind, seq), in arrival order: what a receiver that drops duplicates by seq keeps. */
  firstArrivals(): Arrival[] {
    const seen = new Set<string>();
    return this.arrivals.filter((a) => {
      const key = `${a.kind}/${a.seq}`;
      if (seen.has(key)) return false;
      seen.add(key);
      return true;
    });
  }

  count(kind: string): number {
    return new Set(this.arrivals.filter((a) => a.kind === kind).map((a) => a.seq)).size;
  }

  /** Index in `firstArrivals()` of (kind, seq); -1 when it has not arrived. */
  position(kind: string, seq: number): number {
    return this.firstArrivals().findIndex((a) => a.kind === kind && a.seq === seq);
  }
}

function range(from: number, to: number): number[] {
  return Array.from({ length: Math.max(0, to - from + 1) }, (_, i) => from + i);
}

/** Per kind: the sequence numbers in first-arrival order must be 1..count, nothing missing, nothing out of order. */
function assertEveryKindComplete(t: Test, sink: FleetSink, expected: Record<string, number>): void {
  const first = sink.firstArrivals();
  for (const [kind, count] of Object.entries(expected)) {
    t.same(first.filter((a) => a.kind === kind).map((a) => a.seq), range(1, count), `${kind}: seq 1..${count}, each once, in order`);
  }
}



/**
 * A TCP link between the agent's client and the broker that can hold back what the broker sends (PUBACKs
 * among it) and be cut: publishes then reach the broker but their acknowledgements never reach the agent, so
 * the outage starts with entries in flight for certain, not by timing luck.
 */
class BrokerLink {
  private held = false;
  private readonly pairs = new Set<{ client: Socket; upstream: Socket }>();

  private constructor(readonly port: number) {}

  static async open(t: Tap, brokerPort: number): Promise<BrokerLink> {
    const port = await freePort();
    const server = createServer();
    const link = new BrokerLink(port);
    server.on('connection', (client) => link.bridge(client, brokerPort));
    await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', () => resolve()));
    t.teardown(() => { link.cut(); return new Promise<void>((r) => server.close(() => r())); });
    return link;
  }

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  /** Stops passing the broker's bytes to the agent (the agent's still reach the broker). */
  hold(): void {
    this.held = true;
    for (const { upstream } of this.pairs) upstream.pause();
  }

  /** Drops every connection; new ones pass both ways again. */
  cut(): void {
    this.held = false;
    for (const { client, upstream } of this.pairs) { client.destroy(); upstream.destroy(); }
    this.pairs.clear();
  }

  private bridge(client: Socket, brokerPort: number): void {
    const upstream = connect(brokerPort, '127.0.0.1');
    const pair = { client, upstream };
    this.pairs.add(pair);
    const close = (): void => { client.destroy(); upstream.destroy(); this.pairs.delete(pair); };
    client.on('error', close).on('close', close);
    upstream.on('error', close).on('close', close);
    client.pipe(upstream);
    upstream.pipe(client);
    if (this.held) upstream.pause();
  }
}

async function openSqlite(file: string): Promise<{ db: Database; outbox: SqliteOutbox }> {
  const db = await Database.open(file);
  return { db, outbox: await SqliteOutbox.open(db) };
}

const IMPLEMENTATIONS: readonly { readonly name: string; readonly open: (t: Tap) => Promise<Outbox> }[] = [
  {
    name: 'SqliteOutbox',
    open: async (t) => {
      const { db, outbox } = await openSqlite(join(tempDir(t, 'edge-prio-db-'), 'agent.db'));
      t.teardown(async () => { await outbox.close(); await db.close(); });
      return outbox;
    },
  },
  { name: 'MemoryOutbox', open: async () => new MemoryOutbox() },
];

for (const { name, open } of IMPLEMENTATIONS) {
  t.test(`${name}: protected entries enqueued behind a telemetry backlog are sent with the next tokens`, async (t) => {
    const broker = await MosquittoBroker.start();
    t.teardown(() => broker.close());
    const sink = await FleetSink.connect(t, broker.url, `sink-prio-${name}`);
    const outbox = await open(t);
    for (let n = 1; n <= 30; n += 1) await outbox.enqueue(telemetry(n));
    const client = await connectAgentClient(t, broker.url);
    const inFlight = watchInFlight(client);
    let clock = 0;
    const publisher = new OutboxPublisher({ client, outbox, ratePerSecond: 10, maxInFlight: 3, now: () => clock });
    publisher.start();
    await until('the first burst is acknowledged', () => publisher.stats().acknowledged >= 3);

    // An operator's command and a deployment step complete while 27 records still wait.
    await outbox.enqueue(telemetry(31));
    await outbox.enqueue(commandResult('c1'));
    await outbox.enqueue(telemetry(32));
    await outbox.enqueue(deploymentStatus('dep1', 'active'));
    await outbox.enqueue(commandResult('c2'));
    await new Promise((r) => setTimeout(r, 200));
    t.equal(publisher.stats().published, 3, 'protected entries spend tokens too: on a frozen clock nothing more is sent');

    clock += 1000; // refills the bucket (max_in_flight = 3 tokens)
    await until('the refill is acknowledged', () => publisher.stats().acknowledged >= 6);
    await new Promise((r) => setTimeout(r, 200));
    t.equal(publisher.stats().published, 6, 'one bucket, not one per class');
    while (publisher.stats().acknowledged < 35) {
      const before = publisher.stats().acknowledged;
      clock += 1000;
      await until('the next refill is acknowledged', () => publisher.stats().acknowledged >= Math.min(35, before + 3));
    }
    await publisher.drained();
    await publisher.stop();
    await until('all 35 entries at the subscriber', () => sink.firstArrivals().length >= 35);

    const order = sink.firstArrivals().map((a) => `${a.kind}:${a.seq}`);
    t.same(order.slice(0, 6), ['telemetry:1', 'telemetry:2', 'telemetry:3', 'command-result:1', 'deployment-status:1', 'command-result:2'],
      'the three protected entries are the next published, in id order, ahead of 29 older telemetry records');
    t.same(order.slice(6), range(4, 32).map((s) => `telemetry:${s}`), 'then the telemetry backlog, in order');
    assertEveryKindComplete(t, sink, { telemetry: 32, 'command-result': 2, 'deployment-status': 1 });
    t.equal(sink.arrivals.length, 35, 'no duplicates without an outage');
    t.ok(inFlight.max <= 3, `max_in_flight bounds both classes together (saw ${inFlight.max})`);
    t.equal(outbox.stats().rows, 0);
  });
}

t.test('SqliteOutbox, rate-bounded drain with a broker outage in the middle: nothing lost or skipped in either class', async (t) => {
  const broker = await startPersistentBroker(t, 'edge-prio-persist-');
  const sink = await FleetSink.connect(t, broker.url, 'sink-prio-outage');
  const { db, outbox } = await openSqlite(join(tempDir(t, 'edge-prio-outage-'), 'agent.db'));
  t.teardown(async () => { await outbox.close(); await db.close(); });
  const BACKLOG = 120;
  for (let n = 1; n <= BACKLOG; n += 1) await outbox.enqueue(telemetry(n));
  const link = await BrokerLink.open(t, broker.port);
  const client = await connectAgentClient(t, link.url);
  const maxInFlight = 4;
  const publisher = new OutboxPublisher({ client, outbox, ratePerSecond: 40, maxInFlight });
  let inFlightAtOutage = -1;
  // Registered before the publisher's own listener, so it sees what was in flight when the link went.
  client.on('close', () => { if (inFlightAtOutage < 0) inFlightAtOutage = publisher.stats().inFlight; });
  publisher.start();

  await until('10 records drained', () => sink.count('telemetry') >= 10);
  // Read when the entry is stored (the enqueue's checkpoint takes a while, the publisher keeps sending).
  let handedBeforeCommand = -1;
  const off = outbox.onEnqueued((e) => { if (e.kind === 'command-result') handedBeforeCommand = publisher.stats().published; });
  await outbox.enqueue(commandResult('c1'));
  off();
  await until('the command result', () => sink.count('command-result') >= 1);
  const newestTelemetryBefore = Math.max(...sink.firstArrivals().slice(0, sink.position('command-result', 1)).filter((a) => a.kind === 'telemetry').map((a) => a.seq));
  t.ok(newestTelemetryBefore <= handedBeforeCommand + maxInFlight,
    `online: the command result overtook the backlog (telemetry up to seq ${newestTelemetryBefore} before it; ${handedBeforeCommand} had been handed to the client at the enqueue)`);

  // The broker goes down with records in flight (published, PUBACK not received); the fleet keeps talking
  // to the device meanwhile.
  link.hold();
  await until('max_in_flight entries unacknowledged', () => publisher.stats().inFlight === maxInFlight);
  await broker.stop('SIGTERM');
  link.cut();
  await until('the client sees the outage', () => !client.connected);
  t.equal(inFlightAtOutage, maxInFlight, 'the outage began with max_in_flight entries in flight');
  const handedBeforeOutage = publisher.stats().published;
  t.ok(handedBeforeOutage < BACKLOG - 20, `most of the backlog still waits (${handedBeforeOutage} of ${BACKLOG} handed out)`);
  await outbox.enqueue(commandResult('c2'));
  for (let n = BACKLOG + 1; n <= BACKLOG + 5; n += 1) await outbox.enqueue(telemetry(n));
  await outbox.enqueue(deploymentStatus('dep1', 'loading'));
  await outbox.enqueue(commandResult('c3'));
  for (let n = BACKLOG + 6; n <= BACKLOG + 10; n += 1) await outbox.enqueue(telemetry(n));
  await outbox.enqueue(deploymentStatus('dep1', 'active'));
  await broker.start();

  await publisher.drained(60_000);
  await publisher.stop();
  const total = BACKLOG + 10;
  await until('every entry at the subscriber', () => sink.count('telemetry') >= total && sink.count('command-result') >= 3 && sink.count('deployment-status') >= 2);
  assertEveryKindComplete(t, sink, { telemetry: total, 'command-result': 3, 'deployment-status': 2 });

  // After the reconnect only records already handed to the client before the outage (in flight, or
  // resent by mqtt.js from its own store) may arrive before the protected entries written during it.
  const lastProtected = Math.max(sink.position('command-result', 3), sink.position('deployment-status', 2), sink.position('command-result', 2), sink.position('deployment-status', 1));
  const firstNewTelemetry = sink.position('telemetry', handedBeforeOutage + 1);
  t.ok(lastProtected < firstNewTelemetry,
    `after the reconnect the 4 protected entries came before telemetry seq ${handedBeforeOutage + 1} (positions ${lastProtected} < ${firstNewTelemetry})`);
  t.comment(`duplicates: ${sink.arrivals.length - sink.firstArrivals().length}, republished: ${publisher.stats().republished}`);
  t.equal(outbox.stats().rows, 0, 'every entry acknowledged and removed');
});

t.test('SqliteOutbox, publisher restarted on the reopened file mid-drain: the protected class goes first, nothing lost', async (t) => {
  const broker = await startPersistentBroker(t, 'edge-prio-persist-');
  const sink = await FleetSink.connect(t, broker.url, 'sink-prio-restart');
  const file = join(tempDir(t, 'edge-prio-restart-'), 'agent.db');
  const first = await openSqlite(file);
  const BACKLOG = 80;
  for (let n = 1; n <= BACKLOG; n += 1) await first.outbox.enqueue(telemetry(n));
  const clientA = await connectAgentClient(t, broker.url);
  const publisherA = new OutboxPublisher({ client: clientA, outbox: first.outbox, ratePerSecond: 40, maxInFlight: 4 });
  publisherA.start();
  await until('10 records drained', () => sink.count('telemetry') >= 10);
  await first.outbox.enqueue(commandResult('c1'));
  await first.outbox.enqueue(deploymentStatus('dep1', 'accepted'));
  // The process goes down hard: its connection is dropped with publishes in flight, nothing is drained.
  clientA.end(true);
  await until('the first client is closed', () => !clientA.connected);
  await publisherA.stop(0);
  const handedByA = publisherA.stats().published;
  await first.outbox.close();
  await first.db.close();

  const second = await openSqlite(file);
  t.teardown(async () => { await second.outbox.close(); await second.db.close(); });
  await second.outbox.enqueue(commandResult('c2'));
  const clientB = await connectAgentClient(t, broker.url);
  const publisherB = new OutboxPublisher({ client: clientB, outbox: second.outbox, ratePerSecond: 40, maxInFlight: 4 });
  publisherB.start();
  await publisherB.drained(60_000);
  await publisherB.stop();
  await until('every entry at the subscriber', () => sink.count('telemetry') >= BACKLOG && sink.count('command-result') >= 2 && sink.count('deployment-status') >= 1);
  assertEveryKindComplete(t, sink, { telemetry: BACKLOG, 'command-result': 2, 'deployment-status': 1 });
  const lastProtected = Math.max(sink.position('command-result', 1), sink.position('command-result', 2), sink.position('deployment-status', 1));
  const firstAfterRestart = sink.position('telemetry', handedByA + 1);
  t.ok(lastProtected < firstAfterRestart, `the restarted publisher sent the protected entries before telemetry seq ${handedByA + 1}`);
  t.equal(second.outbox.stats().rows, 0);
});

t.test('a droppable entry the broker keeps refusing stays in the outbox and does not hold back a command result', async (t) => {
  const broker = await startEdgeOnlyBroker(t);
  const outbox = new MemoryOutbox();
  await outbox.enqueue(telemetry(1));
  await outbox.enqueue({ kind: 'telemetry', topic: 'forbidden/devices/d/telemetry', payload: (s) => JSON.stringify({ seq: s.seq }) });
  await outbox.enqueue(telemetry(3));
  const client = await connectAgentClient(t, broker.url);
  const publisher = new OutboxPublisher({ client, outbox, ratePerSecond: 1000, maxInFlight: 1, refusalBackoffMs: 20 });
  publisher.start();
  await until('two refusals', () => publisher.stats().refused >= 2);
  await outbox.enqueue(commandResult('c1'));
  await until('the command result acknowledged', () => publisher.stats().acknowledged >= 2);
  const refusedBefore = publisher.stats().refused;
  await until('the refused entry is retried after the command result', () => publisher.stats().refused > refusedBefore);
  await publisher.stop();
  const left = await outbox.peek(0, 10);
  t.same(left.map((e) => [e.kind, e.seq]), [['telemetry', 2], ['telemetry', 3]], 'the refused record and the one behind it wait; the command result went');
  t.equal(publisher.stats().acknowledged, 2, 'telemetry 1 and the command result');
});
