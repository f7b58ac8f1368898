/**
 * The outbox: everything the agent must tell the fleet (telemetry records, deployment statuses) is written here
 * first and leaves only after the broker acknowledged it. Two implementations share this file's contract and
 * its bookkeeping (`OutboxLedger`): `SqliteOutbox` (the agent's, durable) and `MemoryOutbox` (tests, and
 * agents run without a data dir). One contract test suite runs against both.
 */

/** Kinds the agent writes; other strings are allowed (they are droppable like telemetry, after it). */
export type OutboxKind = 'telemetry' | 'deployment-status' | (string & {});

/** What an entry is stamped with when it is accepted, inside the same transaction that stores it. */
export interface OutboxStamp {
  /** Per-device sequence number of this kind, 1-based, never reused, kept across restarts. */
  readonly seq: number;
  /**
   * Entries dropped by the bounds since the last telemetry entry (0 for kinds other than telemetry, which do
   * not carry it). Summed over the telemetry entries a receiver gets, it equals everything ever dropped,
   * because a dropped telemetry entry hands its own `dropped` on to the next one.
   */
  readonly dropped: number;
  /** Entries dropped since the outbox was created. */
  readonly droppedTotal: number;
  /**
   * Changes each time the outbox is opened, and is made durable before any entry carries it. After a power
   * cut the last committed transactions can roll back (WAL, synchronous=NORMAL) and sequence numbers already
   * sent can be handed out again: (epoch, seq) stays unique, so receivers never mistake such an entry for a
   * duplicate. A new database (a recreated one too, whose sequences restart at 1) starts from a random value,
   * so it does not repeat the epochs of the one it replaced. Compare for equality only.
   */
  readonly epoch: number;
}

export interface OutboxMessage {
  readonly kind: OutboxKind;
  readonly topic: string;
  readonly retain?: boolean;
  /** Renders the payload once the stamp is known (the payload names its own sequence number). */
  readonly payload: (stamp: OutboxStamp) => string | Uint8Array;
}

export interface OutboxEntry {
  /**
   * Insertion order across all kinds. The publisher sends each class (`OutboxClass`) in this order, the
   * protected class ahead of the droppable one.
   */
  readonly id: number;
  readonly kind: OutboxKind;
  readonly seq: number;
  readonly topic: string;
  readonly payload: Buffer;
  readonly retain: boolean;
  /** ms since epoch. */
  readonly createdAt: number;
}

export interface OutboxBounds {
  readonly maxRows: number;
  /** Payload bytes (topics not counted). */
  readonly maxBytes: number;
  /** Droppable entries older than this are dropped at the next enqueue (age: elapsed time, see `monotonicNow`). */
  readonly maxAgeMs: number;
}

export const DEFAULT_OUTBOX_BOUNDS: OutboxBounds = {
  maxRows: 10_000,
  maxBytes: 16 * 1024 * 1024,
  maxAgeMs: 7 * 24 * 3600 * 1000,
};

/**
 * Kinds that the bounds never drop (they may push the outbox past its bounds; they are few and small):
 * deployment statuses and the results of fleet commands. Retained reported state ('state') is droppable: a
 * newer one supersedes it.
 */
export const DEFAULT_PROTECTED_KINDS: readonly OutboxKind[] = ['deployment-status', 'command-result'];

/**
 * The two classes a read can ask for: `protected` (the configured protected kinds: never dropped, few, and
 * someone is waiting for them, so the publisher sends them ahead of a backlog) and `droppable` (everything else).
 */
export type OutboxClass = 'protected' | 'droppable';

/** Every class, in the order a publisher sends them: protected entries overtake the droppable backlog. */
export const OUTBOX_CLASSES: readonly OutboxClass[] = ['protected', 'droppable'];

/** Rejects a read class that is not one of `OUTBOX_CLASSES` (a caller's bug, named, rather than an empty read). */
export function assertOutboxClass(only: unknown): asserts only is OutboxClass | undefined {
  if (only !== undefined && !OUTBOX_CLASSES.includes(only as OutboxClass)) {
    throw new TypeError(`outbox read class must be ${OUTBOX_CLASSES.map((c) => `'${c}'`).join(' or ')}, got ${JSON.stringify(only) ?? String(only)}`);
  }
}

