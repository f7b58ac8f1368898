import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { fleetSchema } from '../agent/config/fleet-schema.js';
import type { SpawnFn } from '../agent/telemetry/device-tool.js';
import { NvidiaSmiCollector } from '../agent/telemetry/nvidia-smi.js';
import { TegrastatsCollector } from '../agent/telemetry/tegrastats.js';
import { DeviceMonitor } from '../agent/telemetry/device-monitor.js';
import { AgentMetrics } from '../agent/telemetry/agent-metrics.js';
import { createPrometheusRegistry } from '../agent/telemetry/prometheus-metrics.js';
import { LocalHttpServer } from '../agent/telemetry/local-http-server.js';
import type { StatusReport } from '../agent/telemetry/status-report.js';
import { Database } from '../agent/store/index.js';
import { freePort } from './helpers/mosquitto.js';
import { startTestAgent } from './helpers/agent.js';
import { gone } from './helpers/event-loop.js';
import { tempDir } from './helpers/runtime.js';

// What telemetry holds on the device besides its figures: device-tool processes, connections of the local
// listener, rows in the outbox. Real child processes (stub scripts standing in for nvidia-smi and tegrastats,
// which this machine lacks), real HTTP and TCP, a real agent with its SQLite database.

type Tap = { teardown(fn: () => void | Promise<void>): void };

const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'telemetry');

async function until<T>(what: string, probe: () => T | undefined | Promise<T | undefined>, timeoutMs = 20_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`gave up waiting for ${what} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A stub tool: a shell script in a scratch folder. */
function stubTool(t: Tap, name: string, body: (dir: string) => string): { command: string; dir: string } {
  const dir = tempDir(t, 'edge-tool-');
  const command = join(dir, name);
  writeFileSync(command, `#!/bin/sh\n${body(dir)}\n`);
  chmodSync(command, 0o755);
  return { command, dir };
}

/** The real spawn, keeping every child it started. */
function recordingSpawn(): { spawn: SpawnFn; children: ChildProcess[] } {
  const children: ChildProcess[] = [];
  return { children, spawn: (command, args, options) => { const c = spawn(command, [...args], options); children.push(c); return c; } };
}

