import t from 'tap';
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync, readdirSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { runtimeSchema } from '../agent/config/schema.js';
import { ModelRepository } from '../agent/models/index.js';
import { InferenceRuntime, createSession, digestModelFile, GRAPHS_KEPT_PER_MODEL, type Tensor } from '../agent/runtime/index.js';
import { directBinding, openOrtSession } from '../agent/runtime/ort-session.js';
import { buildTiny } from '../scripts/demo-models.js';
import { DEMO_REPO, copyDemoRepo, startRuntime, tempDir } from './helpers/runtime.js';

function capturingLogger(): { log: pino.Logger; lines: () => Record<string, unknown>[] } {
  const out: string[] = [];
  const stream = new Writable({ write(chunk, _enc, cb) { out.push(chunk.toString()); cb(); } });
  return { log: pino({ level: 'info' }, stream), lines: () => out.join('').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>) };
}

t.test('providers are tried in order; a missing one is skipped with its reason logged', async (t) => {
  const repo = copyDemoRepo(t, ['tiny']);
  const { log, lines } = capturingLogger();
  const config = runtimeSchema.parse({ execution_providers: ['tensorrt', 'cuda', 'webgpu', 'cpu'] });
  const rt = new InferenceRuntime({ repository: new ModelRepository(repo), config, dataDir: tempDir(t), log });
  await rt.start();
  t.teardown(() => rt.close());
  t.equal(rt.modelInfo('tiny').provider, 'cpu', 'cpu serves on a machine without GPU libraries');
  const skipped = lines().find((l) => l.msg === 'execution providers skipped before the one that serves') as { skipped: { provider: string; reason: string }[] } | undefined;
  t.same(skipped?.skipped.map((s) => s.provider), ['tensorrt', 'cuda', 'webgpu'], 'skipped in preference order');
  t.ok(skipped?.skipped.every((s) => s.reason.length > 0), 'each with onnxruntime\'s reason');
  const ready = lines().find((l) => l.msg === 'model ready');
  t.equal(ready?.provider, 'cpu', 'the serving provider is logged');
});

t.test('a list of only missing providers is a clear load error; other models still serve', async (t) => {
  const repo = copyDemoRepo(t, ['tiny', 'filter']);
  writeFileSync(join(repo, 'tiny', 'config.yaml'), 'execution_providers: [cuda, tensorrt]\n');
  const rt = await startRuntime(t, repo);
  const info = rt.modelInfo('tiny');
  t.equal(info.state, 'UNAVAILABLE');
  t.match(info.reason, /model 'tiny' \(.*model\.onnx\) failed to load: no execution provider could load it: tensorrt: .* \(also tried cuda: .*\)/);
  t.equal(rt.modelInfo('filter').state, 'READY', 'the other model serves');
});

t.test('a truncated model file is reported with name, path and onnxruntime\'s message', async (t) => {
  const repo = copyDemoRepo(t, ['tiny', 'filter']);
  const file = join(repo, 'tiny', '1', 'model.onnx');
  writeFileSync(file, readFileSync(file).subarray(0, 200));
  const rt = await startRuntime(t, repo);
  t.match(rt.modelInfo('tiny').reason, new RegExp(`model 'tiny' \\(${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\) failed to load: .*cpu: .*(?:protobuf|parse|Protobuf)`, 'i'));
  t.equal(rt.modelInfo('filter').state, 'READY');
});

