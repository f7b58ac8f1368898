import t from 'tap';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { startCli } from './helpers/cli.js';
import { rejection, startHostileAgent, type Msg } from './helpers/hostile-agent.js';
import { freePort } from './helpers/mosquitto.js';
import { tempDir } from './helpers/runtime.js';

// Hostile files: broken model files in the repository, and config files with wrong types. A broken model is
// reported failed (name, path, onnxruntime's own message) while the others serve; a bad config stops the agent
// before it listens, with one line naming the file, the key and the problem.

const report: string[] = [];
t.teardown(() => { t.comment(`hostile files report:\n${report.join('\n')}`); });

t.test('truncated and non-ONNX model files: those models fail with name, path and reason; the rest serve', async (t) => {
  const broken: Record<string, (tinyBytes: Buffer) => Buffer> = {
    truncated: (b) => b.subarray(0, Math.floor(b.length / 2)),
    'not-onnx': () => Buffer.from('this is a text file, not an ONNX model\n'),
    empty: () => Buffer.alloc(0),
    'random-bytes': () => Buffer.from(Array.from({ length: 8192 }, (_, i) => (i * 2654435761) >>> 24)),
  };
  const agent = await startHostileAgent(t, {
    models: ['tiny', 'classifier'],
    prepareRepo: (repo) => {
      const tiny = readFileSync(join(repo, 'tiny', '1', 'model.onnx'));
      for (const [name, make] of Object.entries(broken)) {
        mkdirSync(join(repo, name, '1'), { recursive: true });
        writeFileSync(join(repo, name, '1', 'model.onnx'), make(tiny));
      }
    },
  });
  const names = Object.keys(broken).sort();

  const readyLine = JSON.parse(await agent.run.waitFor(/"msg":"edge-agent ready"/)) as { ready: string[]; failed: string[] };
  t.same([...readyLine.failed].sort(), names, 'the ready log line names the failed models');
  t.same(readyLine.ready, ['classifier:1@cpu', 'tiny:1@cpu'], 'the good models serve');

  const index = (await agent.kserve.call('RepositoryIndex', {}))['models'] as Msg[];
  for (const name of names) {
    const path = join(agent.repo, name);
    const entry = index.find((m) => m['name'] === name);
    t.equal(entry?.['state'], 'UNAVAILABLE', `${name}: RepositoryIndex state`);
    const reason = String(entry?.['reason'] ?? '');
    report.push(`model   | ${name.padEnd(14)} | ${reason}`);
    t.ok(reason.includes(`'${name}'`) && reason.includes(path), `${name}: reason names the model and its path: ${reason}`);
    t.match(reason, /failed to load: \S/, `${name}: and gives the loader's message`);
    const logged = agent.run.stdout().split('\n').find((l) => l.includes('"msg":"model failed to load"') && l.includes(`"model":"${name}"`));
    t.ok(logged, `${name}: logged as failed`);

    await t.rejects(agent.native.openStream({ model: name }), { code: grpc.status.UNAVAILABLE, details: new RegExp(`model '${name}' is unavailable`) }, `${name}: a stream is refused UNAVAILABLE`);
    const err = await rejection(agent.kserve.call('ModelInfer', { model_name: name, inputs: [], raw_input_contents: [] }));
    t.equal(err.code, grpc.status.UNAVAILABLE, `${name}: ModelInfer UNAVAILABLE`);
    t.equal(await agent.native.checkHealth(name), 'NOT_SERVING', `${name}: health NOT_SERVING`);
  }
  // onnxruntime's own words reach the operator for the ones it parsed (an empty file is refused before that).
  const truncated = String(index.find((m) => m['name'] === 'truncated')?.['reason']);
  t.match(truncated, /cpu: Load model from \S+truncated\S+ failed:Protobuf parsing failed/, 'truncated: onnxruntime\'s message');
  const loadAgain = await rejection(agent.kserve.call('RepositoryModelLoad', { model_name: 'not-onnx' }));
  t.equal(loadAgain.code, grpc.status.UNAVAILABLE, 'loading it again through KServe fails again: UNAVAILABLE');
  t.match(loadAgain.details, /model 'not-onnx' \(\S+not-onnx\S*\) failed to load: .*Protobuf parsing failed/);
  report.push(`kserve  | RepositoryModelLoad not-onnx | ${grpc.status[loadAgain.code]}: ${loadAgain.details}`);
  await agent.stillServing(t, 'broken models in the repository');
});

