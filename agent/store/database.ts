import { accessSync, constants as fsConstants, mkdirSync, renameSync, existsSync, statSync, statfsSync } from 'node:fs';
import { dirname } from 'node:path';
import sqlite3 from 'sqlite3';
import { ConfigError, EdgeAgentError, errorMessage } from '../errors.js';

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
  /** How long a statement waits for another connection's lock before failing with SQLITE_BUSY. Default 5000 ms. */
  readonly busyTimeoutMs?: number;
  /** Called when a corrupt (or empty) database was set aside and a fresh one created. */
  readonly onRecovered?: (info: { file: string; setAsideAs: string; reason: string }) => void;
}

/**
 * Result codes that say the file's content is damaged. Only these (and a failed quick_check) set a database
 * aside; every other failure (busy, locked, full, I/O, read-only, permission, cannot open) says nothing about
 * the content, and renaming the file would throw away healthy state.
 */
const CORRUPTION_CODES: ReadonlySet<string> = new Set(['SQLITE_CORRUPT', 'SQLITE_NOTADB']);

function errorCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

function isCorruption(err: unknown): boolean {
  return CORRUPTION_CODES.has(errorCode(err) ?? '');
}

function fsErrorCode(check: () => void): string | undefined {
  try {
    check();
    return undefined;
  } catch (err) {
    return errorCode(err) ?? 'EIO';
  }
}

/**
 * What to check. SQLite's code alone often misleads (a full disk shows as SQLITE_IOERR when the -shm file
 * cannot grow, a read-only filesystem as SQLITE_CANTOPEN), so the filesystem is asked first.
 */
function openFailureHint(code: string | undefined, file: string): string {
  const dir = dirname(file);
  if (code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED') {
    return `another process holds it? Stop the other edge-agent or sqlite3 shell using it (fuser ${file}), then start again`;
  }
  let free: number | undefined;
  try {
    const fs = statfsSync(dir);
    free = fs.bavail * fs.bsize;
  } catch { /* the checks below name the problem */ }
  if (free !== undefined && free < 64 * 1024) return `the disk is full, ${free} bytes free: free space on the filesystem of ${dir} (df ${dir})`;
  const dirProblem = fsErrorCode(() => accessSync(dir, fsConstants.W_OK));
  const fileProblem = existsSync(file) ? fsErrorCode(() => accessSync(file, fsConstants.R_OK | fsConstants.W_OK)) : undefined;
  const problem = dirProblem ?? fileProblem ?? code;
  switch (problem) {
    case 'SQLITE_FULL':
    case 'ENOSPC':
      return `the disk is full: free space on the filesystem of ${dir} (df ${dir})`;
    case 'SQLITE_READONLY':
    case 'EROFS':
      return `read-only: check that ${dir} is mounted read-write (a filesystem remounted read-only after errors?) and that the file and its -wal and -shm files belong to the agent's user`;
    case 'SQLITE_PERM':
    case 'SQLITE_AUTH':
    case 'EACCES':
    case 'EPERM':
      return `permission denied: the agent's user must be able to read and write the file, its -wal and -shm files, and create files in ${dir}`;
    case 'SQLITE_IOERR':
    case 'EIO':
      return `I/O error: a failing storage device or a filesystem error; check the kernel log (dmesg) and df ${dir}`;
    case 'SQLITE_CANTOPEN':
    case 'ENOENT':
    case 'ENOTDIR':
    case 'EISDIR':
      return `cannot open it: check that ${dir} is a directory the agent's user can write, and that the path is not a directory`;
    case 'SQLITE_NOMEM':
    case 'ENOMEM':
      return 'out of memory';
    default:
      return `check the file, its -wal and -shm files and ${dir}`;
  }
}

/**
 * The error a failed start reports for the state database: names the file, the cause (SQLite's code and
 * message) and what to check, and says the file was kept. Errors of the agent's own catalogue pass unchanged.
 */
export function databaseOpenError(file: string, err: unknown): EdgeAgentError {
  if (err instanceof EdgeAgentError) return err;
  return new ConfigError(file, '', `${errorMessage(err)} (${openFailureHint(errorCode(err), file)}); the file was left as it is`);
}