t.test('sessions open through onnxruntime-node\'s native binding with the metadata its public API reports', async (t) => {
  t.ok(directBinding, 'the binding loads, so runs are synchronous (no setImmediate per frame)');
  const ort = await import('onnxruntime-node');
  for (const model of ['tiny', 'types', 'filter']) {
    const path = join(DEMO_REPO, model, '1', 'model.onnx');
    const viaBinding = await openOrtSession(path, {});
    const viaApi = await ort.InferenceSession.create(path);
    t.same(viaBinding.inputMetadata, viaApi.inputMetadata, `${model}: inputs`);
    t.same(viaBinding.outputMetadata, viaApi.outputMetadata, `${model}: outputs`);
    await viaBinding.release();
    await viaApi.release();
  }
  const bad = await openOrtSession(join(DEMO_REPO, 'tiny', '1', 'model.onnx'), {});
  const { Tensor: OrtTensor } = await import('onnxruntime-node');
  t.throws(() => bad.run({ x: new OrtTensor('float32', new Float32Array(7), [1, 7]) }), /dimension|shape|Got/i, 'a bad feed is an exception, not a crash');
  await bad.release();
});

t.test('the optimised graph is cached, reused, and rebuilt when the model changes', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'tiny.onnx');
  writeFileSync(path, buildTiny());
  const req = { model: 'tiny', path, providers: ['cpu'] as const, providerOptions: runtimeSchema.parse({}).provider_options, graphOptimization: 'all' as const, cacheDir: join(dir, 'cache') };
  const first = await createSession({ ...req, providers: ['cpu'] });
  t.equal(first.graphCache, 'stored', 'first load optimises and stores');
  const second = await createSession({ ...req, providers: ['cpu'] });
  t.equal(second.graphCache, 'hit', 'second load reuses the cached graph');
  const x = new Float32Array(1024).map((_, i) => Math.sin(i));
  const { Tensor: OrtTensor } = await import('onnxruntime-node');
  const a = await first.session.run({ x: new OrtTensor('float32', x, [1, 1024]) });
  const b = await second.session.run({ x: new OrtTensor('float32', x, [1, 1024]) });
  t.same(Array.from(b.y?.data as Float32Array), Array.from(a.y?.data as Float32Array), 'cached graph computes the same outputs');
  await first.session.release();
  await second.session.release();
  const bytes = Buffer.from(buildTiny());
  const mid = bytes.length >> 1; // inside the weights: a changed weight, a different model
  bytes[mid] = (bytes[mid] as number) ^ 1;
  writeFileSync(path, bytes);
  const third = await createSession({ ...req, providers: ['cpu'] });
  t.equal(third.graphCache, 'stored', 'a changed model misses the cache and is optimised again');
  await third.session.release();
  t.equal(readdirSync(join(dir, 'cache', 'graphs')).filter((f) => f.endsWith('.onnx')).length, 2, 'one cache entry per model content');
});

t.test("a model file is hashed in chunks, and the loader's digest is reused only while the file is unchanged", async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'tiny.onnx');
  const bytes = Buffer.from(buildTiny());
  writeFileSync(path, bytes);
  const digest = await digestModelFile(path);
  t.equal(digest.sha256, createHash('sha256').update(bytes).digest('hex'), 'the digest is the SHA-256 of the whole file');
  t.equal(digest.size, bytes.length, 'with the size it was taken at');

  const req = { model: 'tiny', path, providers: ['cpu'] as const, providerOptions: runtimeSchema.parse({}).provider_options, graphOptimization: 'all' as const, cacheDir: join(dir, 'cache') };
  const graphs = (): string[] => readdirSync(join(dir, 'cache', 'graphs')).filter((f) => f.endsWith('.onnx')).sort();
  const first = await createSession({ ...req, providers: ['cpu'], digest });
  t.equal(first.graphCache, 'stored');
  await first.session.release();
  const plain = await createSession({ ...req, providers: ['cpu'] });
  t.equal(plain.graphCache, 'hit', 'the given digest keys the cache exactly as hashing the file does');
  await plain.session.release();

  // A digest that matches the file on disk is trusted as it is: a made-up hash keys a new entry.
  const trusted = await createSession({ ...req, providers: ['cpu'], digest: { ...digest, sha256: 'f'.repeat(64) } });
  t.equal(trusted.graphCache, 'stored', 'a current digest is used, not recomputed');
  await trusted.session.release();
  t.equal(graphs().length, 2);

  // The file changes after the digest was taken (another size): the digest is stale and the file is hashed again,
  // so the old model's optimised graph can never serve the new model.
  const changed = Buffer.concat([bytes, Buffer.from([0xa0, 0x06, 0x01])]); // + field 100 = 1, which ONNX ignores
  writeFileSync(path, changed);
  const stale = await createSession({ ...req, providers: ['cpu'], digest });
  t.equal(stale.graphCache, 'stored', 'a stale digest is not trusted: the changed file misses the cache');
  await stale.session.release();
  t.equal(graphs().length, 3, 'the changed file has its own entry');
  const again = await createSession({ ...req, providers: ['cpu'], digest: await digestModelFile(path) });
  t.equal(again.graphCache, 'hit', "the changed file's fresh digest finds that entry");
  await again.session.release();
});

