import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { FleetConfig } from '../config/fleet-schema.js';
import { ConfigError, errorMessage } from '../errors.js';
import { FleetStore, type Database, type DeploymentRecord } from '../store/index.js';
import { ArtifactDownloader } from './artifact-downloader.js';
import { CommandHandler, type CommandRejectionStats } from './command-handler.js';
import type { DeploymentTarget } from './deployment-target.js';
import { DeploymentRunner, StoppingError, SupersededError, type RunPhase } from './deployment-runner.js';
import { sha256File } from './file-io.js';
import { cleanDownloads, syncRegistry } from './fleet-housekeeping.js';
import type { FleetLogger } from './fleet-logger.js';
import { HttpRangeFetcher } from './http-range-fetcher.js';
import { identify, ManifestRejection, verifyManifest, type DeploymentManifest, type ManifestLimits } from './manifest.js';
import { MqttChunkFetcher } from './mqtt-chunk-fetcher.js';
import type { MqttLink } from './mqtt-link.js';
import { buildReportedState, deploymentStatusPayload, type ReportedState } from './reported-state.js';
import { RolledBackDeployments } from './rolled-back-deployments.js';
import { TrustedKeys } from './signing.js';
import type { StatusSink } from './status-sink.js';

export interface FleetAgentOptions {
  readonly config: FleetConfig;
  readonly agentVersion: string;
  /** The agent's data dir; partial downloads live under `<dataDir>/fleet/downloads`. */
  readonly dataDir: string;
  /** The agent's database (one writer); the fleet adds its tables under the `fleet` namespace. */
  readonly db: Database;
  readonly target: DeploymentTarget;
  /** Owned by the caller (shared with telemetry): the caller starts it after `start()` and stops it after `stop()`. */
  readonly link: MqttLink;
  readonly statusSink: StatusSink;
  readonly logger: FleetLogger;
  /** True when `Database.open` set a corrupt file aside: the registry is rebuilt from the repository on disk. */
  readonly databaseRecovered?: boolean;
}

/**
 * Deployment messages are weighed `settle_ms` after the last one, but never later than this many `settle_ms` after
 * the first one not yet weighed: a steady stream of messages on a deployment topic (a misbehaving publisher,
 * junk) cannot keep a valid manifest waiting for ever.
 */
export const SETTLE_MAX_FACTOR = 5;

/** Beside `active-versions.json` in the data dir, outside the state database. */
export const ROLLED_BACK_FILE = 'rolled-back-deployments.json';

interface Candidate {
  readonly topic: string;
  readonly priority: number;
  readonly text: string;
  readonly manifest: DeploymentManifest;
}

interface Lane {
  readonly deploymentId: string;
  readonly controller: AbortController;
  phase: RunPhase;
  readonly done: Promise<void>;
}

/**
 * The agent's side of fleet-managed model updates: listens for signed manifests on the device and group
 * deployment topics, weighs them (device topic wins, then groups in config order), and drives each accepted one
 * through download, verification, installation, activation and the health window, journaling every step so a
 * restart picks up where it stopped. Also answers signed commands and keeps the retained reported state fresh.
 */
export class FleetAgent {
  private store: FleetStore | undefined;
  private readonly keys: TrustedKeys;
  private readonly limits: ManifestLimits;
  private readonly desired = new Map<string, Buffer>();
  private readonly lanes = new Map<string, Lane>();
  private readonly queued = new Map<string, { rec: DeploymentRecord; manifest: DeploymentManifest }>();
  private readonly modelLocks = new Map<string, Promise<unknown>>();
  private readonly unsubscribers: (() => void)[] = [];
  private reconcileTimer: NodeJS.Timeout | undefined;
  /** Monotonic time of the first deployment message not yet weighed (undefined: none waiting). */
  private settleSince: number | undefined;
  private reconcileTail: Promise<void> = Promise.resolve();
  private stateTimer: NodeJS.Timeout | undefined;
  private stateDebounce: NodeJS.Timeout | undefined;
  private stopping = false;
  private downloader: ArtifactDownloader | undefined;
  private runner: DeploymentRunner | undefined;
  private commands: CommandHandler | undefined;
  private readonly rolledBack: RolledBackDeployments;

