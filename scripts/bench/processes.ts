import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { ROOT } from './workloads.js';

/** A child process whose stdout is read line by line (JSON logs), so the bench can wait for what it announces. */
export class ChildServer {
  private out = '';
  private err = '';
  private readonly lineWaiters: { test: (line: string) => boolean; resolve: (line: string) => void; reject: (e: Error) => void }[] = [];
  readonly exited: Promise<number | null>;
  private exitCode: number | null | undefined;

  constructor(readonly name: string, readonly child: ChildProcess) {
    child.stdout?.setEncoding('utf8');
    child.stderr?.setEncoding('utf8');
    let partial = '';
    child.stdout?.on('data', (d: string) => {
      // Keep a bounded tail for error messages; the pipe must be drained or the child blocks on its logs.
      this.out = (this.out + d).slice(-16_384);
      const lines = (partial + d).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) {
        for (const w of [...this.lineWaiters]) {
          if (!w.test(line)) continue;
          this.lineWaiters.splice(this.lineWaiters.indexOf(w), 1);
          w.resolve(line);
        }
      }
    });
    child.stderr?.on('data', (d: string) => { this.err = (this.err + d).slice(-16_384); });
    this.exited = new Promise((resolve) => child.once('exit', (code) => {
      this.exitCode = code;
      for (const w of this.lineWaiters.splice(0)) w.reject(new Error(`${name} exited (code ${code}) before it was ready; stderr: ${this.err.slice(-3000)} stdout: ${this.out.slice(-2000)}`));
      resolve(code);
    }));
  }

  get pid(): number {
    return this.child.pid as number;
  }

  /** Resolves with the first stdout line (after now) that `test` accepts. */
  waitForLine(test: (line: string) => boolean, timeoutMs: number): Promise<string> {
    if (this.exitCode !== undefined) return Promise.reject(new Error(`${this.name} has exited (code ${this.exitCode}); stderr: ${this.err.slice(-3000)}`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.lineWaiters.splice(this.lineWaiters.findIndex((w) => w.resolve === done), 1);
        reject(new Error(`${this.name}: nothing expected on stdout within ${timeoutMs} ms; stdout: ${this.out.slice(-2000)} stderr: ${this.err.slice(-2000)}`));
      }, timeoutMs);
      const done = (line: string): void => { clearTimeout(timer); resolve(line); };
      this.lineWaiters.push({ test, resolve: done, reject: (e) => { clearTimeout(timer); reject(e); } });
    });
  }

  /** CPU time the process has used, all threads and its main thread (ns, from /proc/PID/task/TID/schedstat). */
  cpuNs(): CpuNs {
    return processCpuNs(this.pid);
  }

  /** Resident set size now, from /proc (kB). */
  rssKb(): number {
    const status = readFileSync(`/proc/${this.pid}/status`, 'utf8');
    const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
    if (!m) throw new Error(`no VmRSS in /proc/${this.pid}/status`);
    return Number(m[1]);
  }

  stderrTail(): string {
    return this.err.slice(-3000);
  }

  stdoutTail(): string {
    return this.out;
  }

  /** SIGTERM, then SIGKILL if it has not exited after `graceMs`. */
  async stop(graceMs = 10_000): Promise<void> {
    if (this.exitCode !== undefined) return;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }
}

export interface CpuNs {
  readonly total: number;
  readonly main: number;
}

/**
 * On-CPU nanoseconds of a process: what a frame costs in CPU, which, unlike latency, another process sharing
 * the cores does not inflate much. The main thread (TID = PID) runs gRPC, the agent's JavaScript and, inline,
 * inference; the rest is worker threads, onnxruntime's pool and libuv.
 */
export function processCpuNs(pid: number): CpuNs {
  let total = 0;
  let main = 0;
  let tids: string[] = [];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return { total: Number.NaN, main: Number.NaN };
  }
  for (const tid of tids) {
    let ns: number;
    try {
      ns = Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      continue; // the thread exited between the listing and the read
    }
    total += ns;
    if (Number(tid) === pid) main = ns;
  }
  return { total, main };
}

function spawnNode(name: string, script: string, args: readonly string[], nodeArgs: readonly string[] = []): ChildServer {
  const child = spawn(process.execPath, [...nodeArgs, script, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env } });
  return new ChildServer(name, child);
}

export interface AgentSpec {
  readonly repo: string;
  readonly providers: readonly string[];
  /** undefined: the agent's default. */
  readonly execution?: 'worker' | 'inline';
  /** Reuse this data dir (graph cache present) instead of a fresh one. */
  readonly dataDir?: string;
  /** Extra node flags for the child (e.g. --cpu-prof). */
  readonly nodeArgs?: readonly string[];
  /** Merged over the bench's agent config (e.g. runtime.provider_options), for investigations. */
  readonly configOverrides?: Readonly<Record<string, unknown>>;
}

