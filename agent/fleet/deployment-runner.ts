import type { FleetConfig } from '../config/fleet-schema.js';
import { errorMessage } from '../errors.js';
import type { DeploymentRecord, DeploymentPatch, FleetStore } from '../store/index.js';
import type { ArtifactDownloader } from './artifact-downloader.js';
import type { ActivationPhase, DeploymentTarget, ValidationSpec } from './deployment-target.js';
import { sha256File } from './file-io.js';
import type { FleetLogger } from './fleet-logger.js';
import { watchHealth } from './health-watch.js';
import { ManifestRejection, type DeploymentManifest } from './manifest.js';

/** A kill during activation that repeats this often is treated as the new version taking the agent down. */
export const MAX_ACTIVATION_ATTEMPTS = 3;

/** Abort reason when a newer deployment of the same model takes over. */
export class SupersededError extends Error {
  constructor(readonly by: string) {
    super(`superseded by deployment ${by}`);
    this.name = 'SupersededError';
  }
}

/** Abort reason when the agent stops: the journal keeps the state and a restart resumes. */
export class StoppingError extends Error {
  constructor() {
    super('agent stopping');
    this.name = 'StoppingError';
  }
}

export interface RunnerContext {
  readonly store: FleetStore;
  readonly target: DeploymentTarget;
  readonly downloader: ArtifactDownloader;
  readonly config: FleetConfig;
  readonly logger: FleetLogger;
  /** Publishes a deployment's status (durably, through the sink). */
  readonly report: (rec: DeploymentRecord) => Promise<void>;
  /** Serialises activations (and command-driven switches) of one model. */
  readonly withModelLock: <T>(model: string, fn: () => Promise<T>) => Promise<T>;
  /** Something an operator sees in the reported state changed. */
  readonly changed: () => void;
  readonly retain: (model: string) => Promise<void>;
}

export type RunPhase = 'download' | 'activate' | 'health';

/** Key in a watching deployment's `details`: `{ window_ms, left_ms }`, the health window and what is left of it. */
const HEALTH_WINDOW_KEY = 'health_window';

/** The health window a deployment is under, and what is left of it, from its journal row. */
function healthWindowOf(rec: DeploymentRecord, configuredMs: number): { windowMs: number; leftMs: number } {
  const w = rec.details?.[HEALTH_WINDOW_KEY] as { window_ms?: unknown; left_ms?: unknown } | undefined;
  if (w && typeof w.window_ms === 'number' && typeof w.left_ms === 'number' && w.window_ms > 0) {
    return { windowMs: w.window_ms, leftMs: Math.min(Math.max(0, w.left_ms), w.window_ms) };
  }
  // Journaled by an agent that kept a wall-clock deadline: the best reading there is, bounded by the window.
  if (rec.healthUntil !== undefined) return { windowMs: configuredMs, leftMs: Math.min(Math.max(0, rec.healthUntil - Date.now()), configuredMs) };
  return { windowMs: configuredMs, leftMs: configuredMs };
}

function validationOf(m: DeploymentManifest): ValidationSpec | undefined {
  const v = m.validation;
  if (!v) return undefined;
  return {
    ...(v.inputs ? { inputs: v.inputs } : {}),
    ...(v.expected_outputs ? { expectedOutputs: v.expected_outputs } : {}),
    ...(v.tolerance !== undefined ? { tolerance: v.tolerance } : {}),
  };
}

/**
 * Drives one deployment from wherever its journal row says it is to a final state. Each step is committed to the
 * journal before it is reported, and each can be re-entered after a crash: a download resumes from its chunk
 * map, a verified file that was already installed is recognised by its hash, an interrupted activation is
 * retried (at most MAX_ACTIVATION_ATTEMPTS times), an open health window is watched for its remaining time.
 */
export class DeploymentRunner {
  constructor(private readonly ctx: RunnerContext) {}

