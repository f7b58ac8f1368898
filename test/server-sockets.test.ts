import t from 'tap';
import { spawn } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { agentConfigSchema } from '../agent/config/index.js';
import { ConfigError } from '../agent/errors.js';
import { silentLogger } from '../agent/logger.js';
import { Agent } from '../agent/main.js';
import { GrpcListeners } from '../agent/server/index.js';
import { capStatusDetails, MAX_STATUS_DETAILS } from '../agent/server/status-map.js';
import { startTestAgent } from './helpers/agent.js';
import { KServeClient, rejection } from './helpers/hostile-agent.js';
import { tempDir } from './helpers/runtime.js';

// The unix socket listener next to other processes on the same path (a second agent started by hand next to
// the service, a stale file left by a killed one), paths too long for a socket, and statuses that echo a
// hostile client's very long names.

type Teardown = Parameters<typeof startTestAgent>[0];

/** A second agent in this process on the same model repository, listening on `listen`; stopped at teardown. */
function secondAgent(t: Teardown, repo: string, listen: string[]): Agent {
  const config = agentConfigSchema.parse({
    model_repository: repo,
    data_dir: tempDir(t, 'edge-agent-second-'),
    server: { listen },
    runtime: { execution_providers: ['cpu'] },
    telemetry: { http: { port: 0 } },
  });
  const agent = new Agent({ config, configSource: '<second>', log: silentLogger() });
  t.teardown(() => agent.stop());
  return agent;
}

const identity = (path: string): string => {
  const s = lstatSync(path);
  return `${s.dev}:${s.ino}`;
};

t.test('a second agent on a unix socket in use fails with a ConfigError and leaves the first one serving', async (t) => {
  const first = await startTestAgent(t, { models: ['tiny'] });
  const path = first.unix.slice('unix:'.length);
  const before = identity(path);
  // Unix first, as in the default config: the socket was the first thing the second agent touched.
  const second = secondAgent(t, first.repo, [first.unix, '127.0.0.1:0']);
  const err = await second.start().then(() => undefined, (e: unknown) => e);
  t.type(err, ConfigError, 'start rejects with a ConfigError');
  t.match((err as Error | undefined)?.message, /server\.listen: unix socket '.*agent\.sock' is in use by a running process/, 'naming server.listen, the path and why');
  await second.stop();
  t.equal(identity(path), before, 'the first agent\'s socket file is still there');
  t.equal(await first.client(first.unix).checkHealth(), 'SERVING', 'the first agent answers over the unix socket');
});

