import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import type { Http2Server, ServerHttp2Session } from 'node:http2';
import type { Socket } from 'node:net';
import { dirname } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { ConfigError } from '../errors.js';
import type { Logger } from '../logger.js';

export interface ListenerOptions {
  readonly listen: readonly string[];
  readonly maxMessageBytes: number;
  readonly unixSocketMode: number;
  /** Owner/group of unix sockets: names (looked up in /etc/passwd, /etc/group) or numeric ids. */
  readonly unixSocketOwner?: string | undefined;
  readonly unixSocketGroup?: string | undefined;
  /** Keepalive and idle limits; they also close connections a broken HTTP/2 peer left half-open. */
  readonly keepaliveTimeMs?: number;
  readonly keepaliveTimeoutMs?: number;
  readonly maxConnectionIdleMs?: number;
  /** HTTP/2 receive windows per stream and per connection; undefined: HTTP/2's 64 KiB defaults. */
  readonly streamWindowBytes?: number;
  readonly connectionWindowBytes?: number;
  /** Allow plaintext TCP on a non-loopback address. */
  readonly insecure: boolean;
  /** Server credentials for TCP listeners (TLS); undefined = plaintext. */
  readonly tcpCredentials?: grpc.ServerCredentials | undefined;
  readonly configSource: string;
}

export interface BoundAddress {
  readonly address: string;
  /** The port actually bound (useful with port 0), 0 for unix sockets. */
  readonly port: number;
}

/**
 * Transport settings grpc-js has no options for, applied to the http2 servers it created (kept in a private
 * map; returns false if a future grpc-js moves it, and the defaults then stay):
 * - TCP_NODELAY on every connection, as gRPC's C core does. grpc-js sets it on its client sockets but not on
 *   accepted ones, where Nagle's algorithm may hold back a small result written while an earlier one is
 *   unacknowledged. (On the development VM the difference drowned in run-to-run noise.)
 * - The HTTP/2 receive windows. HTTP/2's 64 KiB default covers a whole connection, and large frames from
 *   several streams then trickle in window update by window update.
 * The benchmark's echo floor calls this too, so the floor has the agent's transport.
 */
export function tuneHttp2Sessions(
  server: grpc.Server, o: { readonly streamWindowBytes?: number | undefined; readonly connectionWindowBytes?: number | undefined }, done = new WeakSet<Http2Server>(),
): boolean {
  const servers = (server as unknown as { http2Servers?: unknown }).http2Servers;
  if (!(servers instanceof Map)) return false;
  for (const http2Server of servers.keys() as IterableIterator<Http2Server>) {
    if (done.has(http2Server)) continue;
    done.add(http2Server);
    if (o.streamWindowBytes !== undefined && typeof http2Server.updateSettings === 'function') http2Server.updateSettings({ initialWindowSize: o.streamWindowBytes });
    // The raw socket, before HTTP/2 takes it over (its session only exposes a proxy that refuses this).
    http2Server.on('connection', (socket: Socket) => {
      socket.setNoDelay?.(true); // absent on unix sockets
    });
    if (o.connectionWindowBytes !== undefined) {
      const connection = o.connectionWindowBytes;
      http2Server.on('session', (session: ServerHttp2Session) => {
        try {
          session.setLocalWindowSize(connection);
        } catch {
          // A session already closing: nothing to widen.
        }
      });
    }
  }
  return true;
}

/** A user or group name from /etc/passwd or /etc/group (or a numeric id) as its id. */
export function resolveId(kind: 'passwd' | 'group', nameOrId: string, source: string, key: string): number {
  if (/^\d+$/.test(nameOrId)) return Number(nameOrId);
  const line = readFileSync(`/etc/${kind}`, 'utf8').split('\n').find((l) => l.split(':')[0] === nameOrId);
  const id = line ? Number(line.split(':')[2]) : NaN;
  if (!Number.isInteger(id)) throw new ConfigError(source, key, `no ${kind === 'passwd' ? 'user' : 'group'} named '${nameOrId}' on this system`);
  return id;
}

function isLoopback(address: string): boolean {
  const host = address.replace(/:\d+$/, '').replace(/^\[|\]$/g, '');
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
}

/**
 * The gRPC listeners: TCP and unix sockets carrying the same services. The unix socket is for sensor processes
 * on the same host (no TCP stack, file-permission access control).
 */
