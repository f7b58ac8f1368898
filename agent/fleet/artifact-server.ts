import { createReadStream } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { MqttClient } from 'mqtt';
import { errorMessage } from '../errors.js';
import { sha256File, sleep } from './file-io.js';

/** The fleet manager's side of artifact transfer: answering chunk requests over MQTT, and HTTP with Range. */
export interface ServedArtifact {
  readonly sha256: string;
  readonly size: number;
  readonly path: string;
  /** Chunk size used when a request does not carry `chunk_size`. */
  readonly chunkSize?: number;
}

export async function describeArtifact(path: string, chunkSize?: number): Promise<ServedArtifact> {
  const [sha256, st] = await Promise.all([sha256File(path), stat(path)]);
  return { sha256, size: st.size, path, ...(chunkSize !== undefined ? { chunkSize } : {}) };
}

export interface MqttArtifactServerOptions {
  readonly client: MqttClient;
  readonly topicPrefix?: string;
  /** Bytes per second over all chunks (simulates a thin link); unlimited when absent. */
  readonly bytesPerSecond?: number;
  /** Awaited before each chunk is sent (tests gate the transfer with it). */
  readonly beforeSend?: (sha256: string, index: number) => Promise<void> | void;
}

export interface ChunkRequestLog {
  readonly sha256: string;
  readonly deviceId: string;
  readonly chunks: readonly number[];
}

const TOPIC_LEVELS = /^[A-Za-z0-9_.:/-]{1,512}$/;

/**
 * Answers `{prefix}/artifacts/{sha256}/request` with each asked-for chunk on `{reply_to}/{index}` (QoS 1, raw
 * bytes), reading only that chunk from disk. Requests for unknown artifacts or outside the artifact are ignored.
 */
export class MqttArtifactServer {
  readonly requests: ChunkRequestLog[] = [];
  /** How many times each (sha256, index) was asked for. */
  readonly askedFor = new Map<string, number>();
  chunksSent = 0;
  /** Chunks that could not be answered (the artifact's file unreadable, a hold that failed), newest last. */
  readonly sendFailures: { readonly sha256: string; readonly index: number; readonly error: string }[] = [];
  private readonly artifacts = new Map<string, ServedArtifact>();
  private readonly queue: { artifact: ServedArtifact; replyTo: string; index: number; chunkSize: number }[] = [];
  private readonly queuedKeys = new Set<string>();
  private pumping = false;
  private closed = false;
  private readonly prefix: string;
  private readonly onMessage = (topic: string, payload: Buffer): void => this.handle(topic, payload);

  constructor(private readonly options: MqttArtifactServerOptions) {
    this.prefix = options.topicPrefix ?? 'edge';
  }

  add(artifact: ServedArtifact): void {
    this.artifacts.set(artifact.sha256, artifact);
  }

  async start(): Promise<void> {
    this.options.client.on('message', this.onMessage);
    await this.options.client.subscribeAsync(`${this.prefix}/artifacts/+/request`, { qos: 1 });
  }

  close(): void {
    this.closed = true;
    this.options.client.off('message', this.onMessage);
    this.queue.length = 0;
  }

  /** Chunks asked for more than once, summed over all artifacts. */
  get rerequests(): number {
    let n = 0;
    for (const c of this.askedFor.values()) n += Math.max(0, c - 1);
    return n;
  }

