import t from 'tap';
import { spawn, type SpawnOptions } from 'node:child_process';
import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { agentStatusLine, SystemdNotifier, SystemdNotifyCommand, statusText, type NotifySender } from '../agent/systemd/index.js';
import { NotifyListener, notifyToolsMissing, type NotifyDatagram } from './helpers/notify-socket.js';
import { gone } from './helpers/event-loop.js';
import { tempDir } from './helpers/runtime.js';

// The notifier against a real NOTIFY_SOCKET (a python3 listener standing in for PID 1) through the real
// systemd-notify binary: the tests check the exact datagrams systemd would receive.

const missing = notifyToolsMissing();
if (missing) t.plan(0, `sd_notify tests need ${missing}`);

const monotonicUs = (): number => Number(process.hrtime.bigint() / 1000n);

/**
 * The listener lets systemd-notify return before it prints the datagram's line, so the last message can still
 * be in its pipe when the notifier's promise resolves: wait until `count` have been read (or give up quietly
 * after 5 s and let the assertion that follows show what arrived).
 */
const arrived = (pid1: NotifyListener, count: number): Promise<void> => pid1.waitFor(() => true, count, 5000).catch(() => undefined);

t.test('without NOTIFY_SOCKET the notifier does nothing', async (t) => {
  const calls: string[] = [];
  const spy: NotifySender = { send: async (m) => { calls.push(m); } };
  const n = new SystemdNotifier({ env: { WATCHDOG_USEC: '1000000' }, sender: spy });
  t.equal(n.enabled, false);
  t.equal(n.watchdogIntervalMs, undefined, 'no watchdog without a socket');
  n.start();
  await n.ready('up');
  await n.status('x');
  await n.reloading();
  await n.stopping();
  await n.watchdog();
  await n.close();
  t.same(calls, [], 'nothing sent');
});

t.test('READY, STATUS, RELOADING (with MONOTONIC_USEC), STOPPING arrive as exact datagrams on a path socket', async (t) => {
  const socket = join(tempDir(t), 'notify');
  const pid1 = await NotifyListener.start(t, socket);
  const errors: Error[] = [];
  const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: socket }, onError: (e) => errors.push(e) });
  t.equal(n.enabled, true);
  t.equal(n.watchdogIntervalMs, undefined, 'no WATCHDOG_USEC: no watchdog');
  await n.status('starting: loading 4 models');
  await n.ready('serving 4/4 models');
  const before = monotonicUs();
  await n.reloading('reloading /etc/edge-agent/agent.yaml');
  const after = monotonicUs();
  await n.ready('serving 4/4 models');
  await n.status('serving 4/4 models');
  await n.stopping('draining');
  await n.close();
  await arrived(pid1, 5);
  const got = pid1.messages();
  t.equal(got.length, 5, `five notifications: ${JSON.stringify(got)}`);
  t.equal(got[0], 'STATUS=starting: loading 4 models');
  t.equal(got[1], 'READY=1\nSTATUS=serving 4/4 models');
  const reload = /^RELOADING=1\nMONOTONIC_USEC=(\d+)\nSTATUS=reloading \/etc\/edge-agent\/agent\.yaml$/.exec(got[2] ?? '');
  t.ok(reload, `reload datagram: ${JSON.stringify(got[2])}`);
  const stamp = Number(reload?.[1]);
  t.ok(stamp >= before && stamp <= after, `MONOTONIC_USEC ${stamp} is CLOCK_MONOTONIC at the call (${before}..${after})`);
  t.equal(got[3], 'READY=1\nSTATUS=serving 4/4 models', 'ready again after the reload, with the status restored');
  t.equal(got[4], 'STOPPING=1\nSTATUS=draining', 'an unchanged status line was not sent again');
  const barrier = (d: NotifyDatagram): boolean => d.message === 'BARRIER=1' && d.fds === 1;
  await pid1.waitForDatagrams(barrier, 5, 5000).catch(() => undefined); // the last line may still be in the pipe
  t.equal(pid1.received.filter(barrier).length, 5, 'systemd-notify waited for each to be processed (barrier)');
  t.same(errors, []);
});

