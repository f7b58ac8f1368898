import type { ChildProcess, SpawnOptions } from 'node:child_process';

/** `child_process.spawn`'s shape, injected so tests decide what a device tool prints. */
export type SpawnFn = (command: string, args: readonly string[], options: SpawnOptions) => ChildProcess;

/** A tool's output did not have the expected form; names the tool and the offending text. */
export class DeviceOutputError extends Error {
  constructor(readonly tool: string, problem: string, readonly text: string) {
    super(`${tool}: ${problem}: ${JSON.stringify(text.length > 200 ? `${text.slice(0, 200)}…` : text)}`);
    this.name = 'DeviceOutputError';
  }
}

export type ToolResult =
  | { readonly ok: true; readonly stdout: string }
  /** `missing`: the tool is not installed (ENOENT/EACCES); collectors stop trying it. */
  | { readonly ok: false; readonly missing: boolean; readonly reason: string };

export interface RunToolOptions {
  readonly timeoutMs: number;
  /** Resolve with the first complete line and stop the tool (for tools that print forever, like tegrastats). */
  readonly firstLineOnly?: boolean;
  /** Output beyond this is an error (a runaway tool must not fill memory). */
  readonly maxBytes?: number;
}

/** After SIGTERM, how long a tool gets before its process group is sent SIGKILL. */
export const KILL_GRACE_MS = 1000;

/**
 * One device tool, run at most once at a time. A run that times out (or prints too much) is stopped: SIGTERM to
 * its process group, SIGKILL to the group `KILL_GRACE_MS` later (a hung driver call can ignore SIGTERM). Until
 * the previous child has exited, `run` starts nothing and answers "still running": a tool stuck in the kernel
 * must not gain a sibling every interval.
 */
export class DeviceTool {
  private child: ChildProcess | undefined;

  constructor(private readonly spawn: SpawnFn, readonly command: string) {}

  /** True while the last child started has not exited. */
  get running(): boolean {
    return this.child !== undefined;
  }

  /** Runs the tool once; never rejects. */
  run(args: readonly string[], options: RunToolOptions): Promise<ToolResult> {
    const previous = this.child;
    if (previous) {
      return Promise.resolve({ ok: false, missing: false, reason: `previous ${this.command} run still running (pid ${previous.pid ?? '?'}), not started again` });
    }
    return runTool(this.spawn, this.command, args, options, (child) => {
      this.child = child;
      const gone = (): void => { if (this.child === child) this.child = undefined; };
      child.once('exit', gone);
      // A spawn that failed (ENOENT) emits 'error' and never 'exit'.
      child.once('error', () => { if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) gone(); });
    });
  }
}

/**
 * Runs a device tool once; never rejects, stops what it started (see DeviceTool). `onSpawn` sees the child
 * (to know when it has exited); prefer DeviceTool, which does not start a run while the last one is alive.
 */
export function runTool(spawn: SpawnFn, command: string, args: readonly string[], options: RunToolOptions, onSpawn?: (child: ChildProcess) => void): Promise<ToolResult> {
  const maxBytes = options.maxBytes ?? 256 * 1024;
  return new Promise<ToolResult>((resolve) => {
    let child: ChildProcess;
    try {
      // Own process group, so a timeout stops the tool's children too (a wrapper script, `sh -c`).
      child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    } catch (err) {
      resolve({ ok: false, missing: isMissing(err), reason: `${command}: ${err instanceof Error ? err.message : String(err)}` });
      return;
    }
    onSpawn?.(child);
    let stdout = '';
    let stderr = '';
    let settled = false;
    const finish = (result: ToolResult): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (child.exitCode === null && child.signalCode === null) stop(child);
      child.stdout?.destroy();
      child.stderr?.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => finish({ ok: false, missing: false, reason: `${command}: no answer within ${options.timeoutMs} ms` }), options.timeoutMs);
    child.stdout?.setEncoding('utf8');
    child.stderr?.setEncoding('utf8');
    child.stdout?.on('data', (chunk: string) => {
      stdout += chunk;
      if (stdout.length > maxBytes) {
        finish({ ok: false, missing: false, reason: `${command}: more than ${maxBytes} bytes of output` });
        return;
      }
      if (options.firstLineOnly) {
        const nl = stdout.indexOf('\n');
        if (nl >= 0) finish({ ok: true, stdout: stdout.slice(0, nl) });
      }
    });
    child.stderr?.on('data', (chunk: string) => { if (stderr.length < 4096) stderr += chunk; });
    child.once('error', (err) => finish({ ok: false, missing: isMissing(err), reason: `${command}: ${err.message}` }));
    child.once('close', (code, signal) => {
      if (code === 0) finish({ ok: true, stdout });
      else if (options.firstLineOnly && stdout.trim() !== '') finish({ ok: true, stdout: stdout.trim().split('\n')[0]! });
      else finish({ ok: false, missing: false, reason: `${command} exited with ${code ?? signal}: ${(stderr || stdout).trim().slice(0, 300)}` });
    });
  });
}

/** SIGTERM to the tool's process group now, SIGKILL to it a little later (unref'd: it never holds the agent up). */
function stop(child: ChildProcess): void {
  signalGroup(child, 'SIGTERM');
  const pid = child.pid;
  if (pid === undefined) return;
  setTimeout(() => {
    // Also when the leader has exited: children it left in the group (a wrapper's tool) may ignore SIGTERM.
    // Linux does not hand out a pid again while a group of that id has members; an empty group is ESRCH.
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {
      // ESRCH: the whole group has exited.
    }
  }, KILL_GRACE_MS).unref();
}

function signalGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  try {
    if (child.pid !== undefined) process.kill(-child.pid, signal);
    else child.kill(signal);
  } catch {
    child.kill(signal);
  }
}

function isMissing(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'ENOENT' || code === 'EACCES';
}