  private handle(topic: string, payload: Buffer): void {
    const m = new RegExp(`^${this.prefix.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/artifacts/([0-9a-f]{64})/request$`).exec(topic);
    if (!m || this.closed) return;
    const sha256 = m[1] as string;
    const artifact = this.artifacts.get(sha256);
    if (!artifact) return;
    let req: { device_id?: unknown; reply_to?: unknown; chunks?: unknown; chunk_size?: unknown };
    try {
      req = JSON.parse(payload.toString('utf8')) as typeof req;
    } catch {
      return;
    }
    if (typeof req.reply_to !== 'string' || !TOPIC_LEVELS.test(req.reply_to) || !Array.isArray(req.chunks)) return;
    const chunkSize = typeof req.chunk_size === 'number' && Number.isSafeInteger(req.chunk_size) && req.chunk_size > 0 ? req.chunk_size : artifact.chunkSize;
    if (chunkSize === undefined) return;
    const total = Math.ceil(artifact.size / chunkSize);
    const chunks = req.chunks.filter((i): i is number => Number.isSafeInteger(i) && (i as number) >= 0 && (i as number) < total);
    this.requests.push({ sha256, deviceId: typeof req.device_id === 'string' ? req.device_id : '', chunks });
    for (const index of chunks) {
      const key = `${sha256}:${index}`;
      this.askedFor.set(key, (this.askedFor.get(key) ?? 0) + 1);
      const qkey = `${req.reply_to}:${index}`;
      if (this.queuedKeys.has(qkey)) continue;
      this.queuedKeys.add(qkey);
      this.queue.push({ artifact, replyTo: req.reply_to, index, chunkSize });
    }
    void this.pump();
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.queue.length > 0 && !this.closed) {
        const job = this.queue.shift();
        if (!job) break;
        this.queuedKeys.delete(`${job.replyTo}:${job.index}`);
        const start = job.index * job.chunkSize;
        const length = Math.min(job.chunkSize, job.artifact.size - start);
        try {
          await this.options.beforeSend?.(job.artifact.sha256, job.index);
          // A hold may outlast close() (and the artifact's file): nothing more is sent then.
          if (this.closed) break;
          const buf = Buffer.alloc(length);
          const fh = await open(job.artifact.path, 'r');
          try {
            await fh.read(buf, 0, length, start);
          } finally {
            await fh.close();
          }
          this.options.client.publish(`${job.replyTo}/${job.index}`, buf, { qos: 1 });
          this.chunksSent += 1;
        } catch (err) {
          // The device asks again for what it does not get; one unreadable chunk must not stop the others.
          this.sendFailures.push({ sha256: job.artifact.sha256, index: job.index, error: errorMessage(err) });
          continue;
        }
        if (this.options.bytesPerSecond) await sleep((length / this.options.bytesPerSecond) * 1000);
      }
    } finally {
      this.pumping = false;
    }
  }
}

export interface HttpArtifactServerOptions {
  readonly host?: string;
  readonly port?: number;
  /** Bytes per second per response (simulates a thin link); unlimited when absent. */
  readonly bytesPerSecond?: number;
}

/** Serves `/artifacts/{sha256}` with single-range `Range` support (206, Content-Range; 416 past the end). */
export class HttpArtifactServer {
  /** The Range header of every request (undefined: none), for tests and logs. */
  readonly ranges: (string | undefined)[] = [];
  bytesSent = 0;
  private readonly artifacts = new Map<string, ServedArtifact>();
  private readonly server: Server;

  constructor(private readonly options: HttpArtifactServerOptions = {}) {
    this.server = createServer((req, res) => void this.handle(req, res));
  }

  add(artifact: ServedArtifact): void {
    this.artifacts.set(artifact.sha256, artifact);
  }

  async start(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.options.port ?? 0, this.options.host ?? '127.0.0.1', () => resolve());
    });
  }

  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  urlFor(sha256: string): string {
    return `http://${this.options.host ?? '127.0.0.1'}:${this.port}/artifacts/${sha256}`;
  }

  /** Cuts every open connection (a dropped link mid-transfer). */
  cutConnections(): void {
    this.server.closeAllConnections();
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const m = /^\/artifacts\/([0-9a-f]{64})$/.exec(req.url ?? '');
    const artifact = m ? this.artifacts.get(m[1] as string) : undefined;
    if (!artifact || (req.method !== 'GET' && req.method !== 'HEAD')) {
      res.writeHead(404).end();
      return;
    }
    const range = req.headers.range;
    this.ranges.push(range);
    let start = 0;
    let end = artifact.size - 1;
    if (range !== undefined) {
      const r = /^bytes=(\d+)-(\d*)$/.exec(range);
      if (!r) {
        res.writeHead(416, { 'content-range': `bytes */${artifact.size}` }).end();
        return;
      }
      start = Number(r[1]);
      if (r[2] !== '') end = Math.min(end, Number(r[2]));
      if (start >= artifact.size || start > end) {
        res.writeHead(416, { 'content-range': `bytes */${artifact.size}` }).end();
        return;
      }
      res.writeHead(206, { 'content-type': 'application/octet-stream', 'content-length': end - start + 1, 'content-range': `bytes ${start}-${end}/${artifact.size}`, 'accept-ranges': 'bytes' });
    } else {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': artifact.size, 'accept-ranges': 'bytes' });
    }
    if (req.method === 'HEAD') {
      res.end();
      return;
    }
    const stream = createReadStream(artifact.path, { start, end, highWaterMark: 16 * 1024 });
    try {
      for await (const piece of stream as AsyncIterable<Buffer>) {
        if (res.destroyed) break;
        res.write(piece);
        this.bytesSent += piece.length;
        if (this.options.bytesPerSecond) await sleep((piece.length / this.options.bytesPerSecond) * 1000);
        // Checked after the pause: a 'drain' that fired during it must not be waited for again.
        if (res.writableNeedDrain && !res.destroyed) await new Promise<void>((resolve) => { res.once('drain', resolve); res.once('close', resolve); });
      }
      res.end();
    } catch {
      res.destroy();
    } finally {
      stream.destroy();
    }
  }
}
