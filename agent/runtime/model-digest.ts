import { statSync, type Stats } from 'node:fs';
import { sha256File } from '../models/index.js';

/** A model file's SHA-256 and the file's identity when it was read: the hash holds for as long as that does. */
export interface ModelDigest {
  readonly sha256: string;
  readonly size: number;
  readonly mtimeMs: number;
  readonly ino: number;
}

function identity(s: Stats): Omit<ModelDigest, 'sha256'> {
  return { size: s.size, mtimeMs: s.mtimeMs, ino: s.ino };
}

function sameFile(a: Omit<ModelDigest, 'sha256'>, b: Omit<ModelDigest, 'sha256'>): boolean {
  return a.size === b.size && a.mtimeMs === b.mtimeMs && a.ino === b.ino;
}

/**
 * Hashes a model file, streamed (read whole and hashed at once, a 256 MB model held the event loop for 300 ms
 * on the development VM, a stall for every stream each time a version loaded). A file that changes while it is
 * read is read again.
 */
export async function digestModelFile(path: string): Promise<ModelDigest> {
  for (let attempt = 0; ; attempt++) {
    const before = identity(statSync(path));
    const sha256 = await sha256File(path);
    const after = identity(statSync(path));
    if (sameFile(before, after)) return { sha256, ...after };
    if (attempt === 2) throw new Error(`${path} kept changing while it was read`);
  }
}

/** Whether the file still is what the digest was taken of (same inode, size and modification time). */
export function digestIsCurrent(digest: ModelDigest, path: string): boolean {
  try {
    return sameFile(digest, identity(statSync(path)));
  } catch {
    return false;
  }
}