export interface OutboxOptions {
  readonly bounds?: Partial<OutboxBounds>;
  readonly protectedKinds?: readonly OutboxKind[];
  /** Wall clock (ms since epoch) for created_at; tests move it. Default Date.now. */
  readonly now?: () => number;
  /**
   * Monotonic clock (ms, any origin) that measures time within a run: entries' ages for `maxAgeMs` and the
   * sync interval (SQLite). A wall-clock step (the wall clock moving away from it by more than 1 s) shifts the
   * `created_at` of every entry by the step (stored too, in SQLite), so a step never ages (or rejuvenates) the
   * backlog. Default performance.now; when only `now` is given, `now` itself (a test clock that moves both,
   * without steps).
   */
  readonly monotonicNow?: () => number;
  /**
   * SQLite only. With `synchronous=NORMAL` a commit reaches the disk at the next checkpoint, which by default
   * comes after ~1000 WAL pages (hours of telemetry). The outbox checkpoints (one fsync) at most this often
   * after an enqueue, bounding what a power cut can take back; protected kinds are checkpointed at once.
   * 0 leaves it to SQLite. Default 60 s.
   */
  readonly syncIntervalMs?: number;
}

export interface OutboxStats {
  readonly rows: number;
  readonly bytes: number;
  /** Dropped since the outbox was created (survives restarts in SQLite). */
  readonly droppedTotal: number;
  /** Dropped and not yet reported in a telemetry entry. */
  readonly pendingDrops: number;
  /** ms since epoch of the oldest entry, null when empty. */
  readonly oldestCreatedAt: number | null;
  readonly bounds: OutboxBounds;
  readonly epoch: number;
}

export interface Outbox {
  /** Stores the message (dropping what the bounds require first); resolves once it is durable. */
  enqueue(message: OutboxMessage): Promise<OutboxEntry | undefined>;
  /**
   * Entries with id > afterId, oldest first; with `only`, the entries of that class alone (a reader that
   * sends the protected class first keeps one cursor per class). An unknown class rejects with a TypeError.
   */
  peek(afterId: number, limit: number, only?: OutboxClass): Promise<OutboxEntry[]>;
  /** Removes entries the broker acknowledged; unknown ids are ignored. */
  remove(ids: readonly number[]): Promise<void>;
  stats(): OutboxStats;
  /** Called after each stored entry; returns the unsubscribe function. */
  onEnqueued(listener: (entry: OutboxEntry) => void): () => void;
  close(): Promise<void>;
}

/** Bookkeeping of one stored entry (no payload). */
export interface LedgerRow {
  readonly id: number;
  readonly kind: OutboxKind;
  readonly bytes: number;
  readonly createdAt: number;
  /** The `dropped` count this (telemetry) entry carries; handed on if it is dropped itself. */
  readonly carriedDrops: number;
}

/** What one enqueue will do, computed before anything is written, applied after the write committed. */
export interface EnqueuePlan {
  readonly kind: OutboxKind;
  readonly topic: string;
  readonly retain: boolean;
  readonly stamp: OutboxStamp;
  readonly payload: Buffer;
  readonly createdAt: number;
  /** Existing entries to drop, oldest telemetry first. */
  readonly evict: readonly LedgerRow[];
  /** False when the new entry itself had to be dropped (nothing older was droppable). */
  readonly insert: boolean;
  readonly carriedDrops: number;
  readonly nextSeq: number;
  readonly pendingDrops: number;
  readonly droppedTotal: number;
}

function toBuffer(payload: string | Uint8Array): Buffer {
  if (typeof payload === 'string') return Buffer.from(payload, 'utf8');
  return Buffer.isBuffer(payload) ? payload : Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
}

/** A wall clock that moves this much more (or less) than the monotonic clock was stepped (NTP, `date -s`). */
export const WALL_CLOCK_STEP_TOLERANCE_MS = 1000;

/**
 * Wall time before this was never set: a real-time clock that lost power reads 1970 or 2000 (fake-hwclock
 * restores the last shutdown time, later than this). Entries stamped by such a clock have no meaningful age
 * once the clock is set.
 */
