import { SystemdNotifyCommand, type NotifySender } from './notify-command.js';

export interface SystemdNotifierOptions {
  /** Where NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID are read from. */
  readonly env?: NodeJS.ProcessEnv;
  /** Our pid, compared with WATCHDOG_PID. */
  readonly pid?: number;
  /** How messages travel; `systemd-notify` on NOTIFY_SOCKET by default. */
  readonly sender?: NotifySender;
  /** A message that could not be delivered. The agent keeps running; under systemd a lost READY=1 or
   * WATCHDOG=1 shows up as a start timeout or a watchdog restart, so it should be logged. */
  readonly onError?: (err: Error) => void;
}

/** Longest STATUS= text sent; `systemctl status` shows one line. */
export const MAX_STATUS_CHARS = 200;

/**
 * A single line of status text: control characters (a newline would start a new assignment, so a model name
 * could otherwise smuggle `MAINPID=` or `READY=1` in) become spaces, and it is cut to MAX_STATUS_CHARS.
 */
export function statusText(text: string): string {
  // eslint-disable-next-line no-control-regex
  const flat = text.replace(/[\u0000-\u001f\u007f]+/g, ' ').replace(/ {2,}/g, ' ').trim();
  return flat.length <= MAX_STATUS_CHARS ? flat : `${flat.slice(0, MAX_STATUS_CHARS - 1)}…`;
}

function watchdogInterval(env: NodeJS.ProcessEnv, pid: number): number | undefined {
  const usec = Number(env.WATCHDOG_USEC);
  if (!env.WATCHDOG_USEC || !Number.isSafeInteger(usec) || usec <= 0) return undefined;
  // WATCHDOG_PID names the process the watchdog is meant for; a child that inherited it must not ping.
  if (env.WATCHDOG_PID && Number(env.WATCHDOG_PID) !== pid) return undefined;
  return Math.max(1, Math.floor(usec / 2 / 1000));
}

/**
 * Tells systemd (Type=notify) how the agent is doing: READY=1 once models are warm, WATCHDOG=1 from an
 * event-loop timer at half the watchdog interval (a stalled loop stops the pings and systemd restarts the
 * agent), STATUS= one-line summaries, RELOADING=1 around a config reload and STOPPING=1 on shutdown. Without
 * NOTIFY_SOCKET (not started by systemd) every method does nothing.
 *
 * Messages are sent one at a time in call order; a watchdog ping that finds another one still waiting to be
 * sent is folded into it. No method rejects: failures go to `onError`.
 */
export class SystemdNotifier {
  /** True when started by systemd with a notify socket. */
  readonly enabled: boolean;
  /** How often WATCHDOG=1 is sent (half of WATCHDOG_USEC), undefined when the watchdog is off for us. */
  readonly watchdogIntervalMs: number | undefined;
  private readonly sender: NotifySender | undefined;
  private readonly onError: (err: Error) => void;
  private queue: Promise<void> = Promise.resolve();
  private watchdogQueued = false;
  private timer: NodeJS.Timeout | undefined;
  private lastStatus: string | undefined;

  constructor(options: SystemdNotifierOptions = {}) {
    const env = options.env ?? process.env;
    const socket = env.NOTIFY_SOCKET;
    this.enabled = socket !== undefined && socket !== '';
    this.sender = this.enabled ? options.sender ?? new SystemdNotifyCommand({ socket: socket as string }) : undefined;
    this.watchdogIntervalMs = this.enabled ? watchdogInterval(env, options.pid ?? process.pid) : undefined;
    this.onError = options.onError ?? (() => undefined);
  }

  /** Starts the watchdog pings (when systemd asked for them). */
  start(): void {
    if (this.timer || this.watchdogIntervalMs === undefined) return;
    this.timer = setInterval(() => void this.watchdog(), this.watchdogIntervalMs);
    // The pings must not keep a process that is otherwise done from exiting.
    this.timer.unref();
  }

  /** Startup (or a reload) finished: the agent serves. */
  ready(status?: string): Promise<void> {
    return this.send(['READY=1', ...this.statusLine(status)]);
  }

  /** The agent is reloading its config; follow with `ready()` when done. MONOTONIC_USEC is what systemd ≥ 253
   * matches against the reload it asked for. */
  reloading(status?: string): Promise<void> {
    const monotonicUs = process.hrtime.bigint() / 1000n; // CLOCK_MONOTONIC, the clock systemd compares with
    return this.send(['RELOADING=1', `MONOTONIC_USEC=${monotonicUs}`, ...this.statusLine(status)]);
  }

  /** Shutdown began. */
  stopping(status?: string): Promise<void> {
    return this.send(['STOPPING=1', ...this.statusLine(status)]);
  }

  /** One-line status for `systemctl status`; an unchanged line is not sent again. */
  status(text: string): Promise<void> {
    const line = this.statusLine(text);
    if (line.length === 0) return Promise.resolve();
    return this.send(line);
  }

  /** One watchdog ping (the timer calls this; exposed for a caller that wants to ping after a long step). */
  watchdog(): Promise<void> {
    if (!this.sender || this.watchdogQueued) return this.queue;
    this.watchdogQueued = true;
    return this.enqueue('WATCHDOG=1', () => { this.watchdogQueued = false; });
  }

  /** Stops the pings and waits for messages already queued. */
  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.queue;
    this.sender?.close?.();
  }

  private statusLine(text: string | undefined): string[] {
    if (text === undefined || !this.sender) return [];
    const line = statusText(text);
    if (line === this.lastStatus) return [];
    this.lastStatus = line;
    return [`STATUS=${line}`];
  }

  private send(assignments: readonly string[]): Promise<void> {
    if (!this.sender) return Promise.resolve();
    return this.enqueue(assignments.join('\n'));
  }

  private enqueue(message: string, beforeSend?: () => void): Promise<void> {
    const sender = this.sender as NotifySender;
    this.queue = this.queue.then(() => {
      beforeSend?.();
      return sender.send(message).catch((err: unknown) => {
        try {
          this.onError(err instanceof Error ? err : new Error(String(err)));
        } catch {
          // A failing error handler must not wedge the queue: later messages still go out.
        }
      });
    });
    return this.queue;
  }
}
