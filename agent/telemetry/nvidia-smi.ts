import { collectorToolOptions, DeviceOutputError, StreamingDeviceTool, type CollectorOptions, type LineAssembler } from './device-tool.js';

/** One GPU's reading; a field the device does not report is absent. */
export interface GpuReading {
  readonly index: number;
  readonly source: 'nvidia-smi' | 'tegrastats';
  readonly utilization_percent?: number;
  readonly memory_used_mib?: number;
  readonly memory_total_mib?: number;
  readonly temperature_c?: number;
}

/**
 * `index` and `count` lead every line, so the loop mode's output groups itself: a reading is complete at the
 * line whose index is count - 1, whatever the timing of the lines (no guessing by arrival time).
 */
export const NVIDIA_SMI_FIELDS = ['index', 'count', 'utilization.gpu', 'memory.used', 'memory.total', 'temperature.gpu'] as const;
export const NVIDIA_SMI_ARGS: readonly string[] = [`--query-gpu=${NVIDIA_SMI_FIELDS.join(',')}`, '--format=csv,noheader,nounits'];

/** nvidia-smi's words for "this GPU has no such reading". */
const NOT_AVAILABLE = /^\[?(N\/A|Not Supported|Unknown Error|Insufficient Permissions|GPU is lost)\]?$/i;

function field(tool: string, raw: string, line: string): number | undefined {
  const v = raw.trim();
  if (NOT_AVAILABLE.test(v)) return undefined;
  if (!/^-?\d+(\.\d+)?$/.test(v)) throw new DeviceOutputError(tool, `'${v}' is not a number`, line);
  return Number(v);
}

/** One line of the query: the GPU's reading and how many GPUs the host has. */
export function parseNvidiaSmiLine(line: string): { readonly gpu: GpuReading; readonly count: number } {
  const parts = line.trim().split(',');
  if (parts.length !== NVIDIA_SMI_FIELDS.length) {
    throw new DeviceOutputError('nvidia-smi', `expected ${NVIDIA_SMI_FIELDS.length} comma-separated fields (${NVIDIA_SMI_FIELDS.join(', ')}), got ${parts.length}`, line);
  }
  const [index, count, util, used, total, temp] = parts.map((p) => field('nvidia-smi', p, line));
  if (index === undefined || count === undefined || !Number.isInteger(index) || !Number.isInteger(count) || index < 0 || index >= count) {
    throw new DeviceOutputError('nvidia-smi', 'index and count are not a GPU index below the GPU count', line);
  }
  const reading: { -readonly [K in keyof GpuReading]: GpuReading[K] } = { index, source: 'nvidia-smi' };
  if (util !== undefined) reading.utilization_percent = util;
  if (used !== undefined) reading.memory_used_mib = used;
  if (total !== undefined) reading.memory_total_mib = total;
  if (temp !== undefined) reading.temperature_c = temp;
  return { gpu: reading, count };
}

/**
 * Parses `nvidia-smi --query-gpu=index,count,utilization.gpu,memory.used,memory.total,temperature.gpu
 * --format=csv,noheader,nounits`: one line per GPU, e.g. `0, 4, 37, 10240, 81559, 41`.
 */
export function parseNvidiaSmi(output: string): GpuReading[] {
  return output.split(/\r?\n/).filter((l) => l.trim() !== '').map((l) => parseNvidiaSmiLine(l).gpu);
}

/**
 * Groups the loop mode's lines into one reading per interval: GPUs 0 … count-1 in order. A block that breaks
 * off (a GPU's line failed, lines out of order) is dropped up to the next GPU 0, so no reading mixes intervals.
 */
export function nvidiaSmiAssembler(): LineAssembler<GpuReading[]> {
  let block: GpuReading[] = [];
  let broken = false;
  return (line) => {
    let parsed: { gpu: GpuReading; count: number };
    try {
      parsed = parseNvidiaSmiLine(line);
    } catch (err) {
      block = [];
      broken = true;
      throw err;
    }
    const { gpu, count } = parsed;
    if (gpu.index === 0) {
      block = [];
      broken = false;
    } else if (broken || gpu.index !== block.length) {
      block = [];
      broken = true;
      return undefined;
    }
    block.push(gpu);
    if (block.length < count) return undefined;
    const done = block;
    block = [];
    return done;
  };
}

/**
 * nvidia-smi started once in its loop mode (`-lms`), printing every `intervalMs`; a reading is its latest block
 * (see StreamingDeviceTool for stops and restarts). A device without it (ENOENT) is remembered and never asked again.
 */
export class NvidiaSmiCollector extends StreamingDeviceTool<GpuReading[]> {
  constructor(options: CollectorOptions = {}) {
    super(collectorToolOptions(options, {
      command: 'nvidia-smi',
      args: (intervalMs) => [...NVIDIA_SMI_ARGS, '-lms', String(intervalMs)],
      timeoutMs: 2000,
      assembler: nvidiaSmiAssembler,
    }));
  }
}