export const EARLIEST_PLAUSIBLE_WALL_MS = Date.UTC(2024, 0, 1);

export interface ClockReading {
  /** Wall clock, ms since epoch. */
  readonly now: number;
  readonly monotonic: number;
  /** How far the wall clock moved beyond (negative: short of) the monotonic time elapsed; 0 within tolerance. */
  readonly step: number;
}

/**
 * Tells wall-clock steps apart from elapsed time. Linux slews CLOCK_REALTIME and CLOCK_MONOTONIC alike, so the
 * two drift apart only when the wall clock is stepped (or while the device is suspended, which the monotonic
 * clock does not count: the outbox then keeps entries longer, never drops them early).
 */
export class WallClockSteps {
  private anchorWall: number;
  private anchorMonotonic: number;

  constructor(private readonly wall: () => number, private readonly monotonic: () => number) {
    this.anchorWall = wall();
    this.anchorMonotonic = monotonic();
  }

  read(): ClockReading {
    const now = this.wall();
    const monotonic = this.monotonic();
    const drift = now - (this.anchorWall + (monotonic - this.anchorMonotonic));
    return { now, monotonic, step: Math.abs(drift) > WALL_CLOCK_STEP_TOLERANCE_MS ? drift : 0 };
  }

  /** Takes a reading whose step was handled as the new reference; the steps before it are not reported again. */
  accept(reading: ClockReading): void {
    this.anchorWall = reading.now;
    this.anchorMonotonic = reading.monotonic;
  }
}

/** The wall and monotonic clocks an outbox runs on (see `OutboxOptions.now` and `monotonicNow`). */
export function resolveClocks(options: OutboxOptions): { readonly wall: () => number; readonly monotonic: () => number } {
  const wall = options.now ?? Date.now;
  const monotonic = options.monotonicNow ?? (options.now ? options.now : () => performance.now());
  return { wall, monotonic };
}

/** An enqueue planned at one clock reading, not yet written. */
export interface PlannedEnqueue {
  readonly plan: EnqueuePlan;
  readonly reading: ClockReading;
}

export function resolveBounds(bounds: Partial<OutboxBounds> | undefined): OutboxBounds {
  const b = { ...DEFAULT_OUTBOX_BOUNDS, ...bounds };
  for (const [key, value] of Object.entries(b)) {
    if (!Number.isFinite(value) || value <= 0) throw new RangeError(`outbox bound ${key} must be a positive number, got ${String(value)}`);
  }
  return b;
}

/**
 * The outbox's state that decides what to drop, shared by both implementations so they cannot disagree:
 * entries by class (telemetry, other droppable, protected) in id order, totals, sequence counters and drop
 * counters. The SQLite outbox rebuilds it from its tables at open.
 */
export class OutboxLedger {
  private readonly telemetry = new Map<number, LedgerRow>();
  private readonly otherDroppable = new Map<number, LedgerRow>();
  private readonly protectedRows = new Map<number, LedgerRow>();
  private readonly protectedKinds: ReadonlySet<string>;
  private readonly nextSeqByKind = new Map<string, number>();
  private rowCount = 0;
  private byteCount = 0;
  pendingDrops = 0;
  droppedTotal = 0;

  constructor(readonly bounds: OutboxBounds, protectedKinds: readonly OutboxKind[], public epoch: number) {
    this.protectedKinds = new Set(protectedKinds);
  }

  /** The read class of a kind: protected kinds are never dropped and are sent first. */
  classOfKind(kind: OutboxKind): OutboxClass {
    return this.protectedKinds.has(kind) ? 'protected' : 'droppable';
  }

  /** The protected kinds, for a store that filters by kind itself. */
  get protectedKindList(): readonly OutboxKind[] {
    return [...this.protectedKinds];
  }

  /** Ids of protected entries after `afterId`, ascending: protected entries are few, so this is a short walk. */
  protectedIdsAfter(afterId: number, limit: number): number[] {
    const ids: number[] = [];
    if (limit <= 0) return ids;
    for (const id of this.protectedRows.keys()) {
      if (id <= afterId) continue;
      ids.push(id);
      if (ids.length >= limit) break;
    }
    return ids;
  }

