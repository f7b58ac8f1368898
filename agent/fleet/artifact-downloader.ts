import { mkdirSync } from 'node:fs';
import { stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { ChunkMap } from '../store/index.js';
import { sha256File } from './file-io.js';
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

/**
 * Gets a manifest's artifact into `<dataDir>/fleet/downloads/<sha256>.part`, resumable across reconnects and
 * restarts, then checks its size and SHA-256. A mismatch deletes the bytes and rejects the deployment.
 */
export class ArtifactDownloader {
  readonly dir: string;
  /** Statistics of the last fetch per sha256 (tests count re-requested chunks with it). */
  readonly lastStats = new Map<string, FetchStats>();

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

  /** Downloads (or finishes downloading) and verifies; resolves with the verified temp file's path. */
  async download(manifest: DeploymentManifest, signal: AbortSignal, hooks: DownloadHooks): Promise<string> {
    const { sha256, size, source } = manifest.artifact;
    const tempPath = this.tempPath(sha256);
    const chunkSize = manifest.artifact.chunk_size ?? 0;
    const { record, restarted } = await this.chunks.begin({ sha256, size, chunkSize, source, tempPath });
    if (restarted) this.logger.info({ sha256 }, 'fleet: earlier partial download had other parameters, starting over');
    if (source === 'mqtt') {
      const stats = await this.mqtt.fetch(record, signal, hooks.onProgress);
      this.lastStats.set(sha256, { kind: 'mqtt', ...stats });
    } else {
      const stats = await this.http.fetch(record, signal, hooks.onProgress);
      this.lastStats.set(sha256, { kind: 'http', ...stats });
    }
    hooks.onVerifying();
    await this.verify(sha256, size, tempPath);
    return tempPath;
  }

  /** Checks a complete temp file; on mismatch forgets it so the next attempt starts clean. */
  async verify(sha256: string, size: number, tempPath: string): Promise<void> {
    const actualSize = await stat(tempPath).then((s) => s.size);
    if (actualSize !== size) {
      await this.discard(sha256);
      throw new ManifestRejection('size mismatch', `size mismatch: downloaded ${actualSize} bytes, the manifest says ${size}`);
    }
    const actual = await sha256File(tempPath);
    if (actual !== sha256) {
      await this.discard(sha256);
      throw new ManifestRejection('hash mismatch', `hash mismatch: artifact sha256 is ${actual}, the manifest says ${sha256}`);
    }
  }

  /** The temp file was consumed (installed) or is worthless: forget the download. */
  async discard(sha256: string): Promise<void> {
    await unlink(this.tempPath(sha256)).catch(() => undefined);
    await this.chunks.finish(sha256);
  }

  /** Whether a complete, unverified-or-verified temp file of this size is waiting. */
  async hasComplete(sha256: string, size: number): Promise<boolean> {
    return stat(this.tempPath(sha256)).then((s) => s.size === size, () => false);
  }
}