t.test('the graph cache keeps the most recently used graphs of each model, so model updates cannot fill the disk', async (t) => {
  const dir = tempDir(t);
  const cacheDir = join(dir, 'cache');
  const base = { providers: ['cpu'] as const, providerOptions: runtimeSchema.parse({}).provider_options, graphOptimization: 'all' as const, cacheDir };
  const graphs = (model: string): string[] => readdirSync(join(cacheDir, 'graphs')).filter((f) => f.startsWith(`${model}-`) && f.endsWith('.onnx'));
  // Versions of one model: the same graph with a different unknown field, so different bytes and cache keys.
  const version = (i: number): string => {
    const path = join(dir, `tiny-v${i}.onnx`);
    writeFileSync(path, Buffer.concat([Buffer.from(buildTiny()), Buffer.from([0xa0, 0x06, i])]));
    return path;
  };
  const open = async (model: string, path: string): Promise<string> => {
    const created = await createSession({ ...base, model, path });
    await created.session.release();
    return created.graphCache;
  };
  const paths = Array.from({ length: GRAPHS_KEPT_PER_MODEL + 2 }, (_, i) => version(i + 1));
  await open('other', paths[0] as string); // another model's graph is never pruned for this one's
  for (const p of paths) t.equal(await open('tiny', p), 'stored');
  t.equal(graphs('tiny').length, GRAPHS_KEPT_PER_MODEL, `${paths.length} versions stored, ${GRAPHS_KEPT_PER_MODEL} kept`);
  t.equal(await open('tiny', paths[0] as string), 'stored', 'the least recently used was dropped, and is optimised again');
  const oldestKept = paths[paths.length - GRAPHS_KEPT_PER_MODEL + 1] as string; // the first one left after that
  t.equal(await open('tiny', oldestKept), 'hit', 'a kept graph is reused');
  t.equal(await open('tiny', version(99)), 'stored');
  t.equal(await open('tiny', oldestKept), 'hit', 'using a graph makes it recent again: the next store dropped another');
  t.equal(graphs('tiny').length, GRAPHS_KEPT_PER_MODEL);
  t.equal(graphs('other').length, 1, "another model's graph stays");
});

t.test('instance_count sessions serve one model; inline and worker execution give the same outputs', async (t) => {
  const x: Tensor = { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).map((_, i) => Math.cos(i)) };
  const outputs: Float32Array[] = [];
  for (const execution of ['worker', 'inline'] as const) {
    const repo = copyDemoRepo(t, ['tiny']);
    writeFileSync(join(repo, 'tiny', 'config.yaml'), 'instance_count: 2\nmax_batch_size: 4\n');
    const rt = await startRuntime(t, repo, { execution });
    t.equal(rt.modelInfo('tiny').instanceCount, 2, `${execution}: two instances`);
    const rs = await Promise.all(Array.from({ length: 16 }, () => rt.submit('tiny', undefined, { inputs: { x } })));
    t.ok(rs.every((r) => r.batchSize <= 4), `${execution}: batches respect max_batch_size 4`);
    outputs.push(rs[15]?.outputs.y?.data as Float32Array);
    t.equal(rt.statistics('tiny')[0]?.inferenceCount, 16, 'warm-up runs are not counted as inferences');
  }
  t.same(Array.from(outputs[0] as Float32Array), Array.from(outputs[1] as Float32Array));
});