  constructor(private readonly options: FleetAgentOptions) {
    try {
      this.keys = new TrustedKeys(options.config.trusted_keys);
    } catch (err) {
      throw new ConfigError('fleet', 'fleet.trusted_keys', errorMessage(err));
    }
    const a = options.config.artifacts;
    this.limits = { maxArtifactBytes: a.max_artifact_bytes, maxChunkBytes: a.max_chunk_bytes, allowHttp: a.allow_http };
    this.rolledBack = new RolledBackDeployments(join(options.dataDir, ROLLED_BACK_FILE));
    if (this.keys.size === 0) options.logger.warn({}, 'fleet: fleet.trusted_keys is empty, every deployment and command will be rejected');
  }

  get fleetStore(): FleetStore {
    if (!this.store) throw new Error('FleetAgent not started');
    return this.store;
  }

  /** Download statistics of the last fetch per artifact sha256 (re-requested chunks, resumed bytes). */
  get downloadStats(): ArtifactDownloader['lastStats'] {
    if (!this.downloader) throw new Error('FleetAgent not started');
    return this.downloader.lastStats;
  }

  /**
   * Opens the fleet tables, brings the registry in line with the repository on disk, resumes unfinished
   * deployments and subscribes. Never waits on the broker.
   */
  async start(): Promise<void> {
    const { config, link, logger, target } = this.options;
    this.store = await FleetStore.open(this.options.db);
    const a = config.artifacts;
    const http = new HttpRangeFetcher(this.store.chunks, {
      timeoutMs: a.http_timeout_ms,
      maxClientErrors: a.http_max_client_errors,
      ...(a.http_ca ? { ca: readFileSync(a.http_ca) } : {}),
    }, logger);
    const mqttFetcher = new MqttChunkFetcher(link, this.store.chunks, { window: a.window, chunkTimeoutMs: a.chunk_timeout_ms }, logger);
    this.downloader = new ArtifactDownloader(this.options.dataDir, this.store.chunks, mqttFetcher, http, logger);
    this.runner = new DeploymentRunner({
      store: this.store,
      target,
      downloader: this.downloader,
      config,
      logger,
      report: (rec) => this.report(rec),
      withModelLock: (model, fn) => this.withModelLock(model, fn),
      changed: () => this.stateChanged(),
      retain: (model) => this.applyRetention(model),
    });
    this.commands = new CommandHandler({
      keys: this.keys,
      deviceId: config.device_id,
      store: this.store,
      target,
      logger,
      topics: link.topics,
      sink: this.options.statusSink,
      withModelLock: (model, fn) => this.withModelLock(model, fn),
      stopHealthWatch: (model, by) => this.stopHealthWatch(model, by),
      report: (rec) => this.report(rec),
      reportedState: () => this.reportedState(),
      publishState: () => this.publishState(),
      replyLimits: { replyBurst: config.rejected_commands.reply_burst, replyIntervalMs: config.rejected_commands.reply_interval_s * 1000 },
    });
    await syncRegistry(this.fleetStore, this.options.target, this.options.logger, this.options.databaseRecovered === true);
    if (this.downloader) await cleanDownloads(this.fleetStore, this.downloader);
    for (const rec of await this.store.journal.unfinished()) {
      const manifest = this.parseStored(rec);
      if (!manifest) continue;
      logger.info({ deployment_id: rec.deploymentId, state: rec.state }, 'fleet: resuming deployment after restart');
      await this.report(rec);
      this.enqueueRun(rec, manifest);
    }
    const topics = link.topics;
    this.unsubscribers.push(link.subscribe(topics.deviceDeployments, (t, p) => this.onDeployment(t, p)).unsubscribe);
    for (const g of config.groups) this.unsubscribers.push(link.subscribe(topics.groupDeployments(g), (t, p) => this.onDeployment(t, p)).unsubscribe);
    this.unsubscribers.push(link.subscribe(topics.commands, (t, p) => void this.commands?.handle(t, p)).unsubscribe);
    this.unsubscribers.push(link.onConnect(() => this.stateChanged()));
    if (config.state_interval_s > 0) {
      this.stateTimer = setInterval(() => void this.publishState(), config.state_interval_s * 1000);
      this.stateTimer.unref();
    }
  }

