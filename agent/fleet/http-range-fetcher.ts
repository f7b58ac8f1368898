import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import type { ChunkMap, DownloadRecord } from '../store/index.js';
import { errorMessage } from '../errors.js';
import { isDiskFull, openForWrite, sleep } from './file-io.js';
import type { FleetLogger } from './fleet-logger.js';
import { ManifestRejection } from './manifest.js';

export interface HttpFetchOptions {
  readonly timeoutMs: number;
  /** CA bundle for https; the system's when absent. */
  readonly ca?: Buffer;
  /** 4xx answers (other than 408 and 429) tolerated before giving up; network errors and 5xx retry forever. */
  readonly maxClientErrors: number;
}

export interface HttpFetchStats {
  /** Offset of the first request (bytes already durable from an earlier run). */
  readonly resumedFrom: number;
  readonly attempts: number;
  /** Requests that carried a Range header. */
  readonly rangeRequests: number;
}

/** Bytes between two durable checkpoints (fdatasync + bytes_done in SQLite). */
const CHECKPOINT_BYTES = 1024 * 1024;
const CHECKPOINT_MS = 500;

class HttpStatusError extends Error {
  constructor(readonly status: number, url: string) {
    super(`HTTP ${status} from ${url}`);
  }
}

/**
 * Downloads an artifact over http(s) with Range resume. The file grows from the front; after each checkpoint
 * (fdatasync, then bytes_done recorded) a later attempt, or a restart, asks for `bytes=<bytes_done>-` and
 * truncates anything written past the checkpoint.
 */
export class HttpRangeFetcher {
  constructor(private readonly chunks: ChunkMap, private readonly options: HttpFetchOptions, private readonly logger: FleetLogger) {}

  async fetch(rec: DownloadRecord, signal: AbortSignal, onProgress: (bytes: number, total: number) => void): Promise<HttpFetchStats> {
    const { sha256, size } = rec;
    let attempts = 0;
    let rangeRequests = 0;
    let clientErrors = 0;
    let resumedFrom = -1;
    for (;;) {
      signal.throwIfAborted();
      const offset = (await this.chunks.download(sha256))?.bytesDone ?? 0;
      if (resumedFrom < 0) resumedFrom = offset;
      if (offset >= size) return { resumedFrom, attempts, rangeRequests };
      attempts += 1;
      if (offset > 0) rangeRequests += 1;
      try {
        await this.attempt(rec, offset, signal, onProgress);
        const after = (await this.chunks.download(sha256))?.bytesDone ?? 0;
        if (after >= size) return { resumedFrom, attempts, rangeRequests };
        this.logger.info({ sha256, bytes: after, size }, 'fleet: download ended early, resuming');
      } catch (err) {
        // A full disk does not clear by retrying; the downloader removes the partial file and fails the deployment.
        if (err instanceof ManifestRejection || signal.aborted || isDiskFull(err)) throw err;
        if (err instanceof HttpStatusError && err.status >= 400 && err.status < 500 && err.status !== 408 && err.status !== 429) {
          clientErrors += 1;
          if (clientErrors >= this.options.maxClientErrors) throw err;
        }
        const delay = Math.min(30_000, 500 * 2 ** Math.min(attempts - 1, 6));
        this.logger.warn({ sha256, source: rec.source, err: errorMessage(err), retry_ms: delay }, 'fleet: artifact download failed, retrying');
        await sleep(delay, signal);
      }
    }
  }

