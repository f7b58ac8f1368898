import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { EdgeAgentClient, type FrameResult, type SensorStreamHandle } from '../../agent/client/index.js';
import type { Tensor } from '../../agent/runtime/index.js';
import { boundTcpPort, startCli, type RunningCli } from './cli.js';

// The real agent (the compiled CLI) as a child process with a fleet section, for the end-to-end suites in
// test/e2e: it can be killed with SIGKILL and restarted on the same data dir, config and gRPC port.

type Teardown = { teardown(fn: () => void | Promise<void>): void };

/** One pino line of the agent's stdout. */
export interface LogLine {
  readonly level: number;
  readonly msg: string;
  readonly [key: string]: unknown;
}

export interface AgentProcessOptions {
  /** Holds agent.yaml, the data dir (`var/`) and the unix socket; kept across restarts. */
  readonly dir: string;
  readonly repo: string;
  /** The `fleet:` section (omitted: stand-alone). */
  readonly fleet?: Record<string, unknown>;
  /** Merged into `telemetry:`; `http.port` is 0 unless given. */
  readonly telemetry?: Record<string, unknown>;
  readonly runtime?: Record<string, unknown>;
}

/** The agent's config as a file (YAML is a superset of JSON, so JSON is written). */
function writeConfig(o: AgentProcessOptions): string {
  const file = join(o.dir, 'agent.yaml');
  const t = o.telemetry ?? {};
  const config = {
    model_repository: o.repo,
    data_dir: join(o.dir, 'var'),
    log: { level: 'info' },
    runtime: { execution_providers: ['cpu'], ...o.runtime },
    // Port 0: suites run in parallel, and 8002 belongs to a real agent. The bound port is in the log.
    telemetry: { ...t, http: { port: 0, ...(t.http as object | undefined) }, device: { nvidia_smi: false, tegrastats: false, ...(t.device as object | undefined) } },
    ...(o.fleet ? { fleet: o.fleet } : {}),
  };
  writeFileSync(file, JSON.stringify(config, null, 2));
  return file;
}

export class AgentProcess {
  private constructor(
    readonly options: AgentProcessOptions,
    readonly port: number,
    readonly run: RunningCli,
  ) {}

  /** Starts the agent and waits for `edge-agent ready`. */
  static async start(t: Teardown, options: AgentProcessOptions, port?: number): Promise<AgentProcess> {
    mkdirSync(options.dir, { recursive: true });
    const file = writeConfig(options);
    // The first start binds port 0 and reads the port back; a restart asks for the same port again.
    const run = startCli(['serve', '--config', file, '--listen', `127.0.0.1:${port ?? 0}`, '--listen', `unix:${join(options.dir, 'agent.sock')}`]);
    t.teardown(() => { if (run.child.exitCode === null && run.child.signalCode === null) run.child.kill('SIGKILL'); });
    const bound = await boundTcpPort(run);
    await run.waitFor(/"msg":"edge-agent ready"/, 60_000);
    return new AgentProcess(options, bound, run);
  }

