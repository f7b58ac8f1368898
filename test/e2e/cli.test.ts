import t from 'tap';
import { writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { EdgeAgentClient, type FrameResult } from '../../agent/client/index.js';
import { freePort } from '../helpers/mosquitto.js';
import { copyDemoRepo, ROOT, tempDir } from '../helpers/runtime.js';
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

  const run4 = startCli(['serve', '--log-level', 'loud']);
  t.equal((await run4.exited).code, 2, 'a bad flag exits 2, like a bad config');
  t.match(run4.stderr(), /argument 'loud' is invalid/);
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

t.test('SIGTERM: a KServe stream gets the answers to what it sent, then UNAVAILABLE; an idle one does not hold the exit', async (t) => {
  const dir = tempDir(t);
  const repo = copyDemoRepo(t, ['tiny']);
  const port = await freePort();
  const config = join(dir, 'agent.yaml');
  // A drain timeout far beyond the test's: the exit must come from the streams ending, not from the timeout.
  writeFileSync(config, 'server:\n  drain_timeout_ms: 600000\ntelemetry:\n  http:\n    port: 0\n');
  const run = startCli(['serve', '--config', config, '--model-repository', repo, '--data-dir', join(dir, 'var'), '--listen', `127.0.0.1:${port}`]);
  t.teardown(() => { if (run.child.exitCode === null) run.child.kill('SIGKILL'); });
  await run.waitFor(/"msg":"edge-agent ready"/);

  const protoDir = join(ROOT, 'proto', 'inference');
  const definition = protoLoader.loadSync(join(protoDir, 'grpc_service.proto'), { includeDirs: [protoDir], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true });
  const Ctor = (grpc.loadPackageDefinition(definition) as unknown as { inference: { GRPCInferenceService: grpc.ServiceClientConstructor } }).inference.GRPCInferenceService;
  const client = new Ctor(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  t.teardown(() => client.close());
  type Duplex = grpc.ClientDuplexStream<object, { error_message: string; infer_response: { id: string } }>;
  const open = (): Duplex => (client as unknown as { ModelStreamInfer(): Duplex }).ModelStreamInfer();
  const ended = (s: Duplex): Promise<grpc.ServiceError> => new Promise((resolve) => s.on('error', resolve));
  const request = (i: number): object => ({ model_name: 'tiny', id: `r${i}`, inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [Buffer.alloc(4096)] });

  const busy = open();
  const idle = open();
  const busyEnd = ended(busy);
  const idleEnd = ended(idle);
  const answers: string[] = [];
  const firstAnswer = new Promise<void>((resolve) => busy.on('data', (m) => { answers.push(m.infer_response.id); resolve(); }));
  for (let i = 0; i < 5; i++) busy.write(request(i));
  await firstAnswer;
  idle.write(request(99));
  await new Promise<void>((resolve) => idle.once('data', () => resolve()));
  run.child.kill('SIGTERM');
  const [busyErr, idleErr] = await Promise.all([busyEnd, idleEnd]);
  t.same(answers, ['r0', 'r1', 'r2', 'r3', 'r4'], 'every request sent before the signal was answered, in order');
  t.equal(busyErr.code, grpc.status.UNAVAILABLE);
  t.match(busyErr.details, /edge-agent is shutting down; every request sent before was answered/);
  t.equal(idleErr.code, grpc.status.UNAVAILABLE, 'the idle stream ended too');
  const { code } = await run.exited;
  t.equal(code, 0, 'exit code 0');
  t.match(run.stdout(), /"drained":true/);
});
