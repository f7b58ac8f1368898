import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';
import type { Logger } from '../logger.js';
import type { StatusReport } from './status-report.js';

export interface LocalHttpServerOptions {
  /** Default 127.0.0.1: the figures are for the device and its Prometheus, not the network. */
  readonly host?: string;
  /** Default 8002 (Triton's metrics port); 0 picks a free one (tests). */
  readonly port?: number;
  readonly registry: Registry;
  readonly status: () => StatusReport | Promise<StatusReport>;
  readonly logger?: Logger;
  /**
   * A connection that sends nothing for this long is closed, whether it never sent a request, is idle between
   * keep-alive requests, or stalls mid-request (default 30 s; Prometheus scrapes every 15 s or more and asks
   * within milliseconds of connecting). The request headers must also be complete within it.
   */
  readonly idleTimeoutMs?: number;
  /** Connections open at once; more are closed on arrival (default 64: a few scrapers and people, not a crowd). */
  readonly maxConnections?: number;
}

export const DEFAULT_IDLE_TIMEOUT_MS = 30_000;
export const DEFAULT_MAX_CONNECTIONS = 64;

/** `GET /metrics` (Prometheus text exposition 0.0.4) and `GET /v1/status` (JSON) on a local listener. */
export class LocalHttpServer {
  private server: Server | undefined;
  private bound: { host: string; port: number } | undefined;

  constructor(private readonly options: LocalHttpServerOptions) {}

  /** Where it listens, once started. */
  get address(): { host: string; port: number } | undefined {
    return this.bound;
  }

  get url(): string | undefined {
    return this.bound ? `http://${this.bound.host.includes(':') ? `[${this.bound.host}]` : this.bound.host}:${this.bound.port}` : undefined;
  }

  async start(): Promise<{ host: string; port: number }> {
    if (this.bound) return this.bound;
    const host = this.options.host ?? '127.0.0.1';
    const port = this.options.port ?? 8002;
    const idleMs = this.options.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
    // Node's own bounds start with a request's first byte (headersTimeout) or after a response (keepAliveTimeout);
    // the socket timeout also ends connections that never send one, which otherwise hold a descriptor for ever.
    const server = createServer({
      headersTimeout: idleMs,
      requestTimeout: idleMs,
      keepAliveTimeout: Math.min(5000, idleMs),
      connectionsCheckingInterval: Math.max(10, Math.min(30_000, Math.floor(idleMs / 2))),
    }, (req, res) => { void this.handle(req, res); });
    // No 'timeout' listener on the server: Node destroys the silent socket.
    server.setTimeout(idleMs);
    server.maxConnections = this.options.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    let dropped = 0;
    let warnedAt = -Infinity;
    server.on('drop', (data) => {
      dropped += 1;
      // A flood of connections must not become a flood of log lines: one a minute, with the count.
      if (performance.now() - warnedAt < 60_000) return;
      warnedAt = performance.now();
      this.options.logger?.warn({ remote: data?.remoteAddress, max_connections: server.maxConnections, dropped_total: dropped }, 'telemetry HTTP listener at its connection limit: connections closed on arrival');
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => {
        reject(new Error(`telemetry HTTP listener on ${host}:${port}: ${err.code === 'EADDRINUSE' ? 'address already in use (telemetry.http.port)' : err.message}`, { cause: err }));
      });
      server.listen(port, host, () => resolve());
    });
    server.on('error', (err) => this.options.logger?.warn({ err }, 'telemetry HTTP listener error'));
    this.server = server;
    const addr = server.address() as AddressInfo;
    this.bound = { host: addr.address, port: addr.port };
    return this.bound;
  }

  async stop(): Promise<void> {
    const server = this.server;
    if (!server) return;
    this.server = undefined;
    this.bound = undefined;
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0];
    try {
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        send(res, 405, 'application/json', JSON.stringify({ error: `method ${req.method ?? '?'} not allowed; use GET` }), { allow: 'GET, HEAD' });
      } else if (path === '/metrics') {
        const body = await this.options.registry.metrics();
        send(res, 200, this.options.registry.contentType, body);
      } else if (path === '/v1/status') {
        send(res, 200, 'application/json', `${JSON.stringify(await this.options.status())}\n`);
      } else {
        send(res, 404, 'application/json', JSON.stringify({ error: `no such path '${path}'; try /metrics or /v1/status` }));
      }
    } catch (err) {
      this.options.logger?.warn({ err, path }, 'telemetry HTTP request failed');
      send(res, 500, 'application/json', JSON.stringify({ error: err instanceof Error ? err.message : String(err) }));
    }
  }
}

function send(res: ServerResponse, status: number, type: string, body: string, headers: Record<string, string> = {}): void {
  res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(body), 'cache-control': 'no-store', ...headers });
  res.end(res.req.method === 'HEAD' ? undefined : body);
}
