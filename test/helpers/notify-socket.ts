import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';

/** One datagram as the service manager would see it. */
export interface NotifyDatagram {
  readonly message: string;
  /** Sender pid from SCM_CREDENTIALS (what systemd attributes the message by). */
  readonly pid: number;
  /** File descriptors passed with it (systemd-notify's BARRIER=1 carries one). */
  readonly fds: number;
  /** Receipt time on CLOCK_MONOTONIC, µs (same clock as `process.hrtime.bigint()`). */
  readonly monotonicUs: number;
}

// Node cannot receive unix datagrams either, so the listener is a python3 child: it binds the socket with
// SO_PASSCRED, closes any passed fd at once (that is what releases systemd-notify's barrier wait, as PID 1
// does), and prints each datagram as one JSON line.
const LISTENER = `
import array, json, os, socket, sys, time
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind('\\0' + path[1:] if path.startswith('@') else path)
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
print(json.dumps({"listening": True}), flush=True)
while True:
    msg, anc, flags, addr = s.recvmsg(65536, socket.CMSG_SPACE(16 * 4) + socket.CMSG_SPACE(12))
    now = time.monotonic_ns() // 1000
    pid = 0
    fds = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(data[0:4], 'little')
        elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array('i')
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds = list(a)
    for fd in fds:
        os.close(fd)
    print(json.dumps({"message": msg.decode('utf-8', 'replace'), "pid": pid, "fds": len(fds), "monotonicUs": now}), flush=True)
`;

/** Why notify tests cannot run here, or undefined when python3 and systemd-notify are both present. */
export function notifyToolsMissing(): string | undefined {
  for (const tool of ['python3', 'systemd-notify']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) return `${tool} is not installed (apt-get install ${tool === 'python3' ? 'python3' : 'systemd'})`;
  }
  return undefined;
}

/** A NOTIFY_SOCKET the test listens on, standing in for PID 1's. */
export class NotifyListener {
  /** Every datagram received, barriers included, in arrival order. */
  readonly received: NotifyDatagram[] = [];
  private waiters: { test: () => boolean; resolve: () => void }[] = [];

  private constructor(readonly socket: string, private readonly child: ChildProcess) {}

  /** `socket` is a filesystem path or an abstract name starting with '@'. */
  static async start(t: { teardown(fn: () => void): void }, socket: string): Promise<NotifyListener> {
    const child = spawn('python3', ['-c', LISTENER, socket], { stdio: ['ignore', 'pipe', 'pipe'] });
    const listener = new NotifyListener(socket, child);
    t.teardown(() => { child.kill(); });
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
    await new Promise<void>((resolve, reject) => {
      child.once('exit', (code) => reject(new Error(`notify listener exited ${code}: ${stderr}`)));
      createInterface({ input: child.stdout! }).on('line', (line) => {
        const msg = JSON.parse(line) as NotifyDatagram & { listening?: boolean };
        if (msg.listening) return resolve();
        listener.received.push(msg);
        for (const w of [...listener.waiters]) if (w.test()) { listener.waiters.splice(listener.waiters.indexOf(w), 1); w.resolve(); }
      });
    });
    return listener;
  }

  /** The notifications, without systemd-notify's BARRIER=1 datagrams. */
  messages(): string[] {
    return this.received.filter((d) => d.message !== 'BARRIER=1').map((d) => d.message);
  }

  /** Resolves once `count` notifications (barriers not counted) satisfy `match`. */
  waitFor(match: (message: string) => boolean, count = 1, timeoutMs = 20_000): Promise<void> {
    return this.waitForDatagrams((d) => d.message !== 'BARRIER=1' && match(d.message), count, timeoutMs);
  }

  /**
   * Resolves once `count` datagrams, barriers included, satisfy `match`. The listener releases a barrier by
   * closing its fd before it prints the line, so systemd-notify can return before the line is read here.
   */
  waitForDatagrams(match: (d: NotifyDatagram) => boolean, count = 1, timeoutMs = 20_000): Promise<void> {
    const test = () => this.received.filter(match).length >= count;
    if (test()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`fewer than ${count} matching datagrams within ${timeoutMs} ms; got ${JSON.stringify(this.received)}`)), timeoutMs);
      this.waiters.push({ test, resolve: () => { clearTimeout(timer); resolve(); } });
    });
  }
}
