import {
  EnqueueListeners,
  OutboxLedger,
  WallClockSteps,
  DEFAULT_PROTECTED_KINDS,
  assertOutboxClass,
  resolveBounds,
  resolveClocks,
  type Outbox,
  type OutboxClass,
  type OutboxEntry,
  type OutboxMessage,
  type OutboxOptions,
  type OutboxStats,
} from './outbox.js';

/**
 * The outbox without a file: same bounds, order, stamps, drop accounting and wall-clock-step handling as
 * `SqliteOutbox`, nothing survives the process. For tests and for an agent run without a data dir.
 */
export class MemoryOutbox implements Outbox {
  private readonly ledger: OutboxLedger;
  private readonly clock: WallClockSteps;
  private readonly entries = new Map<number, OutboxEntry>();
  private readonly listeners = new EnqueueListeners();
  private lastId = 0;
  private closed = false;

  constructor(options: OutboxOptions = {}) {
    const { wall, monotonic } = resolveClocks(options);
    this.clock = new WallClockSteps(wall, monotonic);
    // Numbering restarts with every process: a start time tells the runs apart.
    this.ledger = new OutboxLedger(resolveBounds(options.bounds), options.protectedKinds ?? DEFAULT_PROTECTED_KINDS, wall());
  }

  /**
   * Synchronous from plan to commit (nothing to await), so concurrent enqueues cannot interleave. A
   * wall-clock step shifts the entries' created_at as in `SqliteOutbox`: an agent without a data dir that
   * boots with an unset clock keeps its backlog when NTP sets the clock.
   */
  async enqueue(message: OutboxMessage): Promise<OutboxEntry | undefined> {
    this.assertOpen();
    const planned = this.ledger.planAt(message, this.clock);
    const { plan } = planned;
    for (const row of plan.evict) this.entries.delete(row.id);
    const id = plan.insert ? ++this.lastId : 0;
    this.ledger.commit(planned, this.clock, id);
    if (!plan.insert) return undefined;
    const entry: OutboxEntry = { id, kind: plan.kind, seq: plan.stamp.seq, topic: plan.topic, payload: plan.payload, retain: plan.retain, createdAt: plan.createdAt };
    this.entries.set(id, entry);
    this.listeners.emit(entry);
    return entry;
  }

  async peek(afterId: number, limit: number, only?: OutboxClass): Promise<OutboxEntry[]> {
    this.assertOpen();
    assertOutboxClass(only);
    const out: OutboxEntry[] = [];
    if (limit <= 0) return out;
    for (const entry of this.entries.values()) {
      if (entry.id <= afterId) continue;
      if (only !== undefined && this.ledger.classOfKind(entry.kind) !== only) continue;
      // created_at as the ledger has it: a clock step since the enqueue shifted it there.
      const createdAt = this.ledger.get(entry.id)?.createdAt ?? entry.createdAt;
      out.push(createdAt === entry.createdAt ? entry : { ...entry, createdAt });
      if (out.length >= limit) break;
    }
    return out;
  }

  async remove(ids: readonly number[]): Promise<void> {
    this.assertOpen();
    for (const id of ids) if (this.ledger.delete(id)) this.entries.delete(id);
  }

  stats(): OutboxStats {
    return this.ledger.stats();
  }

  onEnqueued(listener: (entry: OutboxEntry) => void): () => void {
    return this.listeners.add(listener);
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  private assertOpen(): void {
    if (this.closed) throw new Error('outbox is closed');
  }
}
