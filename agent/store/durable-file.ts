import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { mkdir, open, rename, rm, unlink, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';

/** Temp files of concurrent writes to one path (two models' state files, a retry) must not be the same file. */
let tempCounter = 0;
const tempPath = (path: string): string => `${path}.tmp-${process.pid}-${++tempCounter}`;

/**
 * Replaces a small file atomically and durably (temp file, fsync, rename, fsync of the folder), or removes it for
 * `null`: after a power cut the file holds the old text or the new one, never a mix or nothing.
 *
 * Every step runs on libuv's thread pool: these writes happen while frames are served (a fleet activation
 * records its version, its config and its marker), and one fsync on a device's eMMC can take tens of
 * milliseconds that every stream would otherwise wait out.
 */
export async function writeFileDurably(path: string, data: string | Uint8Array | null): Promise<void> {
  const dir = dirname(path);
  if (data === null) {
    try {
      await unlink(path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
  } else {
    await mkdir(dir, { recursive: true });
    const tmp = tempPath(path);
    try {
      await writeFile(tmp, data);
      await fsyncPath(tmp);
      await rename(tmp, path);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
  }
  await fsyncPath(dir);
}

/**
 * Runs a file's rewrites one at a time, in call order, each after the one before settled (failed or not): a
 * rewrite built from in-memory state then starts from the state the previous one left, and two callers at once
 * (two models activating) both land instead of the later file losing the earlier change.
 */
export class SerialWrites {
  private tail: Promise<void> = Promise.resolve();

  /** Resolves or rejects as `write` does. */
  run(write: () => Promise<void>): Promise<void> {
    const done = this.tail.then(write);
    this.tail = done.catch(() => undefined);
    return done;
  }
}

/** `writeFileDurably` for start-up, before anything is served (an interrupted activation undone as the agent starts). */
export function writeFileDurablySync(path: string, data: string | Uint8Array | null): void {
  const dir = dirname(path);
  if (data === null) {
    if (!existsSync(path)) return;
    unlinkSync(path);
  } else {
    mkdirSync(dir, { recursive: true });
    const tmp = tempPath(path);
    try {
      writeFileSync(tmp, data);
      fsyncPathSync(tmp);
      renameSync(tmp, path);
    } catch (err) {
      rmSync(tmp, { force: true });
      throw err;
    }
  }
  fsyncPathSync(dir);
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

/** Flushes a file (or a folder: the names in it) to the disk, on libuv's thread pool. */
export async function fsyncPath(path: string): Promise<void> {
  const handle = await open(path, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** `fsyncPath` for start-up and scripts. */
export function fsyncPathSync(path: string): void {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
