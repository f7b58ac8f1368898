import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { extname, join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { InvalidInputError } from '../errors.js';
import type { Feeds } from './calibrate.js';
import { DataType, dataTypeName, type Dim } from './onnx-graph.js';

/**
 * Calibration and held-out samples for a model: real frames from a directory of images (PNG, JPEG, PPM/PGM)
 * or tensors from NumPy `.npy` files. Samples keep the file they came from, so the held-out split can put
 * whole source images aside (crops of one photo on both sides would flatter the report).
 */

export interface ModelInputSpec {
  readonly name: string;
  readonly elemType: number;
  /** -1 where dynamic. */
  readonly dims: readonly number[];
}

export interface Sample {
  readonly source: string;
  readonly feeds: Feeds;
}

export type Normalization = 'unit' | 'symmetric' | 'imagenet' | 'raw';

export const NORMALIZATIONS: readonly Normalization[] = ['unit', 'symmetric', 'imagenet', 'raw'];

/** The normalisation asked for (default unit); throws InvalidInputError naming it when it is not one of NORMALIZATIONS. */
export function imageNormalization(normalize: Normalization | undefined): Normalization {
  const n = normalize ?? 'unit';
  if (!NORMALIZATIONS.includes(n)) throw new InvalidInputError(`image normalisation '${String(n)}' is not one of ${NORMALIZATIONS.join(', ')}`);
  return n;
}

/** Height × width of the tensors images are resized to. */
export interface ImageSize {
  readonly height: number;
  readonly width: number;
}

/** Where a model's image height/width are dynamic and no size is given. */
export const DEFAULT_IMAGE_SIZE: ImageSize = { height: 320, width: 320 };

export interface ImageOptions {
  /**
   * Height/width of the image tensors where the model's are dynamic (a number: square); default 320×320.
   * Where the model fixes an axis, a size that differs on it is refused.
   */
  readonly size?: number | ImageSize;
  /** unit: [0,1]; symmetric: [-1,1]; imagenet: (x/255 − mean)/std; raw: 0…255. Default unit. */
  readonly normalize?: Normalization;
  /** Crops per image besides the full frame (centre, then corners); default 5. */
  readonly crops?: number;
}

// ---------------------------------------------------------------- images

export interface RgbImage {
  readonly width: number;
  readonly height: number;
  /** Interleaved RGB, 8 bits per channel. */
  readonly rgb: Uint8Array;
}

const IMAGE_EXTENSIONS = new Set(['.png', '.jpg', '.jpeg', '.ppm', '.pgm', '.pnm']);

/** Netpbm P5 (grey) / P6 (colour) with maxval ≤ 255: trivial enough to read without a library. */
export function decodeNetpbm(bytes: Uint8Array, file = 'image'): RgbImage {
  const text = new TextDecoder('latin1').decode(bytes.subarray(0, Math.min(bytes.length, 512)));
  const m = /^(P[56])\s+(?:#[^\n]*\n\s*)*(\d+)\s+(?:#[^\n]*\n\s*)*(\d+)\s+(?:#[^\n]*\n\s*)*(\d+)\s/.exec(text);
  if (!m) throw new InvalidInputError(`${file}: not a binary PPM/PGM (P5/P6) image`);
  const [, magic, w, h, maxval] = m;
  const width = Number(w), height = Number(h), max = Number(maxval);
  if (max > 255 || max <= 0) throw new InvalidInputError(`${file}: PPM/PGM maxval ${max} is not supported (8-bit only)`);
  const channels = magic === 'P6' ? 3 : 1;
  const offset = m[0].length;
  const need = width * height * channels;
  if (bytes.length - offset < need) throw new InvalidInputError(`${file}: truncated image data (${bytes.length - offset} of ${need} bytes)`);
  const rgb = new Uint8Array(width * height * 3);
  for (let p = 0; p < width * height; p++) {
    for (let c = 0; c < 3; c++) {
      const v = bytes[offset + p * channels + (channels === 3 ? c : 0)]!;
      rgb[p * 3 + c] = max === 255 ? v : Math.round((v * 255) / max);
    }
  }
  return { width, height, rgb };
}

interface PngModule { PNG: { sync: { read(buf: Buffer): { width: number; height: number; data: Buffer } } } }
interface JpegModule { decode(buf: Uint8Array, opts: { useTArray: boolean; formatAsRGBA: boolean }): { width: number; height: number; data: Uint8Array } }

async function optionalModule<T>(name: string, ext: string): Promise<T> {
  try {
    const spec: string = name;
    const mod = (await import(spec)) as { default?: T } & T;
    return (mod.default ?? mod) as T;
  } catch {
    throw new InvalidInputError(`decoding ${ext} images needs the '${name}' package, which is not installed; convert the images to PPM/PGM or .npy, or install ${name}`);
  }
}

function rgbaToRgb(width: number, height: number, rgba: Uint8Array): RgbImage {
  const rgb = new Uint8Array(width * height * 3);
  for (let p = 0; p < width * height; p++) {
    rgb[p * 3] = rgba[p * 4]!;
    rgb[p * 3 + 1] = rgba[p * 4 + 1]!;
    rgb[p * 3 + 2] = rgba[p * 4 + 2]!;
  }
  return { width, height, rgb };
}

export async function decodeImage(file: string): Promise<RgbImage> {
  const bytes = readFileSync(file);
  const ext = extname(file).toLowerCase();
  try {
    if (ext === '.png') {
      const png = await optionalModule<PngModule>('pngjs', '.png');
      const img = png.PNG.sync.read(bytes);
      return rgbaToRgb(img.width, img.height, img.data);
    }
    if (ext === '.jpg' || ext === '.jpeg') {
      const jpeg = await optionalModule<JpegModule>('jpeg-js', '.jpg');
      const img = jpeg.decode(bytes, { useTArray: true, formatAsRGBA: true });
      return rgbaToRgb(img.width, img.height, img.data);
    }
    return decodeNetpbm(bytes, file);
  } catch (err) {
    if (err instanceof InvalidInputError) throw err;
    throw new InvalidInputError(`${file}: cannot decode image (${(err as Error).message})`, { cause: err });
  }
}

/** A crop box in source pixels. */
interface Box { x: number; y: number; w: number; h: number }

function cropBoxes(width: number, height: number, crops: number): Box[] {
  const boxes: Box[] = [{ x: 0, y: 0, w: width, h: height }];
  const cw = Math.round(width * 0.7), ch = Math.round(height * 0.7);
  const sw = Math.round(width * 0.6), sh = Math.round(height * 0.6);
  const extra: Box[] = [
    { x: Math.round((width - cw) / 2), y: Math.round((height - ch) / 2), w: cw, h: ch },
    { x: 0, y: 0, w: sw, h: sh },
    { x: width - sw, y: 0, w: sw, h: sh },
    { x: 0, y: height - sh, w: sw, h: sh },
    { x: width - sw, y: height - sh, w: sw, h: sh },
  ];
  return boxes.concat(extra.slice(0, Math.max(0, crops)));
}

const IMAGENET_MEAN = [0.485, 0.456, 0.406];
const IMAGENET_STD = [0.229, 0.224, 0.225];

function normalizeValue(v: number, channel: number, mode: Normalization): number {
  switch (mode) {
    case 'unit': return v / 255;
    case 'symmetric': return v / 127.5 - 1;
    case 'imagenet': return (v / 255 - IMAGENET_MEAN[channel]!) / IMAGENET_STD[channel]!;
    case 'raw': return v;
  }
}

/** Bilinear resize of a crop into a float tensor laid out as the model wants (NCHW or NHWC, batch 1). */
export function imageToTensor(img: RgbImage, box: Box, layout: 'NCHW' | 'NHWC', channels: 1 | 3, height: number, width: number, mode: Normalization): Float32Array {
  const out = new Float32Array(channels * height * width);
  const sx = box.w / width, sy = box.h / height;
  for (let y = 0; y < height; y++) {
    const fy = Math.min(box.h - 1, Math.max(0, (y + 0.5) * sy - 0.5));
    const y0 = Math.floor(fy), y1 = Math.min(box.h - 1, y0 + 1), wy = fy - y0;
    for (let x = 0; x < width; x++) {
      const fx = Math.min(box.w - 1, Math.max(0, (x + 0.5) * sx - 0.5));
      const x0 = Math.floor(fx), x1 = Math.min(box.w - 1, x0 + 1), wx = fx - x0;
      const px = (yy: number, xx: number, c: number): number => img.rgb[((box.y + yy) * img.width + box.x + xx) * 3 + c]!;
      const rgb = [0, 1, 2].map((c) =>
        (px(y0, x0, c) * (1 - wx) + px(y0, x1, c) * wx) * (1 - wy) + (px(y1, x0, c) * (1 - wx) + px(y1, x1, c) * wx) * wy);
      const values = channels === 3 ? rgb : [0.299 * rgb[0]! + 0.587 * rgb[1]! + 0.114 * rgb[2]!];
      for (let c = 0; c < channels; c++) {
        const v = normalizeValue(values[c]!, channels === 3 ? c : 0, mode);
        if (layout === 'NCHW') out[c * height * width + y * width + x] = v;
        else out[(y * width + x) * channels + c] = v;
      }
    }
  }
  return out;
}

/** A size option as height × width; throws InvalidInputError for anything but positive whole numbers. */
export function imageSize(size: number | ImageSize | undefined): ImageSize | undefined {
  if (size === undefined) return undefined;
  const s = typeof size === 'number' ? { height: size, width: size } : size;
  const ok = (v: number): boolean => Number.isInteger(v) && v > 0 && v <= 16384;
  if (!ok(s.height) || !ok(s.width)) throw new InvalidInputError(`image size ${s.height}x${s.width} is not a size in pixels (whole numbers 1…16384)`);
  return s;
}

/** Parses `HxW` (e.g. `48x320`) or `N` (square), as `--size` takes it. */
export function parseImageSize(text: string): ImageSize {
  const m = /^\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?$/.exec(text);
  if (!m) throw new InvalidInputError(`size '${text}' is not HxW (e.g. 224x224 or 48x320)`);
  return imageSize({ height: Number(m[1]), width: Number(m[2] ?? m[1]) })!;
}

export interface ImageLayout {
  readonly layout: 'NCHW' | 'NHWC';
  readonly channels: 1 | 3;
  readonly height: number;
  readonly width: number;
  /** The axes the model leaves dynamic, filled from the size option or the default. */
  readonly filled: readonly ('height' | 'width')[];
  /** Whether the filled axes took DEFAULT_IMAGE_SIZE because no size was given. */
  readonly defaultSize: boolean;
}

/** How an image model's single input is laid out, or a reason why images cannot feed it. */
export function imageLayout(input: ModelInputSpec, size?: number | ImageSize): ImageLayout {
  if (input.elemType !== DataType.FLOAT) {
    throw new InvalidInputError(`input '${input.name}' is ${dataTypeName(input.elemType)}; images can only feed a float32 input`);
  }
  const d = input.dims;
  if (d.length !== 4) throw new InvalidInputError(`input '${input.name}' has rank ${d.length}; images need a rank-4 image input (NCHW or NHWC)`);
  const given = imageSize(size);
  const want = given ?? DEFAULT_IMAGE_SIZE;
  const filled: ('height' | 'width')[] = [];
  const fix = (v: number, axis: 'height' | 'width'): number => {
    if (v > 0) {
      if (given && given[axis] !== v) {
        throw new InvalidInputError(`input '${input.name}' [${d.join(',')}] has a fixed ${axis} of ${v}; the size ${given.height}x${given.width} does not fit it`);
      }
      return v;
    }
    filled.push(axis);
    return want[axis];
  };
  const done = (layout: 'NCHW' | 'NHWC', channels: 1 | 3, h: number, w: number): ImageLayout => {
    const height = fix(h, 'height'), width = fix(w, 'width');
    return { layout, channels, height, width, filled, defaultSize: filled.length > 0 && !given };
  };
  if (d[1] === 3 || d[1] === 1) return done('NCHW', d[1] as 1 | 3, d[2]!, d[3]!);
  if (d[3] === 3 || d[3] === 1) return done('NHWC', d[3] as 1 | 3, d[1]!, d[2]!);
  throw new InvalidInputError(`input '${input.name}' [${d.join(',')}] has no channel axis of 1 or 3; images cannot feed it`);
}

// ---------------------------------------------------------------- .npy

export interface NpyArray {
  readonly dtype: 'float32' | 'float16' | 'int64' | 'int32' | 'uint8' | 'int8' | 'float64';
  readonly shape: number[];
  readonly data: Float32Array | Uint16Array | BigInt64Array | Int32Array | Uint8Array | Int8Array | Float64Array;
}

const NPY_DTYPES: Record<string, NpyArray['dtype']> = {
  '<f4': 'float32', '<f2': 'float16', '<i8': 'int64', '<i4': 'int32', '|u1': 'uint8', '|i1': 'int8', '<f8': 'float64',
};

/** NumPy .npy (format 1.x/2.x/3.x, little-endian, C order). */
export function decodeNpy(bytes: Uint8Array, file = 'array.npy'): NpyArray {
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];
  if (bytes.length < 10 || magic.some((b, i) => bytes[i] !== b)) throw new InvalidInputError(`${file}: not a NumPy .npy file`);
  const major = bytes[6]!;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (!descr || !fortran || shapeText === undefined) throw new InvalidInputError(`${file}: malformed .npy header`);
  const dtype = NPY_DTYPES[descr.replace('=', '<')];
  if (!dtype) throw new InvalidInputError(`${file}: .npy dtype ${descr} is not supported (float32, float16, float64, int64, int32, uint8, int8)`);
  if (fortran === 'True') throw new InvalidInputError(`${file}: Fortran-order .npy arrays are not supported; save with C order`);
  const shape = shapeText.split(',').map((s) => s.trim()).filter(Boolean).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const body = bytes.slice(start + headerLen);
  const ctor = { float32: Float32Array, float16: Uint16Array, int64: BigInt64Array, int32: Int32Array, uint8: Uint8Array, int8: Int8Array, float64: Float64Array }[dtype];
  if (body.byteLength < count * ctor.BYTES_PER_ELEMENT) throw new InvalidInputError(`${file}: truncated .npy data`);
  return { dtype, shape, data: new ctor(body.buffer, body.byteOffset, count) };
}

/** A float32 array as NumPy .npy (format 1.0, C order): calibration data written by a script for `optimize`. */
export function encodeNpy(shape: readonly number[], data: Float32Array): Uint8Array {
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(', ')}${shape.length === 1 ? ',' : ''}), }`;
  // The data starts on a 64-byte boundary, the header ending in a newline (the format's own rule).
  while ((10 + header.length + 1) % 64 !== 0) header += ' ';
  header += '\n';
  const out = new Uint8Array(10 + header.length + data.byteLength);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  new DataView(out.buffer).setUint16(8, header.length, true);
  out.set(new TextEncoder().encode(header), 10);
  out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), 10 + header.length);
  return out;
}

const ORT_TYPE: Record<number, NpyArray['dtype'] | 'float16'> = {
  [DataType.FLOAT]: 'float32', [DataType.FLOAT16]: 'float16', [DataType.INT64]: 'int64', [DataType.INT32]: 'int32',
  [DataType.UINT8]: 'uint8', [DataType.INT8]: 'int8', [DataType.DOUBLE]: 'float64',
};

/** Splits an array into batch-1 tensors for `input`: with a leading sample axis, or one sample without it. */
function npySamples(arr: NpyArray, input: ModelInputSpec, file: string): ort.Tensor[] {
  const want = ORT_TYPE[input.elemType];
  if (want !== arr.dtype) {
    throw new InvalidInputError(`${file}: dtype ${arr.dtype} does not match input '${input.name}' (${dataTypeName(input.elemType)})`);
  }
  const rank = input.dims.length;
  const sampleShape = arr.shape.length === rank ? arr.shape.slice(1) : arr.shape.length === rank - 1 ? arr.shape : undefined;
  if (!sampleShape) {
    throw new InvalidInputError(`${file}: shape [${arr.shape.join(',')}] fits neither [samples, ...] nor one sample of input '${input.name}' [${input.dims.join(',')}]`);
  }
  for (let i = 1; i < rank; i++) {
    const d = input.dims[i]!;
    if (d > 0 && sampleShape[i - 1] !== d) {
      throw new InvalidInputError(`${file}: sample shape [${sampleShape.join(',')}] does not match input '${input.name}' [${input.dims.join(',')}] at axis ${i}`);
    }
  }
  const per = sampleShape.reduce((a, b) => a * b, 1);
  const n = arr.shape.length === rank ? arr.shape[0]! : 1;
  const bad = firstNonFinite(arr);
  if (bad !== undefined) {
    throw new InvalidInputError(`${file}: sample ${Math.floor(bad.index / Math.max(1, per))} holds ${bad.value} (element ${bad.index}); calibration inputs must be finite numbers`);
  }
  const out: ort.Tensor[] = [];
  for (let s = 0; s < n; s++) {
    const data = arr.data.slice(s * per, (s + 1) * per);
    out.push(new ort.Tensor(arr.dtype as 'float32', data as Float32Array, [1, ...sampleShape]));
  }
  return out;
}

/** The first NaN or ±Inf of a float array, or undefined; it would poison every range calibrated from it. */
function firstNonFinite(arr: NpyArray): { index: number; value: string } | undefined {
  const d = arr.data;
  if (arr.dtype === 'float16') {
    for (let i = 0; i < d.length; i++) {
      const bits = (d as Uint16Array)[i]!;
      if ((bits & 0x7c00) === 0x7c00) return { index: i, value: bits & 0x3ff ? 'NaN' : bits & 0x8000 ? '-Infinity' : 'Infinity' };
    }
    return undefined;
  }
  if (arr.dtype !== 'float32' && arr.dtype !== 'float64') return undefined;
  const f = d as Float32Array | Float64Array;
  for (let i = 0; i < f.length; i++) if (!Number.isFinite(f[i]!)) return { index: i, value: String(f[i]) };
  return undefined;
}

// ---------------------------------------------------------------- loading

export type LoadOptions = ImageOptions;

/**
 * Reads calibration samples for a model. `path` is a directory of images (single image input), a `.npy` file
 * (single input; leading axis = samples), a directory of `.npy` files (each file one source), or a directory of per-sample
 * subdirectories holding `<input name>.npy` for multi-input models. Throws InvalidInputError naming the
 * problem when nothing usable is there.
 */
export async function loadSamples(path: string, inputs: readonly ModelInputSpec[], options: LoadOptions = {}): Promise<Sample[]> {
  if (!existsSync(path)) throw new InvalidInputError(`calibration path ${path} does not exist`);
  if (inputs.length === 0) throw new InvalidInputError('the model has no inputs to calibrate');
  const stat = statSync(path);
  if (stat.isFile()) {
    if (extname(path).toLowerCase() !== '.npy') {
      if (IMAGE_EXTENSIONS.has(extname(path).toLowerCase())) return imageSamples([path], inputs, options);
      throw new InvalidInputError(`calibration file ${path} is neither a .npy array nor an image`);
    }
    return npyFileSamples(path, inputs);
  }
  const entries = readdirSync(path).sort();
  const images = entries.filter((f) => IMAGE_EXTENSIONS.has(extname(f).toLowerCase())).map((f) => join(path, f));
  const npys = entries.filter((f) => extname(f).toLowerCase() === '.npy').map((f) => join(path, f));
  const dirs = entries.filter((f) => statSync(join(path, f)).isDirectory()).map((f) => join(path, f));
  let samples: Sample[] = [];
  if (images.length > 0) samples = samples.concat(await imageSamples(images, inputs, options));
  // Several .npy files in a folder are several sources (e.g. the crops of one image each): their rows stay
  // together on one side of the held-out split. A lone .npy file's rows are the only sources there are.
  for (const f of npys) samples = samples.concat(npyFileSamples(f, inputs, npys.length >= 2));
  for (const d of dirs) {
    const feeds: Feeds = {};
    const missing: string[] = [];
    for (const input of inputs) {
      // Tensor names may hold '/' or ':' (TensorFlow exports); the file name uses '_' there.
      const f = join(d, `${input.name.replace(/[/:]/g, '_')}.npy`);
      if (!existsSync(f)) { missing.push(input.name); continue; }
      const t = npySamples(decodeNpy(readFileSync(f), f), input, f);
      if (t.length !== 1) throw new InvalidInputError(`${f}: a per-sample directory holds one sample per input, found ${t.length}`);
      feeds[input.name] = t[0]!;
    }
    if (missing.length === inputs.length) continue;
    if (missing.length > 0) throw new InvalidInputError(`${d}: missing ${missing.map((m) => `${m}.npy`).join(', ')}`);
    samples.push({ source: d, feeds });
  }
  if (samples.length === 0) {
    throw new InvalidInputError(`calibration set ${path} is empty: no images (.png/.jpg/.ppm/.pgm), .npy files or per-sample directories found`);
  }
  return samples;
}

function npyFileSamples(file: string, inputs: readonly ModelInputSpec[], fileIsSource = false): Sample[] {
  if (inputs.length !== 1) {
    throw new InvalidInputError(`${file}: the model has ${inputs.length} inputs (${inputs.map((i) => i.name).join(', ')}); give a directory of per-sample subdirectories with one <input>.npy each`);
  }
  const tensors = npySamples(decodeNpy(readFileSync(file), file), inputs[0]!, file);
  if (tensors.length === 0) throw new InvalidInputError(`${file}: holds no samples`);
  return tensors.map((t, i) => ({ source: fileIsSource ? file : `${file}#${i}`, feeds: { [inputs[0]!.name]: t } }));
}

