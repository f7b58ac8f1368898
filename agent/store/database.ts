import { mkdirSync, renameSync, existsSync } from 'node:fs';
import { dirname } from 'node:path';
import sqlite3 from 'sqlite3';

export type SqlValue = string | number | bigint | Buffer | null;
export type SqlParams = readonly SqlValue[] | Record<string, SqlValue>;

export interface Migration {
  readonly version: number;
  readonly sql: string;
}

export interface DatabaseOptions {
  /** `synchronous` pragma: NORMAL in WAL mode keeps every committed transaction across a process kill; a power
   * cut can lose the last transactions since the last checkpoint-sync, never corrupt the file. FULL syncs the
   * WAL on every commit (power-cut safe, slower on eMMC). */
  readonly synchronous?: 'NORMAL' | 'FULL';
  /** Called when an unreadable database was set aside and a fresh one created. */
  readonly onRecovered?: (info: { file: string; setAsideAs: string; reason: string }) => void;
}

/**
 * One SQLite connection in WAL mode: the agent's single writer. Each concern (models, deployments, chunks,
 * outbox) keeps its own tables and migrations under its own namespace, so parts can be built and tested alone.
 */
export class Database {
  private constructor(private readonly db: sqlite3.Database, readonly file: string) {}

  /**
   * Opens (creating if needed) the database file. A file that is not a database or fails its integrity check
   * is renamed aside (`<file>.corrupt-<ts>`) and a fresh one is created: the callers rebuild from disk.
   */
  static async open(file: string, options: DatabaseOptions = {}): Promise<Database> {
    if (file !== ':memory:') mkdirSync(dirname(file), { recursive: true });
    try {
      const db = await Database.openRaw(file, options);
      const check = await db.get<{ quick_check: string }>('PRAGMA quick_check');
      if (check?.quick_check !== 'ok') throw new Error(`integrity check: ${check?.quick_check ?? 'no answer'}`);
      return db;
    } catch (err) {
      if (file === ':memory:' || !existsSync(file)) throw err;
      const reason = err instanceof Error ? err.message : String(err);
      const setAsideAs = `${file}.corrupt-${Date.now()}`;
      renameSync(file, setAsideAs);
      for (const suffix of ['-wal', '-shm']) if (existsSync(file + suffix)) renameSync(file + suffix, setAsideAs + suffix);
      options.onRecovered?.({ file, setAsideAs, reason });
      return Database.openRaw(file, options);
    }
  }

  private static async openRaw(file: string, options: DatabaseOptions): Promise<Database> {
    const raw = await new Promise<sqlite3.Database>((resolve, reject) => {
      const d: sqlite3.Database = new sqlite3.Database(file, (err) => (err ? reject(err) : resolve(d)));
    });
    const db = new Database(raw, file);
    try {
      await db.exec(`PRAGMA journal_mode=WAL; PRAGMA synchronous=${options.synchronous ?? 'NORMAL'}; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=ON;`);
      await db.exec('CREATE TABLE IF NOT EXISTS schema_migrations (namespace TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (namespace, version))');
    } catch (err) {
      await db.close().catch(() => undefined);
      throw err;
    }
    return db;
  }

  /** Applies the namespace's migrations that have not run yet, each in its own transaction. */
  async migrate(namespace: string, migrations: readonly Migration[]): Promise<void> {
    const done = new Set((await this.all<{ version: number }>('SELECT version FROM schema_migrations WHERE namespace = ?', [namespace])).map((r) => r.version));
    for (const m of [...migrations].sort((a, b) => a.version - b.version)) {
      if (done.has(m.version)) continue;
      await this.transaction(async () => {
        await this.exec(m.sql);
        await this.run('INSERT INTO schema_migrations (namespace, version) VALUES (?, ?)', [namespace, m.version]);
      });
    }
  }

  exec(sql: string): Promise<void> {
    return new Promise((resolve, reject) => this.db.exec(sql, (err) => (err ? reject(err) : resolve())));
  }

  run(sql: string, params: SqlParams = []): Promise<{ changes: number; lastID: number }> {
    return new Promise((resolve, reject) =>
      this.db.run(sql, params, function (this: sqlite3.RunResult, err: Error | null) {
        if (err) reject(err);
        else resolve({ changes: this.changes, lastID: this.lastID });
      }),
    );
  }

  get<T>(sql: string, params: SqlParams = []): Promise<T | undefined> {
    return new Promise((resolve, reject) => this.db.get(sql, params, (err, row) => (err ? reject(err) : resolve(row as T | undefined))));
  }

  all<T>(sql: string, params: SqlParams = []): Promise<T[]> {
    return new Promise((resolve, reject) => this.db.all(sql, params, (err, rows) => (err ? reject(err) : resolve(rows as T[]))));
  }

  private txTail: Promise<unknown> = Promise.resolve();

  /**
   * Runs `fn` inside BEGIN IMMEDIATE … COMMIT. Transactions are queued so two callers never interleave their
   * statements on the one connection; statements outside a transaction are not queued (SQLite serialises them).
   */
  transaction<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.txTail.then(async () => {
      await this.exec('BEGIN IMMEDIATE');
      try {
        const result = await fn();
        await this.exec('COMMIT');
        return result;
      } catch (err) {
        await this.exec('ROLLBACK').catch(() => undefined);
        throw err;
      }
    });
    this.txTail = next.catch(() => undefined);
    return next;
  }

  close(): Promise<void> {
    return new Promise((resolve, reject) => this.db.close((err) => (err ? reject(err) : resolve())));
  }
}
