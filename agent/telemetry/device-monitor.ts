import type { CollectorResult, SpawnFn } from './device-tool.js';
import { NvidiaSmiCollector, type GpuReading } from './nvidia-smi.js';
import { TegrastatsCollector, tegrastatsGpu, type TegrastatsReading } from './tegrastats.js';
import { ThermalZoneReader, type ThermalZoneReading } from './thermal-zones.js';

/** The device's readings at one moment; a source the device lacks is simply not there. */
export interface DeviceReadings {
  /** ms since epoch. */
  readonly read_at: number;
  /** From nvidia-smi, or the Jetson's integrated GPU from tegrastats. */
  readonly gpus: readonly GpuReading[];
  readonly jetson?: TegrastatsReading;
  readonly thermal: readonly ThermalZoneReading[];
  /** Sources that answered. */
  readonly sources: readonly string[];
  /** Sources that exist but failed this time, with why (a tool that is not installed is not an error). */
  readonly errors?: Readonly<Record<string, string>>;
}

export interface DeviceMonitorOptions {
  readonly nvidiaSmi?: boolean;
  readonly tegrastats?: boolean;
  readonly thermal?: boolean;
  readonly nvidiaSmiCommand?: string;
  readonly tegrastatsCommand?: string;
  readonly thermalRoot?: string;
  /** The first reading after a tool's (re)start may take this long; part of the staleness bound. */
  readonly commandTimeoutMs?: number;
  /** How often nvidia-smi and tegrastats print a reading (they run on, one child each). Default 1000. */
  readonly toolIntervalMs?: number;
  /** Restart backoff of a tool that exited or was stopped for silence: doubles from min to max (1 s, 60 s); back to min after a run of max. */
  readonly toolRestartMinMs?: number;
  readonly toolRestartMaxMs?: number;
  /** Tests inject a spawn that plays recorded tool output. */
  readonly spawn?: SpawnFn;
  readonly now?: () => number;
}

/**
 * Collects device readings from whatever this device has, all sources at once. nvidia-smi and tegrastats run
 * as one long-lived child each, started by the first `read()`; `close()` stops them.
 */
export class DeviceMonitor {
  private readonly nvidiaSmi: NvidiaSmiCollector | undefined;
  private readonly tegrastats: TegrastatsCollector | undefined;
  private readonly thermal: ThermalZoneReader | undefined;
  private readonly now: () => number;
  private last: DeviceReadings | undefined;

  constructor(options: DeviceMonitorOptions = {}) {
    const common = {
      ...(options.spawn ? { spawn: options.spawn } : {}),
      ...(options.commandTimeoutMs ? { timeoutMs: options.commandTimeoutMs } : {}),
      ...(options.toolIntervalMs ? { intervalMs: options.toolIntervalMs } : {}),
      ...(options.toolRestartMinMs !== undefined ? { restartMinMs: options.toolRestartMinMs } : {}),
      ...(options.toolRestartMaxMs !== undefined ? { restartMaxMs: options.toolRestartMaxMs } : {}),
    };
    this.nvidiaSmi = options.nvidiaSmi === false ? undefined : new NvidiaSmiCollector({ ...common, ...(options.nvidiaSmiCommand ? { command: options.nvidiaSmiCommand } : {}) });
    this.tegrastats = options.tegrastats === false ? undefined : new TegrastatsCollector({ ...common, ...(options.tegrastatsCommand ? { command: options.tegrastatsCommand } : {}) });
    this.thermal = options.thermal === false ? undefined : new ThermalZoneReader(options.thermalRoot);
    this.now = options.now ?? Date.now;
  }

  /** The readings of the last `read()`, undefined before the first. */
  get latest(): DeviceReadings | undefined {
    return this.last;
  }

  /** Stops the device tools (resolves once they exited, at most ~2 s); later readings report them stopped. */
  async close(): Promise<void> {
    await Promise.all([this.nvidiaSmi?.close(), this.tegrastats?.close()]);
  }

  async read(): Promise<DeviceReadings> {
    const skip = Promise.resolve(undefined);
    const [smi, tegra, thermal] = await Promise.all([
      this.nvidiaSmi && !this.nvidiaSmi.absent ? this.nvidiaSmi.read() : skip,
      this.tegrastats && !this.tegrastats.absent ? this.tegrastats.read() : skip,
      this.thermal ? this.thermal.read() : skip,
    ]);
    const sources: string[] = [];
    const errors: Record<string, string> = {};
    const note = <T>(name: string, r: CollectorResult<T> | undefined): T | undefined => {
      if (r === undefined) return undefined;
      if (r.ok) {
        sources.push(name);
        return r.value;
      }
      if (!r.missing) errors[name] = r.reason;
      return undefined;
    };
    const gpus = note('nvidia-smi', smi) ?? [];
    const jetson = note('tegrastats', tegra);
    const zones = note('thermal', thermal) ?? [];
    const readings: DeviceReadings = {
      read_at: this.now(),
      gpus: gpus.length > 0 ? gpus : jetson ? [tegrastatsGpu(jetson)] : [],
      ...(jetson ? { jetson } : {}),
      thermal: zones,
      sources,
      ...(Object.keys(errors).length > 0 ? { errors } : {}),
    };
    this.last = readings;
    return readings;
  }
}
