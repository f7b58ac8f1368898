import { randomInt } from 'node:crypto';
import { databaseOpenError, type Database, type Migration, type SqlValue } from './database.js';
import {
  EARLIEST_PLAUSIBLE_WALL_MS,
  EnqueueListeners,
  OutboxLedger,
  SerialQueue,
  WallClockSteps,
  DEFAULT_PROTECTED_KINDS,
  assertOutboxClass,
  resolveBounds,
  resolveClocks,
  type Outbox,
  type EnqueuePlan,
  type OutboxClass,
  type OutboxEntry,
  type OutboxMessage,
  type OutboxOptions,
  type OutboxStats,
  type PlannedEnqueue,
} from './outbox.js';

export const OUTBOX_MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    sql: `
      -- AUTOINCREMENT: ids are never reused, so "everything after id N" stays right after the table empties.
      CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        seq INTEGER NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        retain INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        carried_drops INTEGER NOT NULL,
        created_at INTEGER NOT NULL
      );
      CREATE TABLE outbox_sequences (kind TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
      CREATE TABLE outbox_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
      INSERT INTO outbox_counters (name, value) VALUES ('pending_drops', 0), ('dropped_total', 0), ('epoch', 0);
    `,
  },
];

interface StoredRow {
  id: number;
  kind: string;
  seq: number;
  topic: string;
  payload: Buffer;
  retain: number;
  created_at: number;
}

const DELETE_CHUNK = 500;

/**
 * A new database's first epoch: random below 2^47 (epochs then count up by one per open, far from 2^53), so a
 * database recreated after corruption, whose sequence numbers restart at 1, does not repeat the (epoch, seq)
 * pairs of the one it replaced. Not the wall clock: with an unset real-time clock every boot reads the same.
 */
function firstEpoch(): number {
  return randomInt(1, 2 ** 47);
}

/**
 * The durable outbox: one table in the agent's SQLite database (WAL). Every change is one transaction, so a
 * process killed at any point keeps every entry whose enqueue resolved, with its sequence number, and never
 * reuses a number. All operations (reads included) run one at a time, so a reader never sees a transaction
 * that could still roll back.
 */
export class SqliteOutbox implements Outbox {
  private readonly queue = new SerialQueue();
  private readonly listeners = new EnqueueListeners();
  private closed = false;
  private lastSync: number;
  private syncCount = 0;

  private constructor(
    private readonly db: Database,
    private readonly ledger: OutboxLedger,
    private readonly clock: WallClockSteps,
    private readonly monotonic: () => number,
    private readonly syncIntervalMs: number,
  ) {
    this.lastSync = monotonic();
  }

