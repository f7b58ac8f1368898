import t from 'tap';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildClassifier, buildTypes } from '../scripts/demo-models.js';
import { chooseVariant, decideVariant, readVariantReports, runOptimize } from '../agent/compress/index.js';
import { InvalidInputError } from '../agent/errors.js';

/** A binary PPM (P6) of a smooth synthetic scene; distinct per seed. */
function ppm(width: number, height: number, seed: number): Uint8Array {
  const header = new TextEncoder().encode(`P6\n# seed ${seed}\n${width} ${height}\n255\n`);
  const body = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      for (let c = 0; c < 3; c++) {
        const v = 128 + 100 * Math.sin(x * 0.07 * (1 + seed % 3) + y * 0.05 + seed + c) * Math.cos((x + y) * 0.02 * (c + 1));
        body[(y * width + x) * 3 + c] = Math.max(0, Math.min(255, Math.round(v)));
      }
    }
  }
  const out = new Uint8Array(header.length + body.length);
  out.set(header);
  out.set(body, header.length);
  return out;
}

const work = mkdtempSync(join(tmpdir(), 'edge-agent-optimize-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));
const images = join(work, 'images');
mkdirSync(images);
for (let i = 0; i < 8; i++) writeFileSync(join(images, `frame-${i}.ppm`), ppm(64, 48, i));
const versionDir = join(work, 'classifier', '1');
mkdirSync(versionDir, { recursive: true });
writeFileSync(join(versionDir, 'model.onnx'), buildClassifier({ size: 32 }));

t.test('optimize writes int8 and fp16 variants with a measured report, and auto serves from it', async (t) => {
  const lines: string[] = [];
  const result = await runOptimize({
    model: join(versionDir, 'model.onnx'), calibration: images, latencyRuns: 5, log: (l) => lines.push(l),
  });
  t.ok(existsSync(join(versionDir, 'model.int8.onnx')));
  t.ok(existsSync(join(versionDir, 'model.fp16.onnx')));
  t.equal(result.reportFile, join(versionDir, 'model.report.json'));
  const report = JSON.parse(readFileSync(result.reportFile, 'utf8'));
  t.equal(report.heldOut.sources, 2, 'every fourth of the 8 images is held out');
  t.equal(report.heldOut.samples, 12, 'each held-out image gives the full frame and 5 crops');
  const int8 = report.variants.int8;
  t.equal(int8.calibration.sources, 6, 'calibration never sees a held-out image');
  t.ok(int8.accuracy.cosine > 0.99, `int8 cosine ${int8.accuracy.cosine}`);
  t.ok(int8.accuracy.top1Agreement >= 0.9, `int8 top-1 ${int8.accuracy.top1Agreement}`);
  t.ok(int8.sizeBytes < report.model.sizeBytes / 3, 'int8 weights take about a quarter of the space');
  t.ok(int8.latencyMs.fp32 > 0 && int8.latencyMs.variant > 0);
  t.same(int8.layers.quantized, ['conv0', 'conv1', 'conv2', 'conv3', 'fc']);
  t.ok(report.variants.fp16.accuracy.cosine > 0.9999);
  t.match(result.table, /int8/);
  t.ok(lines.some((l) => l.includes('held out')));

  const available = readVariantReports(versionDir);
  t.ok(available.int8 && available.fp16, 'both variants are available');
  t.equal(available.ignored, undefined);
  const cpu = chooseVariant({ provider: 'cpu', available, requested: 'auto' });
  t.equal(cpu, int8.passes && int8.latencyMs.speedup >= 1 ? 'int8' : 'fp32', 'auto on CPU follows the report');
  t.equal(chooseVariant({ provider: 'webgpu', available, requested: 'auto' }), 'fp16', 'auto on a GPU provider takes fp16');
  t.equal(chooseVariant({ provider: 'cuda', available, requested: 'fp32' }), 'fp32', 'an explicit request wins');

  // A variant replaced after it was measured is not trusted any more.
  writeFileSync(join(versionDir, 'model.int8.onnx'), readFileSync(join(versionDir, 'model.fp16.onnx')));
  const stale = readVariantReports(versionDir);
  t.equal(stale.int8, undefined);
  t.match(stale.ignored?.[0] ?? '', /changed since it was measured/);
  t.equal(chooseVariant({ provider: 'cpu', available: stale, requested: 'auto' }), 'fp32');
});

t.test('optimize --auto-exclude keeps layers in float until the bound holds', async (t) => {
  const out = join(work, 'auto');
  // A bound no int8 model reaches: every candidate layer ends up excluded, and the plan says so.
  const result = await runOptimize({
    model: join(versionDir, 'model.onnx'), calibration: images, out, formats: ['int8'], autoExclude: true,
    minCosine: 0.999999999, latencyRuns: 3, log: () => {},
  });
  const int8 = result.report.variants.int8!;
  t.ok(int8.layers!.keptFloat.length > 0, `kept in float: ${int8.layers!.keptFloat.join(', ')}`);
  t.equal(result.report.variants.fp16, undefined, 'only the requested format is built');
});

t.test('optimize rejects bad input with clear messages', async (t) => {
  const garbage = join(work, 'garbage.onnx');
  writeFileSync(garbage, 'this is not a protobuf at all, just text that claims to be a model');
  await t.rejects(runOptimize({ model: garbage, calibration: images }), { name: 'InvalidInputError', message: /garbage\.onnx is not an ONNX model/ });

  await t.rejects(runOptimize({ model: join(work, 'missing.onnx'), calibration: images }), /does not exist/);

  const types = join(work, 'types.onnx');
  writeFileSync(types, buildTypes());
  await t.rejects(runOptimize({ model: types, calibration: images }), { message: /has no float32 weights to compress/ });

  const empty = join(work, 'empty');
  mkdirSync(empty);
  writeFileSync(join(empty, 'README.txt'), 'no samples here');
  await t.rejects(runOptimize({ model: join(versionDir, 'model.onnx'), calibration: empty }), { message: /calibration set .*empty.* is empty/ });

  await t.rejects(runOptimize({ model: join(versionDir, 'model.onnx'), calibration: join(work, 'nowhere') }), { message: /does not exist/ });
  await t.rejects(runOptimize({ model: join(versionDir, 'model.onnx'), calibration: images, exclude: ['no_such_layer'] }), { message: /no_such_layer/ });
  await t.rejects(runOptimize({ model: join(versionDir, 'model.onnx'), calibration: images, formats: ['int4' as 'int8'] }), { message: /unknown format 'int4'/ });

  const err = await runOptimize({ model: garbage, calibration: images }).catch((e: unknown) => e);
  t.ok(err instanceof InvalidInputError, 'errors are typed InvalidInputError (code INVALID_ARGUMENT)');
});

t.test('auto picks per provider and refuses variants that fail the bound', async (t) => {
  const report = (variant: 'int8' | 'fp16', cosine: number, extra: { top1?: number; speedup?: number; provider?: string } = {}) => ({
    variant, file: `model.${variant}.onnx`, sha256: 'x', sizeBytes: 1, provider: extra.provider ?? 'cpu', passes: true,
    accuracy: { samples: 10, cosine, minSampleCosine: cosine, maxAbsError: 0.1, outputs: [], ...(extra.top1 !== undefined ? { top1Agreement: extra.top1 } : {}) },
    latencyMs: { fp32: 2, variant: 2 / (extra.speedup ?? 2), speedup: extra.speedup ?? 2, runs: 10 },
    // A CPU measurement of fp16 counts for GPUs only with the range check (the CPU computes most fp16 in fp32).
    ...(variant === 'fp16' ? { fp16Range: { checked: true as const, limit: 32752, samples: 10, maxAbsInFloat16: 1, keptFloat32: [] } } : {}),
  });
  const good = { int8: report('int8', 0.995), fp16: report('fp16', 0.9999) };
  t.equal(chooseVariant({ provider: 'cpu', available: good, requested: 'auto' }), 'int8');
  for (const gpu of ['cuda', 'tensorrt', 'webgpu']) t.equal(chooseVariant({ provider: gpu, available: good, requested: 'auto' }), 'fp16', gpu);
  t.equal(chooseVariant({ provider: 'cpu', available: {}, requested: 'auto' }), 'fp32', 'nothing measured → fp32');
  t.equal(chooseVariant({ provider: 'webgpu', available: { int8: good.int8 }, requested: 'auto' }), 'fp32', 'GPU does not fall back to int8');
  const low = decideVariant({ provider: 'cpu', available: { int8: report('int8', 0.95) }, requested: 'auto' });
  t.equal(low.variant, 'fp32');
  t.match(low.reason, /cosine 0\.9500 is below the bound 0\.99/);
  t.equal(chooseVariant({ provider: 'cpu', available: { int8: report('int8', 0.95) }, requested: 'auto', minCosine: 0.9 }), 'int8', 'the model’s own bound applies');
  t.equal(chooseVariant({ provider: 'cpu', available: { int8: report('int8', 0.999, { top1: 0.9 }) }, requested: 'auto' }), 'fp32', 'top-1 below 99%');
  const slow = decideVariant({ provider: 'cpu', available: { int8: report('int8', 0.999, { speedup: 0.8 }) }, requested: 'auto' });
  t.equal(slow.variant, 'fp32');
  t.match(slow.reason, /slower than fp32/);
  t.equal(chooseVariant({ provider: 'cpu', available: { int8: report('int8', 0.999, { speedup: 0.8, provider: 'cuda' }) }, requested: 'auto' }), 'int8', 'a timing from another provider does not count');
  t.equal(chooseVariant({ provider: 'cpu', available: good, requested: 'fp16' }), 'fp16', 'explicit fp16 on CPU');
});

t.test('readVariantReports tolerates missing, corrupt and stale reports', async (t) => {
  const dir = join(work, 'reports', '1');
  mkdirSync(dir, { recursive: true });
  t.same(readVariantReports(dir), {}, 'no report: nothing available');
  writeFileSync(join(dir, 'model.report.json'), '{ not json');
  t.match(readVariantReports(dir).ignored?.[0] ?? '', /unreadable/);
  writeFileSync(join(dir, 'model.report.json'), JSON.stringify({ formatVersion: 2 }));
  t.match(readVariantReports(dir).ignored?.[0] ?? '', /not a variant report/);
  writeFileSync(join(dir, 'model.onnx'), buildClassifier({ size: 32, classes: 3 }));
  writeFileSync(join(dir, 'model.report.json'), readFileSync(join(versionDir, 'model.report.json')));
  const stale = readVariantReports(dir);
  t.equal(stale.fp16, undefined);
  t.match(stale.ignored?.[0] ?? '', /written for another model\.onnx/);
});