type Json = Record<string, unknown>;
function isObject(x: unknown): x is Json {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}

/** Deep merge of plain objects; arrays and scalars in `over` replace. */
export function mergeConfig(base: Json, over: Json): Json {
  const out: Json = { ...base };
  for (const [k, v] of Object.entries(over)) out[k] = isObject(v) && isObject(out[k]) ? mergeConfig(out[k] as Json, v) : v;
  return out;
}

export interface RunningAgent {
  readonly server: ChildServer;
  readonly tcp: string;
  readonly unix: string;
  readonly dataDir: string;
  /** performance.now() when the process was spawned (cold start is measured from here). */
  readonly spawnedAt: number;
  stop(): Promise<void>;
}

/** The compiled CLI; EDGE_BENCH_AGENT_CLI points the bench at another build (to compare a change). */
export const AGENT_CLI = process.env.EDGE_BENCH_AGENT_CLI ?? join(ROOT, 'dist', 'agent', 'cli.js');

/** Starts `edge-agent serve` as a child process on a free loopback port and a unix socket in its data dir. */
export async function startAgent(spec: AgentSpec, spawnedAt: number, timeoutMs = 120_000): Promise<RunningAgent> {
  const ownDataDir = spec.dataDir === undefined;
  const dataDir = spec.dataDir ?? mkdtempSync(join(tmpdir(), 'edge-bench-data-'));
  const configDir = mkdtempSync(join(tmpdir(), 'edge-bench-config-'));
  const configFile = join(configDir, 'agent.yaml');
  const sock = join(dataDir, 'agent.sock');
  writeFileSync(configFile, stringify(mergeConfig({
    runtime: { execution_providers: [...spec.providers], graph_cache: true, ...(spec.execution ? { execution: spec.execution } : {}) },
    log: { level: 'info' },
    // Telemetry stays on (it is part of what a frame costs in a deployed agent), on a free port: several agents
    // run side by side here.
    telemetry: { http: { port: 0 } },
  }, { ...spec.configOverrides })));
  const server = spawnNode('edge-agent', AGENT_CLI, [
    'serve', '--config', configFile, '--model-repository', spec.repo, '--data-dir', dataDir,
    '--listen', '127.0.0.1:0', '--listen', `unix:${sock}`,
  ], spec.nodeArgs);
  const cleanup = (): void => {
    rmSync(configDir, { recursive: true, force: true });
    if (ownDataDir) rmSync(dataDir, { recursive: true, force: true });
  };
  try {
    const listening = server.waitForLine((l) => l.includes('"gRPC listening"'), timeoutMs);
    const ready = server.waitForLine((l) => l.includes('"edge-agent ready"'), timeoutMs);
    const listenLine = JSON.parse(await listening) as { listen: string[] };
    const readyLine = JSON.parse(await ready) as { failed?: string[] };
    if (readyLine.failed && readyLine.failed.length > 0) {
      throw new Error(`edge-agent could not load ${readyLine.failed.join(', ')}; its log:\n${modelLoadErrors(server.stdoutTail())}`);
    }
    const tcp = listenLine.listen.find((a) => !a.startsWith('unix:'));
    if (!tcp) throw new Error(`edge-agent logged no TCP listener: ${JSON.stringify(listenLine)}`);
    return {
      server, tcp, unix: `unix:${sock}`, dataDir, spawnedAt,
      stop: async () => { await server.stop(); cleanup(); },
    };
  } catch (err) {
    await server.stop();
    cleanup();
    throw err;
  }
}

/** Log lines of a failed model load, for the error a bench row reports. */
export function modelLoadErrors(stdoutTail: string): string {
  return stdoutTail.split('\n').filter((l) => /"level":(50|40)/.test(l)).slice(-5).join('\n');
}

export interface ServerHandle {
  readonly server: ChildServer;
  readonly tcp: string;
  readonly unix?: string;
  stop(): Promise<void>;
}

/**
 * Starts a bench helper server, `dist/scripts/bench/<script>.js` (echo-server or naive-server), that prints
 * `{"listening":{"tcp":..., "unix":...}}` when ready; `name` labels it in errors.
 */
export async function startHelperServer(name: string, script: 'echo-server' | 'naive-server', args: readonly string[], timeoutMs = 60_000): Promise<ServerHandle> {
  const server = spawnNode(name, join(ROOT, 'dist', 'scripts', 'bench', `${script}.js`), args);
  try {
    const line = await server.waitForLine((l) => l.startsWith('{"listening"'), timeoutMs);
    const { listening } = JSON.parse(line) as { listening: { tcp: string; unix?: string } };
    return { server, tcp: listening.tcp, ...(listening.unix ? { unix: listening.unix } : {}), stop: () => server.stop() };
  } catch (err) {
    await server.stop();
    throw err;
  }
}
