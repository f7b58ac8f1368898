import { mkdirSync } from 'node:fs';
import { copyFile, link, stat, statfs, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { errorMessage } from '../errors.js';
import type { ChunkMap } from '../store/index.js';
import { abortable, isDiskFull, sha256File } from './file-io.js';
import type { FleetLogger } from './fleet-logger.js';
import type { HttpFetchStats, HttpRangeFetcher } from './http-range-fetcher.js';
import { ManifestRejection, type DeploymentManifest } from './manifest.js';
import type { ChunkFetchStats, MqttChunkFetcher } from './mqtt-chunk-fetcher.js';

export type FetchStats = ({ readonly kind: 'mqtt' } & ChunkFetchStats) | ({ readonly kind: 'http' } & HttpFetchStats);

export interface DownloadHooks {
  readonly onProgress: (bytes: number, total: number) => void;
  /** Called once the bytes are all there and hashing starts. */
  readonly onVerifying: () => void;
}

/** The download filled the data disk: its partial file was removed so the disk is usable again. */
export class DiskFullError extends Error {
  constructor(dir: string, sha256: string, cause: unknown) {
    super(`disk full while writing artifact ${sha256} under ${dir} (${errorMessage(cause)}); the partial download was removed, free space on the data disk and deploy again`);
    this.name = 'DiskFullError';
  }
}

/**
 * Gets a manifest's artifact into `<dataDir>/fleet/downloads/<sha256>.part`, resumable across reconnects and
 * restarts, then checks its size and SHA-256. A mismatch deletes the bytes and rejects the deployment.
 *
 * The partial file and its chunk map are keyed by the artifact's sha256 (the same bytes are downloaded once), so
 * deployments of the same bytes (two models, two versions) share them: each deployment holds the artifact while
 * it needs it, fetches and verifications of one artifact take turns, each deployment gets its own link to the
 * verified file to consume, and the shared file goes only when its last holder lets go.
 */
export class ArtifactDownloader {
  readonly dir: string;
  /** Statistics of the last fetch per sha256 (tests count re-requested chunks with it). */
  readonly lastStats = new Map<string, FetchStats>();
  /** Deployments (this run) holding each artifact's shared temp file. */
  private readonly holders = new Map<string, Set<string>>();
  /** Tail of the file operations queued per artifact: one fetch, verification or removal at a time. */
  private readonly turns = new Map<string, Promise<void>>();
  /** Artifacts whose temp file was verified in this run and not written since (the next holder skips the hash). */
  private readonly verified = new Set<string>();
  /** Artifacts written in this run since their last verification: a full-length temp file may still be sparse. */
  private readonly written = new Set<string>();

  constructor(
    dataDir: string,
    private readonly chunks: ChunkMap,
    private readonly mqtt: MqttChunkFetcher,
    private readonly http: HttpRangeFetcher,
    private readonly logger: FleetLogger,
  ) {
    this.dir = join(dataDir, 'fleet', 'downloads');
    mkdirSync(this.dir, { recursive: true });
  }

  tempPath(sha256: string): string {
    return join(this.dir, `${sha256}.part`);
  }

  /** The deployment's own name for the verified file (a hard link to the shared one), which `install` consumes. */
  claimPath(sha256: string, owner: string): string {
    return join(this.dir, `${sha256}.${owner}.claim`);
  }

  /**
   * Downloads (or finishes downloading, or reuses) the artifact for deployment `owner`, verifies it and resolves
   * with a path that is the owner's to consume. `resumeVerifying`: the journal says the bytes were all there
   * before a restart, so a temp file of the right size is only verified, not fetched again. The owner holds the
   * artifact until `release`.
   */
  async obtain(manifest: DeploymentManifest, owner: string, signal: AbortSignal, hooks: DownloadHooks, resumeVerifying = false): Promise<string> {
    const { sha256, size } = manifest.artifact;
    const holders = this.holders.get(sha256) ?? new Set<string>();
    holders.add(owner);
    this.holders.set(sha256, holders);
    try {
      return await this.inTurn(sha256, signal, async () => {
        const tempPath = this.tempPath(sha256);
        const complete = await this.hasComplete(sha256, size);
        if (complete && this.verified.has(sha256)) {
          this.logger.info({ sha256, deployment_id: owner }, 'fleet: artifact already downloaded and verified for another deployment, reusing it');
        } else if (complete && resumeVerifying && !this.written.has(sha256)) {
          hooks.onVerifying();
          await this.verify(sha256, size, tempPath);
        } else {
          await this.fetch(manifest, signal, hooks);
        }
        return this.claim(sha256, owner);
      });
    } catch (err) {
      await unlink(this.claimPath(sha256, owner)).catch(() => undefined);
      throw err;
    }
  }

  /**
   * The owner is done with the artifact (installed it, failed, or was superseded): its claim is removed, and the
   * shared temp file with its chunk map too once no other deployment holds it, unless `keepPartial` (a later
   * deployment of the same bytes, or a restart, resumes it; the start-up sweep removes it when none does).
   */
  async release(sha256: string, owner: string, keepPartial = false): Promise<void> {
    await unlink(this.claimPath(sha256, owner)).catch(() => undefined);
    const holders = this.holders.get(sha256);
    holders?.delete(owner);
    if (holders?.size === 0) this.holders.delete(sha256);
    if (keepPartial || this.holders.has(sha256)) return;
    await this.inTurn(sha256, undefined, async () => {
      // Another deployment may have taken the artifact up while this waited for its turn.
      if (!this.holders.has(sha256)) await this.purge(sha256);
    });
  }

  /** Forgets a download nobody needs (the start-up sweep): temp file and chunk map. */
  async discard(sha256: string): Promise<void> {
    await this.inTurn(sha256, undefined, () => this.purge(sha256));
  }

  /** Checks a complete temp file; on mismatch forgets it so the next attempt starts clean. */
  async verify(sha256: string, size: number, tempPath: string): Promise<void> {
    const actualSize = await stat(tempPath).then((s) => s.size);
    if (actualSize !== size) {
      await this.purge(sha256);
      throw new ManifestRejection('size mismatch', `size mismatch: downloaded ${actualSize} bytes, the manifest says ${size}`);
    }
    const actual = await sha256File(tempPath);
    if (actual !== sha256) {
      await this.purge(sha256);
      throw new ManifestRejection('hash mismatch', `hash mismatch: artifact sha256 is ${actual}, the manifest says ${sha256}`);
    }
    this.written.delete(sha256);
    this.verified.add(sha256);
  }

  /** Whether a complete, unverified-or-verified temp file of this size is waiting. */
  async hasComplete(sha256: string, size: number): Promise<boolean> {
    return stat(this.tempPath(sha256)).then((s) => s.size === size, () => false);
  }

  private async fetch(manifest: DeploymentManifest, signal: AbortSignal, hooks: DownloadHooks): Promise<void> {
    const { sha256, size, source } = manifest.artifact;
    const tempPath = this.tempPath(sha256);
    this.verified.delete(sha256);
    await this.checkFreeSpace(sha256, size, tempPath);
    this.written.add(sha256);
    const chunkSize = manifest.artifact.chunk_size ?? 0;
    try {
      const { record, restarted } = await this.chunks.begin({ sha256, size, chunkSize, source, tempPath });
      if (restarted) {
        this.logger.info({ sha256 }, 'fleet: earlier partial download had other parameters, starting over');
        // A new file, not the old one rewritten: after a crash between an install and its release the old file may
        // still be a hard link of an installed model.onnx, which rewriting it in place would damage.
        await unlink(tempPath).catch(() => undefined);
      }
      if (source === 'mqtt') {
        const stats = await this.mqtt.fetch(record, signal, hooks.onProgress);
        this.lastStats.set(sha256, { kind: 'mqtt', ...stats });
      } else {
        const stats = await this.http.fetch(record, signal, hooks.onProgress);
        this.lastStats.set(sha256, { kind: 'http', ...stats });
      }
    } catch (err) {
      if (!isDiskFull(err)) throw err;
      // Left alone, the partial file keeps the data disk full (the database, the outbox and the logs share it).
      this.logger.error({ sha256, dir: this.dir, err: errorMessage(err) }, 'fleet: data disk full while downloading, partial download removed');
      await this.purge(sha256);
      throw new DiskFullError(this.dir, sha256, err);
    }
    hooks.onVerifying();
    await this.verify(sha256, size, tempPath);
  }

  /** Refuses a download that cannot fit on the data disk, before a byte of it is written. */
  private async checkFreeSpace(sha256: string, size: number, tempPath: string): Promise<void> {
    const fs = await statfs(this.dir);
    const free = fs.bavail * fs.bsize;
    // A resumed download already owns the blocks it wrote (an MQTT partial file is sparse: count blocks, not length).
    const written = await stat(tempPath).then((s) => Math.min(s.size, s.blocks * 512), () => 0);
    const needed = Math.max(0, size - written);
    if (needed > free) {
      throw new ManifestRejection('disk space', `disk space: the artifact is ${size} bytes (${needed} still to download) but the data disk at ${this.dir} has ${free} bytes free`);
    }
    if (written > 0) this.logger.debug({ sha256, written, needed, free }, 'fleet: resuming a partial download');
  }

  /** A name of the verified file for the owner alone: a hard link (no copy, no space), or a copy where links fail. */
  private async claim(sha256: string, owner: string): Promise<string> {
    const claimed = this.claimPath(sha256, owner);
    await unlink(claimed).catch(() => undefined);
    try {
      await link(this.tempPath(sha256), claimed);
    } catch {
      try {
        await copyFile(this.tempPath(sha256), claimed);
      } catch (err) {
        await unlink(claimed).catch(() => undefined);
        throw err;
      }
    }
    return claimed;
  }

  private async purge(sha256: string): Promise<void> {
    this.verified.delete(sha256);
    this.written.delete(sha256);
    await unlink(this.tempPath(sha256)).catch(() => undefined);
    await this.chunks.finish(sha256);
  }

  /** Runs `fn` after every operation queued before it on the same artifact; waiting ends early on `signal`. */
  private async inTurn<T>(sha256: string, signal: AbortSignal | undefined, fn: () => Promise<T>): Promise<T> {
    const before = this.turns.get(sha256) ?? Promise.resolve();
    let done!: () => void;
    const mine = new Promise<void>((resolve) => { done = resolve; });
    const tail = before.then(() => mine);
    this.turns.set(sha256, tail);
    try {
      await (signal ? abortable(before, signal) : before);
      return await fn();
    } finally {
      done();
      void tail.then(() => {
        if (this.turns.get(sha256) === tail) this.turns.delete(sha256);
      });
    }
  }
}
