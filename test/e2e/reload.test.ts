import t from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { EdgeAgentClient, type FrameResult } from '../../agent/client/index.js';
import { freePort } from '../helpers/mosquitto.js';
import { copyDemoRepo, tempDir } from '../helpers/runtime.js';
import { startCli } from '../helpers/cli.js';

t.test('SIGHUP applies live settings without dropping a stream and reports what needs a restart', async (t) => {
  const dir = tempDir(t);
  const repo = copyDemoRepo(t, ['tiny']);
  const port = await freePort();
  const file = join(dir, 'agent.yaml');
  const yaml = (extra: string): string => `model_repository: ${repo}\ndata_dir: ${join(dir, 'var')}\nserver:\n  listen: ["127.0.0.1:${port}"]\n${extra}telemetry:\n  http:\n    port: 0\n`;
  writeFileSync(file, yaml('  default_max_in_flight: 8\n'));
  const run = startCli(['serve', '--config', file]);
  t.teardown(() => { if (run.child.exitCode === null) run.child.kill('SIGKILL'); });
  await run.waitFor(/"msg":"edge-agent ready"/);

  const client = new EdgeAgentClient({ address: `127.0.0.1:${port}` });
  t.teardown(() => client.close());
  const stream = await client.openStream({ model: 'tiny' });
  const x = { dtype: 'float32' as const, shape: [1, 1024], data: new Float32Array(1024).fill(1) };
  const results: FrameResult[] = [];
  const reading = (async () => { for await (const r of stream.results()) results.push(r); })();
  let seq = 0;
  for (; seq < 50; seq++) await stream.send({ seq, inputs: { x } });

  writeFileSync(file, yaml('  default_max_in_flight: 4\n').replace('server:', 'log:\n  level: debug\nserver:').replace(`"127.0.0.1:${port}"`, `"127.0.0.1:${port}", "127.0.0.1:0"`));
  writeFileSync(join(repo, 'tiny', 'config.yaml'), 'max_batch_size: 32\ndynamic_batching:\n  max_queue_delay_us: 500\n');
  run.child.kill('SIGHUP');
  const line = JSON.parse(await run.waitFor(/"msg":"configuration reloaded"/)) as { applied: string[]; needs_restart: string[] };
  t.same(line.applied.sort(), ['log.level', 'server.default_max_in_flight', 'tiny.dynamic_batching'].sort(), 'live keys applied');
  t.same(line.needs_restart, ['server.listen'], 'a new listener is reported as needing a restart');

  for (; seq < 100; seq++) await stream.send({ seq, inputs: { x } });
  const fresh = await client.openStream({ model: 'tiny' });
  t.equal(fresh.opened.maxInFlight, 4, 'streams opened after the reload get the new default');
  fresh.end();

  writeFileSync(file, 'server:\n  listen: 42\n');
  run.child.kill('SIGHUP');
  await run.waitFor(/"msg":"reload refused: keeping the running configuration"/);
  for (; seq < 120; seq++) await stream.send({ seq, inputs: { x } });
  stream.end();
  await reading;
  t.equal(results.length, 120, 'every frame answered across two reloads');
  t.ok(results.every((r, i) => r.status === 'OK' && r.seq === i), 'all OK, in order: no stream was dropped');
  run.child.kill('SIGTERM');
  t.equal((await run.exited).code, 0);
});

t.test('SIGHUP with changed fleet settings reconnects with them; serving goes on', async (t) => {
  const { MosquittoBroker } = await import('../helpers/mosquitto.js');
  const broker = await MosquittoBroker.start();
  t.teardown(() => broker.close());
  const dir = tempDir(t);
  const repo = copyDemoRepo(t, ['tiny']);
  const port = await freePort();
  const file = join(dir, 'agent.yaml');
  const yaml = (keepalive: number): string => `model_repository: ${repo}\ndata_dir: ${join(dir, 'var')}\nserver:\n  listen: ["127.0.0.1:${port}"]\ntelemetry:\n  http:\n    port: 0\nfleet:\n  broker_url: ${broker.url}\n  device_id: reload-dev\n  keepalive_s: ${keepalive}\n`;
  writeFileSync(file, yaml(30));
  const run = startCli(['serve', '--config', file]);
  t.teardown(() => { if (run.child.exitCode === null) run.child.kill('SIGKILL'); });
  await run.waitFor(/"msg":"edge-agent ready"/);
  writeFileSync(file, yaml(12));
  run.child.kill('SIGHUP');
  const line = JSON.parse(await run.waitFor(/"msg":"configuration reloaded"/)) as { applied: string[]; needs_restart: string[] };
  t.same(line.applied, ['fleet.keepalive_s'], 'fleet settings apply live');
  t.same(line.needs_restart, []);
  await run.waitFor(/"msg":"fleet settings applied"/);
  const client = new EdgeAgentClient({ address: `127.0.0.1:${port}` });
  t.teardown(() => client.close());
  t.equal(await client.checkHealth(), 'SERVING', 'still serving after the fleet link was replaced');
  run.child.kill('SIGTERM');
  t.equal((await run.exited).code, 0);
});
