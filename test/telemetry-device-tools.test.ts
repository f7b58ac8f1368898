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

/** A process is gone when /proc no longer has it, or only as a zombie waiting for its reaper. */
function gone(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] === 'Z';
  } catch {
    return true;
  }
}

// Stands in for nvidia-smi hung in the driver: it ignores SIGTERM, and so does the helper it waits for (an
// ignored signal stays ignored across fork and exec).
const STUBBORN = (dir: string): string => `trap '' TERM\necho $$ >> '${dir}/runs'\nsleep 300 &\necho $! > '${dir}/helper.pid'\nwait $!`;

t.test('a hung nvidia-smi that ignores SIGTERM is killed, and no second one starts while it lives', async (t) => {
  const { command, dir } = stubTool(t, 'nvidia-smi', STUBBORN);
  const rec = recordingSpawn();
  t.teardown(() => { for (const c of rec.children) if (c.pid && c.exitCode === null && c.signalCode === null) try { process.kill(-c.pid, 'SIGKILL'); } catch { /* gone */ } });
  const collector = new NvidiaSmiCollector({ spawn: rec.spawn, command, timeoutMs: 300 });

  const first = await collector.read();
  t.match(first, { ok: false, missing: false, reason: /no answer within 300 ms/ });
  const second = await collector.read();
  t.match(second, { ok: false, missing: false, reason: /previous .*nvidia-smi run still running/ }, 'the next reading says why there is none');
  t.equal(rec.children.length, 1, 'and starts no second tool');

  t.equal(await exitOf(rec.children[0]!, 'the stubborn tool'), 'SIGKILL', 'the tool is killed after SIGTERM did nothing');
  if (existsSync(join(dir, 'helper.pid'))) {
    const helper = Number(readFileSync(join(dir, 'helper.pid'), 'utf8'));
    await until(`the tool's helper (pid ${helper}) to die with its process group`, () => (gone(helper) ? true : undefined));
    t.pass(`its helper process (pid ${helper}) is gone too`);
  }

  const third = await collector.read();
  t.match(third, { ok: false, reason: /no answer within 300 ms/ }, 'once it has exited, the next reading runs the tool again');
  t.equal(rec.children.length, 2);
  t.equal(await exitOf(rec.children[1]!, 'the second stubborn tool'), 'SIGKILL');
  t.equal(readFileSync(join(dir, 'runs'), 'utf8').trim().split('\n').length, 2, 'two runs in all');
});

t.test('tegrastats: a tool that printed its line but ignores SIGTERM is killed; the device monitor reports the skipped reading', async (t) => {
  const line = readFileSync(join(FIXTURES, 'tegrastats-orin-nano-jp6.txt'), 'utf8').split('\n')[0]!;
  const { command } = stubTool(t, 'tegrastats', () => `trap '' TERM\necho '${line}'\nsleep 300`);
  const rec = recordingSpawn();
  t.teardown(() => { for (const c of rec.children) if (c.pid && c.exitCode === null && c.signalCode === null) try { process.kill(-c.pid, 'SIGKILL'); } catch { /* gone */ } });

  const collector = new TegrastatsCollector({ spawn: rec.spawn, command, timeoutMs: 5000 });
  const first = await collector.read();
  t.ok(first.ok, 'the first line is the reading');
  t.match(await collector.read(), { ok: false, reason: /previous .*tegrastats run still running/ });
  t.equal(rec.children.length, 1);
  t.equal(await exitOf(rec.children[0]!, 'the stubborn tegrastats'), 'SIGKILL');
  t.ok((await collector.read()).ok, 'after it exited, readings resume');
  t.equal(await exitOf(rec.children[1]!, 'the second stubborn tegrastats'), 'SIGKILL');

  const monitor = new DeviceMonitor({ nvidiaSmi: false, thermal: false, tegrastatsCommand: command, spawn: rec.spawn });
  const ok = await monitor.read();
  t.same(ok.sources, ['tegrastats']);
  const skipped = await monitor.read();
  t.same(skipped.sources, [], 'no reading while the last run lives');
  t.match(skipped.errors, { tegrastats: /previous .*tegrastats run still running/ }, 'the device readings say why');
  t.equal(rec.children.length, 3);
  await exitOf(rec.children[2]!, 'the third stubborn tegrastats');
});

/** A TCP connection to the listener; resolves once connected. */
function open(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect(port, '127.0.0.1', () => resolve(s));
    s.once('error', reject);
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
  t.equal((await fetch(`${url}/metrics`)).status, 200, 'the listener still serves');
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
    const res = await fetch(`${url}/metrics`, { headers: { connection: 'close' } }).catch(() => undefined);
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
