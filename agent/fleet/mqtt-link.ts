import { readFileSync } from 'node:fs';
import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient } from 'mqtt';
import type { FleetConfig } from '../config/fleet-schema.js';
import { ConfigError, errorMessage } from '../errors.js';
import type { FleetLogger } from './fleet-logger.js';
import { FleetTopics, topicMatches } from './topics.js';

export type MessageHandler = (topic: string, payload: Buffer, packet: IPublishPacket) => void;

export interface MqttLinkOptions {
  readonly config: FleetConfig;
  readonly agentVersion: string;
  readonly logger: FleetLogger;
}

interface Subscription {
  readonly filter: string;
  readonly handler: MessageHandler;
  readonly qos: 0 | 1;
}

/** MQTT 5 reason code / 3.1.1 return code a broker sends when it does not speak the requested version. */
const UNSUPPORTED_PROTOCOL = new Set([1, 132]);

function readPem(path: string, key: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new ConfigError(path, key, `cannot read: ${errorMessage(err)}`);
  }
}

/**
 * The agent's one MQTT connection. It connects in the background and never makes a caller wait for the broker:
 * `start()` returns at once, publishes made while offline are queued by the client, and reconnects go on forever
 * with exponential backoff. Presence is retained on `{prefix}/devices/{id}/status`: online on every connect, the
 * last will (offline) when the connection is lost, offline on a clean stop. The `client` is shared with telemetry.
 */
export class MqttLink {
  readonly topics: FleetTopics;
  readonly client: MqttClient;
  private readonly subscriptions = new Set<Subscription>();
  private readonly connectListeners = new Set<() => void>();
  private reconnectTimer: NodeJS.Timeout | undefined;
  private failedAttempts = 0;
  private started = false;
  private stopping = false;
  private connectedAt = 0;
  private onlinePublished: Promise<void> = Promise.resolve();
  /** Connections made so far (tests and the state report use it). */
  connects = 0;

  constructor(private readonly options: MqttLinkOptions) {
    const { config } = options;
    this.topics = new FleetTopics(config.topic_prefix, config.device_id);
    const clientOptions: IClientOptions = {
      manualConnect: true,
      // Reconnection is driven here (backoff); mqtt.js only knows a fixed period.
      reconnectPeriod: 0,
      connectTimeout: config.reconnect.connect_timeout_ms,
      keepalive: config.keepalive_s,
      clean: true,
      clientId: `edge-agent-${config.device_id}`,
      protocolVersion: config.mqtt_version,
      resubscribe: false,
      reconnectOnConnackError: true,
      will: this.willMessage(),
      ...(config.username !== undefined ? { username: config.username } : {}),
      ...(config.password !== undefined ? { password: config.password } : {}),
      ...(config.mqtt_version === 5 ? { properties: { maximumPacketSize: config.artifacts.max_chunk_bytes + 64 * 1024 } } : {}),
    };
    const tls = config.tls;
    if (tls) {
      if (tls.ca) clientOptions.ca = readPem(tls.ca, 'fleet.tls.ca');
      if (tls.cert) clientOptions.cert = readPem(tls.cert, 'fleet.tls.cert');
      if (tls.key) clientOptions.key = readPem(tls.key, 'fleet.tls.key');
      if (tls.servername) clientOptions.servername = tls.servername;
      clientOptions.rejectUnauthorized = tls.reject_unauthorized;
    }
    this.client = mqtt.connect(config.broker_url, clientOptions);
    this.client.on('connect', () => this.onConnected());
    this.client.on('close', () => this.onClosed());
    this.client.on('error', (err: Error & { code?: number | string }) => this.onError(err));
    this.client.on('message', (topic, payload, packet) => this.dispatch(topic, payload, packet));
  }

  get connected(): boolean {
    return this.client.connected;
  }

  /** Protocol level in use (5, or 4 after falling back). */
  get protocolVersion(): number {
    return this.client.options.protocolVersion ?? 4;
  }

  /** Begins connecting in the background. */
  start(): void {
    if (this.started) return;
    this.started = true;
    this.client.connect();
  }

