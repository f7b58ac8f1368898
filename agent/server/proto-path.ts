import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Walks up from `start` to the directory holding edge-agent's package.json. The same code runs from
 * `agent/server/` (tests, tsx) and from `dist/agent/server/` (the installed daemon), so a fixed `../..` would
 * be wrong in one of them.
 */
export function findPackageRoot(start: string): string {
  let dir = start;
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg)) {
      try {
        if ((JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'edge-agent') return dir;
      } catch {
        // Unreadable or not JSON: not ours, keep walking.
      }
    }
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`cannot find edge-agent's package.json above ${start}`);
    dir = parent;
  }
}

/** The package's `proto/` directory (the .proto files ship beside `dist/`, not inside it). */
export const PROTO_DIR: string = join(findPackageRoot(dirname(fileURLToPath(import.meta.url))), 'proto');
