#!/usr/bin/env node
// Runs the whole tap suite and ends with the one plain line CI reads: `N passed, N failed`.
// tap's own summary is printed too; its counts (every assertion) are the ones reported.
import { spawn } from 'node:child_process';
import { join } from 'node:path';

const tapBin = join(process.cwd(), 'node_modules', 'tap', 'dist', 'esm', 'run.mjs');
const child = spawn(process.execPath, [tapBin, ...process.argv.slice(2)], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, FORCE_COLOR: '0' } });

let tail = '';
child.stdout.on('data', (chunk) => {
  process.stdout.write(chunk);
  tail = (tail + chunk.toString()).slice(-8192);
});
child.on('exit', (code, signal) => {
  const m = [...tail.matchAll(/# \{ total: (\d+)(?:, pass: (\d+))?(?:, fail: (\d+))?(?:, skip: (\d+))?/g)].at(-1);
  const total = m ? Number(m[1]) : 0;
  const passed = m ? Number(m[2] ?? 0) : 0;
  const skipped = m ? Number(m[4] ?? 0) : 0;
  let failed = m ? Number(m[3] ?? total - passed - skipped) : 0;
  // A runner that died without a summary, or exited non-zero with no failure counted, still fails.
  if ((code !== 0 || signal) && failed === 0) failed = 1;
  process.stdout.write(`\n${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}\n`);
  process.exit(code ?? 1);
});