t.test('config files with wrong types: exit 2 with one line naming file, key and problem; nothing listens', async (t) => {
  const cases: [string, string, RegExp][] = [
    ['number as string', 'server:\n  max_streams: "many"\n', /server\.max_streams: .*expected number/i],
    ['string for a list', 'runtime:\n  execution_providers: cpu\n', /runtime\.execution_providers: .*expected array/i],
    ['unknown provider', 'runtime:\n  execution_providers: [cpu, tpu]\n', /runtime\.execution_providers\[1\]: /],
    ['number for an enum', 'log:\n  level: 5\n', /log\.level: /],
    ['port as number', 'server:\n  listen: 50051\n', /server\.listen: .*expected array/i],
    ['bad listen address', 'server:\n  listen: ["localhost"]\n', /server\.listen\[0\]: expected 'host:port'/],
    ['negative limit', 'server:\n  max_message_bytes: -1\n', /server\.max_message_bytes: /],
    ['float for an integer', 'server:\n  max_streams_per_peer: 1.5\n', /server\.max_streams_per_peer: .*int/i],
    ['boolean as string', 'runtime:\n  graph_cache: "yes"\n', /runtime\.graph_cache: .*expected boolean/i],
    ['mapping for a scalar', 'server:\n  drain_timeout_ms:\n    seconds: 10\n', /server\.drain_timeout_ms: .*expected number/i],
    ['list at the top', '- a\n- b\n', /the top level must be a mapping/],
    ['unknown key', 'sever:\n  listen: ["127.0.0.1:1"]\n', /unknown key 'sever'/],
    ['YAML syntax', 'server: [unclosed\n', /YAML syntax error at line \d+, column \d+/],
    ['duplicate key', 'log:\n  level: info\nlog:\n  level: debug\n', /YAML syntax error.*[Mm]ap keys must be unique/],
    ['binary garbage', '\u0000\u0001\u0002\uFFFD\u0007', /edge-agent: .*: /],
  ];
  const dir = tempDir(t);
  for (const [what, yaml, re] of cases) {
    const port = await freePort();
    const file = join(dir, `${what.replace(/\W+/g, '-')}.yaml`);
    writeFileSync(file, yaml);
    // The listener comes from the flag unless the case is about server.listen (a flag would override it).
    const listen = /listen/.test(yaml) ? [] : ['--listen', `127.0.0.1:${port}`];
    const run = startCli(['serve', '--config', file, ...listen, '--model-repository', dir, '--data-dir', join(dir, 'var')]);
    const killer = setTimeout(() => run.child.kill('SIGKILL'), 30_000);
    const { code } = await run.exited;
    clearTimeout(killer);
    const err = run.stderr().trim();
    report.push(`config  | ${what.padEnd(20)} | exit ${code}: ${err}`);
    t.equal(code, 2, `${what}: exit 2`);
    t.ok(err.startsWith(`edge-agent: ${file}: `), `${what}: names the file`);
    t.match(err, re, `${what}: names the key and the problem`);
    t.equal(err.split('\n').length, 1, `${what}: one line, no stack trace`);
    const listening = await new Promise<boolean>((resolve) => {
      const s = connect(port, '127.0.0.1');
      s.once('connect', () => { s.destroy(); resolve(true); });
      s.once('error', () => resolve(false));
    });
    t.notOk(listening, `${what}: nothing listened`);
  }
});
