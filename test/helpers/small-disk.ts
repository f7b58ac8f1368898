import { execFileSync } from 'node:child_process';
import { mkdirSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './runtime.js';

/** Mounting a tmpfs needs root (CI and the dev machines run tests as root); tests that need one skip otherwise. */
export const CAN_MOUNT = process.getuid?.() === 0;

/** A real, tiny filesystem (tmpfs of `size`, e.g. '1m') to fill up or remount read-only; unmounted at teardown. */
export function smallDisk(t: { teardown(fn: () => void): void }, size = '1m'): string {
  return tmpfsDisk(t, `size=${size}`);
}

/** A tmpfs mounted with `options` (e.g. `size=4m,nr_inodes=64`), unmounted at teardown. */
export function tmpfsDisk(t: { teardown(fn: () => void): void }, options: string): string {
  const dir = join(tempDir(t), 'disk');
  mkdirSync(dir);
  execFileSync('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', dir], { stdio: 'pipe' });
  t.teardown(() => {
    execFileSync('umount', ['-l', dir], { stdio: 'pipe' });
    rmdirSync(dir);
  });
  return dir;
}

/** Fills the filesystem with one file until not even a sector is left; returns the file (remove it to free space). */
export function fillDisk(dir: string): string {
  const filler = join(dir, 'filler');
  for (const size of [64 * 1024, 4096, 512]) {
    const chunk = Buffer.alloc(size, 1);
    try {
      for (;;) writeFileSync(filler, chunk, { flag: 'a' });
    } catch {
      // ENOSPC at this chunk size.
    }
  }
  return filler;
}