  async run(start: DeploymentRecord, manifest: DeploymentManifest, signal: AbortSignal, onPhase: (p: RunPhase) => void): Promise<DeploymentRecord> {
    let rec = start;
    try {
      if (rec.state === 'accepted' || rec.state === 'downloading' || rec.state === 'verifying') {
        onPhase('download');
        rec = await this.obtain(rec, manifest, signal);
      }
      if (rec.state === 'loading' || rec.state === 'warming' || rec.state === 'validating' || rec.state === 'accepted') {
        onPhase('activate');
        rec = await this.ctx.withModelLock(rec.model, () => this.activate(rec, manifest));
        if (rec.state === 'active' && rec.health === 'skipped') await this.ctx.retain(rec.model);
      }
      if (rec.state === 'active' && rec.health === 'watching') {
        onPhase('health');
        rec = await this.watch(rec, signal);
      }
      return rec;
    } catch (err) {
      return this.fail(rec, err, signal, manifest);
    }
  }

  private async set(rec: DeploymentRecord, patch: DeploymentPatch): Promise<DeploymentRecord> {
    const next = await this.ctx.store.journal.update(rec.deploymentId, patch);
    if (patch.state !== undefined || patch.progress !== undefined) await this.ctx.report(next).catch((err: unknown) => {
      this.ctx.logger.error({ deployment_id: rec.deploymentId, err: errorMessage(err) }, 'fleet: could not enqueue deployment status');
    });
    if (patch.state !== undefined) this.ctx.changed();
    return next;
  }

  /** Download, verify and install; leaves the record in `accepted` (installed, ready to activate). */
  private async obtain(start: DeploymentRecord, m: DeploymentManifest, signal: AbortSignal): Promise<DeploymentRecord> {
    const { target, store, downloader } = this.ctx;
    let rec = start;
    const onDisk = target.modelVersions(m.model).onDisk.includes(m.version);
    if (onDisk) {
      // Installed before a crash (the rename is atomic, so the file is whole) or already present: check it is ours.
      const path = target.versionPath(m.model, m.version);
      const known = await store.registry.entry(m.model, m.version);
      const sha = known && known.state !== 'deleted' && known.state !== 'rolled_back' ? known.sha256 : await sha256File(path);
      if (sha !== m.artifact.sha256) {
        throw new ManifestRejection('version conflict', `version ${m.version} of '${m.model}' is already on disk with sha256 ${sha}, not ${m.artifact.sha256}`);
      }
      await store.registry.upsert({ model: m.model, version: m.version, sha256: sha, path, state: target.modelVersions(m.model).active === m.version ? 'active' : 'installed', deploymentId: rec.deploymentId });
      // A partial download of these bytes left from before is not needed, unless another deployment is using it.
      await downloader.release(m.artifact.sha256, rec.deploymentId);
      return rec.state === 'accepted' ? rec : this.set(rec, { state: 'accepted', reason: 'artifact already on disk', progress: null });
    }
    // The journal says every byte had arrived before a restart: verify what lies there rather than fetch again.
    const resumeVerifying = rec.state === 'verifying' && (await downloader.hasComplete(m.artifact.sha256, m.artifact.size));
    if (!resumeVerifying) rec = await this.set(rec, { state: 'downloading', progress: rec.progress ?? 0, reason: null });
    let lastReported = rec.progress ?? 0;
    let reporting: Promise<unknown> = Promise.resolve();
    const claimed = await downloader.obtain(m, rec.deploymentId, signal, {
      onProgress: (bytes, total) => {
        const p = Math.floor((bytes / total) * 1000) / 1000;
        // Statuses are never dropped by the outbox, so progress is reported in 10% steps only.
        if (p - lastReported >= 0.1 && p < 1) {
          lastReported = p;
          reporting = reporting.then(() => this.set(rec, { progress: p }).then((r) => { rec = r; })).catch(() => undefined);
        }
      },
      onVerifying: () => undefined,
    }, resumeVerifying).finally(() => reporting);
    if (!resumeVerifying) rec = await this.set(rec, { state: 'verifying', progress: 1 });
    await target.install(m.model, m.version, claimed, m.config);
    await store.registry.upsert({ model: m.model, version: m.version, sha256: m.artifact.sha256, path: target.versionPath(m.model, m.version), state: 'installed', deploymentId: rec.deploymentId });
    await downloader.release(m.artifact.sha256, rec.deploymentId);
    return this.ctx.store.journal.update(rec.deploymentId, { state: 'accepted', reason: 'installed', progress: null });
  }

