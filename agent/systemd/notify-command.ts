import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { holdEventLoop, killGroup } from '../process-group.js';

/** Delivers one sd_notify message (newline-separated `KEY=VALUE` assignments) to the service manager. */
export interface NotifySender {
  send(message: string): Promise<void>;
  /** Releases what the sender holds (a relay process); later sends may start it again. */
  close?(): void;
}

export class NotifyDeliveryError extends Error {
  constructor(readonly notifyMessage: string, reason: string) {
    super(`sd_notify '${notifyMessage.replace(/\n/g, ' ')}' was not delivered: ${reason}`);
    this.name = 'NotifyDeliveryError';
  }
}

export interface SystemdNotifyCommandOptions {
  /** `$NOTIFY_SOCKET`: a path or an abstract `@name`, passed to the relay untouched. */
  readonly socket: string;
  /** The `systemd-notify` binary; looked up on `PATH` by default. */
  readonly command?: string;
  /** A message not answered by then is counted as lost, and the relay (with the hung binary) is killed. */
  readonly timeoutMs?: number;
  /** `child_process.spawn`, injected so tests can count the relays started. */
  readonly spawn?: typeof spawn;
}

/**
 * The relay: one shell, started once, runs `systemd-notify` per line it reads (assignments separated by tabs,
 * one argument each) and answers each line with `<exit code> <output>`. The agent itself then never forks per
 * message: fork() copies a large process's page tables while the event loop waits (21–28 ms measured at
 * 385–443 MB RSS), and the watchdog pings every 15 s.
 */
const RELAY_SCRIPT = [
  'set -f',
  "tab=$(printf '\\t')",
  'while IFS= read -r line; do',
  '  IFS=$tab',
  '  out=$("$1" $line 2>&1)',
  '  code=$?',
  "  IFS=' '",
  "  printf '%s %s\\n' \"$code\" \"$(printf '%s' \"$out\" | tr '\\n' ' ' | cut -c1-500)\"",
  'done',
].join('\n');

interface Waiting {
  readonly message: string;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
  readonly timer: NodeJS.Timeout;
}

interface Relay {
  readonly child: ChildProcess;
  readonly waiting: Waiting[];
}

/**
 * Sends notifications through systemd's own `systemd-notify` binary. Node cannot write unix datagrams, and the
 * binary is on every systemd machine, speaks the protocol of the systemd it came with (path and abstract
 * sockets, and since v246 it waits until PID 1 has processed the message, which closes the race where PID 1
 * cannot attribute a datagram from a process that already exited). The binary runs from a relay shell started
 * once (see RELAY_SCRIPT), so messages come from a grandchild and the unit needs `NotifyAccess=all`.
 */
export class SystemdNotifyCommand implements NotifySender {
  private readonly command: string;
  private readonly timeoutMs: number;
  private readonly spawnFn: typeof spawn;
  private relay: Relay | undefined;

  constructor(private readonly o: SystemdNotifyCommandOptions) {
    this.command = o.command ?? 'systemd-notify';
    this.timeoutMs = o.timeoutMs ?? 10_000;
    this.spawnFn = o.spawn ?? spawn;
    // Now, while the process is still small (the agent creates its notifier before it loads any model).
    this.relay = this.startRelay();
  }

  /** The relay shell's pid, while one runs. */
  get relayPid(): number | undefined {
    return this.relay?.child.pid;
  }

  send(message: string): Promise<void> {
    const relay = this.relay ?? (this.relay = this.startRelay());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => this.abandon(relay, `${this.command} gave no answer within ${this.timeoutMs} ms; its relay was killed`), this.timeoutMs);
      timer.unref();
      relay.waiting.push({ message, resolve, reject, timer });
      if (relay.waiting.length === 1) holdEventLoop(relay.child, true);
      // A tab inside an assignment would split it in two: the status text has no control characters already.
      relay.child.stdin?.write(`${message.split('\n').map((a) => a.replace(/\t/g, ' ')).join('\t')}\n`);
    });
  }

  close(): void {
    const relay = this.relay;
    if (!relay) return;
    this.relay = undefined;
    relay.child.stdin?.end(); // the shell's loop ends at end of input
    for (const w of relay.waiting.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new NotifyDeliveryError(w.message, 'the notifier was closed'));
    }
  }

  private startRelay(): Relay {
    const child = this.spawnFn('/bin/sh', ['-c', RELAY_SCRIPT, 'edge-agent-notify', this.command], {
      env: { NOTIFY_SOCKET: this.o.socket, PATH: process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin' },
      stdio: ['pipe', 'pipe', 'ignore'],
      // Its own process group: killing a relay whose systemd-notify hangs kills that too.
      detached: true,
    });
    const relay: Relay = { child, waiting: [] };
    // An idle relay must not keep an agent that is otherwise done from exiting (one awaiting an answer does).
    holdEventLoop(relay.child, false);
    child.stdin?.on('error', () => undefined); // EPIPE after the relay died: 'close' reports it
    createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => this.answered(relay, line));
    child.once('error', (err: NodeJS.ErrnoException) => this.abandon(relay, `the relay shell could not start (${err.message})`));
    child.once('close', (code, signal) => this.abandon(relay, `the relay shell ended (${signal ?? `exit ${code}`})`));
    return relay;
  }

  private answered(relay: Relay, line: string): void {
    const w = relay.waiting.shift();
    if (!w) return;
    clearTimeout(w.timer);
    if (relay.waiting.length === 0) holdEventLoop(relay.child, false);
    const space = line.indexOf(' ');
    const code = Number(space < 0 ? line : line.slice(0, space));
    const output = space < 0 ? '' : line.slice(space + 1).trim();
    if (code === 0) w.resolve();
    else if (code === 127) w.reject(new NotifyDeliveryError(w.message, `'${this.command}' not found on PATH`));
    else w.reject(new NotifyDeliveryError(w.message, `${this.command} exited ${code}: ${output || 'no message'}`));
  }

  /** The relay is gone or hung: every message it holds is lost, and the next send starts a new one. */
  private abandon(relay: Relay, reason: string): void {
    if (this.relay === relay) this.relay = undefined;
    if (relay.child.pid !== undefined) killGroup(relay.child.pid, 'SIGKILL');
    for (const w of relay.waiting.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new NotifyDeliveryError(w.message, reason));
    }
  }
}
