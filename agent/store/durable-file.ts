import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';

/**
 * Replaces a small file atomically and durably (temp file, fsync, rename, fsync of the folder), or removes it for
 * `null`: after a power cut the file holds the old text or the new one, never a mix or nothing.
 */
export function writeFileDurably(path: string, data: string | Uint8Array | null): void {
  const dir = dirname(path);
  if (data === null) {
    if (!existsSync(path)) return;
    unlinkSync(path);
  } else {
    mkdirSync(dir, { recursive: true });
    const tmp = `${path}.tmp-${process.pid}`;
    try {
      writeFileSync(tmp, data);
      fsyncPath(tmp);
      renameSync(tmp, path);
    } catch (err) {
      rmSync(tmp, { force: true });
      throw err;
    }
  }
  fsyncPath(dir);
}

/**
 * The JSON object in a small state file, or undefined when the file is absent, unreadable or holds something
 * else: such files are caches of what the agent can rebuild, so a bad one is ignored and rewritten.
 */
export function readJsonObjectFile(path: string): Record<string, unknown> | undefined {
  if (!existsSync(path)) return undefined;
  try {
    const parsed = JSON.parse(readFileSync(path, 'utf8')) as unknown;
    return parsed && typeof parsed === 'object' && !Array.isArray(parsed) ? parsed as Record<string, unknown> : undefined;
  } catch {
    return undefined;
  }
}

/** Flushes a file (or a folder: the names in it) to the disk. */
export function fsyncPath(path: string): void {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