/** Resolves when the child has exited (how), or rejects naming what survived. */
function exitOf(child: ChildProcess, what: string): Promise<NodeJS.Signals | number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.signalCode ?? child.exitCode);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} (pid ${child.pid}) is still running`)), 20_000);
    child.once('exit', (code, signal) => { clearTimeout(timer); resolve(signal ?? code); });
  });
}

// Stands in for nvidia-smi hung in the driver: it ignores SIGTERM, and so does the helper it waits for (an
// ignored signal stays ignored across fork and exec).
const STUBBORN = (dir: string): string => `trap '' TERM\necho $$ >> '${dir}/runs'\nsleep 300 &\necho $! > '${dir}/helper.pid'\nwait $!`;

/** Kills what a test's tools left (only on failure: the tests close their tools). */
function killLeftovers(t: Tap, children: ChildProcess[]): void {
  t.teardown(() => { for (const c of children) if (c.pid && c.exitCode === null && c.signalCode === null) try { process.kill(-c.pid, 'SIGKILL'); } catch { /* gone */ } });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

t.test('tegrastats printing forever is read again and again from ONE child, and close() leaves no process', async (t) => {
  const line = readFileSync(join(FIXTURES, 'tegrastats-orin-nano-jp6.txt'), 'utf8').split('\n')[0]!;
  // The line's RAM figure counts up, so each reading shows it is the latest line, not the first.
  const { command } = stubTool(t, 'tegrastats', () => `i=0\nwhile true; do i=$((i+1)); echo '${line}' | sed "s/RAM 3012\\//RAM $i\\//"; sleep 0.1; done`);
  const rec = recordingSpawn();
  killLeftovers(t, rec.children);
  const collector = new TegrastatsCollector({ spawn: rec.spawn, command, intervalMs: 100, timeoutMs: 2000 });
  const seen: number[] = [];
  for (let i = 0; i < 5; i += 1) {
    const r = await collector.read();
    t.ok(r.ok, `reading ${i + 1}`);
    if (r.ok) seen.push(r.value.ram_used_mib);
    await sleep(150);
  }
  t.ok(seen.every((v, i) => i === 0 || v >= seen[i - 1]!), `readings follow the stream (${seen.join(', ')})`);
  await until('a reading of a later line than the first', async () => { const r = await collector.read(); return r.ok && r.value.ram_used_mib > seen[0]! ? true : undefined; });
  t.equal(rec.children.length, 1, 'one tegrastats for all readings');

  const monitor = new DeviceMonitor({ nvidiaSmi: false, thermal: false, tegrastatsCommand: command, spawn: rec.spawn, toolIntervalMs: 100 });
  t.same((await monitor.read()).sources, ['tegrastats']);
  await sleep(150);
  t.same((await monitor.read()).sources, ['tegrastats']);
  t.equal(rec.children.length, 2, 'the monitor reads twice from its one child');

  const pids = rec.children.map((c) => c.pid!);
  await collector.close();
  await monitor.close();
  t.ok(pids.every(gone), 'no tool process is left after close()');
  t.match(await collector.read(), { ok: false, reason: /tegrastats: stopped/ });
  t.equal(rec.children.length, 2, 'nothing is started after close()');
});

t.test('a hung nvidia-smi that ignores SIGTERM is reported stale, killed, never duplicated, and restarted once gone', async (t) => {
  const { command, dir } = stubTool(t, 'nvidia-smi', STUBBORN);
  const rec = recordingSpawn();
  killLeftovers(t, rec.children);
  // Stale after 3 × 100 ms + 300 ms.
  const collector = new NvidiaSmiCollector({ spawn: rec.spawn, command, intervalMs: 100, timeoutMs: 300, restartMinMs: 200 });

  t.match(await collector.read(), { ok: false, missing: false, reason: /no output within 300 ms of its start/ }, 'the first reading waits the timeout');
  await sleep(400);
  t.match(await collector.read(), { ok: false, missing: false, reason: /nvidia-smi: no output for \d+\.\d s .*stopped/ }, 'past the staleness bound it is reported and stopped');
  t.match(await collector.read(), { ok: false, reason: /no output for/ }, 'while it is being killed, a reading says so…');
  t.equal(rec.children.length, 1, '…and starts no second tool');

  t.equal(await exitOf(rec.children[0]!, 'the stubborn tool'), 'SIGKILL', 'the tool is killed after SIGTERM did nothing');
  const helper = Number(readFileSync(join(dir, 'helper.pid'), 'utf8'));
  await until(`the tool's helper (pid ${helper}) to die with its process group`, () => (gone(helper) ? true : undefined));
  t.pass(`its helper process (pid ${helper}) is gone too`);

  await until('a restart after the backoff', () => (rec.children.length === 2 ? true : undefined));
  t.ok(gone(rec.children[0]!.pid!), 'the restart came after the first had exited');
  await until('the second run to start its helper', () => (readFileSync(join(dir, 'runs'), 'utf8').trim().split('\n').length === 2 && existsSync(join(dir, 'helper.pid')) && ![0, helper].includes(Number(readFileSync(join(dir, 'helper.pid'), 'utf8'))) ? true : undefined));
  await collector.close();
  t.equal(rec.children[1]!.signalCode, 'SIGKILL', 'close() kills a tool that ignores SIGTERM');
  const helper2 = Number(readFileSync(join(dir, 'helper.pid'), 'utf8'));
  await until(`the second helper (pid ${helper2}) to die`, () => (gone(helper2) ? true : undefined));
  t.ok(gone(rec.children[1]!.pid!), 'nothing left');
  t.equal(rec.children.length, 2, 'two runs in all');
});