t.test('activate switches versions atomically: frames before finish on the old, frames after run on the new', async (t) => {
  const repo = copyDemoRepo(t, ['tiny']);
  const rt = await startRuntime(t, repo);
  const { cpSync } = await import('node:fs');
  cpSync(join(repo, 'tiny', '1'), join(repo, 'tiny', '2'), { recursive: true });
  const x: Tensor = { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(0.25) };
  const before = Array.from({ length: 20 }, () => rt.submit('tiny', undefined, { inputs: { x } }));
  const switching = rt.activate('tiny', 2);
  const during = Array.from({ length: 20 }, () => rt.submit('tiny', undefined, { inputs: { x } }));
  await switching;
  const after = Array.from({ length: 5 }, () => rt.submit('tiny', undefined, { inputs: { x } }));
  const versions = (await Promise.all([...before, ...during, ...after])).map((r) => r.version);
  t.ok(versions.slice(0, 20).every((v) => v === 1), 'frames accepted before the switch ran on version 1');
  t.ok(versions.slice(40).every((v) => v === 2), 'frames after the switch ran on version 2');
  const changes = versions.filter((v, i) => i > 0 && v !== versions[i - 1]).length;
  t.equal(changes, 1, 'the version switched exactly once');
  t.equal(rt.modelInfo('tiny').version, 2);
  await t.rejects(rt.activate('tiny', 9), /version 9 is not loaded|not loaded/);
  t.equal(rt.modelInfo('tiny').version, 2, 'a failed activation leaves the current version serving');
});

t.test('execution auto: fast models stay on the event loop, slow ones get worker threads', async (t) => {
  const repo = copyDemoRepo(t, ['tiny', 'classifier']);
  // The decision is timed, so the test leaves wide gaps around its bounds: tiny's lone frame and pair take tens
  // of µs and its session opens in a few ms, the classifier's lone frame takes about 3 ms on this class of CPU.
  // The bounds are wider than the defaults (1 ms a run, 100 ms an open): with other test runs loading the
  // machine, tiny was once timed past the defaults.
  const { log, lines } = capturingLogger();
  const config = runtimeSchema.parse({ execution_providers: ['cpu'], execution: 'auto', inline_max_run_us: 2000, inline_max_open_ms: 1000 });
  const rt = new InferenceRuntime({ repository: new ModelRepository(repo), config, dataDir: tempDir(t), log });
  await rt.start();
  t.teardown(() => rt.close());
  const ready = Object.fromEntries(lines().filter((l) => l.msg === 'model ready').map((l) => [l.model as string, l]));
  t.equal(ready.tiny?.execution, 'inline', 'tiny (tens of µs a run) runs inline');
  t.equal(ready.classifier?.execution, 'worker', 'the classifier (milliseconds a run) gets a worker thread');
  t.equal(ready.classifier?.max_stacked_rows, undefined, 'a worker stacks up to max_batch_size');
  const x: Tensor = { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(0.5) };
  t.same((await rt.submit('tiny', undefined, { inputs: { x } })).outputs.y?.shape, [1, 16]);
});