  private classOf(kind: OutboxKind): Map<number, LedgerRow> {
    if (kind === 'telemetry') return this.telemetry;
    return this.protectedKinds.has(kind) ? this.protectedRows : this.otherDroppable;
  }

  /** Loads one stored row (at open). Rows must be added in id order. */
  add(row: LedgerRow): void {
    this.classOf(row.kind).set(row.id, row);
    this.rowCount += 1;
    this.byteCount += row.bytes;
  }

  get(id: number): LedgerRow | undefined {
    return this.telemetry.get(id) ?? this.otherDroppable.get(id) ?? this.protectedRows.get(id);
  }

  delete(id: number): boolean {
    const row = this.get(id);
    if (!row) return false;
    this.classOf(row.kind).delete(id);
    this.rowCount -= 1;
    this.byteCount -= row.bytes;
    return true;
  }

  /** Shifts every entry's `createdAt` by `deltaMs` (a wall-clock step): ages and order stay as they were. */
  rebase(deltaMs: number): void {
    for (const cls of [this.telemetry, this.otherDroppable, this.protectedRows]) {
      for (const [id, row] of cls) cls.set(id, { ...row, createdAt: row.createdAt + deltaMs });
    }
  }

  setNextSeq(kind: OutboxKind, next: number): void {
    this.nextSeqByKind.set(kind, next);
  }

  nextSeq(kind: OutboxKind): number {
    return this.nextSeqByKind.get(kind) ?? 1;
  }

  stats(): OutboxStats {
    let oldest: number | null = null;
    for (const cls of [this.telemetry, this.otherDroppable, this.protectedRows]) {
      const first = cls.values().next();
      if (!first.done && (oldest === null || first.value.createdAt < oldest)) oldest = first.value.createdAt;
    }
    return { rows: this.rowCount, bytes: this.byteCount, droppedTotal: this.droppedTotal, pendingDrops: this.pendingDrops, oldestCreatedAt: oldest, bounds: this.bounds, epoch: this.epoch };
  }

  /**
   * Decides what storing `message` takes: droppable entries past max age go first, then, while the outbox
   * with the new entry would exceed max rows or max bytes, the oldest telemetry, then the oldest other
   * droppable entries. Protected kinds are never chosen. Renders the payload (its size counts).
   */
  private plan(message: OutboxMessage, now: number): EnqueuePlan {
    if (typeof message.topic !== 'string' || message.topic === '') throw new TypeError('outbox message needs a non-empty topic');
    const seq = this.nextSeq(message.kind);
    const isTelemetry = message.kind === 'telemetry';
    const evicted = new Map<number, LedgerRow>();
    const cutoff = now - this.bounds.maxAgeMs;
    for (const cls of [this.telemetry, this.otherDroppable]) {
      for (const row of cls.values()) {
        if (row.createdAt >= cutoff) break;
        evicted.set(row.id, row);
      }
    }
    let payload: Buffer = Buffer.alloc(0);
    let dropsBefore = 0;
    let insert = true;
    // The payload names the drop count, and its size can require more drops: iterate until stable (the
    // count only grows, so this settles in a step or two).
    for (let round = 0; round < 8; round += 1) {
      dropsBefore = 0;
      for (const row of evicted.values()) dropsBefore += 1 + row.carriedDrops;
      const stamp: OutboxStamp = {
        seq,
        dropped: isTelemetry ? this.pendingDrops + dropsBefore : 0,
        droppedTotal: this.droppedTotal + evicted.size,
        epoch: this.epoch,
      };
      payload = toBuffer(message.payload(stamp));
      let rows = this.rowCount - evicted.size + 1;
      let bytes = this.byteCount + payload.length;
      for (const row of evicted.values()) bytes -= row.bytes;
      let grew = false;
      insert = true;
      for (const cls of [this.telemetry, this.otherDroppable]) {
        for (const row of cls.values()) {
          if (rows <= this.bounds.maxRows && bytes <= this.bounds.maxBytes) break;
          if (evicted.has(row.id)) continue;
          evicted.set(row.id, row);
          rows -= 1;
          bytes -= row.bytes;
          grew = true;
        }
      }
      if ((rows > this.bounds.maxRows || bytes > this.bounds.maxBytes) && !this.protectedKinds.has(message.kind)) {
        // Nothing older is droppable: the new droppable entry is the one that goes.
        insert = false;
      }
      if (!grew) break;
    }
    let dropsAll = 0;
    for (const row of evicted.values()) dropsAll += 1 + row.carriedDrops;
    const carriedDrops = isTelemetry && insert ? this.pendingDrops + dropsAll : 0;
    let pendingDrops = this.pendingDrops + dropsAll;
    if (!insert) pendingDrops += 1;
    else if (isTelemetry) pendingDrops = 0;
    return {
      kind: message.kind,
      topic: message.topic,
      retain: message.retain === true,
      stamp: { seq, dropped: carriedDrops, droppedTotal: this.droppedTotal + evicted.size, epoch: this.epoch },
      payload,
      createdAt: now,
      evict: [...evicted.values()],
      insert,
      carriedDrops,
      nextSeq: seq + 1,
      pendingDrops,
      droppedTotal: this.droppedTotal + evicted.size + (insert ? 0 : 1),
    };
  }

