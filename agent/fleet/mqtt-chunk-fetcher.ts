import { stat } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import type { ChunkMap, DownloadRecord } from '../store/index.js';
import { errorMessage } from '../errors.js';
import { openForWrite } from './file-io.js';
import type { FleetLogger } from './fleet-logger.js';
import { ManifestRejection } from './manifest.js';
import type { MqttLink } from './mqtt-link.js';

export interface ChunkFetchOptions {
  readonly window: number;
  readonly chunkTimeoutMs: number;
}

export interface ChunkFetchStats {
  readonly totalChunks: number;
  /** Chunks already durable when this fetch began (a resumed download). */
  readonly resumedChunks: number;
  /** Distinct chunks asked for by this fetch. */
  readonly requestedChunks: number;
  /** Extra requests for chunks already asked for (after a timeout or a reconnect). */
  readonly rerequestedChunks: number;
  readonly duplicateChunks: number;
}

/**
 * Pulls an artifact over MQTT in chunks. A window of chunks is asked for on `{prefix}/artifacts/{sha}/request`;
 * each answer on `{reply_to}/{index}` is written at its offset in the temp file; batches are fdatasync'ed and
 * then recorded in the chunk map, so what the map says is on disk is on disk. Missing chunks of the window are
 * asked for again when nothing arrived for `chunkTimeoutMs` and after every reconnect.
 */
export class MqttChunkFetcher {
  constructor(
    private readonly link: MqttLink,
    private readonly chunks: ChunkMap,
    private readonly options: ChunkFetchOptions,
    private readonly logger: FleetLogger,
  ) {}