  /** A new process on the same config, data dir and port (after `kill()` or `stop()`). */
  restart(t: Teardown): Promise<AgentProcess> {
    return AgentProcess.start(t, this.options, this.port);
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  get dataDir(): string {
    return join(this.options.dir, 'var');
  }

  get alive(): boolean {
    return this.run.child.exitCode === null && this.run.child.signalCode === null;
  }

  /** Every JSON log line so far. */
  logs(): LogLine[] {
    const out: LogLine[] = [];
    for (const line of this.run.stdout().split('\n')) {
      if (!line.startsWith('{')) continue;
      try {
        out.push(JSON.parse(line) as LogLine);
      } catch {
        // A line cut by a SIGKILL.
      }
    }
    return out;
  }

  /** The first log line with this message (and matching `where`), waiting for it. */
  async waitForLog(msg: string, where: (l: LogLine) => boolean = () => true, timeoutMs = 30_000): Promise<LogLine> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const found = this.logs().find((l) => l.msg === msg && where(l));
      if (found) return found;
      if (!this.alive) throw new Error(`agent exited before logging '${msg}'; stderr: ${this.run.stderr().slice(-2000)}`);
      if (Date.now() > until) throw new Error(`no '${msg}' log line within ${timeoutMs} ms; stdout: ${this.run.stdout().slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Base URL of the telemetry listener (`/metrics`, `/v1/status`), from its log line. */
  async httpUrl(): Promise<string> {
    const line = await this.waitForLog('telemetry HTTP listener ready');
    return String(line.url);
  }

  client(t: Teardown): EdgeAgentClient {
    const c = new EdgeAgentClient({ address: this.address });
    t.teardown(() => c.close());
    return c;
  }

  /** SIGKILL, as a crash or the OOM killer would end it. */
  async kill(): Promise<void> {
    if (!this.alive) return;
    this.run.child.kill('SIGKILL');
    await this.run.exited;
  }

  /** SIGTERM, the graceful stop; resolves with the exit code. */
  async stop(): Promise<number | null> {
    if (!this.alive) return (await this.run.exited).code;
    this.run.child.kill('SIGTERM');
    return (await this.run.exited).code;
  }
}

/** A `tiny` frame (x float32 [1,1024]) filled with `value`. */
export function tinyFrame(value = 0.25): Tensor {
  return { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(value) };
}

export interface FramePump {
  readonly results: FrameResult[];
  /** Frames written so far. */
  readonly sent: () => number;
  /** Stops sending, ends the stream and waits for every result (or the stream's error). */
  stop(): Promise<void>;
  /** Resolves once `n` more results have arrived. */
  waitForMore(n: number, timeoutMs?: number): Promise<void>;
  /** The error the stream ended with, if any. */
  readonly error: () => unknown;
}

/**
 * Streams frames continuously on one native stream, keeping at most `window` frames in flight and pausing
 * `pauseMs` after each send, until stopped. Every frame is answered in order; the results keep their version,
 * so a test can see the switch.
 */
export function pumpFrames(stream: SensorStreamHandle, frame: () => Record<string, Tensor>, window = 4, pauseMs = 2): FramePump {
  const results: FrameResult[] = [];
  let seq = 0;
  let running = true;
  let error: unknown;
  let wake: (() => void) | undefined;
  const waiters: { count: number; resolve: () => void }[] = [];
  const reader = (async () => {
    try {
      for await (const r of stream.results()) {
        results.push(r);
        wake?.();
        for (const w of [...waiters]) if (results.length >= w.count) { waiters.splice(waiters.indexOf(w), 1); w.resolve(); }
      }
    } catch (err) {
      error = err;
    } finally {
      running = false;
      wake?.();
    }
  })();
  const writer = (async () => {
    while (running) {
      if (seq - results.length >= window) {
        await new Promise<void>((r) => { wake = r; });
        wake = undefined;
        continue;
      }
      await stream.send({ seq: seq++, inputs: frame() });
      // A steady stream, not a flood: the suites share two cores with the agent they test.
      if (pauseMs > 0) await new Promise((r) => setTimeout(r, pauseMs));
    }
  })();
  let stopping: Promise<void> | undefined;
  return {
    results,
    sent: () => seq,
    error: () => error,
    stop() {
      stopping ??= (async () => {
        running = false;
        wake?.();
        await writer;
        stream.end();
        await reader;
      })();
      return stopping;
    },
    waitForMore(n, timeoutMs = 30_000) {
      const count = results.length + n;
      return new Promise((resolve, reject) => {
        if (results.length >= count) return resolve();
        const timer = setTimeout(() => reject(new Error(`fewer than ${n} more results within ${timeoutMs} ms (${results.length} so far; stream error: ${String(error)})`)), timeoutMs);
        waiters.push({ count, resolve: () => { clearTimeout(timer); resolve(); } });
      });
    },
  };
}

/** Consecutive repeats collapsed: the sequence of versions a stream saw. */
export function versionRuns(versions: readonly number[]): number[] {
  return versions.filter((v, i) => i === 0 || versions[i - 1] !== v);
}
