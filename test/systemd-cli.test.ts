// Proposed test/systemd-cli.test.ts — add once cli.ts is wired to SystemdNotifier (see the systemd helper's
// report). It runs the real CLI with NOTIFY_SOCKET pointing at a listener and checks the exact messages.
import t from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { EdgeAgentClient } from '../agent/client/index.js';
import { startCli } from './helpers/cli.js';
import { freePort } from './helpers/mosquitto.js';
import { NotifyListener, notifyToolsMissing } from './helpers/notify-socket.js';
import { copyDemoRepo, tempDir } from './helpers/runtime.js';

const missing = notifyToolsMissing();
if (missing) t.plan(0, `sd_notify tests need ${missing}`);

t.test('under systemd: STATUS while loading, READY=1 once models are warm, WATCHDOG=1, RELOADING=1 on SIGHUP, STOPPING=1 on SIGTERM', async (t) => {
  const dir = tempDir(t);
  const socket = join(dir, 'notify');
  const pid1 = await NotifyListener.start(t, socket);
  const repo = copyDemoRepo(t, ['tiny', 'classifier']);
  const port = await freePort();
  const config = join(dir, 'agent.yaml');
  writeFileSync(config, 'telemetry:\n  http:\n    port: 0\n');
  const run = startCli(['serve', '--config', config, '--model-repository', repo, '--data-dir', join(dir, 'var'), '--listen', `127.0.0.1:${port}`],
    { NOTIFY_SOCKET: socket, WATCHDOG_USEC: '400000' });
  t.teardown(() => { if (run.child.exitCode === null) run.child.kill('SIGKILL'); });

  await pid1.waitFor((m) => m.startsWith('READY=1'));
  // At the moment systemd hears READY=1, the agent serves every model.
  const client = new EdgeAgentClient({ address: `127.0.0.1:${port}` });
  t.teardown(() => client.close());
  t.equal(await client.checkHealth(), 'SERVING');
  t.equal(await client.checkHealth('tiny'), 'SERVING');
  t.equal(await client.checkHealth('classifier'), 'SERVING');
  const messages = pid1.messages();
  const ready = messages.findIndex((m) => m.startsWith('READY=1'));
  t.match(messages.slice(0, ready).join('\n'), /^STATUS=starting/m, 'a STATUS line while loading');
  t.match(messages[ready], /^READY=1\nSTATUS=serving 2\/2 models \(classifier:1@cpu, tiny:1@cpu\); 0 streams$/);
  t.equal(messages.filter((m) => m.startsWith('READY=1')).length, 1, 'READY=1 once');

  await pid1.waitFor((m) => m === 'WATCHDOG=1', 3);
  t.pass('WATCHDOG=1 at half of WATCHDOG_USEC');

  run.child.kill('SIGHUP');
  await pid1.waitFor((m) => m.startsWith('RELOADING=1'));
  await pid1.waitFor((m) => m.startsWith('READY=1'), 2);
  const reload = pid1.messages().find((m) => m.startsWith('RELOADING=1'));
  t.match(reload, /^RELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=reloading /);

  run.child.kill('SIGTERM');
  const { code } = await run.exited;
  t.equal(code, 0);
  // Its last datagram may still be in the listener's pipe after the agent exited.
  await pid1.waitFor((m) => m.startsWith('STOPPING=1'), 1, 5000).catch(() => undefined);
  t.match(pid1.messages().find((m) => m.startsWith('STOPPING=1')), /^STOPPING=1\nSTATUS=stopping \(SIGTERM\)/);
});
