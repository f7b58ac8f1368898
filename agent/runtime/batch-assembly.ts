import type { TensorData } from './tensor.js';

function product(dims: readonly number[], from: number, to: number): number {
  let n = 1;
  for (let i = from; i < to; i++) n *= dims[i] as number;
  return n;
}

/**
 * Stacks whole tensors' bytes one after another (along axis 0) into `out`. Byte for byte, so a part may be wire
 * bytes on any alignment.
 */
export function stackBytes(parts: readonly Uint8Array[], out: TensorData): void {
  const target = new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
  let at = 0;
  for (const p of parts) {
    target.set(p, at);
    at += p.byteLength;
  }
}

/**
 * Stacks parts along `axis` into `out` (which must hold the stacked size). `shape` is any part's shape: the
 * parts differ only in their size along `axis`, given by `rows`. Axis 0 is one contiguous copy per part.
 */
export function gatherAlongAxis(parts: readonly TensorData[], rows: readonly number[], shape: readonly number[], axis: number, out: TensorData): void {
  const outer = product(shape, 0, axis);
  const inner = product(shape, axis + 1, shape.length);
  const total = rows.reduce((a, b) => a + b, 0);
  const target = out as unknown as { set(src: ArrayLike<unknown>, offset: number): void };
  let offset = 0;
  for (let p = 0; p < parts.length; p++) {
    const part = parts[p] as TensorData;
    const r = rows[p] as number;
    const block = r * inner;
    if (outer === 1) {
      target.set(part as unknown as ArrayLike<unknown>, offset * inner);
    } else {
      for (let o = 0; o < outer; o++) {
        target.set(part.subarray(o * block, (o + 1) * block) as unknown as ArrayLike<unknown>, (o * total + offset) * inner);
      }
    }
    offset += r;
  }
}

/**
 * Splits a stacked tensor back into parts of `rows` along `axis`. Along axis 0 the parts are views into
 * `src` (no copy); along another axis each part is copied out, as its rows are not contiguous.
 */
export function scatterAlongAxis(src: TensorData, shape: readonly number[], axis: number, rows: readonly number[]): TensorData[] {
  const outer = product(shape, 0, axis);
  const inner = product(shape, axis + 1, shape.length);
  const total = shape[axis] as number;
  const out: TensorData[] = [];
  let offset = 0;
  for (const r of rows) {
    if (outer === 1) {
      out.push(src.subarray(offset * inner, (offset + r) * inner) as TensorData);
    } else {
      const ctor = src.constructor as new (n: number) => TensorData;
      const part = ctor === undefined ? src.slice(0, 0) : new ctor(outer * r * inner);
      const target = part as unknown as { set(s: ArrayLike<unknown>, o: number): void };
      for (let o = 0; o < outer; o++) {
        target.set(src.subarray((o * total + offset) * inner, (o * total + offset + r) * inner) as unknown as ArrayLike<unknown>, o * r * inner);
      }
      out.push(part);
    }
    offset += r;
  }
  return out;
}
