import type { MqttClient } from 'mqtt';
import type { Logger } from '../logger.js';
import type { Outbox, OutboxEntry } from '../store/outbox.js';

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
 * Drains the outbox to MQTT in order, QoS 1: an entry leaves the outbox only after its PUBACK. Up to
 * `maxInFlight` entries are unacknowledged at once. When the connection closes, the entries still in flight
 * are published again from the outbox after the next connect (mqtt.js may resend its own copies too: a
 * receiver can see duplicates, recognisable by `seq`, never a gap). The rate is bounded by a token bucket.
 */
export class OutboxPublisher {
  private readonly client: MqttClient;
  private readonly outbox: Outbox;
  private readonly rate: number;
  private readonly maxInFlight: number;
  private readonly logger: Logger | undefined;
  private readonly baseBackoffMs: number;
  /** Highest id handed to the client in the current connection generation. */
  private cursor = 0;
  private highestPublished = 0;
  /** Bumped when the connection closes: callbacks of older generations no longer steer the cursor. */
  private generation = 0;
  /** Bumped whenever the cursor moves back, so a read that was in progress is not used past it. */
  private rewinds = 0;
  private readonly inFlight = new Set<number>();
  /** Acknowledged, removal from the outbox not committed yet: never published again. */
  private readonly acked = new Set<number>();
  private ackBatch: number[] = [];
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
      let lowest = Infinity;
      for (const id of this.inFlight) if (id < lowest) lowest = id;
      this.rewind(lowest);
      this.inFlight.clear();
      this.notifyIdle();
    }
    this.generation += 1;
  }

  /** The next read starts at `id` again. */
  private rewind(id: number): void {
    this.cursor = Math.min(this.cursor, id - 1);
    this.rewinds += 1;
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
      const entries = (await this.outbox.peek(this.cursor, want + this.acked.size)).filter((e) => !this.acked.has(e.id)).slice(0, want);
      if (generation !== this.generation || rewinds !== this.rewinds || !this.running) continue;
      if (entries.length === 0) return;
      for (const entry of entries) {
        if (!this.client.connected || generation !== this.generation) break;
        this.publish(entry, generation);
      }
    }
  }

  private publish(entry: OutboxEntry, generation: number): void {
    this.inFlight.add(entry.id);
    this.cursor = entry.id;
    this.tokens -= 1;
    this.counts.published += 1;
    if (entry.id <= this.highestPublished) this.counts.republished += 1;
    else this.highestPublished = entry.id;
    this.client.publish(entry.topic, entry.payload, { qos: 1, retain: entry.retain }, (err) => this.settled(entry, generation, err));
  }

  private settled(entry: OutboxEntry, generation: number, err: Error | undefined): void {
    const current = generation === this.generation;
    if (!err) {
      // A PUBACK from any generation means the broker has it: remove, whatever the cursor says.
      this.counts.acknowledged += 1;
      if (!this.acked.has(entry.id)) {
        this.acked.add(entry.id);
        this.ackBatch.push(entry.id);
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
      this.rewind(entry.id);
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
    const ids = this.ackBatch;
    if (ids.length === 0) return this.ackFlush;
    this.ackBatch = [];
    this.ackFlush = this.ackFlush
      .then(() => this.outbox.remove(ids))
      .then(() => { for (const id of ids) this.acked.delete(id); })
      .catch((err: unknown) => {
        // The entries stay in the outbox and are published again: a duplicate, never a loss.
        for (const id of ids) this.acked.delete(id);
        this.rewind(Math.min(...ids));
        this.wakeIn(1000);
        this.logger?.warn({ err, count: ids.length }, 'outbox publisher: removing acknowledged entries failed');
      });
    return this.ackFlush;
  }
}
