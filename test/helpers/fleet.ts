import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { KeyObject } from 'node:crypto';
import mqtt, { type MqttClient } from 'mqtt';
import { fleetSchema, type FleetConfig, type FleetConfigInput } from '../../agent/config/fleet-schema.js';
import {
  DirectStatusPublisher, FleetAgent, HttpArtifactServer, MqttArtifactServer, MqttLink, describeArtifact, generateSigningKey,
  parsePrivateKey, signManifest, signCommand, type DeploymentTarget, type FleetLogger, type ManifestInput,
  type MqttArtifactServerOptions, type ServedArtifact, type CommandInput,
} from '../../agent/fleet/index.js';
import { Database } from '../../agent/store/index.js';
import { MosquittoBroker } from './mosquitto.js';
import { FileDeploymentTarget } from './fleet-file-target.js';

type Teardown = { teardown(fn: () => void | Promise<void>): void };

export function scratchDir(t: Teardown, prefix = 'edge-fleet-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A logger that keeps every line, so tests can check what an operator would read. */
export function memoryLogger(): FleetLogger & { lines: { level: string; msg: string; obj: object }[] } {
  const lines: { level: string; msg: string; obj: object }[] = [];
  const at = (level: string) => (obj: object, msg: string): void => {
    lines.push({ level, msg, obj });
    if (process.env.FLEET_TEST_LOG) console.error(level, msg, JSON.stringify(obj));
  };
  return { lines, debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error') };
}

export interface SeenMessage {
  readonly topic: string;
  readonly payload: Buffer;
  readonly json: Record<string, unknown> | undefined;
  readonly retain: boolean;
  readonly at: number;
}

/** A plain MQTT client (the fleet manager's side) that records everything it sees on the given filters. */
export class Watcher {
  readonly seen: SeenMessage[] = [];
  private waiters: { pred: (m: SeenMessage) => boolean; resolve: (m: SeenMessage) => void }[] = [];

  private constructor(readonly client: MqttClient) {
    client.on('message', (topic, payload, packet) => {
      let json: Record<string, unknown> | undefined;
      try {
        json = JSON.parse(payload.toString('utf8')) as Record<string, unknown>;
      } catch {
        json = undefined;
      }
      const m: SeenMessage = { topic, payload, json, retain: packet.retain, at: Date.now() };
      this.seen.push(m);
      this.waiters = this.waiters.filter((w) => {
        if (!w.pred(m)) return true;
        w.resolve(m);
        return false;
      });
    });
  }

  static async connect(t: Teardown, url: string, filters: string[], options: mqtt.IClientOptions = {}): Promise<Watcher> {
    const client = await mqtt.connectAsync(url, { protocolVersion: 5, reconnectPeriod: 200, ...options });
    t.teardown(() => client.endAsync(true).catch(() => undefined));
    const w = new Watcher(client);
    if (filters.length > 0) await client.subscribeAsync(filters, { qos: 1 });
    return w;
  }

  /** The first message (already seen or future) matching `pred`. */
  waitFor(pred: (m: SeenMessage) => boolean, timeoutMs = 20_000, what = 'message'): Promise<SeenMessage> {
    const found = this.seen.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.resolve !== done);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; seen: ${this.seen.map((s) => `${s.topic} ${s.payload.toString().slice(0, 160)}`).join('\n')}`));
      }, timeoutMs);
      const done = (m: SeenMessage): void => {
        clearTimeout(timer);
        resolve(m);
      };
      this.waiters.push({ pred, resolve: done });
    });
  }

  /** States reported for a deployment, in arrival order. */
  states(deploymentId: string): string[] {
    return this.statuses(deploymentId).map((m) => String(m.json?.state));
  }

  statuses(deploymentId: string): SeenMessage[] {
    return this.seen.filter((m) => m.topic.endsWith(`/deployments/${deploymentId}/status`));
  }

  waitForState(deploymentId: string, state: string, timeoutMs = 30_000): Promise<SeenMessage> {
    return this.waitFor((m) => m.topic.endsWith(`/deployments/${deploymentId}/status`) && m.json?.state === state, timeoutMs, `${deploymentId} → ${state}`);
  }
}

export interface FleetHarness {
  readonly broker: MosquittoBroker;
  readonly keyId: string;
  readonly privateKey: KeyObject;
  readonly publicKey: string;
  readonly dir: string;
  readonly manager: Watcher;
  readonly chunkServer: MqttArtifactServer;
  readonly http: HttpArtifactServer;
  artifact(content: string | Buffer, chunkSize?: number): Promise<ServedArtifact>;
  manifest(input: Partial<ManifestInput> & { model: string; version: number; artifact: ServedArtifact }): Record<string, unknown> & { deployment_id: string };
  publish(topic: string, payload: object | string | Buffer, retain?: boolean): Promise<void>;
  command(input: CommandInput): Record<string, unknown> & { command_id: string };
}

/** A broker, a signing key, a fleet-manager client that watches statuses, and artifact servers (MQTT and HTTP). */
export async function startFleetHarness(t: Teardown, options: { chunkServer?: Omit<MqttArtifactServerOptions, 'client'>; httpBytesPerSecond?: number } = {}): Promise<FleetHarness> {
  const broker = await MosquittoBroker.start();
  t.teardown(() => broker.close());
  const dir = scratchDir(t, 'edge-fleet-mgr-');
  const key = generateSigningKey();
  const privateKey = parsePrivateKey(key.privateKeyPem);
  const manager = await Watcher.connect(t, broker.url, ['edge/devices/+/deployments/+/status', 'edge/devices/+/state', 'edge/devices/+/status', 'edge/devices/+/commands/+/result']);
  const chunkServer = new MqttArtifactServer({ client: manager.client, ...options.chunkServer });
  await chunkServer.start();
  t.teardown(() => chunkServer.close());
  const http = new HttpArtifactServer(options.httpBytesPerSecond ? { bytesPerSecond: options.httpBytesPerSecond } : {});
  await http.start();
  t.teardown(() => http.close());
  let n = 0;
  return {
    broker,
    keyId: 'fleet-1',
    privateKey,
    publicKey: key.publicKey,
    dir,
    manager,
    chunkServer,
    http,
    async artifact(content, chunkSize = 1024) {
      const path = join(dir, `artifact-${++n}.onnx`);
      writeFileSync(path, content);
      const a = await describeArtifact(path, chunkSize);
      chunkServer.add(a);
      http.add(a);
      return a;
    },
    manifest(input) {
      const { artifact, ...rest } = input;
      return signManifest({ sha256: artifact.sha256, size: artifact.size, source: 'mqtt', chunkSize: artifact.chunkSize ?? 1024, ...rest }, 'fleet-1', privateKey);
    },
    async publish(topic, payload, retain = true) {
      const body = Buffer.isBuffer(payload) ? payload : typeof payload === 'string' ? payload : JSON.stringify(payload);
      await manager.client.publishAsync(topic, body, { qos: 1, retain });
    },
    command(input) {
      return signCommand(input, 'fleet-1', privateKey);
    },
  };
}

/** Consecutive repeats collapsed (progress updates repeat `downloading`). */
export function distinct(states: readonly string[]): string[] {
  return states.filter((s, i) => i === 0 || states[i - 1] !== s);
}

/** Bytes of a given size with recognisable content (and a marker at the start, see FileDeploymentTarget). */
export function modelBytes(size: number, marker = 'ONNX', seed = 1): Buffer {
  const buf = Buffer.alloc(size);
  let x = seed * 2654435761 >>> 0;
  for (let i = 0; i < size; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    buf[i] = x >>> 24;
  }
  buf.write(marker, 0);
  return buf;
}

export function deviceConfig(h: { broker: MosquittoBroker; keyId: string; publicKey: string }, input: Partial<FleetConfigInput> = {}): FleetConfig {
  return fleetSchema.parse({
    broker_url: h.broker.url,
    device_id: 'dev-1',
    trusted_keys: { [h.keyId]: h.publicKey },
    settle_ms: 100,
    state_interval_s: 0,
    ...input,
    reconnect: { min_ms: 200, max_ms: 1000, ...input.reconnect },
    artifacts: { allow_http: true, chunk_timeout_ms: 1500, ...input.artifacts },
    health: { duration_s: 0, poll_ms: 100, ...input.health },
  });
}

export interface TestDevice {
  readonly agent: FleetAgent;
  readonly link: MqttLink;
  readonly target: DeploymentTarget;
  readonly db: Database;
  readonly dataDir: string;
  readonly logger: ReturnType<typeof memoryLogger>;
  stop(): Promise<void>;
}

/** A FleetAgent in-process with its own data dir and database, statuses published straight on the link. */
export async function startDevice(
  t: Teardown,
  h: { broker: MosquittoBroker; keyId: string; publicKey: string },
  options: { config?: Partial<FleetConfigInput>; target?: DeploymentTarget; dataDir?: string; link?: boolean } = {},
): Promise<TestDevice & { target: DeploymentTarget }> {
  const dataDir = options.dataDir ?? scratchDir(t, 'edge-fleet-dev-');
  const target = options.target ?? new FileDeploymentTarget(join(dataDir, 'models'));
  const logger = memoryLogger();
  let recovered = false;
  const db = await Database.open(join(dataDir, 'agent.db'), { onRecovered: () => { recovered = true; } });
  const config = deviceConfig(h, options.config);
  const link = new MqttLink({ config, agentVersion: '0.1.0-test', logger });
  const agent = new FleetAgent({
    config, agentVersion: '0.1.0-test', dataDir, db, target, link, logger,
    statusSink: new DirectStatusPublisher(() => link.client),
    databaseRecovered: recovered,
  });
  await agent.start();
  if (options.link !== false) link.start();
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (process.env.FLEET_TEST_LOG) console.error("device stop");
    if (stopped) return;
    stopped = true;
    await agent.stop();
    await link.stop();
    await db.close();
  };
  t.teardown(stop);
  return { agent, link, target, db, dataDir, logger, stop };
}
