import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { KeyObject } from 'node:crypto';
import mqtt, { type MqttClient } from 'mqtt';
import { describeArtifact, generateSigningKey, MqttArtifactServer, parsePrivateKey, signManifest, type ServedArtifact } from '../../agent/fleet/index.js';

// The fleet manager's side of the soak: signed deployments over MQTT chunks, and a telemetry watcher.

export const SOAK_KEY_ID = 'soak';

/** How each deployment ended, as its statuses said. */
export interface DeploymentOutcome {
  readonly deploymentId: string;
  readonly version: number;
  /** 'active' (health passed or skipped), 'failed', 'rolled_back', or 'timeout' (no final state in time). */
  readonly result: 'active' | 'failed' | 'rolled_back' | 'timeout';
  readonly reason: string | undefined;
  readonly activeAfterMs: number | undefined;
}

interface StatusWaiter {
  readonly deploymentId: string;
  readonly onStatus: (json: Record<string, unknown>) => void;
}

/** One MQTT client for the whole fleet side: deployments out, chunks out, statuses and telemetry in. */
export class SoakFleet {
  readonly outcomes: DeploymentOutcome[] = [];
  /** Every telemetry record seen (duplicates included): (epoch, seq). */
  readonly telemetry: { epoch: number; seq: number; at: number }[] = [];
  private readonly waiters = new Set<StatusWaiter>();
  private readonly chunks: MqttArtifactServer;
  private readonly privateKey: KeyObject;
  readonly publicKey: string;
  private artifact: ServedArtifact | undefined;
  disconnects = 0;
  /** Wall-clock times of this client's (re)connections, to line up with telemetry gaps. */
  readonly connectedAt: number[] = [];

  private constructor(private readonly client: MqttClient, private readonly deviceId: string, key: { privateKeyPem: string; publicKey: string }) {
    this.privateKey = parsePrivateKey(key.privateKeyPem);
    this.publicKey = key.publicKey;
    this.chunks = new MqttArtifactServer({ client });
    client.on('close', () => { this.disconnects++; });
    client.on('connect', () => { this.connectedAt.push(Date.now()); });
    client.on('message', (topic, payload) => this.handle(topic, payload));
  }

  /** Connects (retrying while the broker comes up) and subscribes; `key` is made here when not given. */
  static async connect(brokerUrl: string, deviceId: string): Promise<SoakFleet> {
    // A persistent session (the soak's broker saves it on every change): telemetry the agent drains right after a
    // broker restart, before this client is back, is queued for it instead of counted as a gap.
    const client = await mqtt.connectAsync(brokerUrl, {
      protocolVersion: 5, clientId: `soak-fleet-${process.pid}`, clean: false, properties: { sessionExpiryInterval: 3600 },
      reconnectPeriod: 100, connectTimeout: 5000,
    });
    const fleet = new SoakFleet(client, deviceId, generateSigningKey());
    await client.subscribeAsync([`edge/devices/${deviceId}/deployments/+/status`, `edge/devices/${deviceId}/telemetry`], { qos: 1 });
    await fleet.chunks.start();
    return fleet;
  }

  /** Serves `bytes` (written under `dir`) for every deployment from now on. */
  async serve(dir: string, bytes: Buffer, chunkSize: number): Promise<void> {
    const path = join(dir, 'soak-artifact.onnx');
    writeFileSync(path, bytes);
    this.artifact = await describeArtifact(path, chunkSize);
    this.chunks.add(this.artifact);
  }

  get chunksSent(): number {
    return this.chunks.chunksSent;
  }

  /**
   * Publishes a signed manifest for `version` (retained, on the device topic) and waits for its final outcome:
   * active with health passed/skipped, failed, rolled_back, or nothing within `timeoutMs`.
   */
  async deploy(model: string, version: number, timeoutMs: number): Promise<DeploymentOutcome> {
    const artifact = this.artifact;
    if (!artifact) throw new Error('serve() an artifact before deploying');
    const m = signManifest({ model, version, sha256: artifact.sha256, size: artifact.size, source: 'mqtt', chunkSize: artifact.chunkSize ?? 16384 }, SOAK_KEY_ID, this.privateKey);
    const start = performance.now();
    let activeAt: number | undefined;
    const outcome = await new Promise<DeploymentOutcome>((resolve) => {
      const done = (result: DeploymentOutcome['result'], reason: string | undefined): void => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
        resolve({ deploymentId: m.deployment_id, version, result, reason, activeAfterMs: activeAt === undefined ? undefined : Math.round(activeAt - start) });
      };
      const waiter: StatusWaiter = {
        deploymentId: m.deployment_id,
        onStatus: (s) => {
          const reason = typeof s.reason === 'string' ? s.reason : undefined;
          if (s.state === 'failed' || s.state === 'rolled_back') done(s.state, reason);
          else if (s.state === 'active') {
            activeAt ??= performance.now();
            if (s.health === 'passed' || s.health === 'skipped') done('active', undefined);
          }
        },
      };
      const timer = setTimeout(() => done('timeout', activeAt === undefined ? 'no final state' : 'active, health window not over'), timeoutMs);
      this.waiters.add(waiter);
      // QoS 1 through a broker that may be down: mqtt.js queues it and sends it after the reconnect.
      this.client.publishAsync(`edge/devices/${this.deviceId}/deployments`, JSON.stringify(m), { qos: 1, retain: true }).catch((err: Error) => done('failed', `publish: ${err.message}`));
    });
    this.outcomes.push(outcome);
    return outcome;
  }

  /** Distinct telemetry seqs per epoch, and the seqs missing between each epoch's first and last. */
  telemetrySummary(): { received: number; distinct: number; duplicates: number; epochs: { epoch: number; first: number; last: number; missing: number[] }[] } {
    const byEpoch = new Map<number, Set<number>>();
    for (const r of this.telemetry) {
      let s = byEpoch.get(r.epoch);
      if (!s) byEpoch.set(r.epoch, (s = new Set()));
      s.add(r.seq);
    }
    let distinct = 0;
    const epochs = [...byEpoch].map(([epoch, seqs]) => {
      distinct += seqs.size;
      const sorted = [...seqs].sort((a, b) => a - b);
      const first = sorted[0] ?? 0;
      const last = sorted[sorted.length - 1] ?? 0;
      const missing: number[] = [];
      for (let q = first; q <= last; q++) if (!seqs.has(q)) missing.push(q);
      return { epoch, first, last, missing };
    });
    return { received: this.telemetry.length, distinct, duplicates: this.telemetry.length - distinct, epochs };
  }

  async close(): Promise<void> {
    this.chunks.close();
    await this.client.endAsync(true).catch(() => undefined);
  }

  private handle(topic: string, payload: Buffer): void {
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(payload.toString('utf8')) as Record<string, unknown>;
    } catch {
      return;
    }
    if (topic === `edge/devices/${this.deviceId}/telemetry`) {
      if (typeof json.seq === 'number' && typeof json.epoch === 'number') this.telemetry.push({ epoch: json.epoch, seq: json.seq, at: Date.now() });
      return;
    }
    const m = /\/deployments\/([^/]+)\/status$/.exec(topic);
    if (!m) return;
    for (const w of [...this.waiters]) if (w.deploymentId === m[1]) w.onStatus(json);
  }
}
