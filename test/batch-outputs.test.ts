import t from 'tap';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import * as ort from 'onnxruntime-node';
import {
  attr, DataType, encodeModel, floatTensor, int64Tensor, makeModel, makeNode, valueInfo, type NodeProto, type TensorProto, type ValueInfoProto,
} from '../agent/compress/onnx-graph.js';
import { runtimeSchema } from '../agent/config/schema.js';
import { createLogger } from '../agent/logger.js';
import { ModelRepository } from '../agent/models/index.js';
import type { InferenceRuntime, Tensor } from '../agent/runtime/index.js';
import { loadModelVersion } from '../agent/runtime/model-loader.js';
import { startRuntime, tempDir } from './helpers/runtime.js';

/**
 * Batching splits a run's outputs along their first dimension, so a model batches only when every output has
 * one row per input row there. Every model here takes x float32 [N,4] and also returns y = 2x [N,4].
 */
function model(name: string, nodes: NodeProto[], outputs: ValueInfoProto[], initializers: TensorProto[] = []): Uint8Array {
  return encodeModel(makeModel({
    graph: {
      name,
      nodes: [makeNode('Mul', ['x', 'two'], ['y'], {}, 'double'), ...nodes],
      initializers: [floatTensor('two', [], [2]), ...initializers],
      inputs: [valueInfo('x', DataType.FLOAT, ['N', 4])],
      outputs: [valueInfo('y', DataType.FLOAT, ['N', 4]), ...outputs],
    },
  }));
}

/** The reviewer's model: s sums over the batch [4], tr holds it on axis 1 [4,N], anchors is a constant [3,2]. */
const ODD = model('odd', [
  makeNode('ReduceSum', ['x', 'axis0'], ['s'], { keepdims: attr.int(0) }, 'sum'),
  makeNode('Transpose', ['x'], ['tr'], { perm: attr.ints([1, 0]) }, 'transpose'),
  makeNode('Identity', ['anchors_c'], ['anchors'], {}, 'anchors'),
], [
  valueInfo('s', DataType.FLOAT, [4]), valueInfo('tr', DataType.FLOAT, [4, 'N']), valueInfo('anchors', DataType.FLOAT, [3, 2]),
], [int64Tensor('axis0', [1], [0]), floatTensor('anchors_c', [3, 2], [1, 2, 3, 4, 5, 6])]);

/** Only a transposed output [4,N]: the batch is there, but not on the axis a batch is split along. */
const TRANSPOSED = model('transposed', [makeNode('Transpose', ['x'], ['tr'], { perm: attr.ints([1, 0]) }, 'transpose')], [valueInfo('tr', DataType.FLOAT, [4, 'N'])]);

/** r = x reshaped to [-1,2]: declared [?,2], but 2N rows, so the first dimension is dynamic and not the batch. */
const MERGE = model('merge', [makeNode('Reshape', ['x', 'pairs'], ['r'], {}, 'reshape')], [valueInfo('r', DataType.FLOAT, ['K', 2])], [int64Tensor('pairs', [2], [-1, 2])]);

/** NonMaxSuppression-like: the [K,2] indices of the positive entries, K depending on the data. */
const BOXES = model('boxes', [
  makeNode('Greater', ['x', 'zero'], ['positive'], {}, 'positive'),
  makeNode('NonZero', ['positive'], ['nz'], {}, 'nonzero'),
  makeNode('Transpose', ['nz'], ['idx'], { perm: attr.ints([1, 0]) }, 'transpose'),
], [valueInfo('idx', DataType.INT64, ['K', 2])], [floatTensor('zero', [], [0])]);

/** An ordinary per-row model: z = 2x + 1 [N,4]. */
const PLAIN = model('plain', [makeNode('Add', ['y', 'one'], ['z'], {}, 'add')], [valueInfo('z', DataType.FLOAT, ['N', 4])], [floatTensor('one', [], [1])]);

function repoWith(t: Parameters<typeof tempDir>[0], models: Record<string, { bytes: Uint8Array; config?: string }>): string {
  const repo = join(tempDir(t, 'edge-repo-'), 'models');
  for (const [name, { bytes, config }] of Object.entries(models)) {
    mkdirSync(join(repo, name, '1'), { recursive: true });
    writeFileSync(join(repo, name, '1', 'model.onnx'), bytes);
    if (config !== undefined) writeFileSync(join(repo, name, 'config.yaml'), config);
  }
  return repo;
}

