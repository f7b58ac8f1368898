import { readJsonObjectFile, SerialWrites, writeFileDurably } from '../store/index.js';

/**
 * The version each model serves after a fleet activation, kept in one small JSON file under the data dir and
 * replaced atomically (temp file, fsync, rename, fsync of the folder). A restart serves the recorded version
 * even when a newer one is on disk: a kill in the middle of activating version N+1 comes back on version N.
 */
export class ActiveVersions {
  private versions: Record<string, number> = {};
  /** Two models activating at once both land. */
  private readonly writes = new SerialWrites();

  constructor(readonly file: string) {
    // Absent or unreadable: serve the repository's own choice (highest or pinned); the next activation rewrites it.
    for (const [k, v] of Object.entries(readJsonObjectFile(file) ?? {})) if (Number.isSafeInteger(v) && (v as number) > 0) this.versions[k] = v as number;
  }

  get(model: string): number | undefined {
    return this.versions[model];
  }

  /** Resolves once the file on disk says so; `get` answers the new version from then on. */
  set(model: string, version: number | undefined): Promise<void> {
    return this.writes.run(async () => {
      const next = { ...this.versions };
      if (version === undefined) delete next[model];
      else next[model] = version;
      await writeFileDurably(this.file, JSON.stringify(next, null, 2));
      this.versions = next;
    });
  }
}
