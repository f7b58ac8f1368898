import t from 'tap';
import { spawn } from 'node:child_process';
import { existsSync, linkSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { decideVariant, encodeNpy, readVariantReports, runOptimize } from '../agent/compress/index.js';
import { inferElemTypes } from '../agent/compress/graph-analysis.js';
import { OpsetUpgradeError, upgradeOpset } from '../agent/compress/opset-upgrade.js';
import {
  attr, DataType, decodeModel, defaultOpsetVersion, floatTensor, getAttribute, int64Tensor, makeModel, makeNode, makeTensor, onnx,
  valueInfo, writeModel, type GraphProto, type ModelProto,
} from '../agent/compress/onnx-graph.js';

/**
 * Defects of `edge-agent optimize` found in review, each reproduced on a small model built here and run
 * through real onnxruntime sessions: fp16 certified on CPU arithmetic, a one-format run dropping the other
 * variant's entry, unvalidated options and non-finite numbers breaking the report, opset upgrades that skip
 * subgraphs, hidden image sizes, late or misleading errors.
 */

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'edge-agent-compress-robust-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));

/** A folder of `files` .npy files, each [rows, 4] with values in [lo, hi]. */
function npyFolder(name: string, lo: number, hi: number, files = 4, rows = 6): string {
  const dir = join(work, name);
  mkdirSync(dir, { recursive: true });
  for (let f = 0; f < files; f++) {
    const data = new Float32Array(rows * 4).map((_, i) => lo + ((hi - lo) * ((i * 7 + f * 13) % 17)) / 16);
    writeFileSync(join(dir, `s${f}.npy`), encodeNpy([rows, 4], data));
  }
  return dir;
}

/** x [N,4] → MatMul(W) → Relu → y: with weights of 200–240 and inputs near 100, h and y reach ~75,000. */
function matmulRelu(weight: (i: number) => number): ModelProto {
  return makeModel({
    graph: {
      name: 'mm-relu',
      nodes: [makeNode('MatMul', ['x', 'W'], ['h'], {}, 'mm'), makeNode('Relu', ['h'], ['y'], {}, 'relu')],
      inputs: [valueInfo('x', DataType.FLOAT, ['N', 4])],
      outputs: [valueInfo('y', DataType.FLOAT, ['N', 4])],
      initializers: [floatTensor('W', [4, 4], Float32Array.from({ length: 16 }, (_, i) => weight(i)))],
    },
  });
}

function versionDir(name: string, model: ModelProto): string {
  const dir = join(work, name, '1');
  mkdirSync(dir, { recursive: true });
  writeModel(join(dir, 'model.onnx'), model);
  return dir;
}

function ppm(width: number, height: number, seed: number): Uint8Array {
  const header = new TextEncoder().encode(`P6\n${width} ${height}\n255\n`);
  const body = new Uint8Array(width * height * 3).map((_, i) => (i * 31 + seed * 97) % 251);
  const out = new Uint8Array(header.length + body.length);
  out.set(header);
  out.set(body, header.length);
  return out;
}

const images = join(work, 'images');
mkdirSync(images);
for (let i = 0; i < 4; i++) writeFileSync(join(images, `img-${i}.ppm`), ppm(24, 20, i));

const quiet = { latencyRuns: 3, log: () => {} };
const readJson = (file: string): Record<string, unknown> => JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;

t.test('fp16: tensors beyond fp16 range are kept in float32 and the report says the range was checked', async (t) => {
  const dir = versionDir('overflow', matmulRelu((i) => 200 + (i % 5) * 10));
  const calibration = npyFolder('overflow-cal', 60, 100);
  const lines: string[] = [];
  const result = await runOptimize({ model: join(dir, 'model.onnx'), calibration, ...quiet, log: (l) => lines.push(l) });
  const fp16 = result.report.variants.fp16!;
  t.ok(fp16.fp16Range?.checked, 'the fp16 entry records the range check');
  const kept = fp16.fp16Range!.keptFloat32;
  t.same(kept.map((k) => k.tensor).sort(), ['h', 'y'], 'the MatMul output and the Relu after it exceed the range');
  t.ok(kept.every((k) => k.maxAbs > 65504), `measured magnitudes ${kept.map((k) => k.maxAbs).join(', ')}`);
  t.same([...new Set(kept.flatMap((k) => k.nodes))].sort(), ['mm', 'relu']);
  t.ok(lines.some((l) => /fp16: range check .* kept in float32: .*h/.test(l)), 'the log names the kept tensors');
  t.match(result.table, /fp16 tensors beyond .* kept in float32: .*h/);

  // In the variant, the MatMul and Relu run in float32: W is not half precision and h is a float32 tensor.
  const variant = decodeModel(readFileSync(join(dir, 'model.fp16.onnx')));
  const graph = variant.graph as GraphProto;
  t.equal(graph.initializer.find((i) => i.name === 'W')?.dataType, DataType.FLOAT, 'W stays float32');
  const types = inferElemTypes(graph);
  t.equal(types.get('h'), DataType.FLOAT, 'h is computed in float32');
  t.notOk(graph.node.some((n) => n.opType === 'Cast' && Number(getAttribute(n, 'to')?.i) === DataType.FLOAT16), 'nothing is cast to fp16 when nothing can run in it');

  const available = readVariantReports(dir);
  const cuda = decideVariant({ provider: 'cuda', available, requested: 'auto' });
  t.equal(cuda.variant, 'fp16', cuda.reason);
  t.match(cuda.reason, /2 tensor\(s\) beyond fp16 range kept in float32/);
});

t.test('fp16: a model within range converts fully; the check does not keep everything in float32', async (t) => {
  const dir = versionDir('in-range', matmulRelu((i) => Math.sin(i + 1)));
  const result = await runOptimize({ model: join(dir, 'model.onnx'), calibration: npyFolder('in-range-cal', -1, 1), formats: ['fp16'], ...quiet });
  const range = result.report.variants.fp16!.fp16Range!;
  t.same(range.keptFloat32, []);
  t.ok(range.maxAbsInFloat16 > 0 && range.maxAbsInFloat16 < 10, `largest magnitude ${range.maxAbsInFloat16}`);
  const graph = decodeModel(readFileSync(join(dir, 'model.fp16.onnx'))).graph as GraphProto;
  t.equal(graph.initializer.find((i) => i.name === 'W')?.dataType, DataType.FLOAT16, 'W is half precision');
});

t.test('an fp16 report without the range check stays readable but is not trusted on GPU providers', async (t) => {
  const dir = join(work, 'overflow', '1');
  const reportFile = join(dir, 'model.report.json');
  const report = readJson(reportFile) as { variants: { fp16: Record<string, unknown>; int8: Record<string, unknown> } };
  delete report.variants.fp16.fp16Range;
  writeFileSync(reportFile, JSON.stringify(report));
  const available = readVariantReports(dir);
  t.ok(available.fp16 && available.int8, 'both entries still read');
  t.equal(available.ignored, undefined);
  const cuda = decideVariant({ provider: 'cuda', available, requested: 'auto' });
  t.equal(cuda.variant, 'fp32');
  t.match(cuda.reason, /fp16 was measured on cpu without an fp16 range check/);
  t.equal(decideVariant({ provider: 'cuda', available, requested: 'fp16' }).variant, 'fp16', 'an explicit request is still served');
  // Measured on a GPU provider, the accuracy itself covers fp16 arithmetic.
  const onGpu = { ...available.fp16!, provider: 'tensorrt' };
  t.equal(decideVariant({ provider: 'cuda', available: { fp16: onGpu }, requested: 'auto' }).variant, 'fp16');
});

t.test('a run for one format keeps the other variant entry while its file is unchanged, and writes the report atomically', async (t) => {
  const dir = versionDir('merge', matmulRelu((i) => Math.cos(i) * 0.5));
  const calibration = npyFolder('merge-cal', -2, 2);
  const first = await runOptimize({ model: join(dir, 'model.onnx'), calibration, ...quiet });
  const fp16Sha = first.report.variants.fp16!.sha256;
  const reportFile = join(dir, 'model.report.json');
  linkSync(reportFile, join(dir, 'old-report.json'));

  const second = await runOptimize({ model: join(dir, 'model.onnx'), calibration, formats: ['int8'], ...quiet });
  t.equal(second.report.variants.fp16?.sha256, fp16Sha, 'the fp16 entry is carried over');
  t.equal(second.report.variants.fp16?.measuredAt, first.report.createdAt, 'with the time it was measured');
  t.ok(second.report.notes.some((n) => /fp16: entry kept from the report of/.test(n)));
  const available = readVariantReports(dir);
  t.ok(available.int8 && available.fp16, 'both variants stay available');
  t.equal(decideVariant({ provider: 'webgpu', available, requested: 'auto' }).variant, 'fp16', 'GPUs keep serving fp16');
  t.equal(readJson(join(dir, 'old-report.json')).createdAt, first.report.createdAt, 'a reader holding the old file still sees the whole old report');
  t.not(readFileSync(join(dir, 'old-report.json'), 'utf8'), readFileSync(reportFile, 'utf8'), 'the report was replaced by a rename, not rewritten in place');
  t.same(readdirSync(dir).filter((f) => f.includes('.tmp')), [], 'no temporary file left behind');

  // A variant file replaced since it was measured is not vouched for by the new report.
  writeFileSync(join(dir, 'model.fp16.onnx'), readFileSync(join(dir, 'model.onnx')));
  const lines: string[] = [];
  const third = await runOptimize({ model: join(dir, 'model.onnx'), calibration, formats: ['int8'], ...quiet, log: (l) => lines.push(l) });
  t.equal(third.report.variants.fp16, undefined);
  t.ok(lines.some((l) => /previous fp16 entry not kept: .* changed since it was measured/.test(l)), 'the log says why');

  // Nor is an entry written for another fp32 model.
  await runOptimize({ model: join(dir, 'model.onnx'), calibration, formats: ['fp16'], ...quiet });
  writeModel(join(dir, 'model.onnx'), matmulRelu((i) => Math.cos(i) * 0.25));
  const fourth = await runOptimize({ model: join(dir, 'model.onnx'), calibration, formats: ['int8'], ...quiet });
  t.equal(fourth.report.variants.fp16, undefined, 'a report for another model.onnx is not merged');
});

t.test('bad option values are refused before any work; NaN calibration inputs are refused', async (t) => {
  const dir = join(work, 'in-range', '1');
  const model = join(dir, 'model.onnx');
  const calibration = join(work, 'in-range-cal');
  for (const minCosine of [NaN, 0, -0.5, 1.5]) {
    await t.rejects(runOptimize({ model, calibration, minCosine, ...quiet }), { name: 'InvalidInputError', message: /minCosine \(--min-cosine\) must be a number in \(0, 1\]/ }, `minCosine ${minCosine}`);
  }
  const imageModel = versionDir('image-model', reshapeModel(8, 8));
  await t.rejects(runOptimize({ model: join(imageModel, 'model.onnx'), calibration: images, image: { normalize: 'foo' as 'unit' }, ...quiet }),
    { name: 'InvalidInputError', message: /image normalisation 'foo' is not one of unit, symmetric, imagenet, raw/ });

  const nan = join(work, 'nan-cal');
  mkdirSync(nan);
  const values = new Float32Array(24).fill(0.5);
  values[9] = NaN;
  writeFileSync(join(nan, 'a.npy'), encodeNpy([6, 4], values));
  writeFileSync(join(nan, 'b.npy'), encodeNpy([6, 4], new Float32Array(24).fill(0.25)));
  await t.rejects(runOptimize({ model, calibration: nan, ...quiet }), { name: 'InvalidInputError', message: /a\.npy: sample 2 holds NaN .*must be finite/ });
});

t.test('non-finite measurements keep the report readable, and one bad entry does not discard the others', async (t) => {
  // y = Exp(x·W) overflows float32 to +Inf for inputs near 100: the fp32 outputs themselves hold Inf.
  const dir = versionDir('inf-out', makeModel({
    graph: {
      name: 'exp',
      nodes: [makeNode('MatMul', ['x', 'W'], ['h'], {}, 'mm'), makeNode('Exp', ['h'], ['y'], {}, 'exp')],
      inputs: [valueInfo('x', DataType.FLOAT, ['N', 4])],
      outputs: [valueInfo('y', DataType.FLOAT, ['N', 4])],
      initializers: [floatTensor('W', [4, 4], Float32Array.from({ length: 16 }, (_, i) => 1 + (i % 3) * 0.1))],
    },
  }));
  const result = await runOptimize({ model: join(dir, 'model.onnx'), calibration: npyFolder('inf-cal', 60, 100), ...quiet });
  const text = readFileSync(result.reportFile, 'utf8');
  t.match(text, /"maxAbsError": "Infinity"/, 'Infinity is written as a string JSON can hold');
  t.notMatch(text, /null/);
  const available = readVariantReports(dir);
  t.equal(available.ignored, undefined, 'the report reads back');
  t.equal(available.int8?.accuracy.maxAbsError, Infinity);
  t.equal(decideVariant({ provider: 'cpu', available, requested: 'auto' }).variant, 'fp32', 'an output that cannot be compared does not pass');

  // One entry broken by hand, the other intact: only the broken one is lost.
  const report = readJson(result.reportFile) as { variants: { int8: { accuracy: { cosine: unknown } } } };
  report.variants.int8.accuracy.cosine = 'very good';
  writeFileSync(result.reportFile, JSON.stringify(report));
  const partial = readVariantReports(dir);
  t.equal(partial.int8, undefined);
  t.ok(partial.fp16, 'fp16 survives a bad int8 entry');
  t.match(partial.ignored?.[0] ?? '', /int8: entry is not a variant report \(accuracy\.cosine/);

  // Reports from before non-finite numbers were written as strings hold null there: read as NaN, never passing.
  const old = readJson(result.reportFile) as { minCosine: unknown; variants: { int8: { accuracy: { cosine: unknown } } } };
  old.variants.int8.accuracy.cosine = null;
  old.minCosine = null;
  writeFileSync(result.reportFile, JSON.stringify(old));
  const legacy = readVariantReports(dir);
  t.ok(Number.isNaN(legacy.int8?.accuracy.cosine), 'null reads as NaN');
  t.equal(decideVariant({ provider: 'cpu', available: legacy, requested: 'auto' }).variant, 'fp32');
});

/** x [1,3,H,W] (dynamic) → Reshape to [1, 3·h·w] → MatMul: runs only at h × w. */
function reshapeModel(h: number, w: number, fixed = false): ModelProto {
  const k = 3 * h * w;
  return makeModel({
    graph: {
      name: 'reshape',
      nodes: [makeNode('Reshape', ['x', 'shape'], ['r'], {}, 'reshape'), makeNode('MatMul', ['r', 'W'], ['y'], {}, 'mm')],
      inputs: [valueInfo('x', DataType.FLOAT, fixed ? [1, 3, h, w] : [1, 3, 'H', 'W'])],
      outputs: [valueInfo('y', DataType.FLOAT, [1, 4])],
      initializers: [floatTensor('W', [k, 4], Float32Array.from({ length: k * 4 }, (_, i) => Math.sin(i) * 0.01)), int64Tensor('shape', [2], [1, k])],
    },
  });
}

t.test('image calibration of dynamic height/width: the default size is named when it fails, and a size can be given', async (t) => {
  const dir = versionDir('dynamic', reshapeModel(8, 12));
  const model = join(dir, 'model.onnx');
  await t.rejects(runOptimize({ model, calibration: images, ...quiet }), {
    name: 'InvalidInputError',
    message: /fails on the calibration inputs \(x \[1,3,320,320\]\); images fill its dynamic height and width with 320x320 \(the default\): pass --size HxW/,
  });
  const result = await runOptimize({ model, calibration: images, image: { size: { height: 8, width: 12 } }, formats: ['fp16'], ...quiet });
  t.ok(result.report.variants.fp16, 'calibrated at 8x12');
  const fixed = versionDir('fixed', reshapeModel(8, 8, true));
  await t.rejects(runOptimize({ model: join(fixed, 'model.onnx'), calibration: images, image: { size: 16 }, ...quiet }),
    { message: /has a fixed height of 8; the size 16x16 does not fit it/ });
});

/** opset 11: x → MatMul → Unsqueeze(axes attr) → If(cond) { Squeeze(u, axes attr) } — both branches. */
function ifModel(): ModelProto {
  const branch = (n: string): GraphProto => onnx.GraphProto.create({
    name: n,
    node: [makeNode('Squeeze', ['u'], [`y_${n}`], { axes: attr.ints([0]) }, `sq_${n}`)],
    output: [valueInfo(`y_${n}`, DataType.FLOAT, ['N', 4])],
  });
  const ifNode = makeNode('If', ['cond'], ['y'], {}, 'if');
  ifNode.attribute.push(onnx.AttributeProto.create({ name: 'then_branch', type: onnx.AttributeProto.AttributeType.GRAPH, g: branch('then') }));
  ifNode.attribute.push(onnx.AttributeProto.create({ name: 'else_branch', type: onnx.AttributeProto.AttributeType.GRAPH, g: branch('else') }));
  return makeModel({
    opset: 11,
    graph: {
      name: 'if',
      nodes: [makeNode('MatMul', ['x', 'W'], ['h'], {}, 'mm'), makeNode('Unsqueeze', ['h'], ['u'], { axes: attr.ints([0]) }, 'unsq'), ifNode],
      inputs: [valueInfo('x', DataType.FLOAT, ['N', 4])],
      outputs: [valueInfo('y', DataType.FLOAT, ['N', 4])],
      initializers: [floatTensor('W', [4, 4], Float32Array.from({ length: 16 }, (_, i) => Math.sin(i))), makeTensor('cond', DataType.BOOL, [], Uint8Array.from([1]))],
    },
  });
}

t.test('opset upgrade: If subgraphs are rewritten too, and fp16-only runs do not upgrade at all', async (t) => {
  const dir = versionDir('if', ifModel());
  const calibration = npyFolder('if-cal', -1, 1);
  const fp16 = await runOptimize({ model: join(dir, 'model.onnx'), calibration, formats: ['fp16'], ...quiet });
  t.ok(fp16.report.variants.fp16, 'fp16 variant built and measured');
  t.notOk(fp16.report.notes.some((n) => /opset/.test(n)), 'no opset change for fp16');
  t.equal(defaultOpsetVersion(decodeModel(readFileSync(join(dir, 'model.fp16.onnx')))), 11);

  const int8 = await runOptimize({ model: join(dir, 'model.onnx'), calibration, formats: ['int8'], ...quiet });
  t.ok(int8.report.variants.int8!.accuracy.cosine > 0.99, `int8 cosine ${int8.report.variants.int8!.accuracy.cosine}`);
  t.ok(int8.report.notes.some((n) => /If if\.then_branch → sq_then: axes attribute → input/.test(n)), int8.report.notes.join('; '));
  const q = decodeModel(readFileSync(join(dir, 'model.int8.onnx')));
  const ifNode = q.graph!.node!.find((n) => n.opType === 'If')!;
  for (const branch of ifNode.attribute ?? []) {
    const sq = branch.g!.node![0]!;
    t.equal(sq.input?.length, 2, `${branch.name}: Squeeze reads its axes as an input`);
    t.notOk(getAttribute(sq, 'axes'), `${branch.name}: no axes attribute left`);
  }
});

t.test('opset upgrade refuses what it cannot rewrite inside a subgraph, naming the node', async (t) => {
  const body = onnx.GraphProto.create({ name: 'body', node: [makeNode('Scan', ['s'], ['o'], {}, 'inner_scan')] });
  const loop = makeNode('Loop', ['', 'c'], ['z'], {}, 'outer_loop');
  loop.attribute.push(onnx.AttributeProto.create({ name: 'body', type: onnx.AttributeProto.AttributeType.GRAPH, g: body }));
  const model = makeModel({ opset: 8, graph: { name: 'g', nodes: [loop], inputs: [valueInfo('c', DataType.BOOL, [])], outputs: [valueInfo('z', DataType.FLOAT, [1])] } });
  let err: unknown;
  try {
    upgradeOpset(model, 13);
  } catch (e) {
    err = e;
  }
  t.ok(err instanceof OpsetUpgradeError, 'an OpsetUpgradeError');
  t.match((err as Error).message, /cannot upgrade opset 8 → 13: Scan Loop outer_loop\.body → inner_scan uses the opset-8 form/);
});

t.test('smaller: unwritable --out fails before calibration, one "not an ONNX model", a right hint for subgraph weights', async (t) => {
  const model = join(work, 'in-range', '1', 'model.onnx');
  const calibration = join(work, 'in-range-cal');
  const notADir = join(work, 'a-file');
  writeFileSync(notADir, 'x');
  const lines: string[] = [];
  await t.rejects(runOptimize({ model, calibration, out: notADir, ...quiet, log: (l) => lines.push(l) }), { name: 'InvalidInputError', message: /output folder .*a-file is not a writable directory/ });
  t.same(lines, [], 'nothing was calibrated or timed first');
  await t.rejects(runOptimize({ model, calibration, out: join(notADir, 'sub'), ...quiet }), { message: /not a writable directory \(ENOTDIR\)/ });

  const garbage = join(work, 'garbage.onnx');
  writeFileSync(garbage, 'plain text');
  const err = await runOptimize({ model: garbage, calibration, ...quiet }).then(() => new Error('accepted'), (e: unknown) => e as Error);
  t.match(err.message, /garbage\.onnx is not an ONNX model: protobuf decoding failed/);
  t.notMatch(err.message, /not an ONNX model: not an ONNX model/);

  // Weights as Constant nodes inside If branches (as Silero VAD ships them): nothing to compress, and it says why.
  const branch = (n: string): GraphProto => onnx.GraphProto.create({
    name: n,
    node: [
      makeNode('Constant', [], [`w_${n}`], { value: attr.tensor(floatTensor(`w_${n}`, [4, 4], new Float32Array(16).fill(0.5))) }, `const_${n}`),
      makeNode('MatMul', ['x', `w_${n}`], [`y_${n}`], {}, `mm_${n}`),
    ],
    output: [valueInfo(`y_${n}`, DataType.FLOAT, ['N', 4])],
  });
  const ifNode = makeNode('If', ['cond'], ['y'], {}, 'gate');
  ifNode.attribute.push(onnx.AttributeProto.create({ name: 'then_branch', type: onnx.AttributeProto.AttributeType.GRAPH, g: branch('then') }));
  ifNode.attribute.push(onnx.AttributeProto.create({ name: 'else_branch', type: onnx.AttributeProto.AttributeType.GRAPH, g: branch('else') }));
  const dir = versionDir('subgraph-weights', makeModel({
    graph: { name: 'g', nodes: [ifNode], inputs: [valueInfo('x', DataType.FLOAT, ['N', 4]), valueInfo('cond', DataType.BOOL, [])], outputs: [valueInfo('y', DataType.FLOAT, ['N', 4])] },
  }));
  const refused = await runOptimize({ model: join(dir, 'model.onnx'), calibration, ...quiet }).then(() => new Error('accepted'), (e: unknown) => e as Error);
  t.match(refused.message, /has no float32 weights in its main graph to compress: its 2 constant\(s\) sit inside the subgraphs of If gate/);
  t.notMatch(refused.message, /already quantized|half precision/);
});

t.test('CLI: --normalize, --min-cosine and --size are validated by the optimize command', async (t) => {
  const tsLoader = process.execArgv.filter((a) => a.includes('@tapjs/typescript'));
  const run = (args: readonly string[]): Promise<{ code: number | null; stderr: string }> => new Promise((resolve) => {
    const child = spawn(process.execPath, [...tsLoader, join(ROOT, 'agent', 'cli.ts'), 'optimize', ...args], {
      env: { ...process.env, TS_NODE_TRANSPILE_ONLY: '1' }, stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.once('exit', (code) => resolve({ code, stderr }));
  });
  const model = join(work, 'in-range', '1', 'model.onnx');
  const base = [model, '--calibration', join(work, 'in-range-cal'), '--out', join(work, 'cli-out')];
  const normalize = await run([...base, '--normalize', 'foo']);
  t.not(normalize.code, 0);
  t.match(normalize.stderr, /argument 'foo' is invalid\. Allowed choices are unit, symmetric, imagenet, raw/);
  const cosine = await run([...base, '--min-cosine', 'abc']);
  t.not(cosine.code, 0);
  t.match(cosine.stderr, /--min-cosine <x>' argument 'abc' is invalid\. expected a number in \(0, 1\]/);
  const size = await run([...base, '--size', '48y320']);
  t.not(size.code, 0);
  t.match(size.stderr, /size '48y320' is not HxW/);
  t.notOk(existsSync(join(work, 'cli-out', 'model.report.json')), 'nothing was written');
});