async function imageSamples(files: readonly string[], inputs: readonly ModelInputSpec[], options: ImageOptions): Promise<Sample[]> {
  if (inputs.length !== 1) {
    throw new InvalidInputError(`images can feed a model with one image input; this model has ${inputs.length} inputs (${inputs.map((i) => i.name).join(', ')})`);
  }
  const input = inputs[0]!;
  const normalize = imageNormalization(options.normalize);
  const { layout, channels, height, width } = imageLayout(input, options.size);
  const shape: Dim[] = layout === 'NCHW' ? [1, channels, height, width] : [1, height, width, channels];
  const samples: Sample[] = [];
  for (const file of files) {
    const img = await decodeImage(file);
    for (const box of cropBoxes(img.width, img.height, options.crops ?? 5)) {
      const data = imageToTensor(img, box, layout, channels, height, width, normalize);
      samples.push({ source: file, feeds: { [input.name]: new ort.Tensor('float32', data, shape as number[]) } });
    }
  }
  return samples;
}

/**
 * Deterministic split into calibration and held-out samples by source file: every k-th source (sorted by
 * name) is held out, so no crop of a held-out image is ever calibrated on. With a single source the
 * samples themselves alternate.
 */
export function splitHeldOut(samples: readonly Sample[], fraction: number): { calibration: Sample[]; heldOut: Sample[] } {
  if (!(fraction > 0 && fraction < 1)) throw new RangeError(`held-out fraction must be in (0,1), got ${fraction}`);
  // Rows of one .npy file carry '#row' in their source, so they split like separate sources.
  const sources = [...new Set(samples.map((s) => s.source))].sort();
  const every = Math.max(2, Math.round(1 / fraction));
  if (sources.length >= 2) {
    const held = new Set(sources.filter((_, i) => i % every === every - 1 || (sources.length < every && i === sources.length - 1)));
    return { calibration: samples.filter((s) => !held.has(s.source)), heldOut: samples.filter((s) => held.has(s.source)) };
  }
  return { calibration: samples.filter((_, i) => i % every !== every - 1), heldOut: samples.filter((_, i) => i % every === every - 1) };
}


/** Evenly spaced subset (keeps the spread of sources) when a set is larger than needed. */
export function subsample<T>(items: readonly T[], max: number): T[] {
  if (items.length <= max) return [...items];
  const out: T[] = [];
  for (let i = 0; i < max; i++) out.push(items[Math.floor((i * items.length) / max)]!);
  return out;
}