export class GrpcListeners {
  readonly server: grpc.Server;
  private bound: BoundAddress[] = [];
  private readonly tuned = new WeakSet<Http2Server>();
  private tuningUnavailable = false;

  constructor(private readonly o: ListenerOptions, private readonly log: Logger) {
    this.server = new grpc.Server({
      'grpc.max_receive_message_length': o.maxMessageBytes,
      'grpc.max_send_message_length': o.maxMessageBytes,
      // A client that opens streams without end meets the per-connection limit before the agent's memory does.
      'grpc.max_concurrent_streams': 1000,
      // Node's http2 answers a bad HPACK block or an oversized frame with GOAWAY but leaves the socket open;
      // keepalive and idle limits close such connections, so a hostile client cannot pile up descriptors.
      'grpc.keepalive_time_ms': o.keepaliveTimeMs ?? 30_000,
      'grpc.keepalive_timeout_ms': o.keepaliveTimeoutMs ?? 10_000,
      'grpc.max_connection_idle_ms': o.maxConnectionIdleMs ?? 300_000,
    });
  }

  addService(definition: grpc.ServiceDefinition, implementation: grpc.UntypedServiceImplementation): void {
    this.server.addService(definition, implementation);
  }

  async start(): Promise<readonly BoundAddress[]> {
    for (const address of this.o.listen) {
      if (address.startsWith('unix:')) {
        const path = address.slice(5);
        mkdirSync(dirname(path), { recursive: true });
        // A socket file left by a killed agent would make bind fail with EADDRINUSE.
        if (existsSync(path) && statSync(path).isSocket()) rmSync(path);
        await this.bind(address, grpc.ServerCredentials.createInsecure());
        chmodSync(path, this.o.unixSocketMode);
        if (this.o.unixSocketOwner !== undefined || this.o.unixSocketGroup !== undefined) {
          const uid = this.o.unixSocketOwner !== undefined ? resolveId('passwd', this.o.unixSocketOwner, this.o.configSource, 'server.unix_socket_owner') : -1;
          const gid = this.o.unixSocketGroup !== undefined ? resolveId('group', this.o.unixSocketGroup, this.o.configSource, 'server.unix_socket_group') : -1;
          chownSync(path, uid, gid);
        }
        this.bound.push({ address, port: 0 });
      } else {
        if (!this.o.tcpCredentials && !isLoopback(address) && !this.o.insecure) {
          throw new ConfigError(this.o.configSource, 'server.listen', `'${address}' is not a loopback address: configure TLS or set server.insecure: true to serve plaintext on it`);
        }
        if (!this.o.tcpCredentials && !isLoopback(address)) this.log.warn({ address }, 'serving plaintext gRPC on a non-loopback address (server.insecure: true)');
        const port = await this.bind(address, this.o.tcpCredentials ?? grpc.ServerCredentials.createInsecure());
        this.bound.push({ address: address.replace(/:0$/, `:${port}`), port });
      }
    }
    this.log.info({ listen: this.bound.map((b) => b.address) }, 'gRPC listening');
    return this.bound;
  }

  private bind(address: string, creds: grpc.ServerCredentials): Promise<number> {
    return new Promise((resolve, reject) => {
      this.server.bindAsync(address, creds, (err, port) => {
        if (err) reject(new ConfigError(this.o.configSource, 'server.listen', `cannot listen on '${address}': ${err.message}`));
        else {
          this.widenWindows();
          resolve(port);
        }
      });
    });
  }

  private widenWindows(): void {
    if (!tuneHttp2Sessions(this.server, this.o, this.tuned) && !this.tuningUnavailable) {
      this.log.warn('cannot reach grpc-js\'s http2 servers: serving with HTTP/2\'s 64 KiB windows and Nagle on TCP');
      this.tuningUnavailable = true;
    }
  }

  get addresses(): readonly BoundAddress[] {
    return this.bound;
  }

  /** Waits for open calls to finish, up to `timeoutMs`, then cuts whatever is left. */
  async stop(timeoutMs: number): Promise<void> {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => { this.server.forceShutdown(); resolve(); }, timeoutMs);
      this.server.tryShutdown(() => { clearTimeout(timer); resolve(); });
    });
    for (const b of this.bound) {
      if (b.address.startsWith('unix:')) rmSync(b.address.slice(5), { force: true });
    }
  }
}