t.test('a tool that exits is restarted after a backoff that doubles, one child at a time', async (t) => {
  const { command } = stubTool(t, 'nvidia-smi', () => `echo "driver gone $$" >&2\nexit 3`);
  const rec = recordingSpawn();
  killLeftovers(t, rec.children);
  let overlapped = false;
  const spawnOne: SpawnFn = (c, a, o) => {
    if (rec.children.some((ch) => ch.exitCode === null && ch.signalCode === null)) overlapped = true;
    return rec.spawn(c, a, o);
  };
  const collector = new NvidiaSmiCollector({ spawn: spawnOne, command, intervalMs: 100, timeoutMs: 1000, restartMinMs: 50, restartMaxMs: 400 });
  t.teardown(() => collector.close());
  // Each answer names the child that ended and the delay before the next one.
  const delayOf = new Map<number, number>();
  await until('five runs of the exiting tool', async () => {
    const r = await collector.read();
    if (!r.ok) {
      const m = /\(pid (\d+)\) exited with 3: driver gone \d+; restarting in (\d+) ms/.exec(r.reason);
      if (m) delayOf.set(Number(m[1]), Number(m[2]));
    }
    await sleep(10);
    return rec.children.length >= 5 ? true : undefined;
  });
  t.notOk(overlapped, 'no tool was started while another lived');
  const expected = [50, 100, 200, 400];
  const checked = rec.children.slice(0, 4).flatMap((c, i) => (delayOf.has(c.pid!) ? [[delayOf.get(c.pid!), expected[i]]] : []));
  t.ok(checked.length >= 2, `delays seen for ${checked.length} of the first 4 runs`);
  for (const [got, want] of checked) t.equal(got, want, 'backoff doubles up to its maximum');
});

t.test('a runaway line is dropped without holding it; readings go on', async (t) => {
  const line = readFileSync(join(FIXTURES, 'tegrastats-orin-nano-jp6.txt'), 'utf8').split('\n')[0]!;
  const { command } = stubTool(t, 'tegrastats', () => `head -c 300000 /dev/zero | tr '\\0' x\necho\nwhile true; do echo '${line}'; sleep 0.1; done`);
  const rec = recordingSpawn();
  killLeftovers(t, rec.children);
  const collector = new TegrastatsCollector({ spawn: rec.spawn, command, intervalMs: 100 });
  t.teardown(() => collector.close());
  const first = await collector.read();
  if (!first.ok) t.match(first.reason, /a line longer than 65536 bytes, dropped/, 'the long line is an error of its own');
  const ok = await until('a good reading after the long line', async () => { const r = await collector.read(); await sleep(20); return r.ok ? r : undefined; });
  t.ok(ok.ok);
  t.equal(rec.children.length, 1, 'the tool was not restarted for it');
});

/** A TCP connection to the listener; resolves once connected. */
/**
 * A raw connection that reads (and drops) whatever the listener sends. Unread, its close is never seen: under
 * load Node's header timeout may win the race with the idle timeout and answer a silent connection with a 408
 * before closing it, and a socket with unread bytes emits neither 'end' nor 'close' (the listener had closed
 * it, yet the test waited 20 s for the close).
 */
function open(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect(port, '127.0.0.1', () => resolve(s));
    s.once('error', reject);
    s.resume();
  });
}

