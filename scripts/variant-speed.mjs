#!/usr/bin/env node
// Interleaved latency of an fp32 model against its variants, in one process: rounds alternate between the
// files so each sees the same machine load; prints the median per file and thread count, and the speed-up.
// A bench step for `edge-agent optimize` results (its own report times the variants one after the other).
//
//   node scripts/variant-speed.mjs FP32.onnx VARIANT.onnx [...] [--input name=d0,d1,...] [--rounds 8] [--runs 10]
import * as ort from 'onnxruntime-node';

const args = process.argv.slice(2);
function take(name, fallback) {
  const i = args.indexOf(name);
  if (i < 0) return fallback;
  const v = args[i + 1];
  args.splice(i, 2);
  return v;
}
const rounds = Number(take('--rounds', '8'));
const runs = Number(take('--runs', '10'));
const inputSpec = take('--input', undefined);
const files = args;
if (files.length < 2) {
  console.error('usage: node scripts/variant-speed.mjs FP32.onnx VARIANT.onnx [...] [--input name=d0,d1,...] [--rounds 8] [--runs 10]');
  process.exit(2);
}

function feedsFor(session) {
  const feeds = {};
  for (const meta of session.inputMetadata) {
    const given = inputSpec?.startsWith(`${meta.name}=`) ? inputSpec.slice(meta.name.length + 1).split(',').map(Number) : undefined;
    const dims = given ?? meta.shape.map((d) => (typeof d === 'number' && d > 0 ? d : 1));
    const n = dims.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    for (let i = 0; i < n; i++) data[i] = Math.sin(i * 0.37) * 0.9;
    feeds[meta.name] = new ort.Tensor('float32', data, dims);
  }
  return feeds;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
for (const threads of [1, 0]) {
  const sessions = [];
  for (const f of files) sessions.push(await ort.InferenceSession.create(f, { logSeverityLevel: 3, ...(threads ? { intraOpNumThreads: threads } : {}) }));
  const feeds = sessions.map(feedsFor);
  for (let i = 0; i < sessions.length; i++) for (let w = 0; w < 3; w++) await sessions[i].run(feeds[i]);
  const times = sessions.map(() => []);
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < sessions.length; i++) {
      const t = performance.now();
      for (let k = 0; k < runs; k++) await sessions[i].run(feeds[i]);
      times[i].push((performance.now() - t) / runs);
    }
  }
  const base = median(times[0]);
  for (let i = 0; i < files.length; i++) {
    const m = median(times[i]);
    console.log(`${threads ? '1 thread ' : 'default  '} ${files[i].padEnd(48)} ${m.toFixed(2).padStart(8)} ms  ${(base / m).toFixed(2)}x`);
  }
  for (const s of sessions) await s.release();
}