/**
 * Frame i of a test: x [1,4], distinct per frame so a leaked row shows, with one positive entry so that boxes
 * returns one row per frame: a batch of them would split without an error, and each frame would get wrong rows.
 */
function frame(i: number): Tensor {
  return { dtype: 'float32', shape: [1, 4], data: Float32Array.from({ length: 4 }, (_, k) => (k === i % 4 ? 1 : -1) * (i * 10 + k + 1)) };
}

async function direct(bytes: Uint8Array, x: Tensor): Promise<Record<string, { dims: readonly number[]; data: number[] }>> {
  const s = await ort.InferenceSession.create(bytes);
  const out = await s.run({ x: new ort.Tensor('float32', x.data as Float32Array, x.shape as number[]) });
  await s.release();
  return Object.fromEntries(Object.entries(out).map(([k, v]) => [k, { dims: v.dims, data: Array.from(v.data as ArrayLike<number | bigint>, Number) }]));
}

/** Submits `count` frames from as many streams at once; every result must equal its frame's own direct run. */
async function submitAndCompare(t: { same(found: unknown, wanted: unknown, message: string): boolean }, rt: InferenceRuntime, name: string, bytes: Uint8Array, count: number): Promise<number[]> {
  const frames = Array.from({ length: count }, (_, i) => frame(i));
  const results = await Promise.all(frames.map((x) => rt.submit(name, undefined, { inputs: { x }, streamKey: {} })));
  for (const [i, r] of results.entries()) {
    const want = await direct(bytes, frames[i] as Tensor);
    for (const [out, w] of Object.entries(want)) {
      const got = r.outputs[out];
      t.same({ shape: got?.shape, data: got ? Array.from(got.data as ArrayLike<number | bigint>, Number) : undefined }, { shape: w.dims, data: w.data }, `${name} frame ${i} (batch ${r.batchSize}): ${out} equals its own direct run`);
    }
  }
  return results.map((r) => r.batchSize);
}

t.test('outputs without a dynamic first dimension turn default batching off; frames of many streams get their own results', async (t) => {
  for (const execution of ['worker', 'inline'] as const) {
    const rt = await startRuntime(t, repoWith(t, { odd: { bytes: ODD }, transposed: { bytes: TRANSPOSED } }), { execution });
    for (const name of ['odd', 'transposed']) {
      const info = rt.modelInfo(name);
      t.equal(info.state, 'READY', `${execution}: ${name} loads`);
      t.equal(info.batching, false, `${execution}: ${name} does not batch`);
      t.equal(info.maxBatchSize, 0, `${execution}: ${name} max batch 0`);
    }
    const sizes = await submitAndCompare(t, rt, 'odd', ODD, 8);
    t.same(sizes, sizes.map(() => 1), `${execution}: each frame ran alone`);
    // Five at once: the first runs alone, the other four would share a run whose tr [4,4] splits without an error.
    await submitAndCompare(t, rt, 'transposed', TRANSPOSED, 5);
  }
});

t.test('max_batch_size set on a model with an output lacking a dynamic first dimension fails the load, naming the output', async (t) => {
  const rt = await startRuntime(t, repoWith(t, {
    odd: { bytes: ODD, config: 'max_batch_size: 8\n' },
    transposed: { bytes: TRANSPOSED, config: 'max_batch_size: 4\n' },
  }));
  t.equal(rt.modelInfo('odd').state, 'UNAVAILABLE');
  t.match(rt.modelInfo('odd').reason, /max_batch_size 8 needs a dynamic first dimension on every output .*output 's' has shape \[4\]/);
  await t.rejects(rt.loadModel('odd'), { code: 'MODEL_LOAD', message: /output 's' has shape \[4\]/ });
  await t.rejects(rt.loadModel('transposed'), { code: 'MODEL_LOAD', message: /output 'tr' has shape \[4,-1\]/ });
});

