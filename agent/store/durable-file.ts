import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, renameSync, unlinkSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';

/**
 * Replaces a small file atomically and durably (temp file, fsync, rename, fsync of the folder), or removes it for
 * `null`: after a power cut the file holds the old text or the new one, never a mix or nothing.
 */
export function writeFileDurably(path: string, text: string | null): void {
  const dir = dirname(path);
  if (text === null) {
    if (!existsSync(path)) return;
    unlinkSync(path);
  } else {
    mkdirSync(dir, { recursive: true });
    const tmp = `${path}.tmp-${process.pid}`;
    writeFileSync(tmp, text);
    fsyncPath(tmp);
    renameSync(tmp, path);
  }
  fsyncPath(dir);
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