  private async attempt(rec: DownloadRecord, offset: number, signal: AbortSignal, onProgress: (bytes: number, total: number) => void): Promise<void> {
    const { sha256, size } = rec;
    const res = await this.get(rec.source, offset, signal);
    const fh = await openForWrite(rec.tempPath);
    let pos = offset;
    try {
      if (res.statusCode === 206) {
        const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.headers['content-range'] ?? '');
        if (!m) throw new Error(`206 without a usable Content-Range (${res.headers['content-range'] ?? 'none'})`);
        if (m[3] !== '*' && Number(m[3]) !== size) {
          throw new ManifestRejection('size mismatch', `size mismatch: server has ${m[3]} bytes, the manifest says ${size}`);
        }
        if (Number(m[1]) !== offset) throw new Error(`server answered bytes ${m[1]}- to a request for ${offset}-`);
      } else if (res.statusCode === 200) {
        const len = res.headers['content-length'];
        if (len !== undefined && Number(len) !== size) {
          throw new ManifestRejection('size mismatch', `size mismatch: server sends ${len} bytes, the manifest says ${size}`);
        }
        if (offset > 0) this.logger.info({ sha256, offset }, 'fleet: server ignored Range, downloading from the start');
        pos = 0;
        await this.chunks.setBytesDone(sha256, 0);
      } else if (res.statusCode === 416 && offset === size) {
        res.resume();
        return;
      } else {
        res.resume();
        throw new HttpStatusError(res.statusCode ?? 0, rec.source);
      }
      await fh.truncate(pos);
      let sinceCheckpoint = 0;
      let lastCheckpoint = performance.now();
      const checkpoint = async (): Promise<void> => {
        await fh.datasync();
        await this.chunks.setBytesDone(sha256, pos);
        sinceCheckpoint = 0;
        lastCheckpoint = performance.now();
        onProgress(pos, size);
      };
      try {
        for await (const piece of res as AsyncIterable<Buffer>) {
          if (pos + piece.length > size) {
            throw new ManifestRejection('size mismatch', `size mismatch: server sends more than the manifest's ${size} bytes`);
          }
          await fh.write(piece, 0, piece.length, pos);
          pos += piece.length;
          sinceCheckpoint += piece.length;
          if (sinceCheckpoint >= CHECKPOINT_BYTES || performance.now() - lastCheckpoint >= CHECKPOINT_MS) await checkpoint();
        }
      } finally {
        // Keep what arrived before a cut, an abort or an error: the next attempt resumes from here.
        if (sinceCheckpoint > 0) await checkpoint().catch(() => undefined);
      }
      if (pos < size && res.complete) {
        this.logger.warn({ sha256, pos, size }, 'fleet: server closed the body before the end');
      }
    } finally {
      await fh.close().catch(() => undefined);
    }
  }

  private get(url: string, offset: number, signal: AbortSignal, redirects = 0): Promise<IncomingMessage> {
    return new Promise((resolve, reject) => {
      const u = new URL(url);
      const headers: Record<string, string> = { 'accept-encoding': 'identity' };
      if (offset > 0) headers.range = `bytes=${offset}-`;
      const req = (u.protocol === 'https:' ? httpsRequest : httpRequest)(
        u,
        { method: 'GET', headers, signal, timeout: this.options.timeoutMs, ...(u.protocol === 'https:' && this.options.ca ? { ca: this.options.ca } : {}) },
        (res) => {
          const status = res.statusCode ?? 0;
          const location = res.headers.location;
          if ([301, 302, 303, 307, 308].includes(status) && location) {
            res.resume();
            if (redirects >= 5) {
              reject(new Error(`too many redirects from ${url}`));
              return;
            }
            const nextUrl = new URL(location, u);
            if (nextUrl.protocol !== u.protocol && nextUrl.protocol !== 'https:') {
              reject(new Error(`refusing redirect from ${u.protocol} to ${nextUrl.protocol}`));
              return;
            }
            this.get(nextUrl.toString(), offset, signal, redirects + 1).then(resolve, reject);
            return;
          }
          res.setTimeout(this.options.timeoutMs, () => res.destroy(new Error(`no data from ${url} for ${this.options.timeoutMs} ms`)));
          resolve(res);
        },
      );
      req.on('timeout', () => req.destroy(new Error(`no answer from ${url} within ${this.options.timeoutMs} ms`)));
      req.on('error', reject);
      req.end();
    });
  }
}
