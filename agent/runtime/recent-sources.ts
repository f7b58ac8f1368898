/**
 * A source (stream, client connection, or a lone request) that submitted this recently still feeds the model
 * (at least; the window also spans the last two runs and the queue delay).
 */
const ACTIVE_SOURCE_WINDOW_MS = 20;

/**
 * The sources feeding one model version, by when each last submitted: the frames a batch may still expect. A
 * frame waits for a fuller batch only while some of them have nothing in it yet, and a synchronous instance
 * gathers one event-loop turn only while more than one is active — a lone stream, or streams all already in the
 * batch, never wait out `max_queue_delay_us` for frames nobody will send.
 */
export class RecentSources {
  /** Ordered oldest first: a source is re-inserted at each submission. */
  private readonly seen = new Map<object | string, number>();

  submitted(source: object | string, at: number): void {
    this.seen.delete(source);
    this.seen.set(source, at);
  }

  /** Sources that submitted within the window ending at `now`; older ones are forgotten. */
  active(now: number, lastRunMs: number, queueDelayUs: number): number {
    const since = now - Math.max(ACTIVE_SOURCE_WINDOW_MS, 2 * lastRunMs + queueDelayUs / 1000);
    for (const [source, at] of this.seen) {
      if (at >= since) break;
      this.seen.delete(source);
    }
    return this.seen.size;
  }
}
