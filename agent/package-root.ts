import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';

/**
 * Walks up from `start` to the directory holding edge-agent's package.json. The same code runs from the
 * sources (tests) and from `dist/` (the installed daemon), so a fixed `../..` would be wrong in one of them.
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
