import { collectorToolOptions, DeviceOutputError, StreamingDeviceTool, type CollectorOptions } from './device-tool.js';
import type { GpuReading } from './nvidia-smi.js';

export interface CpuCoreReading {
  readonly index: number;
  /** Absent when the core is offline. */
  readonly load_percent?: number;
  readonly freq_mhz?: number;
  readonly online: boolean;
}

/** One tegrastats line, parsed. Jetson GPUs share the RAM, so the GPU's memory is the RAM. */
export interface TegrastatsReading {
  readonly ram_used_mib: number;
  readonly ram_total_mib: number;
  readonly swap_used_mib?: number;
  readonly swap_total_mib?: number;
  readonly cpus: readonly CpuCoreReading[];
  readonly gpu_load_percent?: number;
  /** One entry per GPC on Orin (`GR3D_FREQ 0%@[305,305]`), one on older boards. */
  readonly gpu_freq_mhz?: readonly number[];
  readonly emc_load_percent?: number;
  /** By sensor name (`CPU`, `GPU`, `tj`, `SOC0`…); sensors reporting -256 (powered off) are left out. */
  readonly temperatures_c: Readonly<Record<string, number>>;
  /** Power rails by name: instantaneous and average milliwatts. */
  readonly power_mw: Readonly<Record<string, { readonly current: number; readonly average: number }>>;
}

const RAM = /\bRAM (\d+)\/(\d+)MB\b/;
const SWAP = /\bSWAP (\d+)\/(\d+)MB\b/;
const CPU = /\bCPU \[([^\]]*)\]/;
const GR3D = /\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?/;
const EMC = /\bEMC_FREQ (\d+)%/;
const TEMP = /(?:^|\s)([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C(?=\s|$)/g;
// JetPack 5+ prints `VDD_GPU_SOC 2787mW/2787mW`; older releases `POM_5V_IN 1523/1523`.
const POWER = /(?:^|\s)([A-Z][A-Z0-9_]*) (\d+)(?:mW)?\/(\d+)(?:mW)?(?=\s|$)/g;
const SENSOR_OFF = -256;

/** Parses one line of `tegrastats` output (Nano/TX2/Xavier/Orin formats, with or without a timestamp). */
export function parseTegrastats(line: string): TegrastatsReading {
  const text = line.trim();
  const ram = RAM.exec(text);
  if (!ram) throw new DeviceOutputError('tegrastats', "no 'RAM used/totalMB' field", text);
  const reading: { -readonly [K in keyof TegrastatsReading]: TegrastatsReading[K] } = {
    ram_used_mib: Number(ram[1]),
    ram_total_mib: Number(ram[2]),
    cpus: [],
    temperatures_c: {},
    power_mw: {},
  };
  const swap = SWAP.exec(text);
  if (swap) {
    reading.swap_used_mib = Number(swap[1]);
    reading.swap_total_mib = Number(swap[2]);
  }
  const cpu = CPU.exec(text);
  if (cpu) {
    reading.cpus = cpu[1]!.split(',').map((raw, index): CpuCoreReading => {
      const s = raw.trim();
      if (s === 'off') return { index, online: false };
      const m = /^(\d+)%(?:@(\d+))?$/.exec(s);
      if (!m) throw new DeviceOutputError('tegrastats', `CPU entry '${s}' is neither 'N%@MHz' nor 'off'`, text);
      return m[2] === undefined ? { index, online: true, load_percent: Number(m[1]) } : { index, online: true, load_percent: Number(m[1]), freq_mhz: Number(m[2]) };
    });
  }
  const gr3d = GR3D.exec(text);
  if (gr3d) {
    reading.gpu_load_percent = Number(gr3d[1]);
    if (gr3d[2] !== undefined) reading.gpu_freq_mhz = gr3d[2].split(',').filter((f) => f !== '').map(Number);
  }
  const emc = EMC.exec(text);
  if (emc) reading.emc_load_percent = Number(emc[1]);
  const temps: Record<string, number> = {};
  for (const m of text.matchAll(TEMP)) {
    const value = Number(m[2]);
    if (value !== SENSOR_OFF) temps[m[1]!] = value;
  }
  reading.temperatures_c = temps;
  const power: Record<string, { current: number; average: number }> = {};
  for (const m of text.matchAll(POWER)) {
    if (m[1] === 'NC' || m[1] === 'RAM' || m[1] === 'SWAP') continue; // NC: an unconnected rail
    power[m[1]!] = { current: Number(m[2]), average: Number(m[3]) };
  }
  reading.power_mw = power;
  return reading;
}

/** The GPU as nvidia-smi would describe it, from a tegrastats reading (integrated GPU, shared RAM). */
export function tegrastatsGpu(reading: TegrastatsReading): GpuReading {
  const gpu: { -readonly [K in keyof GpuReading]: GpuReading[K] } = {
    index: 0,
    source: 'tegrastats',
    memory_used_mib: reading.ram_used_mib,
    memory_total_mib: reading.ram_total_mib,
  };
  if (reading.gpu_load_percent !== undefined) gpu.utilization_percent = reading.gpu_load_percent;
  const temp = reading.temperatures_c['GPU'] ?? reading.temperatures_c['gpu'];
  if (temp !== undefined) gpu.temperature_c = temp;
  return gpu;
}

/**
 * tegrastats started once, printing a line every `intervalMs` (`--interval`); a reading is its latest line (see
 * StreamingDeviceTool for stops and restarts). A device without tegrastats is remembered and never asked again.
 */
export class TegrastatsCollector extends StreamingDeviceTool<TegrastatsReading> {
  constructor(options: CollectorOptions = {}) {
    super(collectorToolOptions(options, {
      command: 'tegrastats',
      args: (intervalMs) => ['--interval', String(intervalMs)],
      timeoutMs: 3000,
      assembler: () => parseTegrastats,
    }));
  }
}
