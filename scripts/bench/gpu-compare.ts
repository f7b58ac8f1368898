import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Outputs } from './bare.js';
import type { BenchReport } from './report.js';
import { formatNumber, formatTable, relativeDiff } from './stats.js';

/**
 * The GPU check's verdict (scripts/gpu-check.sh): two bench reports of the same workloads, one per provider,
 * each with bare's reference outputs. Outputs must agree within 1e-4 relative (fp32: the largest absolute
 * difference over the tensor's largest magnitude); the table shows batch-1 latency and what batching gains on
 * each provider. Exit status 1 when outputs differ or the GPU run was not served by the GPU.
 *   node dist/scripts/bench/gpu-compare.js cpu.json webgpu.json
 */

export const GPU_REL_TOLERANCE = 1e-4;

function worstDiff(a: readonly Outputs[], b: readonly Outputs[]): number {
  let worst = 0;
  b.forEach((step, i) => {
    for (const [name, ref] of Object.entries(step)) {
      const got = a[i]?.[name];
      worst = Math.max(worst, got && got.dims.join() === ref.dims.join() ? relativeDiff(got.data, ref.data) : Number.POSITIVE_INFINITY);
    }
  });
  return worst;
}

export function compareRuns(cpu: BenchReport, gpu: BenchReport): { table: string; failures: string[] } {
  const failures: string[] = [];
  const gpuProvider = gpu.meta.providers[0] ?? 'gpu';
  const rows: (string | number | undefined)[][] = [];
  for (const w of Object.keys(gpu.workloads)) {
    const refCpu = cpu.bare[w]?.reference;
    const refGpu = gpu.bare[w]?.reference;
    let diff = Number.NaN;
    if (!refCpu || !refGpu) failures.push(`${w}: a report lacks bare reference outputs (run the bench with --reference-outputs)`);
    else {
      diff = worstDiff(refGpu, refCpu);
      if (!(diff <= GPU_REL_TOLERANCE)) failures.push(`${w}: ${gpuProvider} outputs differ from cpu by ${diff.toExponential(2)} relative (> ${GPU_REL_TOLERANCE})`);
    }
    const served = gpu.meta.served_by[w];
    if (served !== undefined && served !== gpuProvider) failures.push(`${w}: the agent served it on ${served}, not ${gpuProvider}`);
    for (const [name, r] of [['cpu', cpu], [gpuProvider, gpu]] as const) {
      const bare = r.bare[w];
      const lat = r.latency.find((l) => l.workload === w && l.api === 'native_stream' && l.transport === 'unix' && l.config === 'default' && l.client_poll_us === r.meta.client_poll_us);
      const tp = (batching: boolean | null): number | undefined => r.throughput.find((t) => t.workload === w && t.server === 'agent' && t.api === 'native_stream' && t.batching === batching && t.streams === 8)?.fps;
      const on = tp(true);
      const off = tp(false);
      const unequal = r.latency.filter((l) => l.workload === w && !l.outputs_equal);
      if (unequal.length > 0) failures.push(`${w} on ${name}: the agent's outputs differ from bare's (${unequal.map((l) => `${l.api}/${l.transport}: ${l.max_rel_diff.toExponential(2)}`).join(', ')})`);
      rows.push([
        w, name, bare?.b1.p50_us, lat?.p50_us, bare?.b1_fps, bare?.b8_fps, bare?.b8_fps && bare.b1_fps ? `${formatNumber(bare.b8_fps / bare.b1_fps)}x` : 'n/a',
        off, on, on !== undefined && off !== undefined ? `${formatNumber(on / off)}x` : 'n/a', name === 'cpu' ? '' : Number.isNaN(diff) ? 'n/a' : diff.toExponential(2),
      ]);
    }
  }
  const table = formatTable([
    'workload', 'provider', 'bare b1 p50 µs', 'agent b1 p50 µs (unix)', 'bare b1 frames/s', 'bare b8 frames/s', 'bare b8/b1',
    'agent 8 streams off', 'agent 8 streams on', 'batching gain', 'rel diff vs cpu',
  ], rows);
  return { table, failures };
}

function main(argv: readonly string[]): void {
  const [cpuFile, gpuFile] = argv;
  if (!cpuFile || !gpuFile) throw new Error('usage: gpu-compare.js CPU_REPORT.json GPU_REPORT.json');
  const read = (f: string): BenchReport => JSON.parse(readFileSync(f, 'utf8')) as BenchReport;
  const { table, failures } = compareRuns(read(cpuFile), read(gpuFile));
  process.stdout.write(`${table}\n`);
  if (failures.length > 0) {
    process.stdout.write(`\nGPU check FAILED:\n${failures.map((f) => `  - ${f}`).join('\n')}\n`);
    process.exitCode = 1;
  } else {
    process.stdout.write(`\nGPU check passed: outputs within ${GPU_REL_TOLERANCE} relative of cpu on every workload\n`);
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    main(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`gpu-compare: ${(err as Error).message}\n`);
    process.exit(2);
  }
}