  /** Stops listening and interrupts downloads and health watches (the journal keeps them for the next start). */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    clearTimeout(this.reconcileTimer);
    clearInterval(this.stateTimer);
    clearTimeout(this.stateDebounce);
    for (const u of this.unsubscribers.splice(0)) u();
    this.commands?.close();
    this.queued.clear();
    const lanes = [...this.lanes.values()];
    for (const lane of lanes) lane.controller.abort(new StoppingError());
    await Promise.all(lanes.map((l) => l.done));
    await this.reconcileTail;
  }

  /** Command payloads that did not verify since start (for /v1/status). */
  commandRejections(): CommandRejectionStats | undefined {
    return this.commands?.rejections();
  }

  /** Resolves once no deployment is queued or running (tests; a graceful shutdown may wait on it). */
  async idle(): Promise<void> {
    while (this.lanes.size > 0 || this.queued.size > 0) {
      await Promise.all([...this.lanes.values()].map((l) => l.done));
      await new Promise((r) => setImmediate(r));
    }
  }

  reportedState(): Promise<ReportedState> {
    return this.fleetStore.journal.unfinished().then((u) => buildReportedState(this.options.config.device_id, this.options.agentVersion, this.options.target, u));
  }

  private onDeployment(topic: string, payload: Buffer): void {
    if (this.stopping) return;
    if (payload.length === 0) this.desired.delete(topic);
    else this.desired.set(topic, payload);
    const settle = this.options.config.settle_ms;
    const now = performance.now();
    this.settleSince ??= now;
    const wait = Math.max(0, Math.min(settle, this.settleSince + settle * SETTLE_MAX_FACTOR - now));
    clearTimeout(this.reconcileTimer);
    this.reconcileTimer = setTimeout(() => {
      this.settleSince = undefined;
      this.reconcileTail = this.reconcileTail.then(() => this.reconcile()).catch((err: unknown) => {
        this.options.logger.error({ err: errorMessage(err) }, 'fleet: weighing deployments failed');
      });
    }, wait);
  }

  private priorityOf(topic: string): number {
    const topics = this.options.link.topics;
    if (topic === topics.deviceDeployments) return 0;
    const i = this.options.config.groups.findIndex((g) => topics.groupDeployments(g) === topic);
    return i < 0 ? Number.MAX_SAFE_INTEGER : i + 1;
  }

  private async reconcile(): Promise<void> {
    const byModel = new Map<string, Candidate[]>();
    for (const [topic, payload] of this.desired) {
      try {
        const { manifest } = verifyManifest(payload, this.keys, this.limits);
        const list = byModel.get(manifest.model) ?? [];
        list.push({ topic, priority: this.priorityOf(topic), text: payload.toString('utf8'), manifest });
        byModel.set(manifest.model, list);
      } catch (err) {
        if (!(err instanceof ManifestRejection)) throw err;
        await this.recordRejection(topic, payload, err);
      }
    }
    for (const list of byModel.values()) {
      list.sort((a, b) => a.priority - b.priority);
      const [winner, ...losers] = list;
      if (!winner) continue;
      for (const l of losers) {
        if (l.manifest.deployment_id === winner.manifest.deployment_id) continue;
        const where = winner.priority === 0 ? 'the device topic' : `group topic ${winner.topic}`;
        await this.recordRejection(l.topic, Buffer.from(l.text), new ManifestRejection('version conflict', `overridden: deployment ${winner.manifest.deployment_id} on ${where} takes precedence for model '${winner.manifest.model}'`));
      }
      await this.accept(winner);
    }
  }

  private async recordRejection(topic: string, payload: Buffer, err: ManifestRejection): Promise<void> {
    let raw: unknown;
    try {
      raw = JSON.parse(payload.toString('utf8'));
    } catch {
      raw = undefined;
    }
    const id = identify(raw, payload);
    const journal = this.fleetStore.journal;
    const existing = await journal.get(id.deploymentId);
    if (existing && existing.state === 'rejected' && existing.reason === err.message) return;
    if (existing && existing.state !== 'rejected') {
      this.options.logger.warn({ deployment_id: id.deploymentId, topic, reason: err.message }, 'fleet: a payload reusing a known deployment_id failed checks, ignored');
      return;
    }
    this.options.logger.warn({ deployment_id: id.deploymentId, topic, reason: err.message }, 'fleet: deployment rejected');
    const rec = await journal.create({ deploymentId: id.deploymentId, model: id.model, version: id.version, manifest: payload.toString('utf8').slice(0, 64 * 1024), sourceTopic: topic, state: 'rejected', reason: err.message });
    await this.report(rec);
  }

  private async accept(c: Candidate): Promise<void> {
    const { manifest: m } = c;
    const journal = this.fleetStore.journal;
    const existing = await journal.get(m.deployment_id);
    if (existing && existing.state !== 'rejected') {
      if (existing.manifest !== c.text) {
        this.options.logger.warn({ deployment_id: m.deployment_id }, 'fleet: deployment_id reused with different content, ignored');
      }
      return;
    }
    const rolledBack = this.rolledBack.get(m.deployment_id);
    if (rolledBack) {
      // The journal does not know it (the database was recreated) but it was rolled back: never activate it again.
      const rec = await journal.create({
        deploymentId: m.deployment_id, model: m.model, version: m.version, manifest: c.text, sourceTopic: c.topic, state: 'rolled_back',
        reason: `deployment ${m.deployment_id} (version ${m.version} of '${m.model}') was rolled back before the state database was recreated (${this.rolledBack.file}); it is not activated again`,
      });
      this.options.logger.warn({ deployment_id: m.deployment_id, model: m.model, version: m.version }, 'fleet: retained manifest of a rolled-back deployment arrived again, not activated');
      await this.report(rec);
      return;
    }
    let problem: ManifestRejection | 'already active' | undefined;
    try {
      problem = await this.checkAgainstDevice(m);
    } catch (err) {
      problem = new ManifestRejection('version conflict', `cannot check the installed version: ${errorMessage(err)}`);
    }
    if (problem instanceof ManifestRejection) {
      await this.recordRejection(c.topic, Buffer.from(c.text), problem);
      return;
    }
    const base = { deploymentId: m.deployment_id, model: m.model, version: m.version, manifest: c.text, sourceTopic: c.topic };
    if (problem === 'already active') {
      const rec = await journal.create({ ...base, state: 'active', reason: `version ${m.version} is already active` });
      await this.report(rec);
      return;
    }
    const rec = await journal.create({ ...base, state: 'accepted' });
    this.options.logger.info({ deployment_id: m.deployment_id, model: m.model, version: m.version, source: m.artifact.source, topic: c.topic }, 'fleet: deployment accepted');
    await this.report(rec);
    this.stateChanged();
    this.enqueueRun(rec, m);
  }

  /** Checks that need the device's state: downgrade, and an existing version with other bytes. */
  private async checkAgainstDevice(m: DeploymentManifest): Promise<ManifestRejection | 'already active' | undefined> {
    const { target } = this.options;
    const v = target.listModels().includes(m.model) ? target.modelVersions(m.model) : { onDisk: [] as number[] };
    if (v.active !== undefined && m.version < v.active && m.allow_downgrade !== true) {
      return new ManifestRejection('downgrade', `downgrade: version ${m.version} is older than the active version ${v.active} and allow_downgrade is not set`);
    }
    if (v.onDisk.includes(m.version)) {
      const entry = await this.fleetStore.registry.entry(m.model, m.version);
      const sha = entry && entry.state !== 'deleted' && entry.state !== 'rolled_back' ? entry.sha256 : await sha256File(target.versionPath(m.model, m.version));
      if (sha !== m.artifact.sha256) {
        return new ManifestRejection('version conflict', `version ${m.version} of '${m.model}' is already on disk with sha256 ${sha}, not ${m.artifact.sha256}`);
      }
      if (v.active === m.version) return 'already active';
    }
    return undefined;
  }

  private parseStored(rec: DeploymentRecord): DeploymentManifest | undefined {
    try {
      return verifyManifest(Buffer.from(rec.manifest), this.keys, this.limits).manifest;
    } catch (err) {
      this.options.logger.error({ deployment_id: rec.deploymentId, err: errorMessage(err) }, 'fleet: stored manifest no longer verifies, deployment failed');
      void this.fleetStore.journal.update(rec.deploymentId, { state: 'failed', reason: `stored manifest no longer verifies: ${errorMessage(err)}` }).then((r) => this.report(r));
      return undefined;
    }
  }

  /** Queues a run for the model; a running download or health watch of an older deployment is superseded. */
  private enqueueRun(rec: DeploymentRecord, manifest: DeploymentManifest): void {
    const model = rec.model;
    const lane = this.lanes.get(model);
    if (lane?.deploymentId === rec.deploymentId) return;
    const displaced = this.queued.get(model);
    if (displaced && displaced.rec.deploymentId !== rec.deploymentId) {
      void this.fleetStore.journal.update(displaced.rec.deploymentId, { state: 'failed', reason: new SupersededError(rec.deploymentId).message }).then((r) => this.report(r));
    }
    this.queued.set(model, { rec, manifest });
    if (lane && lane.phase !== 'activate') lane.controller.abort(new SupersededError(rec.deploymentId));
    if (!lane) this.pump(model);
  }

  private pump(model: string): void {
    const next = this.queued.get(model);
    if (!next || this.stopping || !this.runner) return;
    this.queued.delete(model);
    const controller = new AbortController();
    const runner = this.runner;
    const lane: Lane = {
      deploymentId: next.rec.deploymentId,
      controller,
      phase: 'download',
      done: Promise.resolve().then(async () => {
        try {
          const current = (await this.fleetStore.journal.get(next.rec.deploymentId)) ?? next.rec;
          await runner.run(current, next.manifest, controller.signal, (p) => { lane.phase = p; });
        } catch (err) {
          this.options.logger.error({ deployment_id: next.rec.deploymentId, err: errorMessage(err) }, 'fleet: deployment run crashed');
        } finally {
          this.lanes.delete(model);
          this.stateChanged();
          this.pump(model);
        }
      }),
    };
    this.lanes.set(model, lane);
  }

  private async stopHealthWatch(model: string, by: string): Promise<void> {
    const lane = this.lanes.get(model);
    if (lane && lane.phase === 'health') {
      lane.controller.abort(new SupersededError(by));
      await lane.done;
    }
  }

  private withModelLock<T>(model: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.modelLocks.get(model) ?? Promise.resolve();
    const run = prev.then(fn, fn);
    const tail = run.catch(() => undefined);
    this.modelLocks.set(model, tail);
    void tail.then(() => {
      if (this.modelLocks.get(model) === tail) this.modelLocks.delete(model);
    });
    return run;
  }

  private async report(rec: DeploymentRecord): Promise<void> {
    if (rec.state === 'rolled_back') {
      // Every rollback (health window, command) is reported through here, after the journal committed it.
      try {
        await this.rolledBack.add(rec.deploymentId, rec.model, rec.version);
      } catch (err) {
        this.options.logger.error({ deployment_id: rec.deploymentId, file: this.rolledBack.file, err: errorMessage(err) }, 'fleet: could not record the rollback outside the database');
      }
    }
    const topic = this.options.link.topics.deploymentStatus(rec.deploymentId);
    try {
      await this.options.statusSink.enqueue('deployment-status', topic, deploymentStatusPayload(rec), true);
    } catch (err) {
      this.options.logger.error({ deployment_id: rec.deploymentId, err: errorMessage(err) }, 'fleet: could not enqueue deployment status');
    }
  }

  private stateChanged(): void {
    if (this.stopping) return;
    clearTimeout(this.stateDebounce);
    this.stateDebounce = setTimeout(() => void this.publishState(), 200);
  }

  private async publishState(): Promise<void> {
    if (this.stopping || !this.store) return;
    try {
      const state = await this.reportedState();
      await this.options.statusSink.enqueue('state', this.options.link.topics.state, state, true);
    } catch (err) {
      this.options.logger.error({ err: errorMessage(err) }, 'fleet: could not publish the reported state');
    }
  }

  /** Keeps the active version and the most recently active others, up to `keep_versions`; deletes the rest. */
  private async applyRetention(model: string): Promise<void> {
    const { target, config, logger } = this.options;
    await this.withModelLock(model, async () => {
      const v = target.modelVersions(model);
      const rank = await this.fleetStore.registry.activationRank(model);
      const score = (ver: number): number => (ver === v.active ? Number.MAX_SAFE_INTEGER : rank.get(ver) ?? -1);
      const ordered = [...v.onDisk].sort((a, b) => score(b) - score(a) || b - a);
      for (const ver of ordered.slice(config.keep_versions)) {
        if (ver === v.active) continue;
        try {
          await target.deleteVersion(model, ver);
          await this.fleetStore.registry.setState(model, ver, 'deleted');
          logger.info({ model, version: ver, keep_versions: config.keep_versions }, 'fleet: old version deleted');
        } catch (err) {
          logger.warn({ model, version: ver, err: errorMessage(err) }, 'fleet: could not delete an old version');
        }
      }
    });
    this.stateChanged();
  }
}