  async fetch(rec: DownloadRecord, signal: AbortSignal, onProgress: (bytes: number, total: number) => void): Promise<ChunkFetchStats> {
    const { sha256, size, chunkSize } = rec;
    const total = Math.ceil(size / chunkSize);
    const chunkLength = (i: number): number => (i === total - 1 ? size - i * chunkSize : chunkSize);
    let received = await this.chunks.receivedChunks(sha256);
    const fileSize = await stat(rec.tempPath).then((s) => s.size, () => -1);
    // A recorded chunk must lie inside the file; otherwise the temp file was lost or replaced: start over.
    if (received.size > 0 && [...received].some((i) => i * chunkSize + chunkLength(i) > fileSize)) {
      this.logger.warn({ sha256, temp: rec.tempPath }, 'fleet: partial download does not match its chunk map, starting it over');
      await this.chunks.reset(sha256);
      received = new Set();
    }
    const resumedChunks = received.size;
    const fh: FileHandle = await openForWrite(rec.tempPath);
    const topics = this.link.topics;
    const replyTo = topics.artifactReplyTo(sha256);
    const requestCount = new Map<number, number>();
    const outstanding = new Set<number>();
    const pending = new Set<number>();
    let next = 0;
    let duplicates = 0;
    let lastActivity = performance.now();
    let failure: unknown;
    /** A write failed (disk full, I/O error): chunks after it in the queue were never written either. */
    let writeFailed = false;
    let writeTail: Promise<void> = Promise.resolve();
    let committing: Promise<void> | undefined;
    let commitTimer: NodeJS.Timeout | undefined;
    let finish!: () => void;
    let fail!: (err: unknown) => void;
    const done = new Promise<void>((resolve, reject) => {
      finish = resolve;
      fail = reject;
    });
    // It may fail (a stop's abort) while the subscription is still being set up, before it is awaited: that must
    // not count as an unhandled rejection, which ends the process.
    done.catch(() => undefined);

    const request = (indices: number[]): void => {
      if (indices.length === 0 || !this.link.connected) return;
      for (const i of indices) requestCount.set(i, (requestCount.get(i) ?? 0) + 1);
      const body = JSON.stringify({ device_id: topics.deviceId, reply_to: replyTo, chunks: indices, chunk_size: chunkSize });
      this.link.client.publish(topics.artifactRequest(sha256), body, { qos: 1 }, (err) => {
        if (err) this.logger.debug({ sha256, err: err.message }, 'fleet: chunk request not sent');
      });
    };

    const topUp = (): void => {
      if (failure !== undefined || !this.link.connected) return;
      const free = this.options.window - outstanding.size;
      if (free < Math.max(1, Math.floor(this.options.window / 2)) && outstanding.size > 0) return;
      const ask: number[] = [];
      while (ask.length < free && next < total) {
        const i = next++;
        if (received.has(i) || pending.has(i) || outstanding.has(i)) continue;
        outstanding.add(i);
        ask.push(i);
      }
      request(ask);
    };

    const reaskOutstanding = (): void => {
      lastActivity = performance.now();
      request([...outstanding].sort((a, b) => a - b));
    };

    const commit = (): Promise<void> => {
      if (committing) return committing;
      clearTimeout(commitTimer);
      commitTimer = undefined;
      committing = (async () => {
        await writeTail;
        const batch = [...pending];
        if (batch.length === 0) return;
        await fh.datasync();
        await this.chunks.markReceived(sha256, batch);
        for (const i of batch) {
          pending.delete(i);
          received.add(i);
        }
        let bytes = 0;
        for (const i of received) bytes += chunkLength(i);
        onProgress(bytes, size);
      })().then(
        () => {
          committing = undefined;
          if (received.size === total) finish();
          else if (pending.size > 0) scheduleCommit();
        },
        (err: unknown) => {
          committing = undefined;
          failure = err;
          fail(err);
        },
      );
      return committing;
    };

    const scheduleCommit = (): void => {
      if (pending.size >= Math.max(1, Math.floor(this.options.window / 2)) || received.size + pending.size === total) {
        void commit();
      } else if (!commitTimer) {
        commitTimer = setTimeout(() => void commit(), 250);
      }
    };

    const onChunk = (topic: string, payload: Buffer): void => {
      if (failure !== undefined) return;
      const idxText = topic.slice(replyTo.length + 1);
      if (!/^(0|[1-9][0-9]{0,9})$/.test(idxText)) {
        this.logger.warn({ topic }, 'fleet: chunk topic without a valid index, ignored');
        return;
      }
      const idx = Number(idxText);
      if (idx >= total) {
        this.logger.warn({ topic, total }, 'fleet: chunk index beyond the artifact, ignored');
        return;
      }
      lastActivity = performance.now();
      if (received.has(idx) || pending.has(idx)) {
        duplicates += 1;
        return;
      }
      if (payload.length !== chunkLength(idx)) {
        failure = new ManifestRejection('size mismatch', `size mismatch: chunk ${idx} has ${payload.length} bytes, the manifest's size ${size} and chunk_size ${chunkSize} make it ${chunkLength(idx)}`);
        fail(failure);
        return;
      }
      outstanding.delete(idx);
      pending.add(idx);
      writeTail = writeTail.then(async () => {
        await fh.write(payload, 0, payload.length, idx * chunkSize);
      });
      writeTail.catch((err: unknown) => {
        writeFailed = true;
        if (failure === undefined) {
          failure = err;
          fail(err);
        }
      });
      scheduleCommit();
      topUp();
    };

    const sub = this.link.subscribe(`${replyTo}/+`, onChunk, 1);
    const offConnect = this.link.onConnect(() => {
      this.logger.info({ sha256, outstanding: outstanding.size, received: received.size, total }, 'fleet: reconnected, asking again for missing chunks');
      reaskOutstanding();
      topUp();
    });
    const watchdog = setInterval(() => {
      if (outstanding.size > 0 && performance.now() - lastActivity >= this.options.chunkTimeoutMs) {
        this.logger.info({ sha256, missing: outstanding.size }, 'fleet: chunks timed out, asking again');
        reaskOutstanding();
      } else if (outstanding.size === 0) {
        topUp();
      }
    }, Math.min(this.options.chunkTimeoutMs, 1000));
    const onAbort = (): void => fail(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });

    try {
      if (received.size === total) finish();
      else {
        await sub.ready;
        onProgress([...received].reduce((a, i) => a + chunkLength(i), 0), size);
        topUp();
      }
      await done;
    } finally {
      signal.removeEventListener('abort', onAbort);
      clearInterval(watchdog);
      clearTimeout(commitTimer);
      offConnect();
      sub.unsubscribe();
      await writeTail.catch(() => undefined);
      if (committing) await committing.catch(() => undefined);
      // What was written but not yet recorded is recorded now, so an abort (a superseded deployment, a stop) keeps it.
      if (!writeFailed && (failure === undefined || !(failure instanceof ManifestRejection))) {
        const rest = [...pending];
        if (rest.length > 0) {
          try {
            await fh.datasync();
            await this.chunks.markReceived(sha256, rest);
          } catch (err) {
            this.logger.warn({ sha256, err: errorMessage(err) }, 'fleet: could not record the last chunks');
          }
        }
      }
      await fh.close().catch(() => undefined);
    }
    let rerequested = 0;
    for (const n of requestCount.values()) rerequested += n - 1;
    return { totalChunks: total, resumedChunks, requestedChunks: requestCount.size, rerequestedChunks: rerequested, duplicateChunks: duplicates };
  }
}
