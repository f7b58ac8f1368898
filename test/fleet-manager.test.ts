import t from 'tap';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { MosquittoBroker } from './helpers/mosquitto.js';
import { modelBytes, scratchDir, startDevice } from './helpers/fleet.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const CLI = join(ROOT, 'scripts', 'fleet-manager.ts');

interface Run {
  readonly code: Promise<number | null>;
  readonly lines: () => Record<string, unknown>[];
  readonly stderr: () => string;
  waitLine(pred: (l: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
  kill(signal: NodeJS.Signals): void;
}

function cli(t: { teardown(fn: () => void): void }, args: string[]): Run {
  const loader = process.execArgv.find((a) => a.includes('@tapjs/typescript'))
    ?? `--import=${pathToFileURL(join(ROOT, 'node_modules', '@tapjs', 'typescript', 'dist', 'esm', 'import.mjs')).href}`;
  const env: NodeJS.ProcessEnv = { ...process.env, TS_NODE_TRANSPILE_ONLY: '1' };
  delete env.NODE_OPTIONS;
  const proc = spawn(process.execPath, [loader, CLI, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => { if (proc.exitCode === null) proc.kill('SIGKILL'); });
  let out = '';
  let err = '';
  proc.stdout.on('data', (d: Buffer) => { out += d.toString(); });
  proc.stderr.on('data', (d: Buffer) => { err += d.toString(); });
  const lines = (): Record<string, unknown>[] => out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
  return {
    code: new Promise((resolve) => proc.once('exit', (c) => resolve(c))),
    lines,
    stderr: () => err,
    kill: (s) => proc.kill(s),
    async waitLine(pred, timeoutMs = 30_000) {
      const end = Date.now() + timeoutMs;
      for (;;) {
        const found = lines().find(pred);
        if (found) return found;
        if (Date.now() > end || proc.exitCode !== null) throw new Error(`fleet-manager ${args[0]}: no matching line; stdout: ${out} stderr: ${err}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
  };
}

t.test('fleet-manager CLI: keygen, serve, publish, watch and command against a real device', { timeout: 110_000 }, async (t) => {
  const dir = scratchDir(t);
  const broker = await MosquittoBroker.start();
  t.teardown(() => broker.close());
  const keygen = cli(t, ['keygen', '--out', join(dir, 'fleet.pem'), '--key-id', 'ops-1']);
  t.equal(await keygen.code, 0);
  const key = keygen.lines()[0] as { key_id: string; public_key: string; trusted_keys_yaml: string };
  t.equal(key.key_id, 'ops-1');
  t.match(key.trusted_keys_yaml, /^trusted_keys:\n {2}ops-1: [A-Za-z0-9+/]{43}=$/);

  const dev = await startDevice(t, { broker, keyId: 'ops-1', publicKey: key.public_key });
  const model = join(dir, 'model.onnx');
  const bytes = modelBytes(70_000, 'ONNX', 3);
  writeFileSync(model, bytes);
  writeFileSync(join(dir, 'config.yaml'), 'max_batch_size: 4\n');

  const serve = cli(t, ['serve', '--broker', broker.url, '--artifact', model, '--chunk-size', '16384', '--http-port', '0']);
  const serving = await serve.waitLine((l) => typeof l.serving === 'string');
  t.match(serving, { size: 70_000, url: /^http:\/\/127\.0\.0\.1:\d+\/artifacts\/[0-9a-f]{64}$/ });

  const watch = cli(t, ['watch', '--broker', broker.url, '--device', 'dev-1', '--until-state', 'active', '--deployment-id', 'cli-1']);
  await watch.waitLine((l) => String(l.topic).endsWith('/status') && (l.payload as { state?: string }).state === 'online');
  const publish = cli(t, ['publish', '--broker', broker.url, '--signing-key', join(dir, 'fleet.pem'), '--key-id', 'ops-1', '--device', 'dev-1',
    '--model', 'det', '--model-version', '1', '--artifact', model, '--chunk-size', '16384', '--config', join(dir, 'config.yaml'), '--deployment-id', 'cli-1']);
  t.equal(await publish.code, 0, publish.stderr());
  t.match(publish.lines()[0], { topic: 'edge/devices/dev-1/deployments', manifest: { deployment_id: 'cli-1', model: 'det', version: 1, key_id: 'ops-1', config: { max_batch_size: 4 }, artifact: { size: 70_000, source: 'mqtt', chunk_size: 16384 } } });
  t.equal(await watch.code, 0, 'watch exits when the deployment is active');
  const states = watch.lines().filter((l) => String(l.topic).includes('/deployments/cli-1/status')).map((l) => (l.payload as { state: string }).state);
  t.same(states.filter((s, i) => states[i - 1] !== s), ['accepted', 'downloading', 'verifying', 'loading', 'warming', 'validating', 'active']);
  t.same(dev.target.modelVersions('det').active, 1);

  const cmd = cli(t, ['command', 'get_state', '--broker', broker.url, '--signing-key', join(dir, 'fleet.pem'), '--key-id', 'ops-1', '--device', 'dev-1']);
  t.equal(await cmd.code, 0, cmd.stderr());
  t.match(cmd.lines()[0], { ok: true, command: 'get_state', result: { device_id: 'dev-1', models: [{ name: 'det', active_version: 1 }] } });
  const bad = cli(t, ['command', 'delete_version', '--broker', broker.url, '--signing-key', join(dir, 'fleet.pem'), '--key-id', 'ops-1', '--device', 'dev-1', '--model', 'det', '--model-version', '1']);
  t.equal(await bad.code, 1, 'a failed command exits 1');
  t.match(bad.lines()[0], { ok: false, error: "version 1 of 'det' is serving; activate another version first" });

  serve.kill('SIGTERM');
  t.equal(await serve.code, 0);
  t.match(serve.lines().find((l) => l.stopped), { chunks_sent: 5, rerequested_chunks: 0 });

  const usage = cli(t, ['publish', '--broker', broker.url]);
  t.equal(await usage.code, 1);
  t.match(usage.stderr(), /required option '--signing-key <file>' not specified/);
});
