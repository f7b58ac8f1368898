import { readJsonObjectFile, SerialWrites, writeFileDurably } from '../store/index.js';

/** Entries kept: enough for every retained manifest a device could still be sent; the oldest go first. */
const MAX_ENTRIES = 512;

export interface RolledBackDeployment {
  readonly model: string;
  readonly version: number;
  /** Wall-clock ms when it was recorded (for a person reading the file; never compared). */
  readonly at: number;
}

/**
 * Deployments that ended rolled back, in a small JSON file beside `active-versions.json`, outside the state
 * database: when a corrupt database is set aside and recreated, a retained manifest of a rolled-back deployment
 * that arrives again is recognised here and not activated a second time. Replaced atomically (temp file, fsync,
 * rename, fsync of the folder), like `active-versions.json`.
 */
export class RolledBackDeployments {
  private entries: Record<string, RolledBackDeployment> = {};
  private readonly writes = new SerialWrites();

  constructor(readonly file: string) {
    // Absent or unreadable: the database still knows (this file only matters once the database was lost as well).
    for (const [id, v] of Object.entries(readJsonObjectFile(file) ?? {})) {
      const e = v as Partial<RolledBackDeployment> | null;
      if (e && typeof e.model === 'string' && Number.isSafeInteger(e.version)) this.entries[id] = { model: e.model, version: e.version as number, at: typeof e.at === 'number' ? e.at : 0 };
    }
  }

  get(deploymentId: string): RolledBackDeployment | undefined {
    return Object.hasOwn(this.entries, deploymentId) ? this.entries[deploymentId] : undefined;
  }

  /** Resolves once the file on disk holds it. */
  add(deploymentId: string, model: string, version: number): Promise<void> {
    return this.writes.run(async () => {
      if (this.get(deploymentId)) return;
      const ids = Object.keys(this.entries);
      const next: Record<string, RolledBackDeployment> = {};
      for (const id of ids.slice(Math.max(0, ids.length - (MAX_ENTRIES - 1)))) next[id] = this.entries[id] as RolledBackDeployment;
      next[deploymentId] = { model, version, at: Date.now() };
      await writeFileDurably(this.file, JSON.stringify(next, null, 2));
      this.entries = next;
    });
  }
}
