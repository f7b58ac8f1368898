import t from 'tap';
import { writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { loadConfig } from '../agent/config/index.js';
import { ConfigError } from '../agent/errors.js';
import { ModelRepository, readModelConfig } from '../agent/models/index.js';
import { tempDir } from './helpers/runtime.js';

t.test('defaults, file, environment and flags, in that order of precedence', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'agent.yaml');
  writeFileSync(file, 'model_repository: repo\ndata_dir: state\nserver:\n  listen: ["127.0.0.1:6000"]\nlog:\n  level: warn\n');
  const fromFile = loadConfig({ file, cwd: '/somewhere' }).config;
  t.equal(fromFile.model_repository, join(dir, 'repo'), 'file paths are relative to the file');
  t.equal(fromFile.data_dir, join(dir, 'state'));
  t.same(fromFile.server.listen, ['127.0.0.1:6000']);
  t.equal(fromFile.server.max_message_bytes, 16 * 1024 * 1024, 'unspecified keys take defaults');
  t.ok(Object.isFrozen(fromFile.server), 'config is frozen');

  const env = { EDGE_AGENT_DATA_DIR: 'envdata', EDGE_AGENT_LISTEN: '127.0.0.1:7000, unix:sock', EDGE_AGENT_LOG_LEVEL: 'debug' };
  const withEnv = loadConfig({ file, env, cwd: '/work' }).config;
  t.equal(withEnv.data_dir, '/work/envdata', 'env paths are relative to the working directory');
  t.same(withEnv.server.listen, ['127.0.0.1:7000', 'unix:/work/sock']);
  t.equal(withEnv.log.level, 'debug');

  const withFlags = loadConfig({ file, env, cwd: '/work', overrides: { dataDir: 'flagdata', listen: ['127.0.0.1:8000'] } }).config;
  t.equal(withFlags.data_dir, '/work/flagdata', 'flags win over env');
  t.same(withFlags.server.listen, ['127.0.0.1:8000']);
  t.equal(withFlags.model_repository, join(dir, 'repo'), 'untouched keys keep the file value');
});

t.test('config errors name the file, the key and the problem', async (t) => {
  const dir = tempDir(t);
  const cases: [string, RegExp][] = [
    ['server:\n  max_message_bytes: lots\n', /agent\.yaml: server\.max_message_bytes: .*number/],
    ['server:\n  listen: ["nonsense"]\n', /server\.listen\[0\]: expected 'host:port'/],
    ['server:\n  listen: ["127.0.0.1:99999"]\n', /server\.listen\[0\]: port out of range/],
    ['runtime:\n  execution_providers: [cpu, tpu]\n', /runtime\.execution_providers\[1\]/],
    ['runtime:\n  typo_key: 1\n', /runtime\.typo_key: unknown key 'typo_key'/],
    ['server: [\n', /YAML syntax error at line/],
    ['- a\n- b\n', /top level must be a mapping/],
  ];
  for (const [text, pattern] of cases) {
    const file = join(dir, 'agent.yaml');
    writeFileSync(file, text);
    t.throws(() => loadConfig({ file }), pattern, JSON.stringify(text));
    t.throws(() => loadConfig({ file }), ConfigError);
  }
  writeFileSync(join(dir, 'agent.yaml'), 'server:\n  busy_poll_us: -5\nruntime:\n  execution_providers: [gpu]\n  typo_key: 1\n');
  t.throws(() => loadConfig({ file: join(dir, 'agent.yaml') }), {
    key: 'server.busy_poll_us',
    message: /server\.busy_poll_us: .*>=0; runtime\.execution_providers\[0\]: .*"cpu"; runtime\.typo_key: unknown key 'typo_key'$/,
  }, 'every problem in the file is named at once, the first as the key');
  t.throws(() => loadConfig({ file: join(dir, 'missing.yaml') }), /missing\.yaml: cannot read config file: ENOENT/);
  t.throws(() => loadConfig({ overrides: { logLevel: 'loud' } }), /log\.level/);
  writeFileSync(join(dir, 'empty.yaml'), 'log:\n  level: info\n');
  t.throws(() => loadConfig({ file: join(dir, 'empty.yaml'), env: { EDGE_AGENT_LOG_LEVEL: 'loud' } }), /^environment EDGE_AGENT_LOG_LEVEL: log\.level: /,
    'a bad value from the environment names the variable, not the file');
  t.throws(() => loadConfig({ file: join(dir, 'empty.yaml'), overrides: { listen: ['nowhere'] } }), /^flag --listen: server\.listen\[0\]: /, 'and one from a flag names the flag');
});

t.test('without server.listen the unix socket is in the data dir, wherever that is', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'etc', 'agent.yaml');
  mkdirSync(join(dir, 'etc'));
  writeFileSync(file, 'model_repository: models\n');
  t.same(loadConfig({ file }).config.server.listen, ['127.0.0.1:50051', `unix:${join(dir, 'etc', 'var', 'edge-agent.sock')}`], 'the default data dir, beside the file');
  const pinned = loadConfig({ file, env: { EDGE_AGENT_DATA_DIR: '/var/lib/edge-agent' } }).config;
  t.same(pinned.server.listen, ['127.0.0.1:50051', 'unix:/var/lib/edge-agent/edge-agent.sock'], 'EDGE_AGENT_DATA_DIR moves the socket with it');
  writeFileSync(file, 'server:\n  listen: ["unix:run/agent.sock"]\n');
  t.same(loadConfig({ file, env: { EDGE_AGENT_DATA_DIR: '/var/lib/edge-agent' } }).config.server.listen, [`unix:${join(dir, 'etc', 'run', 'agent.sock')}`], 'a listen the file gives is kept');
});

t.test('model repository: versions, pinned version, bad config.yaml reported per model', async (t) => {
  const root = tempDir(t);
  const mk = (p: string, content = 'x'): void => {
    mkdirSync(join(root, p, '..'), { recursive: true });
    writeFileSync(join(root, p), content);
  };
  mk('a/1/model.onnx');
  mk('a/3/model.onnx');
  mk('a/3/model.int8.onnx');
  mk('a/notaversion/model.onnx');
  mk('b/1/model.onnx');
  mk('b/2/model.onnx');
  mk('b/config.yaml', 'version: 1\n');
  mk('c/1/model.onnx');
  mk('c/config.yaml', 'max_batch_sise: 8\n');
  mk('d/1/readme.txt');
  mk('d/2/model.int8.onnx');
  mk('a/1234567890123456/model.onnx');
  const repo = new ModelRepository(root);
  const byName = Object.fromEntries(repo.scan().map((e) => [e.name, e]));
  t.same(byName.a?.versions.map((v) => v.version), [1, 3]);
  t.equal(byName.a?.servedVersion, 3, 'highest version served');
  t.same(Object.keys(byName.a?.versions[1]?.variants ?? {}).sort(), ['fp32', 'int8']);
  t.equal(byName.b?.servedVersion, 1, 'config pins version 1');
  t.match(byName.c?.configError, /c\/config\.yaml: max_batch_sise: unknown key/);
  t.same(byName.d?.versions, [], 'a version folder without model.onnx is not a version, even with a compressed variant in it');
  t.notOk(byName.a?.versions.some((v) => v.version > 1e15), 'a 16-digit folder is no version (not exact as a number, not addressable by KServe)');
  t.throws(() => readModelConfig(join(root, 'c')), ConfigError);
  t.throws(() => new ModelRepository(join(root, 'nope')).scan(), /model_repository: cannot read/);
});
