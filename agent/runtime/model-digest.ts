import { createHash } from 'node:crypto';
import { createReadStream, statSync, type Stats } from 'node:fs';

// The instance worker imports this file through the session factory: it keeps to node's built-ins. Taking the
// fleet's hashing helper from models/ instead pulled zod and yaml into every worker thread, and each model
// load (a worker per instance) took 70-80 ms longer.

/** A model file's SHA-256 and the file's identity when it was read: the hash holds for as long as that does. */
export interface ModelDigest {
  readonly sha256: string;
  readonly size: number;
  readonly mtimeMs: number;
  readonly ino: number;
}

/**
 * Read in 1 MiB chunks: hashing one takes about half a millisecond, so a model of hundreds of MB never holds
 * the event loop (read whole and hashed at once, a 256 MB model held it for 300 ms on the development VM, a
 * stall on every stream each time a version loaded).
 */
const CHUNK_BYTES = 1 << 20;

function identity(s: Stats): Omit<ModelDigest, 'sha256'> {
  return { size: s.size, mtimeMs: s.mtimeMs, ino: s.ino };
}

function sameFile(a: Omit<ModelDigest, 'sha256'>, b: Omit<ModelDigest, 'sha256'>): boolean {
  return a.size === b.size && a.mtimeMs === b.mtimeMs && a.ino === b.ino;
}

/** Hashes a model file without blocking; a file that changes while it is read is read again. */
export async function digestModelFile(path: string): Promise<ModelDigest> {
  for (let attempt = 0; ; attempt++) {
    const before = identity(statSync(path));
    const h = createHash('sha256');
    for await (const chunk of createReadStream(path, { highWaterMark: CHUNK_BYTES })) h.update(chunk as Buffer);
    const after = identity(statSync(path));
    if (sameFile(before, after)) return { sha256: h.digest('hex'), ...after };
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
