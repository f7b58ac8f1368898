import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import mqtt, { type MqttClient } from 'mqtt';
import { freePort, waitForPort } from '../../scripts/soak/soak-broker.js';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export { freePort };

export interface MosquittoOptions {
  /** Extra lines appended to the generated mosquitto.conf (TLS listeners, for example). */
  readonly extraConfig?: string;
  readonly port?: number;
}

/**
 * A real mosquitto broker on a free loopback port with its own config file, for tests. `stop()` and `start()`
 * can be called repeatedly to simulate a broker outage; the port stays the same across restarts.
 */
export class MosquittoBroker {
  private child: ChildProcess | undefined;
  private readonly dir = mkdtempSync(join(tmpdir(), 'edge-mqtt-'));

  private constructor(readonly port: number, private readonly options: MosquittoOptions) {}

  static async start(options: MosquittoOptions = {}): Promise<MosquittoBroker> {
    const broker = new MosquittoBroker(options.port ?? (await freePort()), options);
    await broker.start();
    return broker;
  }

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    if (this.child) return;
    const conf = join(this.dir, 'mosquitto.conf');
    writeFileSync(conf, [
      `listener ${this.port} 127.0.0.1`,
      'allow_anonymous true',
      'persistence false',
      'log_dest none',
      this.options.extraConfig ?? '',
    ].join('\n') + '\n');
    const bin = process.env.MOSQUITTO_BIN ?? (['/usr/sbin/mosquitto', '/usr/bin/mosquitto'].find((p) => existsSync(p)) ?? 'mosquitto');
    const child = spawn(bin, ['-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
    this.child = child;
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
    const exited = new Promise<never>((_, reject) => child.once('exit', (code) => reject(new Error(`mosquitto exited (${code}): ${stderr}`))));
    await Promise.race([waitForPort(this.port, 5000, 'mosquitto'), exited]);
    exited.catch(() => undefined);
  }

  /** Stops the broker (SIGKILL by default, as a crash or a cut link would look to clients). */
  async stop(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.child;
    if (!child) return;
    this.child = undefined;
    if (child.exitCode !== null) return;
    await new Promise<void>((resolve) => { child.once('exit', () => resolve()); child.kill(signal); });
  }

  async close(): Promise<void> {
    await this.stop('SIGTERM');
    rmSync(this.dir, { recursive: true, force: true });
  }
}

type Teardown = { teardown(fn: () => unknown): void };

/**
 * A broker that keeps sessions across a SIGTERM restart (its own database in a temp dir), so a persistent
 * subscriber gets every message published while it is itself still reconnecting.
 */
export async function startPersistentBroker(t: Teardown, prefix = 'edge-mq-persist-'): Promise<MosquittoBroker> {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  chmodSync(dir, 0o777); // mosquitto drops root privileges before writing its database
  const broker = await MosquittoBroker.start({ extraConfig: `persistence true\npersistence_location ${dir}/\nautosave_interval 0\n` });
  t.teardown(() => broker.close());
  return broker;
}

/** An MQTT 5 client as the agent's publisher uses one (fast reconnects), connected; ended at teardown. */
export async function connectAgentClient(t: Teardown, url: string, extra: mqtt.IClientOptions = {}): Promise<MqttClient> {
  const client = mqtt.connect(url, { reconnectPeriod: 100, connectTimeout: 2000, protocolVersion: 5, ...extra });
  client.on('error', () => undefined);
  t.teardown(() => new Promise<void>((r) => client.end(true, {}, () => r())));
  await new Promise<void>((resolve) => client.once('connect', () => resolve()));
  return client;
}

/** Counts the client's QoS 1 publishes not yet acknowledged, as they go on the wire; `max` is the most at once. */
export function watchInFlight(client: MqttClient): { readonly max: number } {
  let outstanding = 0;
  const seen = { max: 0 };
  client.on('packetsend', (p) => { if (p.cmd === 'publish') { outstanding += 1; seen.max = Math.max(seen.max, outstanding); } });
  client.on('packetreceive', (p) => { if (p.cmd === 'puback') outstanding -= 1; });
  return seen;
}

/**
 * The fleet side of a test: an MQTT 3.1.1 subscriber with a persistent session (`clean: false`), subscribed at
 * QoS 1 to `filter` before this resolves, so it receives what is published while it is itself reconnecting.
 */
export async function subscribePersistent(t: Teardown, url: string, clientId: string, filter: string, onMessage: (topic: string, payload: Buffer) => void): Promise<MqttClient> {
  const client = mqtt.connect(url, { clientId, clean: false, protocolVersion: 4, reconnectPeriod: 100 });
  client.on('error', () => undefined);
  client.on('message', onMessage);
  await new Promise<void>((resolve, reject) => {
    client.once('connect', () => client.subscribe(filter, { qos: 1 }, (err) => (err ? reject(err) : resolve())));
  });
  t.teardown(() => new Promise<void>((r) => client.end(true, {}, () => r())));
  return client;
}

/** A broker whose ACL lets clients use `edge/#` only: a publish elsewhere is refused (an MQTT 5 reason code). */
export async function startEdgeOnlyBroker(t: Teardown): Promise<MosquittoBroker> {
  const dir = mkdtempSync(join(tmpdir(), 'edge-acl-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  chmodSync(dir, 0o755); // readable by the unprivileged user mosquitto drops to
  const acl = join(dir, 'acl');
  writeFileSync(acl, 'topic readwrite edge/#\n', { mode: 0o644 });
  const broker = await MosquittoBroker.start({ extraConfig: `acl_file ${acl}\n` });
  t.teardown(() => broker.close());
  return broker;
}