  /**
   * Plans `message` at the clock's current reading. A wall-clock step since the last committed enqueue first
   * shifts every entry's `createdAt` by the step, so max age counts elapsed (monotonic) time; the store writes
   * the same shift with the entry (`reading.step`). If planning throws, the shift is undone here; if the
   * write fails, `abandon` undoes it, and the next enqueue sees the same step again. Both implementations
   * enqueue through `planAt`/`commit`/`abandon`, so they treat clock steps alike.
   */
  planAt(message: OutboxMessage, clock: WallClockSteps): PlannedEnqueue {
    const reading = clock.read();
    if (reading.step !== 0) this.rebase(reading.step);
    try {
      return { plan: this.plan(message, reading.now), reading };
    } catch (err) {
      if (reading.step !== 0) this.rebase(-reading.step);
      throw err;
    }
  }

  /** Undoes a planned enqueue's clock shift after its write failed (nothing was written). */
  abandon(planned: PlannedEnqueue): void {
    if (planned.reading.step !== 0) this.rebase(-planned.reading.step);
  }

  /** Applies a planned enqueue whose write committed; its clock reading becomes the reference for the next step. */
  commit(planned: PlannedEnqueue, clock: WallClockSteps, id: number): LedgerRow | undefined {
    if (planned.reading.step !== 0) clock.accept(planned.reading);
    return this.apply(planned.plan, id);
  }

  /** Applies a plan whose writes committed; `id` is the new entry's id (ignored when it was not inserted). */
  private apply(plan: EnqueuePlan, id: number): LedgerRow | undefined {
    for (const row of plan.evict) this.delete(row.id);
    this.nextSeqByKind.set(plan.kind, plan.nextSeq);
    this.pendingDrops = plan.pendingDrops;
    this.droppedTotal = plan.droppedTotal;
    if (!plan.insert) return undefined;
    const row: LedgerRow = { id, kind: plan.kind, bytes: plan.payload.length, createdAt: plan.createdAt, carriedDrops: plan.carriedDrops };
    this.add(row);
    return row;
  }
}

/** Runs async operations one at a time, in call order (the outbox's single writer). */
export class SerialQueue {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(op: () => Promise<T>): Promise<T> {
    const next = this.tail.then(op);
    this.tail = next.catch(() => undefined);
    return next;
  }
}

/** Listener registry shared by both implementations; a throwing listener never breaks an enqueue. */
export class EnqueueListeners {
  private readonly listeners = new Set<(entry: OutboxEntry) => void>();

  add(listener: (entry: OutboxEntry) => void): () => void {
    this.listeners.add(listener);
    return () => { this.listeners.delete(listener); };
  }

  emit(entry: OutboxEntry): void {
    for (const l of this.listeners) {
      try { l(entry); } catch { /* a listener's failure is its own; the entry is stored */ }
    }
  }
}