  /**
   * Creates the tables if needed, starts a new epoch and loads the bookkeeping (ids, sizes, kinds; not
   * payloads). The epoch is checkpointed (WAL and database fsynced) before open resolves, so no entry can
   * carry an epoch that a power cut could take back. A database failure rejects with a ConfigError naming
   * the file.
   *
   * Stored `created_at` values are wall-clock times of the run that last shifted them. Those this run's clock
   * cannot age (later than now: the clock was set back, or reads 2000 again after a reboot; or stamped before
   * EARLIEST_PLAUSIBLE_WALL_MS by an unset clock while now is set) count as written now: such entries are
   * kept for a full max age rather than dropped for a clock's sake.
   */
  static async open(db: Database, options: OutboxOptions = {}): Promise<SqliteOutbox> {
    const bounds = resolveBounds(options.bounds);
    const { wall, monotonic } = resolveClocks(options);
    try {
      await db.migrate('outbox', OUTBOX_MIGRATIONS);
      const clock = new WallClockSteps(wall, monotonic);
      const openedAt = clock.read().now;
      await db.transaction(async () => {
        await db.run("UPDATE outbox_counters SET value = CASE WHEN value = 0 THEN ? ELSE value + 1 END WHERE name = 'epoch'", [firstEpoch()]);
        await db.run('UPDATE outbox SET created_at = ? WHERE created_at > ?', [openedAt, openedAt]);
        if (openedAt >= EARLIEST_PLAUSIBLE_WALL_MS) await db.run('UPDATE outbox SET created_at = ? WHERE created_at < ?', [openedAt, EARLIEST_PLAUSIBLE_WALL_MS]);
      });
      // Busy (another reader): the epoch becomes durable at the next automatic checkpoint instead.
      await db.get('PRAGMA wal_checkpoint(FULL)').catch(() => undefined);
      const epoch = (await db.get<{ value: number }>("SELECT value FROM outbox_counters WHERE name = 'epoch'"))?.value ?? 1;
      const ledger = new OutboxLedger(bounds, options.protectedKinds ?? DEFAULT_PROTECTED_KINDS, epoch);
      const rows = await db.all<{ id: number; kind: string; bytes: number; created_at: number; carried_drops: number }>(
        'SELECT id, kind, bytes, created_at, carried_drops FROM outbox ORDER BY id',
      );
      for (const r of rows) ledger.add({ id: r.id, kind: r.kind, bytes: r.bytes, createdAt: r.created_at, carriedDrops: r.carried_drops });
      for (const s of await db.all<{ kind: string; next_seq: number }>('SELECT kind, next_seq FROM outbox_sequences')) ledger.setNextSeq(s.kind, s.next_seq);
      for (const c of await db.all<{ name: string; value: number }>('SELECT name, value FROM outbox_counters')) {
        if (c.name === 'pending_drops') ledger.pendingDrops = c.value;
        else if (c.name === 'dropped_total') ledger.droppedTotal = c.value;
      }
      return new SqliteOutbox(db, ledger, clock, monotonic, options.syncIntervalMs ?? 60_000);
    } catch (err) {
      throw databaseOpenError(db.file, err);
    }
  }

  /**
   * A wall-clock step since the last enqueue shifts every entry's created_at by the step (in memory and, in
   * the same transaction as the new entry, on disk), so max age counts monotonic time within a run and the
   * stored times follow the corrected clock into the next run.
   */
  enqueue(message: OutboxMessage): Promise<OutboxEntry | undefined> {
    return this.queue.run(async () => {
      this.assertOpen();
      const planned: PlannedEnqueue = this.ledger.planAt(message, this.clock);
      const { plan } = planned;
      let id: number;
      try {
        id = await this.write(plan, planned.reading.step);
      } catch (err) {
        // Nothing was written: the next enqueue sees the same step again.
        this.ledger.abandon(planned);
        throw err;
      }
      this.ledger.commit(planned, this.clock, id);
      await this.syncIfDue(this.ledger.classOfKind(plan.kind) === 'protected');
      if (!plan.insert) return undefined;
      const entry: OutboxEntry = { id, kind: plan.kind, seq: plan.stamp.seq, topic: plan.topic, payload: plan.payload, retain: plan.retain, createdAt: plan.createdAt };
      this.listeners.emit(entry);
      return entry;
    });
  }

  /** One transaction: the step's shift, the evictions, the counters and the new entry; returns its id (0: none). */
  private write(plan: EnqueuePlan, clockStep: number): Promise<number> {
    return this.db.transaction(async () => {
      if (clockStep !== 0) await this.db.run('UPDATE outbox SET created_at = created_at + ?', [clockStep]);
      await this.deleteIds(plan.evict.map((r) => r.id));
      await this.db.run(
        'INSERT INTO outbox_sequences (kind, next_seq) VALUES (?, ?) ON CONFLICT(kind) DO UPDATE SET next_seq = excluded.next_seq',
        [plan.kind, plan.nextSeq],
      );
      await this.db.run("UPDATE outbox_counters SET value = ? WHERE name = 'pending_drops'", [plan.pendingDrops]);
      await this.db.run("UPDATE outbox_counters SET value = ? WHERE name = 'dropped_total'", [plan.droppedTotal]);
      if (!plan.insert) return 0;
      const res = await this.db.run(
        'INSERT INTO outbox (kind, seq, topic, payload, retain, bytes, carried_drops, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
        [plan.kind, plan.stamp.seq, plan.topic, plan.payload, plan.retain ? 1 : 0, plan.payload.length, plan.carriedDrops, plan.createdAt],
      );
      return res.lastID;
    });
  }

