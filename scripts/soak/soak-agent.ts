import { spawn, type ChildProcess } from 'node:child_process';
import { cpSync, createWriteStream, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

// The agent under soak as a child process (the compiled CLI), with a fleet section pointing at the soak's broker.

/** The repository root, from dist/scripts/soak/soak-agent.js. */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

export interface SoakAgentOptions {
  readonly dir: string;
  readonly model: string;
  readonly port: number;
  readonly brokerUrl: string;
  readonly deviceId: string;
  readonly trustedKeys: Record<string, string>;
  /** The health window after each deployment (0: none). */
  readonly healthS: number;
}

export class SoakAgent {
  private constructor(readonly child: ChildProcess, readonly logFile: string, readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>) {}

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Copies the demo model into a fresh repository, writes agent.yaml and waits for `edge-agent ready`. */
  static async start(o: SoakAgentOptions): Promise<SoakAgent> {
    const repo = join(o.dir, 'models');
    mkdirSync(repo, { recursive: true });
    cpSync(join(ROOT, 'edge-config', 'models', o.model), join(repo, o.model), { recursive: true });
    const config = {
      model_repository: repo,
      data_dir: join(o.dir, 'var'),
      log: { level: 'info' },
      runtime: { execution_providers: ['cpu'] },
      telemetry: { interval_s: 2, http: { port: 0 }, device: { nvidia_smi: false, tegrastats: false } },
      fleet: {
        broker_url: o.brokerUrl,
        device_id: o.deviceId,
        trusted_keys: o.trustedKeys,
        state_interval_s: 0,
        reconnect: { min_ms: 1000, max_ms: 2000 },
        artifacts: { chunk_timeout_ms: 3000 },
        // Shared CPUs make p99 noisy; the factor only catches a version that is grossly slower.
        health: { duration_s: o.healthS, max_p99_factor: 5 },
      },
    };
    const file = join(o.dir, 'agent.yaml');
    writeFileSync(file, JSON.stringify(config, null, 2));
    const logFile = join(o.dir, 'agent.log');
    const log = createWriteStream(logFile);
    const child = spawn(process.execPath, [join(ROOT, 'dist', 'agent', 'cli.js'), 'serve', '--config', file, '--listen', `127.0.0.1:${o.port}`], { stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.once('exit', (code, signal) => r({ code, signal })));
    let head = '';
    let isReady = false;
    const ready = new Promise<void>((resolveReady, reject) => {
      const timer = setTimeout(() => reject(new Error(`agent not ready within 60 s; see ${logFile}`)), 60_000);
      child.stdout?.on('data', (d: Buffer) => {
        log.write(d);
        if (isReady) return;
        head += d.toString();
        if (head.includes('"msg":"edge-agent ready"')) { isReady = true; head = ''; clearTimeout(timer); resolveReady(); }
      });
      void exited.then((e) => { clearTimeout(timer); reject(new Error(`agent exited (${e.code ?? e.signal}) before ready; see ${logFile}`)); });
    });
    child.stderr?.on('data', (d: Buffer) => log.write(d));
    await ready;
    return new SoakAgent(child, logFile, exited);
  }

  /** SIGTERM and the exit code (null when it had to be killed after 30 s). */
  async stop(): Promise<number | null> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return (await this.exited).code;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 30_000);
    const e = await this.exited;
    clearTimeout(timer);
    return e.code;
  }
}
