import type { MqttClient } from 'mqtt';
import type { Logger } from '../logger.js';
import { OUTBOX_CLASSES, type Outbox, type OutboxClass, type OutboxEntry } from '../store/outbox.js';

export interface OutboxPublisherOptions {
  /** Owned by the fleet code (connect, reconnect, end); the publisher only publishes and listens. */
  readonly client: MqttClient;
  readonly outbox: Outbox;
  /** Publishes per second at most, backlog or not, so a drain after an outage leaves room for live traffic. */
  readonly ratePerSecond?: number;
  /** Entries published and not yet acknowledged at once. */
  readonly maxInFlight?: number;
  readonly logger?: Logger;
  /** After the broker refuses an entry (MQTT 5 reason code), first retry delay; doubles up to 30 s. */
  readonly refusalBackoffMs?: number;
  /** Monotonic clock in ms for the rate bound (tests freeze it). */
  readonly now?: () => number;
}

export interface PublisherStats {
  readonly connected: boolean;
  readonly inFlight: number;
  readonly published: number;
  readonly acknowledged: number;
  /** Publishes of an entry that had been published before (after a reconnect): receivers see duplicates. */
  readonly republished: number;
  /** Entries the broker refused with a reason code; they stay in the outbox and are retried. */
  readonly refused: number;
}

const MAX_BACKOFF_MS = 30_000;

/**
 * Drains the outbox to MQTT, QoS 1: an entry leaves the outbox only after its PUBACK. Each class is sent in
 * id order, the protected class first: a command result enqueued behind hours of telemetry goes out with the
 * next token, not after the backlog (receivers order by the per-kind `seq`, so reordering across kinds is
 * invisible to them). Up to `maxInFlight` entries (both classes together) are unacknowledged at once. When the
 * connection closes, the entries still in flight are published again from the outbox after the next connect
 * (mqtt.js may resend its own copies too: a receiver can see duplicates, recognisable by `seq`, never a gap).
 * The rate is bounded by a token bucket that both classes spend.
 */
export class OutboxPublisher {
  private readonly client: MqttClient;
  private readonly outbox: Outbox;
  private readonly rate: number;
  private readonly maxInFlight: number;
  private readonly logger: Logger | undefined;
  private readonly baseBackoffMs: number;
  /**
   * Per class: highest id handed to the client in the current connection generation. One cursor per class,
   * because a protected entry overtakes droppable ones with lower ids: a single cursor past it would skip them.
   */
  private readonly cursor: Record<OutboxClass, number> = { protected: 0, droppable: 0 };
  private readonly highestPublished: Record<OutboxClass, number> = { protected: 0, droppable: 0 };
  /** Bumped when the connection closes: callbacks of older generations no longer steer the cursor. */
  private generation = 0;
  /** Bumped whenever a cursor moves back, so a read that was in progress is not used past it. */
  private rewinds = 0;
  /** Entry id → its class (which cursor to rewind if it is not acknowledged). */
  private readonly inFlight = new Map<number, OutboxClass>();
  /** Acknowledged, removal from the outbox not committed yet: never published again. */
  private readonly acked = new Set<number>();
  private ackBatch: { readonly id: number; readonly cls: OutboxClass }[] = [];
  private ackFlush: Promise<void> = Promise.resolve();
  private ackScheduled = false;
  private tokens: number;
  private tokensAt: number;
  private readonly now: () => number;
  private running = false;
  private pumping = false;
  private pumpAgain = false;
  private wakeTimer: NodeJS.Timeout | undefined;
  private backoffMs = 0;
  private blockedUntil = 0;
  private counts = { published: 0, acknowledged: 0, republished: 0, refused: 0 };
  private detach: (() => void) | undefined;
  private idleWaiters: (() => void)[] = [];

  constructor(options: OutboxPublisherOptions) {
    this.client = options.client;
    this.outbox = options.outbox;
    this.rate = options.ratePerSecond ?? 20;
    this.maxInFlight = Math.max(1, Math.floor(options.maxInFlight ?? 8));
    this.logger = options.logger;
    this.baseBackoffMs = options.refusalBackoffMs ?? 1000;
    if (!(this.rate > 0)) throw new RangeError(`publish rate must be positive, got ${this.rate}`);
    this.tokens = this.maxInFlight;
    this.now = options.now ?? (() => performance.now());
    this.tokensAt = this.now();
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    const onConnect = (): void => { this.pump(); };
    const onClose = (): void => { this.connectionLost(); };
    this.client.on('connect', onConnect);
    this.client.on('close', onClose);
    const offEnqueued = this.outbox.onEnqueued(() => this.pump());
    this.detach = () => {
      this.client.removeListener('connect', onConnect);
      this.client.removeListener('close', onClose);
      offEnqueued();
    };
    this.pump();
  }