/** An existing file of 0 bytes (the agent never leaves one: its first open writes the header). */
function isEmptyFile(file: string): boolean {
  try {
    const stat = statSync(file);
    return stat.isFile() && stat.size === 0;
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return false;
    throw databaseOpenError(file, err);
  }
}

/**
 * One SQLite connection in WAL mode: the agent's single writer. Each concern (models, deployments, chunks,
 * outbox) keeps its own tables and migrations under its own namespace, so parts can be built and tested alone.
 */
export class Database {
  private constructor(private readonly db: sqlite3.Database, readonly file: string) {}

  /**
   * Opens (creating if needed) the database file. Only a damaged file (SQLITE_CORRUPT, SQLITE_NOTADB, a failed
   * quick_check) or an empty one (0 bytes: its content was lost) is renamed aside (`<file>.corrupt-<ts>`, with
   * its -wal and -shm files) and replaced by a fresh one, which `onRecovered` reports: the callers rebuild from
   * disk. Any other failure (locked, disk full, I/O error, read-only, permission) rejects with a ConfigError
   * naming the file and what to check, and leaves the file untouched.
   */
  static async open(file: string, options: DatabaseOptions = {}): Promise<Database> {
    if (file === ':memory:') return Database.openRaw(file, options);
    try {
      mkdirSync(dirname(file), { recursive: true });
    } catch (err) {
      throw databaseOpenError(file, err);
    }
    // SQLite would open an empty file as a new database and delete a -wal beside it unread: set both aside.
    if (isEmptyFile(file)) return Database.recreate(file, options, 'the file is empty (0 bytes): its content was lost');
    let db: Database | undefined;
    let reason: string;
    try {
      db = await Database.openRaw(file, options);
      const check = (await db.all<{ quick_check: string }>('PRAGMA quick_check(5)')).map((r) => r.quick_check);
      if (check.length === 1 && check[0] === 'ok') return db;
      reason = `integrity check: ${check.join('; ') || 'no answer'}`;
      await db.close().catch(() => undefined);
    } catch (err) {
      await db?.close().catch(() => undefined);
      if (!isCorruption(err) || !existsSync(file)) throw databaseOpenError(file, err);
      reason = errorMessage(err);
    }
    return Database.recreate(file, options, reason);
  }

  /** Sets the damaged file aside and creates a fresh one in its place. */
  private static async recreate(file: string, options: DatabaseOptions, reason: string): Promise<Database> {
    const setAsideAs = `${file}.corrupt-${Date.now()}`;
    try {
      renameSync(file, setAsideAs);
      for (const suffix of ['-wal', '-shm']) if (existsSync(file + suffix)) renameSync(file + suffix, setAsideAs + suffix);
    } catch (err) {
      throw new ConfigError(file, '', `unreadable (${reason}), and setting it aside as ${setAsideAs} failed: ${errorMessage(err)} (${openFailureHint(errorCode(err), file)})`);
    }
    options.onRecovered?.({ file, setAsideAs, reason });
    try {
      return await Database.openRaw(file, options);
    } catch (err) {
      throw databaseOpenError(file, err);
    }
  }

  private static async openRaw(file: string, options: DatabaseOptions): Promise<Database> {
    const raw = await new Promise<sqlite3.Database>((resolve, reject) => {
      const d: sqlite3.Database = new sqlite3.Database(file, (err) => (err ? reject(err) : resolve(d)));
    });
    const db = new Database(raw, file);
    try {
      // busy_timeout first: every later statement, the journal_mode switch included, waits for a lock held by
      // another connection (a backup, a sqlite3 shell) instead of failing at once.
      await db.exec(`PRAGMA busy_timeout=${Math.max(0, Math.floor(options.busyTimeoutMs ?? 5000))}; PRAGMA journal_mode=WAL; PRAGMA synchronous=${options.synchronous ?? 'NORMAL'}; PRAGMA foreign_keys=ON;`);
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
