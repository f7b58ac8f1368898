import t from 'tap';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runOptimize } from '../agent/compress/index.js';
import { startTestAgent } from './helpers/agent.js';
import { copyDemoRepo, tempDir } from './helpers/runtime.js';

/** A binary PPM (P6) of a smooth synthetic scene, distinct per seed. */
function ppm(width: number, height: number, seed: number): Uint8Array {
  const header = new TextEncoder().encode(`P6\n${width} ${height}\n255\n`);
  const body = new Uint8Array(width * height * 3);
  for (let i = 0; i < body.length; i++) body[i] = Math.round(128 + 100 * Math.sin(i * 0.013 * (1 + (seed % 3)) + seed));
  return Buffer.concat([header, body]);
}

t.test('variant auto: the agent serves int8 on CPU when its report passes the bound, fp32 when it does not', async (t) => {
  const repo = copyDemoRepo(t, ['classifier']);
  const versionDir = join(repo, 'classifier', '1');
  const images = join(tempDir(t), 'images');
  mkdirSync(images);
  for (let i = 0; i < 8; i++) writeFileSync(join(images, `f${i}.ppm`), ppm(128, 128, i));
  const result = await runOptimize({ model: join(versionDir, 'model.onnx'), calibration: images, formats: ['int8'], latencyRuns: 3, log: () => undefined });
  const report = JSON.parse(readFileSync(result.reportFile, 'utf8')) as { variants: { int8: { accuracy: { cosine: number }; latencyMs: { speedup: number } } } };
  t.ok(report.variants.int8.accuracy.cosine >= 0.99, `int8 passes the default bound (cosine ${report.variants.int8.accuracy.cosine})`);
  // `auto` also refuses a variant measured slower than fp32. Three timed runs on a loaded machine once read
  // int8 as slower; that rule has its own test (compress-optimize), so this one pins the timing and follows the
  // accuracy bound end to end.
  report.variants.int8.latencyMs.speedup = 2;
  writeFileSync(result.reportFile, JSON.stringify(report));

  const a = await startTestAgent(t, { repo });
  const info = a.agent.runtime.modelInfo('classifier');
  t.equal(info.variant, 'int8', 'auto serves the measured int8 variant on the cpu provider');
  t.match(info.path, /model\.int8\.onnx$/);
  const stream = await a.client().openStream({ model: 'classifier' });
  t.equal(stream.opened.variant, 'int8', 'the served variant shows in the stream metadata');
  stream.end();

  // A variant whose recorded accuracy fails the bound is refused: the next load serves fp32.
  report.variants.int8.accuracy.cosine = 0.42;
  writeFileSync(result.reportFile, JSON.stringify(report));
  await a.agent.runtime.loadModel('classifier');
  t.equal(a.agent.runtime.modelInfo('classifier').variant, 'fp32', 'a broken variant is not served by auto');

  writeFileSync(join(repo, 'classifier', 'config.yaml'), 'variant: int8\n');
  await a.agent.runtime.loadModel('classifier');
  t.equal(a.agent.runtime.modelInfo('classifier').variant, 'int8', 'an explicit variant is served as asked');
});