  /**
   * Stops publishing; waits up to `drainTimeoutMs` for PUBACKs of entries in flight and commits their removal.
   * Entries without a PUBACK stay in the outbox for the next start.
   */
  async stop(drainTimeoutMs = 1000): Promise<void> {
    if (!this.running) return;
    this.running = false;
    this.detach?.();
    this.detach = undefined;
    if (this.wakeTimer) clearTimeout(this.wakeTimer);
    this.wakeTimer = undefined;
    if (this.inFlight.size > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, drainTimeoutMs);
        this.idleWaiters.push(() => { clearTimeout(timer); resolve(); });
      });
    }
    this.generation += 1;
    this.inFlight.clear();
    await this.flushAcks();
  }

  stats(): PublisherStats {
    return { connected: this.client.connected, inFlight: this.inFlight.size, ...this.counts };
  }

  /** Resolves once the outbox is empty and nothing is in flight; rejects after `timeoutMs`. */
  async drained(timeoutMs = 30_000, pollMs = 20): Promise<void> {
    const until = performance.now() + timeoutMs;
    while (this.outbox.stats().rows > 0 || this.inFlight.size > 0) {
      if (performance.now() > until) throw new Error(`outbox not drained within ${timeoutMs} ms (${this.outbox.stats().rows} entries left)`);
      await new Promise((r) => setTimeout(r, pollMs));
    }
  }

  private connectionLost(): void {
    if (this.inFlight.size > 0) {
      this.rewindToLowest(this.inFlight);
      this.inFlight.clear();
      this.notifyIdle();
    }
    this.generation += 1;
  }

  /** The next read of class `cls` starts at `id` again. */
  private rewind(cls: OutboxClass, id: number): void {
    this.cursor[cls] = Math.min(this.cursor[cls], id - 1);
    this.rewinds += 1;
  }

  /** Rewinds each class to the lowest of its ids among `entries`. */
  private rewindToLowest(entries: Iterable<readonly [number, OutboxClass]>): void {
    const lowest: Record<OutboxClass, number> = { protected: Infinity, droppable: Infinity };
    for (const [id, cls] of entries) lowest[cls] = Math.min(lowest[cls], id);
    for (const cls of OUTBOX_CLASSES) if (lowest[cls] !== Infinity) this.rewind(cls, lowest[cls]);
  }

  private takeTokens(): number {
    const now = this.now();
    this.tokens = Math.min(this.maxInFlight, this.tokens + ((now - this.tokensAt) * this.rate) / 1000);
    this.tokensAt = now;
    return Math.floor(this.tokens);
  }

  private wakeIn(ms: number): void {
    if (this.wakeTimer || !this.running) return;
    this.wakeTimer = setTimeout(() => { this.wakeTimer = undefined; this.pump(); }, Math.max(1, Math.ceil(ms)));
    this.wakeTimer.unref();
  }

  private pump(): void {
    if (!this.running) return;
    if (this.pumping) {
      this.pumpAgain = true;
      return;
    }
    this.pumping = true;
    this.pumpLoop()
      .catch((err: unknown) => {
        this.logger?.warn({ err }, 'outbox publisher: reading the outbox failed; retrying');
        this.wakeIn(1000);
      })
      .finally(() => {
        this.pumping = false;
        if (this.pumpAgain) {
          this.pumpAgain = false;
          this.pump();
        }
      });
  }

  private async pumpLoop(): Promise<void> {
    for (;;) {
      this.pumpAgain = false;
      if (!this.running || !this.client.connected || this.client.disconnecting) return;
      const waitMs = this.blockedUntil - this.now();
      if (waitMs > 0) {
        this.wakeIn(waitMs);
        return;
      }
      const free = this.maxInFlight - this.inFlight.size;
      if (free <= 0) return;
      const allowance = this.takeTokens();
      if (allowance < 1) {
        this.wakeIn(((1 - this.tokens) * 1000) / this.rate);
        return;
      }
      const generation = this.generation;
      const rewinds = this.rewinds;
      const want = Math.min(free, allowance);
      // Protected entries first; the droppable class fills what is left of this round's allowance.
      const batch: { readonly entry: OutboxEntry; readonly cls: OutboxClass }[] = [];
      for (const cls of OUTBOX_CLASSES) {
        const room = want - batch.length;
        if (room <= 0) break;
        const read = await this.outbox.peek(this.cursor[cls], room + this.acked.size, cls);
        for (const entry of read) {
          if (batch.length >= want) break;
          if (!this.acked.has(entry.id)) batch.push({ entry, cls });
        }
        if (generation !== this.generation || rewinds !== this.rewinds) break;
      }
      if (generation !== this.generation || rewinds !== this.rewinds || !this.running) continue;
      if (batch.length === 0) return;
      for (const { entry, cls } of batch) {
        if (!this.client.connected || generation !== this.generation) break;
        this.publish(entry, cls, generation);
      }
    }
  }

  private publish(entry: OutboxEntry, cls: OutboxClass, generation: number): void {
    this.inFlight.set(entry.id, cls);
    this.cursor[cls] = entry.id;
    this.tokens -= 1;
    this.counts.published += 1;
    if (entry.id <= this.highestPublished[cls]) this.counts.republished += 1;
    else this.highestPublished[cls] = entry.id;
    this.client.publish(entry.topic, entry.payload, { qos: 1, retain: entry.retain }, (err) => this.settled(entry, cls, generation, err));
  }

  private settled(entry: OutboxEntry, cls: OutboxClass, generation: number, err: Error | undefined): void {
    const current = generation === this.generation;
    if (!err) {
      // A PUBACK from any generation means the broker has it: remove, whatever the cursor says.
      this.counts.acknowledged += 1;
      if (!this.acked.has(entry.id)) {
        this.acked.add(entry.id);
        this.ackBatch.push({ id: entry.id, cls });
        this.scheduleAckFlush();
      }
      this.backoffMs = 0;
    } else if (current) {
      // Refused by the broker (MQTT 5 reason code) or failed in the client: published again after a
      // backoff, so a refusal that persists (not authorised, quota) cannot spin.
      const code = (err as { code?: unknown }).code;
      if (typeof code === 'number') this.counts.refused += 1;
      this.backoffMs = Math.min(MAX_BACKOFF_MS, this.backoffMs === 0 ? this.baseBackoffMs : this.backoffMs * 2);
      this.blockedUntil = this.now() + this.backoffMs;
      this.logger?.warn({ topic: entry.topic, seq: entry.seq, reasonCode: code, retryInMs: this.backoffMs }, `outbox entry not acknowledged: ${err.message}`);
      this.rewind(cls, entry.id);
    }
    if (current) {
      this.inFlight.delete(entry.id);
      if (this.inFlight.size === 0) this.notifyIdle();
      this.pump();
    }
  }

  private notifyIdle(): void {
    const waiters = this.idleWaiters.splice(0);
    for (const w of waiters) w();
  }

  private scheduleAckFlush(): void {
    if (this.ackScheduled) return;
    this.ackScheduled = true;
    setImmediate(() => {
      this.ackScheduled = false;
      void this.flushAcks();
    });
  }

  /** Removes acknowledged entries in one transaction per batch. */
  private flushAcks(): Promise<void> {
    const batch = this.ackBatch;
    if (batch.length === 0) return this.ackFlush;
    this.ackBatch = [];
    const ids = batch.map((a) => a.id);
    this.ackFlush = this.ackFlush
      .then(() => this.outbox.remove(ids))
      .then(() => { for (const id of ids) this.acked.delete(id); })
      .catch((err: unknown) => {
        // The entries stay in the outbox and are published again: a duplicate, never a loss.
        for (const id of ids) this.acked.delete(id);
        this.rewindToLowest(batch.map((a) => [a.id, a.cls] as const));
        this.wakeIn(1000);
        this.logger?.warn({ err, count: ids.length }, 'outbox publisher: removing acknowledged entries failed');
      });
    return this.ackFlush;
  }
}