  /** Reports offline (retained) when connected, then disconnects cleanly; stops reconnecting. */
  async stop(): Promise<void> {
    if (!this.started || this.stopping) return;
    this.stopping = true;
    clearTimeout(this.reconnectTimer);
    await Promise.race([this.onlinePublished, new Promise((resolve) => setTimeout(resolve, 2000).unref())]);
    if (this.client.connected) {
      const offline = JSON.stringify({ state: 'offline', device_id: this.options.config.device_id, agent_version: this.options.agentVersion, reason: 'stopped', ts: new Date().toISOString() });
      await Promise.race([
        this.client.publishAsync(this.topics.status, offline, { qos: 1, retain: true }).catch(() => undefined),
        new Promise((resolve) => setTimeout(resolve, 2000).unref()),
      ]);
    }
    // A clean DISCONNECT (no last will) when the broker answers; forced when it does not within 2 s.
    const clean = this.client.connected
      ? Promise.race([this.client.endAsync(false).then(() => true, () => false), new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 2000).unref())])
      : Promise.resolve(false);
    if (!(await clean)) await this.client.endAsync(true).catch(() => undefined);
  }

  /**
   * Routes messages matching `filter` to `handler` and keeps the subscription across reconnects. Resolves when
   * the broker acknowledged it (or at once while offline: it is made on the next connect).
   */
  subscribe(filter: string, handler: MessageHandler, qos: 0 | 1 = 1): { ready: Promise<void>; unsubscribe: () => void } {
    const sub: Subscription = { filter, handler, qos };
    this.subscriptions.add(sub);
    const ready = this.client.connected
      ? this.client.subscribeAsync(filter, { qos }).then(() => undefined, (err: unknown) => this.options.logger.warn({ filter, err: errorMessage(err) }, 'fleet: subscribe failed'))
      : Promise.resolve();
    return {
      ready,
      unsubscribe: () => {
        this.subscriptions.delete(sub);
        const stillWanted = [...this.subscriptions].some((s) => s.filter === filter);
        if (!stillWanted && this.client.connected) this.client.unsubscribe(filter);
      },
    };
  }

  /** Called after each successful connect, once the subscriptions were re-made. */
  onConnect(listener: () => void): () => void {
    this.connectListeners.add(listener);
    return () => this.connectListeners.delete(listener);
  }

  /** Publishes and resolves on PUBACK (QoS 1) or rejects when the connection dropped first. */
  async publish(topic: string, payload: string | Buffer, options: { qos?: 0 | 1; retain?: boolean } = {}): Promise<void> {
    await this.client.publishAsync(topic, payload, { qos: options.qos ?? 1, retain: options.retain ?? false });
  }

  private willMessage(): NonNullable<IClientOptions['will']> {
    const { config, agentVersion } = this.options;
    return {
      topic: this.topics.status,
      payload: Buffer.from(JSON.stringify({ state: 'offline', device_id: config.device_id, agent_version: agentVersion, reason: 'connection lost' })),
      qos: 1,
      retain: true,
    };
  }

  private onConnected(): void {
    this.failedAttempts = 0;
    this.connects += 1;
    this.connectedAt = Date.now();
    const { logger, config, agentVersion } = this.options;
    logger.info({ broker: config.broker_url, protocol: this.protocolVersion, device_id: config.device_id }, 'fleet: connected to broker');
    // mqtt.js counts the client as connected from the CONNACK on, but emits 'connect' only after re-sending what
    // the last connection left unacknowledged; a stop() in between has already queued 'offline', which goes out
    // first. Announcing 'online' now would leave a stopped agent online in the retained presence.
    if (!this.stopping) {
      const online = JSON.stringify({ state: 'online', device_id: config.device_id, agent_version: agentVersion, ts: new Date(this.connectedAt).toISOString() });
      // Kept so a stop right after a (re)connect publishes 'offline' only after 'online' was acknowledged:
      // the retained presence must end on the later of the two.
      this.onlinePublished = this.client.publishAsync(this.topics.status, online, { qos: 1, retain: true }).then(() => undefined, () => undefined);
    }
    const byFilter = new Map<string, 0 | 1>();
    for (const s of this.subscriptions) byFilter.set(s.filter, Math.max(byFilter.get(s.filter) ?? 0, s.qos) as 0 | 1);
    const notify = (): void => {
      for (const l of this.connectListeners) {
        try {
          l();
        } catch (err) {
          logger.error({ err: errorMessage(err) }, 'fleet: connect listener failed');
        }
      }
    };
    if (byFilter.size === 0) {
      notify();
      return;
    }
    const subs = Object.fromEntries([...byFilter].map(([filter, qos]) => [filter, { qos }]));
    this.client.subscribe(subs, (err) => {
      if (err) logger.warn({ err: errorMessage(err) }, 'fleet: resubscribe failed');
      notify();
    });
  }

  private onClosed(): void {
    if (this.stopping || !this.started) return;
    if (this.reconnectTimer) return;
    const { min_ms: min, max_ms: max } = this.options.config.reconnect;
    const base = Math.min(max, min * 2 ** Math.min(this.failedAttempts, 30));
    const delay = Math.round(base * (0.8 + Math.random() * 0.4));
    this.failedAttempts += 1;
    this.options.logger.debug({ delay_ms: delay, attempt: this.failedAttempts }, 'fleet: broker connection closed, reconnecting');
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (this.stopping) return;
      this.client.options.will = this.willMessage();
      // Keep the stores: QoS 1 publishes not yet acknowledged are sent again and their callbacks still fire.
      this.client.reconnect({ incomingStore: this.client.incomingStore, outgoingStore: this.client.outgoingStore });
    }, delay);
  }

  private onError(err: Error & { code?: number | string }): void {
    if (typeof err.code === 'number' && UNSUPPORTED_PROTOCOL.has(err.code) && this.client.options.protocolVersion === 5) {
      this.options.logger.warn({ broker: this.options.config.broker_url }, 'fleet: broker refused MQTT 5, falling back to 3.1.1');
      this.client.options.protocolVersion = 4;
      delete this.client.options.properties;
      return;
    }
    this.options.logger.warn({ err: err.message, code: err.code }, 'fleet: broker connection error');
  }

  private dispatch(topic: string, payload: Buffer, packet: IPublishPacket): void {
    for (const s of this.subscriptions) {
      if (!topicMatches(s.filter, topic)) continue;
      try {
        s.handler(topic, payload, packet);
      } catch (err) {
        this.options.logger.error({ topic, err: errorMessage(err) }, 'fleet: message handler failed');
      }
    }
  }
}