t.test('a socket file left by a killed process is replaced; a file that is not a socket is refused', async (t) => {
  const dir = tempDir(t, 'edge-agent-stale-');
  const path = join(dir, 'edge.sock');
  // A process that dies while listening leaves its socket file behind (nothing accepts on it any more).
  const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, 'SIGKILL'))`]);
  await new Promise((resolve) => child.once('exit', resolve));
  t.ok(lstatSync(path).isSocket(), 'a stale socket file is there');
  const a = await startTestAgent(t, { models: ['tiny'], config: { server: { listen: ['127.0.0.1:0', `unix:${path}`] } } });
  t.equal(await a.client(`unix:${path}`).checkHealth(), 'SERVING', 'the agent took the path over');

  const file = join(dir, 'not-a-socket');
  writeFileSync(file, 'keep me');
  const listeners = new GrpcListeners({ listen: [`unix:${file}`], maxMessageBytes: 1 << 20, unixSocketMode: 0o660, insecure: false, configSource: '<test>' }, silentLogger());
  t.teardown(() => listeners.stop(0));
  const err = await listeners.start().then(() => undefined, (e: unknown) => e);
  t.type(err, ConfigError);
  t.match((err as Error).message, /server\.listen: '.*not-a-socket' exists and is not a unix socket/);
  t.equal(readFileSync(file, 'utf8'), 'keep me', 'the file is left as it was');
});

t.test('stop removes only the socket file this agent created', async (t) => {
  const first = await startTestAgent(t, { models: ['tiny'] });
  const path = first.unix.slice('unix:'.length);
  // Someone removes the running agent's socket by hand; another agent then binds the path.
  rmSync(path);
  const second = secondAgent(t, first.repo, ['127.0.0.1:0', first.unix]);
  await second.start();
  const secondSocket = identity(path);
  await first.agent.stop();
  t.ok(existsSync(path), 'the socket file is still there after the first agent stopped');
  t.equal(identity(path), secondSocket, 'and it is the second agent\'s');
  const client = first.client(first.unix);
  t.equal(await client.checkHealth(), 'SERVING', 'the second agent answers over it');
  client.close();
  await second.stop();
  t.notOk(existsSync(path), 'the second agent removed its own socket on stop');
});

t.test('a unix socket path over the system limit is a ConfigError, and nothing is created', async (t) => {
  const base = tempDir(t, 'edge-agent-long-');
  const path = join(base, 'd'.repeat(100), 'edge-agent.sock');
  const bytes = Buffer.byteLength(path);
  const limit = process.platform === 'linux' ? 107 : 103;
  t.ok(bytes > limit, `the path is ${bytes} bytes`);
  const listeners = new GrpcListeners({ listen: [`unix:${path}`], maxMessageBytes: 1 << 20, unixSocketMode: 0o660, insecure: false, configSource: '<test>' }, silentLogger());
  t.teardown(() => listeners.stop(0));
  const err = await listeners.start().then(() => undefined, (e: unknown) => e);
  t.type(err, ConfigError, 'start rejects with a ConfigError');
  t.match((err as Error).message, `server.listen: unix socket path '${path}' is ${bytes} bytes, over the system's limit of ${limit}`);
  t.same(readdirSync(base), [], 'no directory and no socket at a truncated path');

  // Multi-byte characters count as bytes: 36 three-byte characters make a 108+ byte path of fewer characters.
  const wide = join(base, '€'.repeat(36));
  mkdirSync(wide);
  const widePath = join(wide, 's');
  t.ok(widePath.length <= limit && Buffer.byteLength(widePath) > limit, 'short in characters, long in bytes');
  const wideListeners = new GrpcListeners({ listen: [`unix:${widePath}`], maxMessageBytes: 1 << 20, unixSocketMode: 0o660, insecure: false, configSource: '<test>' }, silentLogger());
  t.teardown(() => wideListeners.stop(0));
  t.match(await wideListeners.start().then(() => undefined, (e: unknown) => (e as Error).message), /over the system's limit/);
  t.same(readdirSync(wide), [], 'nothing created');

  // At the limit exactly: served, with a long file name (bound under a shorter temporary one, then renamed) and
  // with a one-letter one (no temporary name fits: bound directly).
  for (const name of ['edge-agent-at-the-limit.sock', 's']) {
    const dir = join(base, 'e'.repeat(limit - Buffer.byteLength(join(base, 'x', name)) + 1));
    const atLimit = join(dir, name);
    t.equal(Buffer.byteLength(atLimit), limit, `${name}: a path of ${limit} bytes`);
    const ok = new GrpcListeners({ listen: [`unix:${atLimit}`], maxMessageBytes: 1 << 20, unixSocketMode: 0o660, insecure: false, configSource: '<test>' }, silentLogger());
    await ok.start();
    t.ok(lstatSync(atLimit).isSocket(), `${name}: the socket is at the path`);
    await new Promise<void>((resolve, reject) => connect(atLimit).once('connect', function (this: Socket) { this.destroy(); resolve(); }).once('error', reject));
    t.pass(`${name}: it accepts connections`);
    t.same(readdirSync(dir), [name], `${name}: no temporary name left`);
    await ok.stop(0);
    t.same(readdirSync(dir), [], `${name}: removed on stop`);
  }
});

