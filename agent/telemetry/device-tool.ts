import { spawn as nodeSpawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { holdEventLoop, killGroup } from '../process-group.js';

/** `child_process.spawn`'s shape, injected so tests decide what a device tool prints. */
export type SpawnFn = (command: string, args: readonly string[], options: SpawnOptions) => ChildProcess;

/** A tool's output did not have the expected form; names the tool and the offending text. */
export class DeviceOutputError extends Error {
  constructor(readonly tool: string, problem: string, readonly text: string) {
    super(`${tool}: ${problem}: ${JSON.stringify(text.length > 200 ? `${text.slice(0, 200)}…` : text)}`);
    this.name = 'DeviceOutputError';
  }
}

/** What one collector read: a reading, or why there is none. `missing`: the tool is not on this device. */
export type CollectorResult<T> =
  | { readonly ok: true; readonly value: T }
  | { readonly ok: false; readonly missing: boolean; readonly reason: string };

/**
 * Turns the tool's output lines into readings, one line at a time: returns a reading when the line completes
 * one, undefined while one is still being assembled; throws (DeviceOutputError) for output of another form.
 * A fresh one is made per child, so a restart never continues a half-read block.
 */
export type LineAssembler<T> = (line: string) => T | undefined;

export interface StreamingDeviceToolOptions<T> {
  readonly spawn: SpawnFn;
  readonly command: string;
  /** Including the tool's own interval flag: the tool prints a reading every `intervalMs` on its own. */
  readonly args: readonly string[];
  readonly intervalMs: number;
  /** How long the first reading after a (re)start may take; part of the staleness bound too. */
  readonly timeoutMs: number;
  readonly assembler: () => LineAssembler<T>;
  /** A line longer than this is dropped (a runaway tool must not fill memory). Default 64 KiB. */
  readonly maxLineBytes?: number;
  /** Restart delay after an exit or a stop for silence: doubles from min to max, back to min after a run that long. */
  readonly restartMinMs?: number;
  readonly restartMaxMs?: number;
  /** Monotonic ms (`performance.now`): a clock step must not make a reading look fresh or stale. */
  readonly now?: () => number;
}

/** What a device-tool collector (nvidia-smi, tegrastats) can be told; tests shorten the times. */
export interface CollectorOptions {
  readonly spawn?: SpawnFn;
  readonly command?: string;
  /** The first reading after a (re)start may take this long; readings older than 3 intervals + this are stale. */
  readonly timeoutMs?: number;
  /** How often the tool prints a reading. */
  readonly intervalMs?: number;
  readonly restartMinMs?: number;
  readonly restartMaxMs?: number;
}

/** How often the device tools print a reading: fresh enough for any telemetry interval, cheap to parse. */
export const DEVICE_TOOL_INTERVAL_MS = 1000;

/** A collector's tool options: its own command, arguments (for the interval) and parser, with the options given. */
export function collectorToolOptions<T>(options: CollectorOptions, tool: {
  readonly command: string;
  readonly args: (intervalMs: number) => readonly string[];
  readonly timeoutMs: number;
  readonly assembler: () => LineAssembler<T>;
}): StreamingDeviceToolOptions<T> {
  const intervalMs = options.intervalMs ?? DEVICE_TOOL_INTERVAL_MS;
  return {
    spawn: options.spawn ?? nodeSpawn,
    command: options.command ?? tool.command,
    args: tool.args(intervalMs),
    intervalMs,
    timeoutMs: options.timeoutMs ?? tool.timeoutMs,
    assembler: tool.assembler,
    ...(options.restartMinMs !== undefined ? { restartMinMs: options.restartMinMs } : {}),
    ...(options.restartMaxMs !== undefined ? { restartMaxMs: options.restartMaxMs } : {}),
  };
}

/** After SIGTERM, how long a tool gets before its process group is sent SIGKILL. */
export const KILL_GRACE_MS = 1000;
const STDERR_TAIL = 4096;

interface Latest<T> {
  readonly result: CollectorResult<T>;
  readonly at: number;
}

/**
 * One device tool run once, as a long-lived child printing a reading per interval; `read()` answers with the
 * latest. A process per reading would cost the agent a fork per interval, and fork() copies the page tables
 * synchronously: tens of ms of a stalled event loop at a model-sized RSS.
 *
 * At most one child at a time, in its own process group. A child that stays silent past the staleness bound
 * (3 intervals + the timeout) is stopped: SIGTERM to its group, SIGKILL to the group `KILL_GRACE_MS` later (a
 * hung driver call can ignore SIGTERM); it is restarted only once it has exited, after a backoff that doubles
 * from `restartMinMs` to `restartMaxMs`. A child that exits on its own is restarted the same way. A tool that is
 * not installed (ENOENT/EACCES) is remembered and never started again. `close()` stops it for good.
 */
export class StreamingDeviceTool<T> {
  private readonly maxLineBytes: number;
  private readonly restartMinMs: number;
  private readonly restartMaxMs: number;
  private readonly now: () => number;
  private child: ChildProcess | undefined;
  private spawnedAt = 0;
  private readingsFromChild = 0;
  private lastOutputAt: number | undefined;
  private latest: Latest<T> | undefined;
  /** Why the last child ended, for readings while none runs. */
  private lastEnd: string | undefined;
  private restartTimer: NodeJS.Timeout | undefined;
  private restartDelayMs: number;
  /** The delay of the restart now pending, for readings while it waits. */
  private restartDelayMsPending = 0;
  /** Children this tool has sent SIGTERM (for silence or close). */
  private readonly stopping = new WeakSet<ChildProcess>();
  private missing = false;
  private closed = false;
  private waiters: (() => void)[] = [];

  constructor(private readonly options: StreamingDeviceToolOptions<T>) {
    this.maxLineBytes = options.maxLineBytes ?? 64 * 1024;
    this.restartMinMs = options.restartMinMs ?? 1000;
    this.restartMaxMs = Math.max(this.restartMinMs, options.restartMaxMs ?? 60_000);
    this.restartDelayMs = this.restartMinMs;
    this.now = options.now ?? (() => performance.now());
  }

  get command(): string {
    return this.options.command;
  }

  /** True once the tool was found not installed. */
  get absent(): boolean {
    return this.missing;
  }

  /** The running child's pid, if one runs. */
  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** A reading older than this is not answered; a child silent for this long is stopped. */
  get staleMs(): number {
    return 3 * this.options.intervalMs + this.options.timeoutMs;
  }

  /**
   * The latest reading if fresh; starts the tool on the first call and then waits up to the timeout for its
   * first reading (so the first telemetry record has one). Never rejects.
   */
  async read(): Promise<CollectorResult<T>> {
    if (this.missing) return this.missingResult();
    if (this.closed) return { ok: false, missing: false, reason: `${this.command}: stopped` };
    if (!this.child && !this.restartTimer) this.start();
    const fresh = this.fresh();
    if (fresh) return fresh;
    const child = this.child;
    if (child && this.readingsFromChild === 0) {
      const left = this.spawnedAt + this.options.timeoutMs - this.now();
      if (left > 0) await this.nextEvent(left);
      if (this.missing) return this.missingResult();
      const first = this.fresh();
      if (first) return first;
    }
    return { ok: false, missing: false, reason: this.whyNoReading() };
  }

  /** Stops the child (group SIGTERM, SIGKILL after the grace) and starts none again; resolves once it exited. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.restartTimer = undefined;
    this.wake();
    const child = this.child;
    if (!child) return;
    const exited = new Promise<void>((resolve) => {
      // A child stuck in the kernel may outlive SIGKILL for a while; the agent's shutdown does not wait for it.
      const timer = setTimeout(resolve, KILL_GRACE_MS + 1000);
      child.once('close', () => { clearTimeout(timer); resolve(); });
    });
    this.stopping.add(child);
    terminate(child);
    await exited;
  }

  private missingResult(): CollectorResult<T> {
    return { ok: false, missing: true, reason: `${this.command} not found` };
  }

  private fresh(): CollectorResult<T> | undefined {
    const latest = this.latest;
    return latest && this.now() - latest.at <= this.staleMs ? latest.result : undefined;
  }

  /** Why there is no fresh reading; stops a child that has been silent past the staleness bound. */
  private whyNoReading(): string {
    const child = this.child;
    const now = this.now();
    if (!child) {
      const end = this.lastEnd ?? `${this.command}: not running`;
      return this.restartTimer ? `${end}; restarting in ${this.restartDelayMsPending} ms` : end;
    }
    const silentMs = now - (this.lastOutputAt ?? this.spawnedAt);
    if (silentMs > this.staleMs) {
      if (child.exitCode === null && child.signalCode === null && !this.stopping.has(child)) {
        this.stopping.add(child);
        terminate(child);
      }
      return `${this.command}: no output for ${(silentMs / 1000).toFixed(1)} s (pid ${child.pid ?? '?'}); stopped, restarted once it has exited`;
    }
    if (this.readingsFromChild === 0 && this.lastOutputAt === undefined) {
      return `${this.command}: no output within ${this.options.timeoutMs} ms of its start (pid ${child.pid ?? '?'})`;
    }
    return `${this.command}: no complete reading for ${((now - (this.latest?.at ?? this.spawnedAt)) / 1000).toFixed(1)} s (pid ${child.pid ?? '?'})`;
  }

  private start(): void {
    if (this.child || this.closed || this.missing) return;
    let child: ChildProcess;
    try {
      // Own process group, so a stop reaches the tool's children too (a wrapper script, `sh -c`).
      child = this.options.spawn(this.command, this.options.args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    } catch (err) {
      this.spawnFailed(err);
      return;
    }
    this.child = child;
    this.spawnedAt = this.now();
    this.readingsFromChild = 0;
    this.lastOutputAt = undefined;
    // Neither the child nor its pipes hold the agent's event loop: close() stops it, and a tool outliving an
    // agent that died dies itself of SIGPIPE on its next line.
    holdEventLoop(child, false);
    const assemble = this.options.assembler();
    let partial = '';
    let dropping = false;
    let stderr = '';
    child.stdout?.setEncoding('utf8');
    child.stderr?.setEncoding('utf8');
    child.stdout?.on('data', (chunk: string) => {
      if (this.child !== child) return;
      this.lastOutputAt = this.now();
      let text = partial + chunk;
      for (let nl = text.indexOf('\n'); nl >= 0; nl = text.indexOf('\n')) {
        const line = text.slice(0, nl);
        text = text.slice(nl + 1);
        if (dropping) dropping = false;
        else this.accept(assemble, line);
      }
      if (text.length > this.maxLineBytes) {
        // Drop it and everything up to its newline; keep reading what follows.
        dropping = true;
        text = '';
        this.lineTooLong();
      }
      partial = text;
    });
    child.stderr?.on('data', (chunk: string) => { stderr = (stderr + chunk).slice(-STDERR_TAIL); });
    child.once('error', (err) => {
      // A spawn that failed (ENOENT) emits 'error' and no 'exit'/'close'; other errors (a failed kill) are not an end.
      if (child.pid === undefined && this.child === child) this.spawnFailed(err);
    });
    child.once('exit', () => {
      // Members the tool left in its group (a wrapper's children) are not to outlive it; they also hold the pipes.
      if (child.pid !== undefined) killGroup(child.pid, 'SIGKILL');
    });
    child.once('close', (code, signal) => {
      if (this.child !== child) return;
      this.child = undefined;
      const how = this.stopping.has(child) ? `stopped (${signal ?? code})` : `exited with ${code ?? signal}`;
      const said = (stderr || partial).trim().slice(0, 300);
      this.lastEnd = `${this.command} (pid ${child.pid ?? '?'}) ${how}${said ? `: ${said}` : ''}`;
      // Back to the shortest delay only after a long run: a tool that prints a line and dies each time would
      // otherwise cost a fork every few seconds, the very stall this class avoids.
      if (this.now() - this.spawnedAt >= this.restartMaxMs) this.restartDelayMs = this.restartMinMs;
      this.scheduleRestart();
      this.wake();
    });
  }

  private accept(assemble: LineAssembler<T>, raw: string): void {
    const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    if (line.trim() === '') return;
    if (line.length > this.maxLineBytes) {
      this.lineTooLong();
      return;
    }
    try {
      const value = assemble(line);
      if (value === undefined) return;
      this.readingsFromChild += 1;
      this.record({ ok: true, value });
    } catch (err) {
      this.readingsFromChild += 1;
      this.record({ ok: false, missing: false, reason: err instanceof Error ? err.message : String(err) });
    }
  }

  private lineTooLong(): void {
    this.record({ ok: false, missing: false, reason: `${this.command}: a line longer than ${this.maxLineBytes} bytes, dropped` });
  }

  private record(result: CollectorResult<T>): void {
    this.latest = { result, at: this.now() };
    this.wake();
  }

  private spawnFailed(err: unknown): void {
    this.child = undefined;
    const code = (err as { code?: unknown } | null)?.code;
    if (code === 'ENOENT' || code === 'EACCES') this.missing = true;
    else {
      this.lastEnd = `${this.command}: ${err instanceof Error ? err.message : String(err)}`;
      this.scheduleRestart();
    }
    this.wake();
  }

  private scheduleRestart(): void {
    if (this.closed || this.missing || this.restartTimer) return;
    const delay = this.restartDelayMs;
    this.restartDelayMsPending = delay;
    this.restartDelayMs = Math.min(this.restartMaxMs, delay * 2);
    this.restartTimer = setTimeout(() => {
      this.restartTimer = undefined;
      this.start();
    }, delay);
    this.restartTimer.unref();
  }

  /** Resolves on the next reading, end or error of the tool, or after `ms`. */
  private nextEvent(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => { clearTimeout(timer); resolve(); };
      // Ref'd: a read in progress keeps the process alive until it has its answer (at most `ms`).
      const timer = setTimeout(() => { this.waiters = this.waiters.filter((w) => w !== done); resolve(); }, ms);
      this.waiters.push(done);
    });
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }
}

/** SIGTERM to the tool's process group now, SIGKILL to it a little later (unref'd: it never holds the agent up). */
function terminate(child: ChildProcess): void {
  const pid = child.pid;
  if (pid === undefined) return;
  killGroup(pid, 'SIGTERM');
  // Also when the leader has exited: children it left in the group (a wrapper's tool) may ignore SIGTERM.
  // Linux does not hand out a pid again while a group of that id has members; an empty group is ESRCH.
  setTimeout(() => killGroup(pid, 'SIGKILL'), KILL_GRACE_MS).unref();
}