t.test('an abstract socket (@name) works the same', async (t) => {
  const socket = `@edge-agent-test-${process.pid}-${Date.now()}`;
  const pid1 = await NotifyListener.start(t, socket);
  const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: socket } });
  await n.ready('up');
  await n.stopping();
  await arrived(pid1, 2);
  t.same(pid1.messages(), ['READY=1\nSTATUS=up', 'STOPPING=1']);
});

t.test('status text is one line: control characters cannot inject assignments; long text is cut', async (t) => {
  const socket = join(tempDir(t), 'notify');
  const pid1 = await NotifyListener.start(t, socket);
  const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: socket } });
  await n.status("model 'evil\nMAINPID=1\nREADY=1' failed\r\n");
  await n.status('x'.repeat(1000));
  await arrived(pid1, 2);
  const got = pid1.messages();
  t.same(got[0], "STATUS=model 'evil MAINPID=1 READY=1' failed", 'newlines became spaces: still one STATUS assignment');
  t.equal(got[1]?.length, 'STATUS='.length + 200, 'cut to 200 characters');
  t.match(got[1], /…$/);
  t.equal(statusText('  a \t\t b  '), 'a b');
});

t.test('watchdog: pings at half WATCHDOG_USEC from the event loop; a stalled loop sends none; close stops them', async (t) => {
  const socket = join(tempDir(t), 'notify');
  const pid1 = await NotifyListener.start(t, socket);
  const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: socket, WATCHDOG_USEC: '100000', WATCHDOG_PID: String(process.pid) } });
  t.equal(n.watchdogIntervalMs, 50, 'half of 100 ms');
  n.start();
  await pid1.waitFor((m) => m === 'WATCHDOG=1', 3);
  t.ok(pid1.messages().every((m) => m === 'WATCHDOG=1'), 'only WATCHDOG=1 datagrams');

  // Block the event loop for 20 intervals: the pings come from a timer on the loop, so none may be started
  // meanwhile; at most the one already handed to systemd-notify before the stall arrives during it.
  const stallStart = monotonicUs();
  while (monotonicUs() - stallStart < 1_000_000) { /* a wedged event loop */ }
  const stallEnd = monotonicUs();
  await new Promise((r) => setTimeout(r, 200));
  const duringStall = pid1.received.filter((d) => d.message === 'WATCHDOG=1' && d.monotonicUs > stallStart && d.monotonicUs < stallEnd).length;
  t.ok(duringStall <= 1, `${duringStall} ping(s) arrived during a 1 s stall (20 intervals): systemd would see the loop stop`);
  await pid1.waitFor((m) => m === 'WATCHDOG=1', pid1.messages().length + 1);
  t.pass('pings resume when the loop runs again');

  await n.close();
  const count = pid1.messages().length;
  await new Promise((r) => setTimeout(r, 300));
  t.equal(pid1.messages().length, count, 'no pings after close()');
});

t.test('WATCHDOG_PID of another process, or a bad WATCHDOG_USEC: no pings', async (t) => {
  const socket = join(tempDir(t), 'notify');
  t.equal(new SystemdNotifier({ env: { NOTIFY_SOCKET: socket, WATCHDOG_USEC: '100000', WATCHDOG_PID: String(process.pid + 1) } }).watchdogIntervalMs, undefined, 'meant for another pid');
  t.equal(new SystemdNotifier({ env: { NOTIFY_SOCKET: socket, WATCHDOG_USEC: 'soon' } }).watchdogIntervalMs, undefined, 'not a number');
  t.equal(new SystemdNotifier({ env: { NOTIFY_SOCKET: socket, WATCHDOG_USEC: '0' } }).watchdogIntervalMs, undefined, 'zero');
  t.equal(new SystemdNotifier({ env: { NOTIFY_SOCKET: socket, WATCHDOG_USEC: '30000000' }, pid: 4242 }).watchdogIntervalMs, 15_000, 'no WATCHDOG_PID: ours');
});

