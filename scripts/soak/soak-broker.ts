import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';

// The soak's own mosquitto. freePort and waitForPort also serve the tests' broker helper (test/helpers/mosquitto.ts).

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

export function waitForPort(port: number, timeoutMs: number, what: string): Promise<void> {
  const until = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const attempt = (): void => {
      const sock = connect(port, '127.0.0.1');
      sock.once('connect', () => { sock.destroy(); resolve(); });
      sock.once('error', () => {
        sock.destroy();
        if (Date.now() > until) reject(new Error(`${what} did not listen on ${port} within ${timeoutMs} ms`));
        else setTimeout(attempt, 50);
      });
    };
    attempt();
  });
}

/** mosquitto on a fixed loopback port; `kill()` (SIGKILL) and `start()` again simulate a broker crash. */
export class SoakBroker {
  private child: ChildProcess | undefined;

  constructor(readonly port: number, private readonly dir: string) {}

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  get logFile(): string {
    return join(this.dir, 'mosquitto.log');
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  async start(): Promise<void> {
    if (this.child) return;
    const conf = join(this.dir, 'mosquitto.conf');
    // Started as root, mosquitto drops to its own user: the log file must be writable by it.
    if (!existsSync(this.logFile)) writeFileSync(this.logFile, '', { mode: 0o666 });
    chmodSync(this.logFile, 0o666);
    chmodSync(this.dir, 0o755);
    // Persistence saved on every change: retained manifests and the soak's own session (its subscriptions, and
    // what arrives for it while it reconnects) survive a SIGKILL, as on a real broker. Without it, records the
    // agent drains right after a restart, before the soak has subscribed again, would be counted as lost.
    // Every MQTT packet is logged (appended across restarts): a telemetry gap can be traced to who lost it.
    const db = join(this.dir, 'mosquitto-db');
    mkdirSync(db, { recursive: true, mode: 0o777 });
    chmodSync(db, 0o777);
    writeFileSync(conf, [
      `listener ${this.port} 127.0.0.1`, 'allow_anonymous true',
      'persistence true', `persistence_location ${db}/`, 'autosave_on_changes true', 'autosave_interval 1',
      `log_dest file ${this.logFile}`, 'log_type all', 'log_timestamp_format %H:%M:%S',
    ].join('\n') + '\n');
    const bin = process.env.MOSQUITTO_BIN ?? (['/usr/sbin/mosquitto', '/usr/bin/mosquitto'].find((p) => existsSync(p)) ?? 'mosquitto');
    const child = spawn(bin, ['-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
    this.child = child;
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
    const exited = new Promise<never>((_, reject) => child.once('exit', (code) => reject(new Error(`mosquitto exited (${code}): ${stderr}`))));
    exited.catch(() => undefined);
    await Promise.race([waitForPort(this.port, 10_000, 'mosquitto'), exited]);
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.child;
    if (!child) return;
    this.child = undefined;
    if (child.exitCode !== null || child.signalCode !== null) return;
    await new Promise<void>((resolve) => { child.once('exit', () => resolve()); child.kill(signal); });
  }
}