  private async activate(start: DeploymentRecord, m: DeploymentManifest): Promise<DeploymentRecord> {
    const { target, store, config, logger } = this.ctx;
    let rec = start;
    const versions = target.modelVersions(m.model);
    const windowMs = config.health.duration_s * 1000;
    // The window is journaled as a duration (what is left of it), never as a wall-clock deadline: see watch().
    const healthWindow: DeploymentPatch = windowMs > 0
      ? { health: 'watching', healthUntil: null, details: { [HEALTH_WINDOW_KEY]: { window_ms: windowMs, left_ms: windowMs } } }
      : { health: 'skipped' };
    if (versions.active === m.version && rec.state !== 'accepted') {
      // The switch happened before a crash; only the journal had not caught up.
      logger.info({ deployment_id: rec.deploymentId, model: m.model, version: m.version }, 'fleet: activation had completed before the restart');
      await store.registry.recordActivation({ model: m.model, version: m.version, ...(rec.previousVersion !== undefined ? { previousVersion: rec.previousVersion } : {}), deploymentId: rec.deploymentId, cause: 'deployment' });
      return this.set(rec, { state: 'active', reason: null, activatedAt: Date.now(), ...healthWindow });
    }
    const attempts = rec.activationAttempts + 1;
    if (attempts > MAX_ACTIVATION_ATTEMPTS) {
      throw new Error(`activation was interrupted ${rec.activationAttempts} times (the agent died while loading version ${m.version}); giving up`);
    }
    const previous = rec.previousVersion ?? (versions.active !== m.version ? versions.active : undefined);
    const previousP99 = previous !== undefined ? target.versionHealth(m.model, previous).p99Us : undefined;
    rec = await this.set(rec, {
      state: 'loading',
      reason: null,
      activationAttempts: attempts,
      previousVersion: previous ?? null,
      previousP99Us: rec.previousP99Us ?? previousP99 ?? null,
    });
    let phaseTail: Promise<unknown> = Promise.resolve();
    try {
      await target.activate(m.model, m.version, validationOf(m), (phase: ActivationPhase) => {
        if (phase === 'loading') return;
        phaseTail = phaseTail.then(() => this.set(rec, { state: phase }).then((r) => { rec = r; })).catch(() => undefined);
      });
    } catch (err) {
      await phaseTail;
      throw new ActivationFailure(errorMessage(err));
    }
    await phaseTail;
    await store.registry.recordActivation({ model: m.model, version: m.version, ...(previous !== undefined ? { previousVersion: previous } : {}), deploymentId: rec.deploymentId, cause: 'deployment' });
    rec = await this.set(rec, { state: 'active', reason: null, activatedAt: Date.now(), ...healthWindow });
    logger.info({ deployment_id: rec.deploymentId, model: m.model, version: m.version, previous }, 'fleet: version activated');
    return rec;
  }

