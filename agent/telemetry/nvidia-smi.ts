import { spawn as nodeSpawn } from 'node:child_process';
import { DeviceOutputError, DeviceTool, type SpawnFn } from './device-tool.js';

/** One GPU's reading; a field the device does not report is absent. */
export interface GpuReading {
  readonly index: number;
  readonly source: 'nvidia-smi' | 'tegrastats';
  readonly utilization_percent?: number;
  readonly memory_used_mib?: number;
  readonly memory_total_mib?: number;
  readonly temperature_c?: number;
}

export const NVIDIA_SMI_FIELDS = ['utilization.gpu', 'memory.used', 'memory.total', 'temperature.gpu'] as const;
export const NVIDIA_SMI_ARGS: readonly string[] = [`--query-gpu=${NVIDIA_SMI_FIELDS.join(',')}`, '--format=csv,noheader,nounits'];

/** nvidia-smi's words for "this GPU has no such reading". */
const NOT_AVAILABLE = /^\[?(N\/A|Not Supported|Unknown Error|Insufficient Permissions|GPU is lost)\]?$/i;

function field(tool: string, raw: string, line: string): number | undefined {
  const v = raw.trim();
  if (NOT_AVAILABLE.test(v)) return undefined;
  if (!/^-?\d+(\.\d+)?$/.test(v)) throw new DeviceOutputError(tool, `'${v}' is not a number`, line);
  return Number(v);
}

/**
 * Parses `nvidia-smi --query-gpu=utilization.gpu,memory.used,memory.total,temperature.gpu
 * --format=csv,noheader,nounits`: one line per GPU in index order, e.g. `37, 10240, 81559, 41`.
 */
export function parseNvidiaSmi(output: string): GpuReading[] {
  const lines = output.split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== '');
  return lines.map((line, index) => {
    const parts = line.split(',');
    if (parts.length !== NVIDIA_SMI_FIELDS.length) {
      throw new DeviceOutputError('nvidia-smi', `expected ${NVIDIA_SMI_FIELDS.length} comma-separated fields (${NVIDIA_SMI_FIELDS.join(', ')}), got ${parts.length}`, line);
    }
    const [util, used, total, temp] = parts.map((p) => field('nvidia-smi', p, line));
    const reading: { -readonly [K in keyof GpuReading]: GpuReading[K] } = { index, source: 'nvidia-smi' };
    if (util !== undefined) reading.utilization_percent = util;
    if (used !== undefined) reading.memory_used_mib = used;
    if (total !== undefined) reading.memory_total_mib = total;
    if (temp !== undefined) reading.temperature_c = temp;
    return reading;
  });
}

export interface CollectorOptions {
  readonly spawn?: SpawnFn;
  readonly command?: string;
  readonly timeoutMs?: number;
}

/** What one collector read: readings, or why there are none. `missing`: the tool is not on this device. */
export type CollectorResult<T> =
  | { readonly ok: true; readonly value: T }
  | { readonly ok: false; readonly missing: boolean; readonly reason: string };

/**
 * Runs nvidia-smi per reading, never two at once: while a hung run is still being killed, a reading says so
 * instead. A device without it (ENOENT) is remembered and never asked again.
 */
export class NvidiaSmiCollector {
  private readonly tool: DeviceTool;
  private readonly command: string;
  private readonly timeoutMs: number;
  private missing = false;

  constructor(options: CollectorOptions = {}) {
    this.command = options.command ?? 'nvidia-smi';
    this.tool = new DeviceTool(options.spawn ?? nodeSpawn, this.command);
    this.timeoutMs = options.timeoutMs ?? 2000;
  }

  get absent(): boolean {
    return this.missing;
  }

  async read(): Promise<CollectorResult<GpuReading[]>> {
    if (this.missing) return { ok: false, missing: true, reason: `${this.command} not found` };
    const res = await this.tool.run(NVIDIA_SMI_ARGS, { timeoutMs: this.timeoutMs });
    if (!res.ok) {
      if (res.missing) this.missing = true;
      return res;
    }
    try {
      return { ok: true, value: parseNvidiaSmi(res.stdout) };
    } catch (err) {
      return { ok: false, missing: false, reason: err instanceof Error ? err.message : String(err) };
    }
  }
}