  /**
   * The protected class is read by the ids the ledger holds (a few rows, no scan of the backlog behind the
   * cursor, and no query at all when none is pending); the droppable class by a range scan that skips them.
   */
  peek(afterId: number, limit: number, only?: OutboxClass): Promise<OutboxEntry[]> {
    return this.queue.run(async () => {
      this.assertOpen();
      assertOutboxClass(only);
      if (limit <= 0) return [];
      const columns = 'SELECT id, kind, seq, topic, payload, retain, created_at FROM outbox';
      let rows: StoredRow[];
      if (only === 'protected') {
        const ids: SqlValue[] = this.ledger.protectedIdsAfter(afterId, Math.floor(limit));
        rows = ids.length === 0 ? [] : await this.db.all<StoredRow>(`${columns} WHERE id IN (${ids.map(() => '?').join(',')}) ORDER BY id`, ids);
      } else if (only === 'droppable' && this.ledger.protectedKindList.length > 0) {
        const kinds: readonly SqlValue[] = this.ledger.protectedKindList;
        rows = await this.db.all<StoredRow>(
          `${columns} WHERE id > ? AND kind NOT IN (${kinds.map(() => '?').join(',')}) ORDER BY id LIMIT ?`,
          [afterId, ...kinds, Math.floor(limit)],
        );
      } else {
        rows = await this.db.all<StoredRow>(`${columns} WHERE id > ? ORDER BY id LIMIT ?`, [afterId, Math.floor(limit)]);
      }
      return rows.map((r) => ({ id: r.id, kind: r.kind, seq: r.seq, topic: r.topic, payload: r.payload, retain: r.retain === 1, createdAt: r.created_at }));
    });
  }

  remove(ids: readonly number[]): Promise<void> {
    return this.queue.run(async () => {
      this.assertOpen();
      const known = ids.filter((id) => this.ledger.get(id) !== undefined);
      if (known.length === 0) return;
      await this.db.transaction(() => this.deleteIds(known));
      for (const id of known) this.ledger.delete(id);
    });
  }

  stats(): OutboxStats {
    return this.ledger.stats();
  }

  onEnqueued(listener: (entry: OutboxEntry) => void): () => void {
    return this.listeners.add(listener);
  }

  /** Waits for queued operations; the database itself belongs to the caller and stays open. */
  close(): Promise<void> {
    return this.queue.run(async () => { this.closed = true; });
  }

  /**
   * A passive checkpoint: in WAL mode with synchronous=NORMAL, SQLite fsyncs the WAL before checkpointing,
   * which makes every commit so far survive a power cut. It fails harmlessly while another part of the agent
   * holds a transaction on the shared connection; the next enqueue tries again.
   */
  private async syncIfDue(force: boolean): Promise<void> {
    const now = this.monotonic();
    if (!force && (this.syncIntervalMs <= 0 || now - this.lastSync < this.syncIntervalMs)) return;
    try {
      await this.db.get('PRAGMA wal_checkpoint(PASSIVE)');
      this.lastSync = now;
      this.syncCount += 1;
    } catch { /* retried at the next enqueue */ }
  }

  /** Checkpoints (WAL fsyncs) done by the outbox since open. */
  get syncs(): number {
    return this.syncCount;
  }

  private async deleteIds(ids: readonly number[]): Promise<void> {
    for (let i = 0; i < ids.length; i += DELETE_CHUNK) {
      const chunk: SqlValue[] = ids.slice(i, i + DELETE_CHUNK);
      await this.db.run(`DELETE FROM outbox WHERE id IN (${chunk.map(() => '?').join(',')})`, chunk);
    }
  }

  private assertOpen(): void {
    if (this.closed) throw new Error('outbox is closed');
  }
}