function closed(s: Socket, what: string): Promise<true> {
  if (s.destroyed || s.readyState === 'closed') return Promise.resolve(true);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what}: still open`)), 20_000);
    s.once('close', () => { clearTimeout(timer); resolve(true); });
  });
}

async function listener(t: Tap, options: { idleTimeoutMs?: number; maxConnections?: number }): Promise<{ port: number; url: string }> {
  const metrics = new AgentMetrics();
  t.teardown(() => metrics.close());
  const server = new LocalHttpServer({ port: 0, registry: createPrometheusRegistry({ metrics, defaultMetrics: false }), status: () => { throw new Error('not asked here'); }, ...options });
  const bound = await server.start();
  t.teardown(() => server.stop());
  return { port: bound.port, url: server.url! };
}

t.test('the local listener closes connections that stay silent, before and between requests', async (t) => {
  const { port, url } = await listener(t, { idleTimeoutMs: 300 });
  const silent = await open(port);
  silent.on('error', () => undefined);
  t.teardown(() => silent.destroy());
  const keptAlive = await open(port);
  keptAlive.on('error', () => undefined);
  t.teardown(() => keptAlive.destroy());
  const answer = new Promise<string>((resolve) => {
    let text = '';
    keptAlive.on('data', (d: Buffer) => { text += d.toString(); if (text.includes('\r\n\r\n')) resolve(text); });
  });
  keptAlive.write('GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n');
  t.match(await answer, /^HTTP\/1\.1 200/, 'a request is answered');
  t.ok(await closed(silent, 'a connection that never sent a byte'), 'a connection that never sent a byte is closed');
  t.ok(await closed(keptAlive, 'an idle keep-alive connection'), 'an idle keep-alive connection is closed');
  t.equal((await fetch(`${url}/metrics`, { signal: AbortSignal.timeout(10_000) })).status, 200, 'the listener still serves');
});

t.test('the local listener caps its connections; one more is closed on arrival, and freed room is used again', async (t) => {
  const { port, url } = await listener(t, { maxConnections: 3 });
  const held: Socket[] = [];
  t.teardown(() => { for (const s of held) s.destroy(); });
  for (let i = 0; i < 3; i += 1) {
    const s = await open(port);
    s.on('error', () => undefined);
    held.push(s);
  }
  const extra = await open(port).catch((err: unknown) => err);
  if (extra instanceof Error) t.pass(`the fourth connection is refused (${extra.message})`);
  else {
    const s = extra as Socket;
    s.on('error', () => undefined);
    held.push(s);
    s.write('GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n');
    t.ok(await closed(s, 'the connection beyond the cap'), 'the fourth connection is closed');
  }
  held[0]!.destroy();
  const status = await until('a connection to fit again', async () => {
    // An attempt whose connection arrived while the listener was still at its cap can hang in the client; the
    // next attempt is what the test is about.
    const res = await fetch(`${url}/metrics`, { headers: { connection: 'close' }, signal: AbortSignal.timeout(2000) }).catch(() => undefined);
    return res?.status;
  });
  t.equal(status, 200, 'once one closed, a new one is served');
});

/** Telemetry rows in an agent's outbox, read from its database file after it stopped. */
async function telemetryRows(dataDir: string): Promise<number> {
  const db = await Database.open(join(dataDir, 'edge-agent.db'));
  try {
    const rows = await db.all<{ n: number }>("SELECT COUNT(*) AS n FROM outbox WHERE kind = 'telemetry'");
    return rows[0]!.n;
  } finally {
    await db.close();
  }
}

t.test('a stand-alone agent keeps no telemetry records (nothing would read them); /v1/status still shows its figures', async (t) => {
  const httpPort = await freePort();
  const a = await startTestAgent(t, {
    models: ['tiny'],
    config: { telemetry: { interval_s: 0.1, http: { port: httpPort }, device: { nvidia_smi: false, tegrastats: false, thermal: false } } },
  });
  const client = a.client();
  const stream = await client.openStream({ model: 'tiny' });
  await stream.send({ seq: 1, inputs: { x: { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(0.5) } } });
  stream.end();
  for await (const r of stream.results()) t.equal(r.status, 'OK');
  const status = await until('an interval with the frame', async () => {
    const s = (await (await fetch(`http://127.0.0.1:${httpPort}/v1/status`)).json()) as StatusReport;
    return (s.models[0]?.figures?.success ?? 0) > 0 ? s : undefined;
  });
  t.equal(status.fleet, null, 'stand-alone');
  t.equal(status.outbox, null, 'no outbox in /v1/status');
  t.match(status.models, [{ name: 'tiny', state: 'READY', figures: { latency_us: { total: {} } } }], 'the model and its figures');
  const metricsText = await (await fetch(`http://127.0.0.1:${httpPort}/metrics`)).text();
  t.notMatch(metricsText, /edge_agent_outbox_rows/, 'no outbox gauges on /metrics');
  await a.agent.stop();
  t.equal(await telemetryRows(a.dataDir), 0, 'no telemetry record was stored');
});

t.test('with a fleet section, records are kept for the broker while the link is down', async (t) => {
  const brokerPort = await freePort(); // nothing listens: the link stays down
  const a = await startTestAgent(t, {
    models: ['tiny'],
    config: {
      telemetry: { interval_s: 0.1, device: { nvidia_smi: false, tegrastats: false, thermal: false } },
      fleet: fleetSchema.parse({ broker_url: `mqtt://127.0.0.1:${brokerPort}`, device_id: 'dev-outbox', reconnect: { min_ms: 200, max_ms: 1000 } }),
    },
  });
  await until('a closed interval', () => a.agent.metrics.lastInterval);
  await a.agent.stop();
  t.ok(await telemetryRows(a.dataDir) >= 1, 'telemetry records wait in the outbox');
});
