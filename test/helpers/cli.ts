import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { ROOT } from './runtime.js';

export const CLI = join(ROOT, 'dist', 'agent', 'cli.js');

export interface RunningCli {
  readonly child: ChildProcess;
  readonly stdout: () => string;
  readonly stderr: () => string;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Resolves when a log line matching `pattern` appears on stdout. */
  waitFor(pattern: RegExp, timeoutMs?: number): Promise<string>;
}

/** Starts the real compiled CLI (`npm test` builds it first) as a child process. */
export function startCli(args: readonly string[], env: NodeJS.ProcessEnv = {}, nodeArgs: readonly string[] = []): RunningCli {
  const child = spawn(process.execPath, [...nodeArgs, CLI, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  const waiters: { pattern: RegExp; resolve: (line: string) => void }[] = [];
  child.stdout?.on('data', (d: Buffer) => {
    out += d.toString();
    for (const w of [...waiters]) {
      const line = out.split('\n').find((l) => w.pattern.test(l));
      if (line) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(line);
      }
    }
  });
  child.stderr?.on('data', (d: Buffer) => { err += d.toString(); });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  return {
    child, exited, stdout: () => out, stderr: () => err,
    waitFor: (pattern, timeoutMs = 30_000) => new Promise((resolve, reject) => {
      const line = out.split('\n').find((l) => pattern.test(l));
      if (line) return resolve(line);
      const timer = setTimeout(() => reject(new Error(`no log line matching ${pattern} within ${timeoutMs} ms; stdout: ${out.slice(-2000)} stderr: ${err.slice(-2000)}`)), timeoutMs);
      waiters.push({ pattern, resolve: (l) => { clearTimeout(timer); resolve(l); } });
      void exited.then(() => { clearTimeout(timer); reject(new Error(`agent exited before logging ${pattern}; stderr: ${err.slice(-2000)}`)); });
    }),
  };
}

/**
 * The loopback TCP port an agent started with `--listen 127.0.0.1:0` bound, from its "gRPC listening" log line.
 * Port 0 and reading it back, rather than a port probed free beforehand: between the probe and the agent's bind,
 * another suite's connection could take it (EADDRINUSE, seen in a CI run).
 */
export async function boundTcpPort(run: RunningCli, timeoutMs = 60_000): Promise<number> {
  const listening = JSON.parse(await run.waitFor(/"msg":"gRPC listening"/, timeoutMs)) as { listen: string[] };
  const bound = listening.listen.find((a) => a.startsWith('127.0.0.1:'));
  if (!bound) throw new Error(`the agent logged no loopback TCP listener: ${JSON.stringify(listening.listen)}`);
  return Number(bound.slice(bound.lastIndexOf(':') + 1));
}
