import {
  EnqueueListeners,
  OutboxLedger,
  DEFAULT_PROTECTED_KINDS,
  resolveBounds,
  type Outbox,
  type OutboxEntry,
  type OutboxMessage,
  type OutboxOptions,
  type OutboxStats,
} from './outbox.js';

/**
 * The outbox without a file: same bounds, order, stamps and drop accounting as `SqliteOutbox`, nothing
 * survives the process. For tests and for an agent run without a data dir.
 */
export class MemoryOutbox implements Outbox {
  private readonly ledger: OutboxLedger;
  private readonly entries = new Map<number, OutboxEntry>();
  private readonly listeners = new EnqueueListeners();
  private readonly now: () => number;
  private lastId = 0;
  private closed = false;

  constructor(options: OutboxOptions = {}) {
    this.now = options.now ?? Date.now;
    // Numbering restarts with every process: a start time tells the runs apart.
    this.ledger = new OutboxLedger(resolveBounds(options.bounds), options.protectedKinds ?? DEFAULT_PROTECTED_KINDS, this.now());
  }

  async enqueue(message: OutboxMessage): Promise<OutboxEntry | undefined> {
    this.assertOpen();
    const plan = this.ledger.plan(message, this.now());
    for (const row of plan.evict) this.entries.delete(row.id);
    const id = plan.insert ? ++this.lastId : 0;
    this.ledger.apply(plan, id);
    if (!plan.insert) return undefined;
    const entry: OutboxEntry = { id, kind: plan.kind, seq: plan.stamp.seq, topic: plan.topic, payload: plan.payload, retain: plan.retain, createdAt: plan.createdAt };
    this.entries.set(id, entry);
    this.listeners.emit(entry);
    return entry;
  }

  async peek(afterId: number, limit: number): Promise<OutboxEntry[]> {
    this.assertOpen();
    const out: OutboxEntry[] = [];
    if (limit <= 0) return out;
    for (const entry of this.entries.values()) {
      if (entry.id <= afterId) continue;
      out.push(entry);
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