t.test('an output whose dynamic first dimension is not the batch: the warm-up check turns default batching off', async (t) => {
  for (const runs of [2, 0]) {
    const warmup = `warmup: { runs: ${runs} }\n`;
    const rt = await startRuntime(t, repoWith(t, { merge: { bytes: MERGE, config: warmup }, boxes: { bytes: BOXES, config: warmup } }), { execution: 'worker' });
    for (const name of ['merge', 'boxes']) {
      const info = rt.modelInfo(name);
      t.equal(info.state, 'READY', `warm-up runs ${runs}: ${name} loads`);
      t.same(info.outputs.map((o) => o.shape[0]), [-1, -1], `${name}: every output is declared with a dynamic first dimension`);
      t.equal(info.batching, false, `warm-up runs ${runs}: ${name} does not batch`);
    }
    const sizes = [...await submitAndCompare(t, rt, 'merge', MERGE, 6), ...await submitAndCompare(t, rt, 'boxes', BOXES, 6)];
    t.same(sizes, sizes.map(() => 1), `warm-up runs ${runs}: each frame ran alone`);
  }
});

t.test('max_batch_size set on a model whose output rows are not the batch fails the load with the rows fed and returned', async (t) => {
  const rt = await startRuntime(t, repoWith(t, {
    merge: { bytes: MERGE, config: 'max_batch_size: 4\n' },
    boxes: { bytes: BOXES, config: 'max_batch_size: 4\nwarmup: { runs: 0 }\n' },
  }));
  await t.rejects(rt.loadModel('merge'), { code: 'MODEL_LOAD', message: /output 'r' to have one row per input row.*fed 1 rows and it returned 2 \(shape \[2,2\]\)/ });
  await t.rejects(rt.loadModel('boxes'), { code: 'MODEL_LOAD', message: /output 'idx' to have one row per input row.*fed 2 rows and it returned 0 \(shape \[0,2\]\)/ });
  t.equal(rt.modelInfo('merge').state, 'UNAVAILABLE');
});

t.test('a placement cached by an earlier load does not skip the row check, and the check logs which output', async (t) => {
  const repo = repoWith(t, { merge: { bytes: MERGE } });
  const entry = new ModelRepository(repo).read('merge');
  const version = entry?.versions[0];
  if (!entry || !version) throw new Error('merge is not in the repository');
  const cfg = runtimeSchema.parse({ execution_providers: ['cpu'] });
  const defaults = {
    providers: cfg.execution_providers, providerOptions: cfg.provider_options, graphOptimization: cfg.graph_optimization, execution: 'auto' as const,
    inlineMaxRunUs: cfg.inline_max_run_us, inlineMaxOpenMs: cfg.inline_max_open_ms, cacheDir: join(tempDir(t, 'edge-data-'), 'cache'),
  };
  const lines: string[] = [];
  const log = createLogger({ level: 'info', destination: new Writable({ write(chunk, _enc, cb) { lines.push(String(chunk)); cb(); } }) });
  for (const load of ['first', 'second']) {
    lines.length = 0;
    const outcome = await loadModelVersion(entry, version, defaults, log);
    await Promise.all(outcome.model.instances.map((s) => s.release()));
    t.equal(outcome.placementCached, load === 'second', `${load} load: placement ${load === 'second' ? 'from the cache' : 'measured'}`);
    t.equal(outcome.model.maxBatchSize, 0, `${load} load: batching off`);
    t.equal(outcome.model.maxStackedRows, undefined, `${load} load: no stacked-rows limit`);
    const warned = lines.map((l) => JSON.parse(l) as { level: number; output?: string; rows_fed?: number; rows_returned?: number; msg: string }).filter((l) => l.msg.startsWith('dynamic batching off'));
    t.equal(warned.length, 1, `${load} load: logged once`);
    t.match(warned[0], { level: 40, output: 'r', rows_fed: 1, rows_returned: 2 }, `${load} load: the warning names the output and the rows`);
  }
});

t.test('an ordinary [N,4] → [N,4] model still batches frames of several streams, each getting its own rows', async (t) => {
  for (const runs of [2, 0]) {
    const rt = await startRuntime(t, repoWith(t, { plain: { bytes: PLAIN, config: `warmup: { runs: ${runs} }\n` } }), { execution: 'worker' });
    const info = rt.modelInfo('plain');
    t.equal(info.batching, true, `warm-up runs ${runs}: batching on by default`);
    t.equal(info.maxBatchSize, 32);
    const sizes = await submitAndCompare(t, rt, 'plain', PLAIN, 24);
    t.ok(sizes.some((s) => s > 1), `warm-up runs ${runs}: frames shared runs (batch sizes ${[...new Set(sizes)].join(',')})`);
  }
});
