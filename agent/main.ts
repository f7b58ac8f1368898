import { mkdirSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { decideVariant, readVariantReports } from './compress/index.js';
import type { AgentConfig } from './config/index.js';
import { ConfigError, EdgeAgentError, errorMessage } from './errors.js';
import type { Logger } from './logger.js';
import { FleetAgent, MqttLink, RuntimeDeploymentTarget } from './fleet/index.js';
import { ActiveVersions, ModelRepository } from './models/index.js';
import { InferenceRuntime, type RuntimeObserver, type VariantChooser } from './runtime/index.js';
import {
  createKServeService, createSensorStreamService, EventLoopSpinner, GrpcListeners, HealthService, serverCredentials, StreamAdmission,
  type BoundAddress, type KServeService, type SensorStreamService, type StreamDefaults,
} from './server/index.js';
import { Database, SqliteOutbox } from './store/index.js';
import { AgentMetrics, OutboxStatusSink, outboxOptions, TelemetryService } from './telemetry/index.js';

export const AGENT_NAME = 'edge-agent';
export const AGENT_VERSION = '0.1.0';

function streamDefaults(config: Readonly<AgentConfig>): StreamDefaults {
  return { defaultQos: config.runtime.default_qos, defaultMaxInFlight: config.server.default_max_in_flight, maxInFlightLimit: config.server.max_in_flight_limit };
}

/** Config keys a SIGHUP applies while streams keep flowing; any other change is reported as needing a restart. */
const LIVE_KEYS = new Set([
  'log.level', 'runtime.default_qos', 'server.default_max_in_flight', 'server.max_in_flight_limit', 'telemetry.interval_s',
]);

function flatten(value: unknown, prefix = '', out: Record<string, string> = {}): Record<string, string> {
  if (value && typeof value === 'object' && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else {
    out[prefix] = JSON.stringify(value);
  }
  return out;
}

export interface ReloadOutcome {
  readonly applied: readonly string[];
  readonly needsRestart: readonly string[];
}

export interface AgentOptions {
  readonly config: Readonly<AgentConfig>;
  /** The config file the values came from, for error messages. */
  readonly configSource: string;
  readonly log: Logger;
}

/**
 * The composition root: builds every part from the config, in dependency order, and owns the start and stop
 * order. Nothing else constructs parts, so each can be built alone in tests.
 */
export class Agent {
  readonly runtime: InferenceRuntime;
  readonly listeners: GrpcListeners;
  readonly health: HealthService;
  readonly sensorStreams: SensorStreamService;
  private readonly kserve: KServeService;
  readonly metrics: AgentMetrics;
  private telemetry: TelemetryService | undefined;
  private fleet: FleetAgent | undefined;
  private link: MqttLink | undefined;
  private readonly target: RuntimeDeploymentTarget;
  private databaseRecovered = false;
  /** The config in force (reloads replace the live parts). */
  private current: Readonly<AgentConfig>;
  private outbox: SqliteOutbox | undefined;
  private db: Database | undefined;
  private starting: Promise<readonly BoundAddress[]> | undefined;
  private stopping: Promise<void> | undefined;

  constructor(private readonly o: AgentOptions) {
    const { config, log } = o;
    this.current = config;
    this.metrics = new AgentMetrics();
    // With telemetry off nothing reads the metrics, so the runtime does not pay for recording them.
    const observers: RuntimeObserver[] = config.telemetry.enabled ? [this.metrics] : [];
    const observer: RuntimeObserver = {
      onRequest: (x) => { for (const ob of observers) ob.onRequest?.(x); },
      onExecution: (x) => { for (const ob of observers) ob.onExecution?.(x); },
      onModelEvent: (e) => {
        for (const ob of observers) ob.onModelEvent?.(e);
        this.health?.refresh();
      },
    };
    // `auto` serves a compressed variant only when its measured report passes the model's accuracy bound.
    const chooseVariant: VariantChooser = ({ provider, version, config: mc }) => {
      const available = readVariantReports(version.dir);
      const decision = decideVariant({ provider, available, requested: mc.variant, minCosine: mc.min_cosine });
      const missing = decision.variant !== 'fp32' && !version.variants[decision.variant];
      const chosen = missing ? 'fp32' : decision.variant;
      if (missing) log.warn({ dir: version.dir, provider, variant: chosen, reason: `${decision.reason}, but model.${decision.variant}.onnx is not in the version folder: serving fp32` }, 'variant chosen');
      else log.info({ dir: version.dir, provider, variant: chosen, reason: decision.reason, ignored: available.ignored }, 'variant chosen');
      return chosen;
    };
    const activeVersions = new ActiveVersions(join(config.data_dir, 'active-versions.json'));
    const repository = new ModelRepository(config.model_repository, activeVersions);
    this.runtime = new InferenceRuntime({
      chooseVariant,
      repository,
      config: config.runtime,
      dataDir: config.data_dir,
      log: log.child({ part: 'runtime' }),
      observer,
    });
    this.target = new RuntimeDeploymentTarget(repository, this.runtime, activeVersions);
    observers.push(this.target.observer);
    // Constructed here so a bad fleet.tls file is a config error before anything starts.
    if (config.fleet) this.link = new MqttLink({ config: config.fleet, agentVersion: AGENT_VERSION, logger: log.child({ part: 'mqtt' }) });
    this.health = new HealthService(this.runtime);
    const spinner = new EventLoopSpinner(config.server.busy_poll_us, () => this.runtime.inFlight() > 0);
    this.sensorStreams = createSensorStreamService({
      runtime: this.runtime,
      log: log.child({ part: 'sensor-stream' }),
      defaults: streamDefaults(config),
      admission: new StreamAdmission({ maxStreams: config.server.max_streams, maxStreamsPerPeer: config.server.max_streams_per_peer }),
      onArrival: spinner.arrived,
      onAnswered: spinner.poke,
      onStreamOpened: () => this.metrics.streamOpened(),
      onStreamClosed: () => this.metrics.streamClosed(),
    });
    const kserve = this.kserve = createKServeService(this.runtime, { name: AGENT_NAME, version: AGENT_VERSION }, {
      onInternalError: (rpc, err) => log.error({ rpc, err: errorMessage(err) }, 'KServe request failed'),
      onArrival: spinner.arrived,
      onAnswered: spinner.poke,
    });
    this.listeners = new GrpcListeners({
      listen: config.server.listen,
      maxMessageBytes: config.server.max_message_bytes,
      unixSocketMode: parseInt(config.server.unix_socket_mode, 8),
      unixSocketOwner: config.server.unix_socket_owner,
      unixSocketGroup: config.server.unix_socket_group,
      insecure: config.server.insecure,
      keepaliveTimeMs: config.server.keepalive_time_ms,
      keepaliveTimeoutMs: config.server.keepalive_timeout_ms,
      maxConnectionIdleMs: config.server.max_connection_idle_ms,
      streamWindowBytes: config.server.http2_stream_window_bytes,
      connectionWindowBytes: config.server.http2_connection_window_bytes,
      tcpCredentials: serverCredentials(config.server.tls, o.configSource),
      configSource: o.configSource,
    }, log.child({ part: 'grpc' }));
    this.listeners.addService(this.sensorStreams.definition, this.sensorStreams.implementation);
    this.listeners.addService(this.health.definition, this.health.implementation);
    this.listeners.addService(kserve.definition, kserve.implementation);
  }

  /** Opens the store, loads and warms the models, then listens. Health turns SERVING when this resolves. */
  start(): Promise<readonly BoundAddress[]> {
    this.starting ??= this.startParts();
    return this.starting;
  }

  private async startParts(): Promise<readonly BoundAddress[]> {
    const { config, log } = this.o;
    mkdirSync(config.data_dir, { recursive: true });
    const dbFile = join(config.data_dir, 'edge-agent.db');
    let outbox: SqliteOutbox;
    try {
      // Both reject with a ConfigError naming the file (locked, disk full, read-only...) and leave it as it is.
      this.db = await Database.open(dbFile, {
        onRecovered: (i) => {
          this.databaseRecovered = true;
          log.error(i, 'state database was unreadable: set aside and rebuilt from the model repository');
        },
      });
      outbox = await SqliteOutbox.open(this.db, outboxOptions(config.telemetry.outbox));
    } catch (err) {
      throw err instanceof EdgeAgentError ? err : new ConfigError(dbFile, '', errorMessage(err));
    }
    this.outbox = outbox;
    const deviceId = config.fleet?.device_id ?? hostname();
    this.telemetry = new TelemetryService({
      config: config.telemetry,
      metrics: this.metrics,
      // Stand-alone (no `fleet:`), nothing would ever drain records: storing them only wore the flash and filled
      // the disk toward the outbox bounds. /metrics and /v1/status read the metrics, not the outbox.
      ...(config.fleet ? { outbox } : {}),
      deviceId,
      agentVersion: AGENT_VERSION,
      topicPrefix: config.fleet?.topic_prefix ?? 'edge',
      logger: log.child({ part: 'telemetry' }),
      statusSource: () => {
        const fleet = this.current.fleet;
        const link = this.link;
        const rejected = this.fleet?.commandRejections();
        return {
          agentVersion: AGENT_VERSION, deviceId, models: this.runtime.listModels(),
          fleet: link && fleet ? {
            connected: link.connected, broker: fleet.broker_url,
            ...(rejected ? { commands_rejected: { total: rejected.total, last_reason: rejected.lastReason ?? null, last_command_id: rejected.lastCommandId ?? null } } : {}),
          } : null,
        };
      },
    });
    await this.runtime.start();
    await this.telemetry.start();
    await this.startFleet(config.fleet);
    const addresses = await this.listeners.start();
    this.health.refresh();
    const models = this.runtime.listModels();
    log.info({ ready: models.filter((m) => m.state === 'READY').map((m) => `${m.name}:${m.version}@${m.provider}`), failed: models.filter((m) => m.state !== 'READY').map((m) => m.name) }, 'edge-agent ready');
    return addresses;
  }

  /** Starts the fleet side (when configured): the journal resumes, then the link connects in the background. */
  private async startFleet(fleetConfig: AgentConfig['fleet']): Promise<void> {
    const link = this.link;
    if (!fleetConfig || !link || !this.db || !this.outbox || !this.telemetry) return;
    this.fleet = new FleetAgent({
      config: fleetConfig, agentVersion: AGENT_VERSION, dataDir: this.o.config.data_dir, db: this.db, target: this.target, link,
      logger: this.o.log.child({ part: 'fleet' }), databaseRecovered: this.databaseRecovered,
      // Deployment statuses go through the durable outbox: never dropped, stamped, published in order after reconnects.
      statusSink: new OutboxStatusSink(this.outbox),
    });
    await this.fleet.start();
    link.start(); // serving never waits on the broker: connection and reconnects run in the background
    this.telemetry.attachMqtt(link.client);
  }

  /** SIGHUP with changed fleet settings: a new link and fleet agent; serving is not touched. */
  private async restartFleet(next: AgentConfig['fleet'], link: MqttLink | undefined): Promise<void> {
    const { log } = this.o;
    await this.fleet?.stop();
    this.fleet = undefined;
    await this.telemetry?.detachMqtt();
    await this.link?.stop();
    this.link = link;
    await this.startFleet(next);
    log.info({ broker: next?.broker_url ?? null }, 'fleet settings applied');
  }

  /**
   * SIGHUP: applies what can change live (log level, stream defaults, telemetry interval, model batching delays)
   * without dropping a stream, and lists every other changed key as needing a restart.
   */
  reload(next: Readonly<AgentConfig>): ReloadOutcome {
    const { log } = this.o;
    const before = flatten(this.current);
    const after = flatten(next);
    const changed = [...new Set([...Object.keys(before), ...Object.keys(after)])].filter((k) => before[k] !== after[k]).sort();
    const applied: string[] = [];
    const needsRestart: string[] = [];
    // Fleet settings apply by reconnecting with a new link, except what names this device's topics.
    // (Adding or removing the whole section, or renaming the device, needs a restart: telemetry's topics follow them.)
    const sameDevice = before['fleet.device_id'] !== undefined && before['fleet.device_id'] === after['fleet.device_id']
      && before['fleet.topic_prefix'] === after['fleet.topic_prefix'];
    const fleetLive = (k: string): boolean => sameDevice && k.startsWith('fleet.');
    for (const key of changed) (LIVE_KEYS.has(key) || fleetLive(key) ? applied : needsRestart).push(key);
    const fleetChanged = applied.some((k) => k.startsWith('fleet'));
    if (applied.includes('log.level')) log.level = next.log.level;
    this.sensorStreams.setDefaults(streamDefaults(next));
    if (applied.includes('telemetry.interval_s')) this.telemetry?.setInterval(next.telemetry.interval_s);
    if (fleetChanged) {
      // A bad TLS file in the new settings must not cost the running link: construct first, then swap.
      try {
        const link = next.fleet ? new MqttLink({ config: next.fleet, agentVersion: AGENT_VERSION, logger: log.child({ part: 'mqtt' }) }) : undefined;
        void this.restartFleet(next.fleet, link).catch((err: unknown) => log.error({ err: errorMessage(err) }, 'fleet settings could not be applied'));
      } catch (err) {
        log.error({ err: errorMessage(err) }, 'fleet settings refused: keeping the running link');
        for (const k of applied.filter((x) => x.startsWith('fleet'))) applied.splice(applied.indexOf(k), 1);
      }
    }
    const models = this.runtime.reloadModelConfigs();
    applied.push(...models.applied);
    needsRestart.push(...models.needsReload);
    // Keys that need a restart keep their running values, so the next reload compares against what runs.
    this.current = { ...this.current, log: next.log, runtime: { ...this.current.runtime, default_qos: next.runtime.default_qos },
      server: { ...this.current.server, default_max_in_flight: next.server.default_max_in_flight, max_in_flight_limit: next.server.max_in_flight_limit },
      telemetry: { ...this.current.telemetry, interval_s: next.telemetry.interval_s },
      ...(fleetChanged && applied.some((k) => k.startsWith('fleet')) ? { fleet: next.fleet } : {}) };
    log.info({ applied, needs_restart: needsRestart }, 'configuration reloaded');
    if (needsRestart.length > 0) log.warn({ keys: needsRestart }, 'these changes need a restart (or a model reload) to take effect');
    return { applied, needsRestart };
  }

  /**
   * Graceful stop: health goes NOT_SERVING, no new streams, accepted frames are finished and answered (up to
   * the drain timeout), then everything closes in reverse order.
   */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      const { config, log } = this.o;
      // A signal during start-up: let the models finish loading first, since tearing down a worker in the
      // middle of onnxruntime's session creation aborts the whole process instead of exiting cleanly.
      await this.starting?.catch(() => undefined);
      const t0 = Date.now();
      this.health.setShuttingDown();
      const timeout = config.server.drain_timeout_ms;
      const drained = await Promise.race([
        Promise.all([this.sensorStreams.drain(), this.kserve.drain(), this.runtime.drain()]).then(() => true),
        new Promise<boolean>((r) => setTimeout(() => r(false), timeout).unref()),
      ]);
      if (!drained) log.warn({ in_flight: this.runtime.inFlight(), timeout_ms: timeout }, 'drain timeout: closing with frames still in flight');
      this.health.close();
      await this.listeners.stop(Math.max(0, timeout - (Date.now() - t0)));
      await this.fleet?.stop();
      await this.runtime.close();
      await this.telemetry?.stop();
      await this.link?.stop();
      await this.outbox?.close();
      this.metrics.close();
      await this.db?.close();
      log.info({ ms: Date.now() - t0, drained }, 'edge-agent stopped');
    })();
    return this.stopping;
  }
}
