import type { Database } from './database.js';

export interface DownloadRecord {
  readonly sha256: string;
  readonly size: number;
  readonly chunkSize: number;
  readonly source: string;
  readonly tempPath: string;
  /** HTTP sources: bytes at the start of the temp file that are fsynced and recorded. */
  readonly bytesDone: number;
  readonly createdAt: number;
}

interface DownloadRow {
  sha256: string;
  size: number;
  chunk_size: number;
  source: string;
  temp_path: string;
  bytes_done: number;
  created_at: number;
}

/**
 * What part of each partial artifact download is durable on disk. A download is keyed by the artifact's sha256,
 * so two deployments of the same bytes share it. A chunk or byte count is recorded only after the temp file was
 * fdatasync'ed, so after any crash the recorded part is really there.
 */
export class ChunkMap {
  constructor(private readonly db: Database) {}

  async download(sha256: string): Promise<DownloadRecord | undefined> {
    const r = await this.db.get<DownloadRow>('SELECT * FROM fleet_downloads WHERE sha256 = ?', [sha256]);
    return r ? { sha256: r.sha256, size: r.size, chunkSize: r.chunk_size, source: r.source, tempPath: r.temp_path, bytesDone: r.bytes_done, createdAt: r.created_at } : undefined;
  }

  async downloads(): Promise<DownloadRecord[]> {
    const rows = await this.db.all<DownloadRow>('SELECT * FROM fleet_downloads ORDER BY created_at');
    return rows.map((r) => ({ sha256: r.sha256, size: r.size, chunkSize: r.chunk_size, source: r.source, tempPath: r.temp_path, bytesDone: r.bytes_done, createdAt: r.created_at }));
  }

  /**
   * Starts (or continues) a download. A stored download whose size, chunk size or source differ is started over:
   * its recorded chunks would not line up with the new request.
   */
  async begin(entry: { sha256: string; size: number; chunkSize: number; source: string; tempPath: string }): Promise<{ record: DownloadRecord; restarted: boolean }> {
    const existing = await this.download(entry.sha256);
    if (existing && existing.size === entry.size && existing.chunkSize === entry.chunkSize && existing.source === entry.source && existing.tempPath === entry.tempPath) {
      return { record: existing, restarted: false };
    }
    await this.db.transaction(async () => {
      await this.db.run('DELETE FROM fleet_chunks WHERE sha256 = ?', [entry.sha256]);
      await this.db.run('DELETE FROM fleet_downloads WHERE sha256 = ?', [entry.sha256]);
      await this.db.run('INSERT INTO fleet_downloads (sha256, size, chunk_size, source, temp_path, bytes_done, created_at) VALUES (?, ?, ?, ?, ?, 0, ?)',
        [entry.sha256, entry.size, entry.chunkSize, entry.source, entry.tempPath, Date.now()]);
    });
    const record = await this.download(entry.sha256);
    if (!record) throw new Error(`download ${entry.sha256} vanished after insert`);
    return { record, restarted: existing !== undefined };
  }

  async receivedChunks(sha256: string): Promise<Set<number>> {
    const rows = await this.db.all<{ idx: number }>('SELECT idx FROM fleet_chunks WHERE sha256 = ?', [sha256]);
    return new Set(rows.map((r) => r.idx));
  }

  async receivedCount(sha256: string): Promise<number> {
    const row = await this.db.get<{ n: number }>('SELECT COUNT(*) AS n FROM fleet_chunks WHERE sha256 = ?', [sha256]);
    return row?.n ?? 0;
  }

  /** Records chunks whose bytes are already fsynced in the temp file. */
  async markReceived(sha256: string, indices: readonly number[]): Promise<void> {
    if (indices.length === 0) return;
    await this.db.transaction(async () => {
      for (const idx of indices) await this.db.run('INSERT OR IGNORE INTO fleet_chunks (sha256, idx) VALUES (?, ?)', [sha256, idx]);
    });
  }

  async setBytesDone(sha256: string, bytesDone: number): Promise<void> {
    await this.db.run('UPDATE fleet_downloads SET bytes_done = ? WHERE sha256 = ?', [bytesDone, sha256]);
  }

  /** Forgets everything received (after a hash mismatch the bytes cannot be trusted). */
  async reset(sha256: string): Promise<void> {
    await this.db.transaction(async () => {
      await this.db.run('DELETE FROM fleet_chunks WHERE sha256 = ?', [sha256]);
      await this.db.run('UPDATE fleet_downloads SET bytes_done = 0 WHERE sha256 = ?', [sha256]);
    });
  }

  async finish(sha256: string): Promise<void> {
    await this.db.transaction(async () => {
      await this.db.run('DELETE FROM fleet_chunks WHERE sha256 = ?', [sha256]);
      await this.db.run('DELETE FROM fleet_downloads WHERE sha256 = ?', [sha256]);
    });
  }
}
