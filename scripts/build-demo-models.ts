import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { findPackageRoot } from '../agent/package-root.js';
import { DEMO_MODELS } from './demo-models.js';

/**
 * Writes the demo models into the model repository (edge-config/models/<name>/1/model.onnx). A file is
 * rewritten only when its bytes differ, so a rebuild keeps mtimes (and the repository watcher) quiet.
 * Usage: node dist/scripts/build-demo-models.js [--out DIR]
 */

export function writeDemoModels(outDir: string): { name: string; file: string; written: boolean; bytes: number }[] {
  return Object.entries(DEMO_MODELS).map(([name, build]) => {
    const bytes = build();
    const file = join(outDir, name, '1', 'model.onnx');
    const same = existsSync(file) && Buffer.compare(readFileSync(file), bytes) === 0;
    if (!same) {
      mkdirSync(dirname(file), { recursive: true });
      writeFileSync(file, bytes);
    }
    return { name, file, written: !same, bytes: bytes.length };
  });
}

function main(argv: readonly string[]): void {
  const i = argv.indexOf('--out');
  if (i >= 0 && !argv[i + 1]) throw new Error('--out needs a directory');
  const outDir = i >= 0 ? resolve(argv[i + 1]!) : join(findPackageRoot(dirname(fileURLToPath(import.meta.url))), 'edge-config', 'models');
  for (const r of writeDemoModels(outDir)) {
    console.log(`${r.written ? 'wrote' : 'unchanged'} ${r.file} (${r.bytes} bytes)`);
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2));
}