t.test('execution auto: a model whose lone frame fits the bound but whose full batch does not runs inline with smaller stacked runs', async (t) => {
  const repo = copyDemoRepo(t, ['classifier']);
  // A 40 ms bound: the classifier's lone frame (~3 ms) and pair fit with a wide margin, its batch of 64 (~180 ms)
  // cannot, so the stacked-row limit lands strictly between.
  writeFileSync(join(repo, 'classifier', 'config.yaml'), 'max_batch_size: 64\n');
  const { log, lines } = capturingLogger();
  const sizes: number[] = [];
  const config = runtimeSchema.parse({ execution_providers: ['cpu'], execution: 'auto', inline_max_run_us: 40_000 });
  const rt = new InferenceRuntime({ repository: new ModelRepository(repo), config, dataDir: tempDir(t), log, observer: { onExecution: (e) => sizes.push(e.batchSize) } });
  await rt.start();
  t.teardown(() => rt.close());
  const ready = lines().find((l) => l.msg === 'model ready' && l.model === 'classifier');
  t.equal(ready?.execution, 'inline', 'the classifier runs inline');
  const limit = ready?.max_stacked_rows as number;
  t.ok(Number.isInteger(limit) && limit >= 2 && limit < 64, `it stacks at most ${limit} rows, fewer than max_batch_size 64`);
  t.equal(rt.modelInfo('classifier').maxBatchSize, 64, 'max_batch_size still bounds a request');
  const frame: Tensor = { dtype: 'float32', shape: [1, 3, 112, 112], data: new Float32Array(3 * 112 * 112).fill(0.25) };
  const streams = Array.from({ length: 3 * limit }, () => ({}));
  const burst = () => Promise.all(streams.map((streamKey) => rt.submit('classifier', undefined, { inputs: { image: frame }, streamKey })));
  await burst(); // the model learns how many streams feed it
  sizes.length = 0;
  const results = await burst();
  t.ok(sizes.some((n) => n > 1), `frames of several streams were stacked (runs of ${sizes.join(',')})`);
  t.ok(sizes.every((n) => n <= limit), `no stacked run held more than ${limit} rows`);
  t.same(results[0]?.outputs.logits?.data, results.at(-1)?.outputs.logits?.data, 'every stream got the same logits for the same frame');
  const big: Tensor = { dtype: 'float32', shape: [64, 3, 112, 112], data: new Float32Array(64 * 3 * 112 * 112).fill(0.25) };
  const r = await rt.submit('classifier', undefined, { inputs: { image: big } });
  t.same(r.outputs.logits?.shape, [64, 10], 'a single request of max_batch_size rows is accepted and runs alone');
});

t.test('execution auto: a model whose session opens too slowly for the event loop stays in a worker, however fast it runs', async (t) => {
  const x: Tensor = { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(0.5) };
  const outputs: number[][] = [];
  for (const inlineMaxOpenMs of [60_000, 0]) {
    const { log, lines } = capturingLogger();
    const config = runtimeSchema.parse({ execution_providers: ['cpu'], execution: 'auto', inline_max_open_ms: inlineMaxOpenMs });
    const rt = new InferenceRuntime({ repository: new ModelRepository(copyDemoRepo(t, ['tiny'])), config, dataDir: tempDir(t), log });
    await rt.start();
    t.teardown(() => rt.close());
    const ready = lines().find((l) => l.msg === 'model ready' && l.model === 'tiny');
    const kept = lines().find((l) => l.msg === 'execution auto: stays in a worker, its session opens too slowly for the event loop');
    if (inlineMaxOpenMs > 0) {
      t.equal(ready?.execution, 'inline', 'with room to open, the fast model runs inline');
      t.equal(kept, undefined);
    } else {
      t.equal(ready?.execution, 'worker', 'with no time to open on the event loop, it stays in a worker');
      t.ok(kept && typeof kept.open_ms === 'number' && kept.inline_max_open_ms === 0, 'the reason is logged with the open time');
    }
    outputs.push(Array.from((await rt.submit('tiny', undefined, { inputs: { x } })).outputs.y?.data as Float32Array));
  }
  t.same(outputs[1], outputs[0], 'both placements compute the same');
});

