import t from 'tap';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { applyHeapGrowingPercent } from '../agent/v8-heap.js';
import { startCli } from './helpers/cli.js';
import { freePort } from './helpers/mosquitto.js';
import { copyDemoRepo, ROOT, tempDir } from './helpers/runtime.js';

t.test("a --heap-growing-percent given to node wins over the config's", async (t) => {
  t.equal(applyHeapGrowingPercent(300, ['--heap-growing-percent=150']), 150);
  t.equal(applyHeapGrowingPercent(300, ['--heap_growing_percent=40']), 40);
  t.equal(applyHeapGrowingPercent(300, ['--heap-growing-percent', '75']), 75, 'also as two arguments');
});

/**
 * A node process that applies `percent` once running (as the agent does after reading its config), then keeps
 * allocating objects it holds, so V8 runs full collections and sizes the old generation after each; with
 * --trace-gc-verbose it prints the factor of every new limit.
 */
function limitFactorsAfterApplying(percent: number): number[] {
  const heap = pathToFileURL(join(ROOT, 'dist', 'agent', 'v8-heap.js')).href;
  const script = `
    const { applyHeapGrowingPercent } = await import(${JSON.stringify(heap)});
    applyHeapGrowingPercent(${percent});
    console.log('APPLIED');
    const held = [];
    for (let i = 0; i < 600_000; i++) held.push({ i, s: 'item ' + i, a: [i, i + 1] });
    console.log('HELD', held.length);`;
  const r = spawnSync(process.execPath, ['--trace-gc-verbose', '--input-type=module', '-e', script], { encoding: 'utf8', env: { ...process.env, NODE_OPTIONS: '' }, maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`child failed: ${r.stderr.slice(-2000)}`);
  const after = r.stdout.slice(r.stdout.indexOf('APPLIED'));
  return [...after.matchAll(/\[HeapController\] Limit: .*\(([\d.]+)\)/g)].map((m) => Number(m[1]));
}

t.test('applied at run time, it sets the factor of every old-generation limit V8 computes after', async (t) => {
  const factors = limitFactorsAfterApplying(250);
  t.ok(factors.length >= 2, `V8 sized the old generation ${factors.length} times while the heap grew`);
  t.ok(factors.every((f) => f === 3.5), `every factor is 1 + 250 / 100: ${factors.join(', ')}`);
});

t.test('the serve command applies v8.heap_growing_percent from the config and logs it (default 300)', async (t) => {
  const repo = copyDemoRepo(t, ['tiny']);
  for (const [yaml, want] of [['', 300], ['v8:\n  heap_growing_percent: 120\n', 120]] as const) {
    const dir = tempDir(t);
    const config = join(dir, 'agent.yaml');
    writeFileSync(config, `telemetry:\n  http:\n    port: 0\n${yaml}`);
    const run = startCli(['serve', '--config', config, '--model-repository', repo, '--data-dir', join(dir, 'var'), '--listen', `127.0.0.1:${await freePort()}`]);
    t.teardown(() => { if (run.child.exitCode === null) run.child.kill('SIGKILL'); });
    const line = JSON.parse(await run.waitFor(/edge-agent starting/)) as { heap_growing_percent: number };
    t.equal(line.heap_growing_percent, want, `config '${yaml.trim() || '(none)'}': ${want} % in force`);
    run.child.kill('SIGTERM');
    await run.exited;
  }
  const bad = join(tempDir(t), 'agent.yaml');
  writeFileSync(bad, 'v8:\n  heap_growing_percent: -5\n');
  const refused = startCli(['serve', '--config', bad, '--model-repository', repo]);
  const { code } = await refused.exited;
  t.equal(code, 2, 'a bad value is a config error');
  t.match(refused.stderr(), /v8\.heap_growing_percent/, 'naming the key');
});
