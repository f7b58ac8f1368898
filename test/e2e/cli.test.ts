import t from 'tap';
import { writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { EdgeAgentClient, type FrameResult } from '../../agent/client/index.js';
import { freePort } from '../helpers/mosquitto.js';
import { copyDemoRepo, tempDir } from '../helpers/runtime.js';
import { startCli } from '../helpers/cli.js';

function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
}

t.test('a bad config exits non-zero naming the file and key, before anything listens', async (t) => {
  const dir = tempDir(t);
  const port = await freePort();
  const file = join(dir, 'bad.yaml');
  writeFileSync(file, `server:\n  listen: ["127.0.0.1:${port}"]\n  drain_timeout_ms: -5\n`);
  const run = startCli(['serve', '--config', file]);
  const { code } = await run.exited;
  t.equal(code, 2, 'exit code 2');
  t.match(run.stderr(), new RegExp(`edge-agent: ${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: server\\.drain_timeout_ms: `));
  t.notOk(await listening(port), 'nothing listened');

  const run2 = startCli(['serve', '--model-repository', join(dir, 'no-such-repo'), '--listen', `127.0.0.1:${port}`, '--data-dir', join(dir, 'var')]);
  t.equal((await run2.exited).code, 2);
  t.match(run2.stderr(), /model_repository: cannot read the model repository/);

  const run3 = startCli(['serve', '--help']);
  t.equal((await run3.exited).code, 0);
  t.match(run3.stdout(), /--model-repository <dir>/);
});

t.test('SIGTERM: health NOT_SERVING, accepted frames answered, exit 0', async (t) => {
  const dir = tempDir(t);
  const repo = copyDemoRepo(t, ['classifier', 'tiny']);
  const port = await freePort();
  const sock = join(dir, 'agent.sock');
  const config = join(dir, 'agent.yaml');
  writeFileSync(config, 'telemetry:\n  http:\n    port: 0\n');
  const run = startCli(['serve', '--config', config, '--model-repository', repo, '--data-dir', join(dir, 'var'), '--listen', `127.0.0.1:${port}`, '--listen', `unix:${sock}`],
    { EDGE_AGENT_LOG_LEVEL: 'info' });
  t.teardown(() => { if (run.child.exitCode === null) run.child.kill('SIGKILL'); });
  await run.waitFor(/"msg":"edge-agent ready"/);
  const client = new EdgeAgentClient({ address: `unix:${sock}` });
  t.teardown(() => client.close());
  t.equal(await client.checkHealth(), 'SERVING');

  const stream = await client.openStream({ model: 'classifier', maxInFlight: 16 });
  const image = { dtype: 'float32' as const, shape: [1, 3, 112, 112], data: new Float32Array(3 * 112 * 112).fill(0.5) };
  const results: FrameResult[] = [];
  let endError: Error | undefined;
  const reading = (async () => {
    try {
      for await (const r of stream.results()) {
        results.push(r);
        if (results.length === 1) run.child.kill('SIGTERM');
      }
    } catch (err) {
      endError = err as Error;
    }
  })();
  const sent = 40;
  for (let i = 0; i < sent; i++) stream.sendNoWait({ seq: i, inputs: { image } });
  await reading;
  const { code } = await run.exited;
  t.equal(code, 0, 'exit code 0 after draining');
  t.same(results.map((r) => r.seq), [...Array(results.length).keys()], 'results in order, no gap');
  t.ok(results.every((r) => r.status === 'OK' || r.status === 'UNAVAILABLE'), 'each result is OK or refused as shutting down');
  t.ok(results.filter((r) => r.status === 'OK').length >= 1, `${results.filter((r) => r.status === 'OK').length} frames finished during the drain`);
  t.match(endError?.message ?? '', /UNAVAILABLE: edge-agent is shutting down; every accepted frame was answered/, 'stream ends with UNAVAILABLE after its results');
  t.match(run.stdout(), /"msg":"edge-agent stopped"/);
  t.match(run.stdout(), /"drained":true/);
});