t.test('intra-op threads: a model config sets them; several instances split the cores when it does not', async (t) => {
  const repo = copyDemoRepo(t, ['tiny', 'classifier']);
  writeFileSync(join(repo, 'tiny', 'config.yaml'), 'max_batch_size: 32\nintra_op_threads: 1\n');
  writeFileSync(join(repo, 'classifier', 'config.yaml'), 'max_batch_size: 32\ninstance_count: 2\n');
  const { log, lines } = capturingLogger();
  const config = runtimeSchema.parse({ execution_providers: ['cpu'], execution: 'worker' });
  const rt = new InferenceRuntime({ repository: new ModelRepository(repo), config, dataDir: tempDir(t), log });
  await rt.start();
  t.teardown(() => rt.close());
  const threads = Object.fromEntries(lines().filter((l) => l.msg === 'model ready').map((l) => [l.model as string, l.intra_op_threads]));
  t.equal(threads.tiny, 1, 'the model config\'s intra_op_threads is used');
  t.equal(threads.classifier, Math.max(1, Math.floor(availableParallelism() / 2)), 'two instances share the cores');
  const x: Tensor = { dtype: 'float32', shape: [1, 3, 112, 112], data: new Float32Array(3 * 112 * 112).fill(0.25) };
  const [a, b] = await Promise.all([rt.submit('classifier', undefined, { inputs: { image: x } }), rt.submit('classifier', undefined, { inputs: { image: x } })]);
  t.same(Array.from(a.outputs.logits?.data as Float32Array), Array.from(b.outputs.logits?.data as Float32Array), 'both instances compute the same');
});

t.test('execution auto remembers where each model ran: the next start opens it there without measuring', async (t) => {
  const repo = copyDemoRepo(t, ['tiny', 'classifier']);
  const dataDir = tempDir(t);
  const config = runtimeSchema.parse({ execution_providers: ['cpu'], execution: 'auto' });
  const start = async (runtimeConfig = config): Promise<Record<string, Record<string, unknown>>> => {
    const { log, lines } = capturingLogger();
    const rt = new InferenceRuntime({ repository: new ModelRepository(repo), config: runtimeConfig, dataDir, log });
    await rt.start();
    const x: Tensor = { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(0.5) };
    t.same((await rt.submit('tiny', undefined, { inputs: { x } })).outputs.y?.shape, [1, 16]);
    await rt.close();
    return Object.fromEntries(lines().filter((l) => l.msg === 'model ready').map((l) => [l.model as string, l]));
  };
  const first = await start();
  t.equal(first.tiny?.placement_cached, false, 'first start measures');
  t.equal(first.classifier?.placement_cached, false);
  const second = await start();
  for (const m of ['tiny', 'classifier']) {
    t.equal(second[m]?.placement_cached, true, `${m}: the second start uses what the first measured`);
    t.equal(second[m]?.execution, first[m]?.execution, `${m}: same place`);
    t.equal(second[m]?.intra_op_threads, first[m]?.intra_op_threads, `${m}: same threads`);
  }
  // Provider options shape what was measured (spinning changes what a pool thread costs): measured again.
  const spinning = runtimeSchema.parse({ execution_providers: ['cpu'], execution: 'auto', provider_options: { allow_spinning: true } });
  t.equal((await start(spinning)).tiny?.placement_cached, false, 'changed provider options are measured again');
  // A damaged record is measured again, not trusted.
  const dir = join(dataDir, 'cache', 'placement');
  for (const f of readdirSync(dir)) writeFileSync(join(dir, f), '{"provider":"cpu","execution":"sideways"');
  const third = await start();
  t.equal(third.tiny?.placement_cached, false, 'an unreadable record is ignored and the model measured again');
  // A changed model file is a different key: measured again.
  const model = join(repo, 'tiny', '1', 'model.onnx');
  const bytes = readFileSync(model);
  const mid = bytes.length >> 1;
  bytes[mid] = (bytes[mid] as number) ^ 1;
  writeFileSync(model, bytes);
  t.equal((await start()).tiny?.placement_cached, false, 'a changed model is measured again');
});