t.test('a message that cannot be delivered is reported and does not block the next ones', async (t) => {
  const socket = join(tempDir(t), 'notify');
  const errors: Error[] = [];
  // Nobody listens yet: systemd-notify fails to connect.
  const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: socket }, onError: (e) => errors.push(e) });
  await n.ready('up');
  t.equal(errors.length, 1);
  t.match(errors[0]?.message, /sd_notify 'READY=1 STATUS=up' was not delivered: systemd-notify exited \d+/);

  const pid1 = await NotifyListener.start(t, socket);
  await n.stopping();
  await arrived(pid1, 1);
  t.same(pid1.messages(), ['STOPPING=1'], 'the next message goes out');

  const lost: Error[] = [];
  const noBinary = new SystemdNotifier({ env: { NOTIFY_SOCKET: socket }, sender: new SystemdNotifyCommand({ socket, command: '/nonexistent/systemd-notify' }), onError: (e) => lost.push(e) });
  await noBinary.ready();
  t.match(lost[0]?.message, /'\/nonexistent\/systemd-notify' not found on PATH/);

  const throwing = new SystemdNotifier({ env: { NOTIFY_SOCKET: socket }, sender: { send: () => Promise.reject(new Error('boom')) }, onError: () => { throw new Error('handler broke'); } });
  await throwing.ready();
  await throwing.stopping();
  t.pass('a throwing error handler does not wedge the queue');
});

t.test('the status line summarises models, failures and streams', async (t) => {
  const models = [
    { name: 'classifier', version: 1, state: 'READY', provider: 'tensorrt' },
    { name: 'tiny', version: 3, state: 'READY', provider: 'cpu' },
    { name: 'broken', version: 1, state: 'UNAVAILABLE', provider: '' },
  ];
  t.equal(agentStatusLine(models, { streams: 2 }), 'serving 2/3 models (classifier:1@tensorrt, tiny:3@cpu); not ready: broken (unavailable); 2 streams');
  t.equal(agentStatusLine(models.slice(0, 1), { streams: 1, note: 'restart needed for server.listen' }), 'serving 1/1 models (classifier:1@tensorrt); 1 stream; restart needed for server.listen');
  t.equal(agentStatusLine([]), 'serving 0/0 models');
});

t.test('one relay process carries every message: the agent does not fork per notification', async (t) => {
  const socket = join(tempDir(t), 'notify');
  const pid1 = await NotifyListener.start(t, socket);
  const started: number[] = [];
  const counting: typeof spawn = ((command: string, args: readonly string[], options: SpawnOptions) => {
    const child = spawn(command, args, options);
    started.push(child.pid ?? -1);
    return child;
  }) as typeof spawn;
  const sender = new SystemdNotifyCommand({ socket, spawn: counting });
  t.teardown(() => sender.close());
  const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: socket, WATCHDOG_USEC: '1000000' }, sender });
  await n.ready('up');
  for (let i = 0; i < 10; i++) await n.watchdog();
  await n.stopping();
  await arrived(pid1, 12);
  t.equal(pid1.messages().filter((m) => m === 'WATCHDOG=1').length, 10, 'every ping arrived');
  t.equal(started.length, 1, 'one process started for 12 messages (the relay, at construction)');
});

t.test('a systemd-notify that hangs: the message is reported lost, its relay killed, and the next goes through a new one', async (t) => {
  const dir = tempDir(t);
  const socket = join(dir, 'notify');
  const pid1 = await NotifyListener.start(t, socket);
  // Hangs on WATCHDOG=1 (ignoring SIGTERM, as a wedged binary might), delivers everything else for real.
  const tool = join(dir, 'systemd-notify');
  writeFileSync(tool, `#!/bin/sh\nif [ "$1" = WATCHDOG=1 ]; then trap '' TERM; sleep 300; fi\nexec systemd-notify "$@"\n`);
  chmodSync(tool, 0o755);
  const sender = new SystemdNotifyCommand({ socket, command: tool, timeoutMs: 300 });
  t.teardown(() => sender.close());
  const errors: Error[] = [];
  const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: socket }, sender, onError: (e) => errors.push(e) });
  const firstRelay = sender.relayPid;
  await n.watchdog();
  t.match(errors[0]?.message, /sd_notify 'WATCHDOG=1' was not delivered: .*gave no answer within 300 ms; its relay was killed/);
  await n.stopping();
  await arrived(pid1, 1);
  t.same(pid1.messages(), ['STOPPING=1'], 'the next message is delivered');
  t.not(sender.relayPid, firstRelay, 'through a new relay');
  t.ok(firstRelay !== undefined && gone(firstRelay), 'the hung relay (and its process group) is gone');
});
