#!/usr/bin/env node
// Calibration and held-out inputs for the PP-OCR text recognizer, cut from real rendered text: finds text lines
// by their horizontal ink profile, splits long ones at wide gaps, and applies PP-OCR's recognizer preprocessing
// (height 48 keeping the aspect ratio, (x/255 − 0.5)/0.5, zero-padded on the right to a fixed width). Writes one
// .npy per source image ([crops, 3, 48, width]), so `edge-agent optimize` keeps each image's crops on one side of
// its calibration / held-out split. A bench/setup step; the images come from `node scripts/fetch-models.mjs`.
// Decoding and the crop's bilinear resize are `edge-agent optimize`'s own (dist/, built by `npm ci`).
//
//   node scripts/text-line-crops.mjs OUT_DIR [--width 320] [--per-image 12] [IMAGE_OR_DIR ...]
//   (default images: var/calibration-images/text)
import { existsSync, mkdirSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { decodeImage, imageToTensor } from '../dist/agent/compress/calibration-data.js';

const args = process.argv.slice(2);
function option(name, fallback) {
  const i = args.indexOf(name);
  if (i < 0) return fallback;
  const v = Number(args[i + 1]);
  if (!Number.isInteger(v) || v <= 0) throw new Error(`${name} must be a positive integer`);
  args.splice(i, 2);
  return v;
}
const W = option('--width', 320);
const maxPer = option('--per-image', 12);
const H = 48;
const [outDir, ...inputs] = args;
if (!outDir) {
  console.error('usage: node scripts/text-line-crops.mjs OUT_DIR [--width 320] [--per-image 12] [IMAGE_OR_DIR ...]');
  process.exit(2);
}
const given = inputs.length > 0 ? inputs : ['var/calibration-images/text'];
const srcs = given.flatMap((p) => {
  if (!existsSync(p)) throw new Error(`${p}: not found (run node scripts/fetch-models.mjs --images first)`);
  return statSync(p).isDirectory() ? readdirSync(p).filter((f) => f.endsWith('.png')).sort().map((f) => join(p, f)) : [p];
});
mkdirSync(outDir, { recursive: true });
function npy(shape, data) {
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(', ')},), }`;
  while ((10 + header.length + 1) % 64) header += ' ';
  header += '\n';
  const h = Buffer.alloc(10); Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]).copy(h); h.writeUInt16LE(header.length, 8);
  return Buffer.concat([h, Buffer.from(header, 'latin1'), Buffer.from(data.buffer, data.byteOffset, data.byteLength)]);
}
let total = 0;
for (const file of srcs) {
  const img = await decodeImage(file);
  const { width: w, height: h, rgb } = img;
  const grey = new Float32Array(w * h);
  for (let p = 0; p < w * h; p++) grey[p] = 0.299 * rgb[p * 3] + 0.587 * rgb[p * 3 + 1] + 0.114 * rgb[p * 3 + 2];
  const sorted = Float32Array.from(grey).sort(); const bg = sorted[sorted.length >> 1];
  const INK = Math.max(25, 0.4 * Math.abs(bg - sorted[bg > 128 ? Math.floor(sorted.length * 0.02) : Math.floor(sorted.length * 0.98)]));
  const ink = (x, y) => Math.abs(grey[y * w + x] - bg) > INK;
  const rowInk = new Int32Array(h);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) if (ink(x, y)) rowInk[y]++;
  const rowMin = 3 + Math.round(0.004 * w);
  for (let y = 0; y < h; y++) if (rowInk[y] < rowMin) rowInk[y] = 0;
  const bands = [];
  for (let y = 0; y < h;) {
    if (rowInk[y] === 0) { y++; continue; }
    let y1 = y; while (y1 < h && rowInk[y1] > 0) y1++;
    if (y1 - y >= 8 && y1 - y <= 90) bands.push([y, y1]);
    y = y1;
  }
  const boxes = [];
  for (const [y0, y1] of bands) {
    const bh = y1 - y0, m = Math.max(2, Math.round(bh * 0.15));
    const top = Math.max(0, y0 - m), bot = Math.min(h, y1 + m);
    const colInk = new Uint8Array(w);
    for (let x = 0; x < w; x++) for (let y = y0; y < y1; y++) if (ink(x, y)) { colInk[x] = 1; break; }
    // segments split at gaps wider than 1.5 line heights
    let x = 0;
    while (x < w) {
      if (!colInk[x]) { x++; continue; }
      let x1 = x, gap = 0;
      while (x1 < w && gap < 1.5 * bh) { gap = colInk[x1] ? 0 : gap + 1; x1++; }
      const segEnd = x1 - gap;
      const maxW = Math.round((bot - top) * W / H);
      for (let s = x; s < segEnd; s += maxW) {
        const l = Math.max(0, s - m), r = Math.min(w, Math.min(segEnd, s + maxW) + m);
        if (r - l >= (bot - top)) boxes.push({ x: l, y: top, w: r - l, h: bot - top });
      }
      x = x1;
    }
  }
  const pick = [];
  for (let i = 0; i < Math.min(maxPer, boxes.length); i++) pick.push(boxes[Math.floor(i * boxes.length / Math.min(maxPer, boxes.length))]);
  if (pick.length === 0) { console.log('no lines in', file); continue; }
  const out = new Float32Array(pick.length * 3 * H * W);
  pick.forEach((b, k) => {
    // Height 48 keeping the aspect ratio, values in [-1, 1], then zero-padded on the right to W.
    const rw = Math.min(W, Math.max(1, Math.ceil(H * b.w / b.h)));
    const crop = imageToTensor(img, b, 'NCHW', 3, H, rw, 'symmetric');
    for (let c = 0; c < 3; c++) for (let y = 0; y < H; y++) {
      out.set(crop.subarray((c * H + y) * rw, (c * H + y + 1) * rw), ((k * 3 + c) * H + y) * W);
    }
  });
  writeFileSync(join(outDir, basename(file).replace(/\.png$/, '.npy')), npy([pick.length, 3, H, W], out));
  total += pick.length;
  console.log(basename(file), `${w}x${h}`, 'bands', bands.length, 'boxes', boxes.length, 'kept', pick.length);
}
console.log('total', total);
