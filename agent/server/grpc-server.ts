import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, lstatSync, mkdirSync, readFileSync, linkSync, rmSync, type Stats } from 'node:fs';
import type { Http2Server, ServerHttp2Session } from 'node:http2';
import { connect, type Socket } from 'node:net';
import { basename, dirname, join } from 'node:path';
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

/** sun_path's size less its terminating NUL: 108 bytes on Linux, 104 on macOS and the BSDs. */
const UNIX_PATH_MAX = process.platform === 'linux' ? 107 : 103;

/** Whether a process accepts connections on the unix socket at `path`: 'stale' when nothing listens there. */
function probeUnixSocket(path: string): Promise<'listening' | 'stale' | NodeJS.ErrnoException> {
  return new Promise((resolve) => {
    const socket = connect(path);
    socket.once('connect', () => {
      socket.destroy();
      resolve('listening');
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      socket.destroy();
      // ENOENT: removed since it was looked at; nothing to remove either.
      resolve(err.code === 'ECONNREFUSED' || err.code === 'ENOENT' ? 'stale' : err);
    });
  });
}

/** A fresh name next to `path` to bind under before linking into place; undefined if none fits sun_path. */
function stagingPath(path: string): string | undefined {
  const tag = randomBytes(4).toString('hex');
  return [join(dirname(path), `.${basename(path)}.${tag}`), join(dirname(path), `.${tag}`)].find((p) => Buffer.byteLength(p) <= UNIX_PATH_MAX);
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
  /** The socket files this server created, by path: the file found there on stop is removed only if it is one. */
  private readonly ownSockets = new Map<string, { dev: number; ino: number }>();
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
        await this.listenUnix(address);
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

  /**
   * Binds under a temporary name next to the path, then links the socket into place. libuv unlinks the path
   * it bound when the server closes, whatever is there by then: bound directly, this server's stop would
   * remove the socket of an agent started after this one's file was deleted by hand. Only where no temporary
   * name fits in sun_path is the path bound directly.
   */
  private async listenUnix(address: string): Promise<void> {
    const path = address.slice(5);
    const bytes = Buffer.byteLength(path);
    if (bytes > UNIX_PATH_MAX) {
      // bind(2) would cut the path short and create a socket at the truncated path.
      throw new ConfigError(this.o.configSource, 'server.listen', `unix socket path '${path}' is ${bytes} bytes, over the system's limit of ${UNIX_PATH_MAX}: choose a shorter path`);
    }
    mkdirSync(dirname(path), { recursive: true });
    const stale = await this.checkSocketPath(path);
    const staging = stagingPath(path);
    if (!staging && stale) rmSync(path, { force: true });
    const bindPath = staging ?? path;
    await this.bind(`unix:${bindPath}`, grpc.ServerCredentials.createInsecure(), address);
    // Mode and owner before the link: the socket appears at its path with them.
    chmodSync(bindPath, this.o.unixSocketMode);
    if (this.o.unixSocketOwner !== undefined || this.o.unixSocketGroup !== undefined) {
      const uid = this.o.unixSocketOwner !== undefined ? resolveId('passwd', this.o.unixSocketOwner, this.o.configSource, 'server.unix_socket_owner') : -1;
      const gid = this.o.unixSocketGroup !== undefined ? resolveId('group', this.o.unixSocketGroup, this.o.configSource, 'server.unix_socket_group') : -1;
      chownSync(bindPath, uid, gid);
    }
    if (staging) {
      // A link, not a rename: it fails if another agent put its socket there since the probe (two starting at
      // once), where a rename would silently take the path from it.
      if (stale) rmSync(path, { force: true });
      try {
        linkSync(staging, path);
      } catch (err) {
        const inUse = (err as NodeJS.ErrnoException).code === 'EEXIST';
        throw new ConfigError(this.o.configSource, 'server.listen', inUse
          ? `unix socket '${path}' was taken by another process while this agent started (another edge-agent?)`
          : `cannot put the socket in place at '${path}': ${(err as Error).message}`);
      } finally {
        rmSync(staging, { force: true });
      }
    }
    const created = lstatSync(path);
    this.ownSockets.set(path, { dev: created.dev, ino: created.ino });
  }

  /**
   * What is at a unix socket path before binding it: nothing (false), or a socket file left by a killed agent
   * (true; it is replaced). A socket a running process listens on (another agent on the same config) stays,
   * and so does anything that is not a socket: this server does not start.
   */
  private async checkSocketPath(path: string): Promise<boolean> {
    let found: Stats;
    try {
      found = lstatSync(path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw new ConfigError(this.o.configSource, 'server.listen', `cannot inspect '${path}': ${(err as Error).message}`);
    }
    if (!found.isSocket()) throw new ConfigError(this.o.configSource, 'server.listen', `'${path}' exists and is not a unix socket: remove it or choose another path`);
    const probe = await probeUnixSocket(path);
    if (probe === 'listening') {
      throw new ConfigError(this.o.configSource, 'server.listen', `unix socket '${path}' is in use by a running process (another edge-agent?): stop it or choose another path`);
    }
    if (probe !== 'stale') {
      throw new ConfigError(this.o.configSource, 'server.listen', `cannot tell whether unix socket '${path}' is in use (${probe.code ?? probe.message}): remove it if no process listens on it`);
    }
    return true;
  }

  private bind(address: string, creds: grpc.ServerCredentials, shownAs = address): Promise<number> {
    return new Promise((resolve, reject) => {
      this.server.bindAsync(address, creds, (err, port) => {
        if (err) reject(new ConfigError(this.o.configSource, 'server.listen', `cannot listen on '${shownAs}': ${err.message}`));
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
    // Only the file this server created (libuv removed only the temporary name it was bound under): another
    // process may have bound the path since this one's file was removed by hand.
    for (const [path, own] of this.ownSockets) {
      try {
        const now = lstatSync(path);
        if (now.dev === own.dev && now.ino === own.ino) rmSync(path, { force: true });
      } catch {
        // Already gone.
      }
    }
    this.ownSockets.clear();
  }
}