t.test('two agents starting at once on one socket path: one serves, the other fails naming the path', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'agent.sock');
  const make = (): GrpcListeners => new GrpcListeners({ listen: [`unix:${path}`], maxMessageBytes: 1 << 20, unixSocketMode: 0o660, insecure: false, configSource: '<test>' }, silentLogger());
  const both = [make(), make()];
  const started = await Promise.allSettled(both.map((l) => l.start()));
  t.teardown(() => Promise.all(both.map((l) => l.stop(0).catch(() => undefined))));
  t.same(started.map((r) => r.status).sort(), ['fulfilled', 'rejected'], 'exactly one of them has the path');
  const failed = started.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  t.type(failed?.reason, ConfigError);
  t.match(String(failed?.reason), /server\.listen: unix socket '.*agent\.sock' (is in use by a running process|was taken by another process)/);
  await new Promise<void>((resolve, reject) => connect(path).once('connect', function (this: Socket) { this.destroy(); resolve(); }).once('error', reject));
  t.pass('the socket at the path accepts connections');
  t.same(readdirSync(dir), ['agent.sock'], 'no temporary name left');
});

t.test('statuses that echo a 100 000-character name are delivered, cut to about 1 KiB', async (t) => {
  const a = await startTestAgent(t, { models: ['tiny'] });
  const kserve = new KServeClient(a.tcp);
  t.teardown(() => kserve.close());
  // Without a cap the trailers exceed HTTP/2's header list limit, are never sent, and the call runs into this
  // deadline instead of failing with the status.
  const deadline = (): grpc.CallOptions => ({ deadline: Date.now() + 10_000 });
  const long = 'm'.repeat(100_000);

  const metadata = await rejection(kserve.call('ModelMetadata', { name: long }, deadline()));
  t.equal(metadata.code, grpc.status.NOT_FOUND, 'KServe ModelMetadata: NOT_FOUND');
  t.ok(metadata.details.length <= MAX_STATUS_DETAILS, `details cut to ${metadata.details.length} chars`);
  t.match(metadata.details, /^[^]*mmmm… \(\d{6} chars\)$/, 'ending with the original length');

  const infer = await rejection(kserve.call('ModelInfer', {
    model_name: 'tiny',
    inputs: [{ name: 'x'.repeat(100_000), datatype: 'FP32', shape: [1, 1024] }],
    raw_input_contents: [Buffer.alloc(4096)],
  }, deadline()));
  t.equal(infer.code, grpc.status.INVALID_ARGUMENT, 'KServe ModelInfer with a long input name: INVALID_ARGUMENT');
  t.ok(infer.details.length <= MAX_STATUS_DETAILS, 'details cut');

  const open = await a.client().openStream({ model: long }, deadline()).then(() => undefined, (e: unknown) => e as grpc.ServiceError);
  t.equal(open?.code, grpc.status.NOT_FOUND, 'native open of a long model name: NOT_FOUND');
  t.ok((open?.details.length ?? Infinity) <= MAX_STATUS_DETAILS, 'details cut');

  // Four-byte characters: percent-encoded, 12 bytes on the wire for every two UTF-16 units.
  const emoji = await rejection(kserve.call('ModelMetadata', { name: '😀'.repeat(50_000) }, deadline()));
  t.equal(emoji.code, grpc.status.NOT_FOUND, 'a long name of emoji: NOT_FOUND');
  t.notOk(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])/.test(emoji.details), 'no half surrogate pair at the cut');

  const health = await a.client().checkHealth(long).then(() => undefined, (e: unknown) => e as grpc.ServiceError);
  t.equal(health?.code, grpc.status.NOT_FOUND, 'health Check of a long service name: NOT_FOUND');
  t.ok((health?.details.length ?? Infinity) <= MAX_STATUS_DETAILS, 'details cut');

  t.equal(await a.client().checkHealth(), 'SERVING', 'the agent still serves');
});

t.test('capStatusDetails: short messages unchanged, long ones cut once', async (t) => {
  t.equal(capStatusDetails('model \'x\' not found'), 'model \'x\' not found');
  const exact = 'a'.repeat(MAX_STATUS_DETAILS);
  t.equal(capStatusDetails(exact), exact, 'a message at the limit is kept whole');
  const cut = capStatusDetails('b'.repeat(5000));
  t.equal(cut.length, MAX_STATUS_DETAILS);
  t.match(cut, /^b+… \(5000 chars\)$/);
  t.equal(capStatusDetails(cut), cut, 'capping a capped message changes nothing');
});