  private async watch(start: DeploymentRecord, signal: AbortSignal): Promise<DeploymentRecord> {
    const { target, store, config, logger } = this.ctx;
    let rec = start;
    const window = healthWindowOf(rec, config.health.duration_s * 1000);
    const outcome = await watchHealth(target, rec.model, rec.version, {
      ...window,
      ...(rec.previousP99Us !== undefined ? { previousP99Us: rec.previousP99Us } : {}),
    }, config.health, signal, async (leftMs) => {
      // A restart resumes the window with what was left at the last checkpoint: the time the agent was down is
      // not counted as watched (the version served nothing then), and no clock step can end the window early.
      const left = { [HEALTH_WINDOW_KEY]: { window_ms: window.windowMs, left_ms: Math.max(0, Math.round(leftMs)) } };
      rec = await store.journal.update(rec.deploymentId, { details: left }).catch((err: unknown) => {
        logger.warn({ deployment_id: rec.deploymentId, err: errorMessage(err) }, 'fleet: could not record the health window left');
        return rec;
      });
    });
    if (outcome.verdict === 'passed') {
      rec = await this.set(rec, { health: 'passed', details: { health: outcome.figures } });
      await this.ctx.report(rec).catch(() => undefined);
      await this.ctx.retain(rec.model);
      return rec;
    }
    logger.warn({ deployment_id: rec.deploymentId, model: rec.model, version: rec.version, reason: outcome.reason, figures: outcome.figures }, 'fleet: health window breached');
    const previous = rec.previousVersion;
    if (previous === undefined || !target.modelVersions(rec.model).onDisk.includes(previous)) {
      return this.set(rec, { state: 'failed', health: 'breached', reason: `health check failed: ${outcome.reason}; no previous version on disk to roll back to, version ${rec.version} keeps serving`, details: { health: outcome.figures } });
    }
    try {
      await this.ctx.withModelLock(rec.model, async () => {
        if (target.modelVersions(rec.model).active === rec.version) {
          await target.activate(rec.model, previous);
          await store.registry.recordActivation({ model: rec.model, version: previous, previousVersion: rec.version, deploymentId: rec.deploymentId, cause: 'rollback' });
        }
        await target.deleteVersion(rec.model, rec.version);
        await store.registry.setState(rec.model, rec.version, 'rolled_back');
      });
    } catch (err) {
      return this.set(rec, { state: 'failed', health: 'breached', reason: `health check failed: ${outcome.reason}; rollback to version ${previous} failed: ${errorMessage(err)}`, details: { health: outcome.figures } });
    }
    return this.set(rec, { state: 'rolled_back', health: 'breached', reason: `rolled back to version ${previous}: ${outcome.reason}`, details: { health: outcome.figures, rolled_back_to: previous } });
  }

  private async fail(rec: DeploymentRecord, err: unknown, signal: AbortSignal, manifest: DeploymentManifest): Promise<DeploymentRecord> {
    const { target, store, logger } = this.ctx;
    const reason = signal.aborted && signal.reason instanceof Error ? signal.reason : err;
    // Bytes that do not match the manifest (or cannot fit) are worthless: a later deployment starts from nothing.
    // Otherwise what was downloaded stays for a later deployment of the same bytes or a restart to resume.
    await this.ctx.downloader.release(manifest.artifact.sha256, rec.deploymentId, !(reason instanceof ManifestRejection)).catch((e: unknown) => {
      logger.warn({ deployment_id: rec.deploymentId, err: errorMessage(e) }, 'fleet: could not let go of the download');
    });
    if (reason instanceof StoppingError) return rec;
    if (reason instanceof SupersededError) {
      if (rec.state === 'active') return this.set(rec, { health: 'skipped', reason: reason.message });
      return this.set(rec, { state: 'failed', reason: reason.message });
    }
    if (reason instanceof ManifestRejection) {
      logger.warn({ deployment_id: rec.deploymentId, reason: reason.message }, 'fleet: deployment rejected');
      return this.set(rec, { state: 'rejected', reason: reason.message, progress: null });
    }
    const message = errorMessage(reason);
    logger.error({ deployment_id: rec.deploymentId, state: rec.state, reason: message }, 'fleet: deployment failed');
    if (reason instanceof ActivationFailure || rec.state === 'loading' || rec.state === 'warming' || rec.state === 'validating') {
      // The new version never served: take it off disk so a restart cannot pick it up.
      const versions = target.modelVersions(rec.model);
      if (versions.active !== rec.version && versions.onDisk.includes(rec.version)) {
        const entry = await store.registry.entry(rec.model, rec.version);
        if (entry?.deploymentId === rec.deploymentId) {
          await target.deleteVersion(rec.model, rec.version).catch((e: unknown) => logger.warn({ err: errorMessage(e) }, 'fleet: could not remove the failed version'));
          await store.registry.setState(rec.model, rec.version, 'deleted');
        }
      }
    }
    return this.set(rec, { state: 'failed', reason: message, progress: null });
  }
}

/** The target refused the new version (load, warm-up or validation); the old version kept serving. */
class ActivationFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ActivationFailure';
  }
}
