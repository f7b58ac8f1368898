import { spawn } from 'node:child_process';

/** Delivers one sd_notify message (newline-separated `KEY=VALUE` assignments) to the service manager. */
export interface NotifySender {
  send(message: string): Promise<void>;
}

export class NotifyDeliveryError extends Error {
  constructor(readonly notifyMessage: string, reason: string) {
    super(`sd_notify '${notifyMessage.replace(/\n/g, ' ')}' was not delivered: ${reason}`);
    this.name = 'NotifyDeliveryError';
  }
}

export interface SystemdNotifyCommandOptions {
  /** `$NOTIFY_SOCKET`: a path or an abstract `@name`, passed to the child untouched. */
  readonly socket: string;
  /** The `systemd-notify` binary; looked up on `PATH` by default. */
  readonly command?: string;
  /** A child that has not finished by then is killed and the message counted as lost. */
  readonly timeoutMs?: number;
}

/**
 * Sends notifications through systemd's own `systemd-notify` binary. Node cannot write unix datagrams, and the
 * binary is on every systemd machine, speaks the protocol of the systemd it came with (path and abstract
 * sockets, and since v246 it waits until PID 1 has processed the message, which closes the race where PID 1
 * cannot attribute a datagram from a process that already exited). The message comes from a child process,
 * so the unit needs `NotifyAccess=all`.
 */
export class SystemdNotifyCommand implements NotifySender {
  private readonly command: string;
  private readonly timeoutMs: number;

  constructor(private readonly o: SystemdNotifyCommandOptions) {
    this.command = o.command ?? 'systemd-notify';
    this.timeoutMs = o.timeoutMs ?? 10_000;
  }

  send(message: string): Promise<void> {
    return new Promise((resolve, reject) => {
      // One argument per assignment: systemd-notify joins them with newlines into a single datagram.
      const child = spawn(this.command, message.split('\n'), {
        env: { NOTIFY_SOCKET: this.o.socket, PATH: process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin' },
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let stderr = '';
      child.stderr?.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-500); });
      const timer = setTimeout(() => child.kill('SIGKILL'), this.timeoutMs);
      timer.unref();
      child.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(new NotifyDeliveryError(message, err.code === 'ENOENT' ? `'${this.command}' not found on PATH` : err.message));
      });
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        if (code === 0) resolve();
        else reject(new NotifyDeliveryError(message, signal ? `${this.command} killed by ${signal} after ${this.timeoutMs} ms` : `${this.command} exited ${code}: ${stderr.trim() || 'no message'}`));
      });
    });
  }
}
