import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { CollectorResult } from './device-tool.js';

export interface ThermalZoneReading {
  /** `thermal_zone0` … */
  readonly zone: string;
  /** The zone's `type` file (`cpu-thermal`, `x86_pkg_temp`, `CPU-therm`…), or the zone name without one. */
  readonly type: string;
  readonly temperature_c: number;
}

/** `temp` holds millidegrees Celsius as an integer, e.g. `47250`. */
export function parseThermalTemp(text: string): number | undefined {
  const v = text.trim();
  if (!/^-?\d+$/.test(v)) return undefined;
  return Number(v) / 1000;
}

/**
 * Reads `/sys/class/thermal/thermal_zone* /temp` (root injectable for tests). Zones whose sensor cannot be read
 * (EINVAL/ENODATA on a powered-down sensor is common) are left out; no thermal class at all is "absent".
 */
export class ThermalZoneReader {
  constructor(private readonly root = '/sys/class/thermal') {}

  async read(): Promise<CollectorResult<ThermalZoneReading[]>> {
    let names: string[];
    try {
      names = (await readdir(this.root)).filter((n) => /^thermal_zone\d+$/.test(n));
    } catch (err) {
      return { ok: false, missing: true, reason: `${this.root}: ${err instanceof Error ? err.message : String(err)}` };
    }
    if (names.length === 0) return { ok: false, missing: true, reason: `${this.root}: no thermal zones` };
    names.sort((a, b) => Number(a.slice(12)) - Number(b.slice(12)));
    const zones: ThermalZoneReading[] = [];
    for (const zone of names) {
      let temp: number | undefined;
      try {
        temp = parseThermalTemp(await readFile(join(this.root, zone, 'temp'), 'utf8'));
      } catch {
        continue;
      }
      if (temp === undefined) continue;
      let type = zone;
      try {
        type = (await readFile(join(this.root, zone, 'type'), 'utf8')).trim() || zone;
      } catch { /* a zone without a type file keeps its own name */ }
      zones.push({ zone, type, temperature_c: temp });
    }
    return { ok: true, value: zones };
  }
}
