import { performance } from 'node:perf_hooks';

/** How long a client that had requests overlapping keeps counting each request as a source of its own. */
const CONCURRENT_WINDOW_MS = 20;

interface Client {
  inFlight: number;
  /** Loop turn of its last arrival: two arrivals in one turn mean requests sent at once. */
  turn: number;
  concurrentUntil: number;
}

/**
 * Which source a KServe request counts as for dynamic batching (`InferenceRequest.source`). A client sending one
 * request at a time — its connection for unary calls, its call for a stream — is one source, so a configured
 * `max_queue_delay_us` never holds its lone request waiting for frames nobody will send (it waited the whole
 * delay on every request). A client with several requests at once (perf_analyzer's concurrency over one
 * channel) counts each request as a source, which is what lets them meet in one batch.
 */
export class RequestSources {
  private readonly clients = new Map<object | string, Client>();
  private turn = 0;
  private turnEnd: NodeJS.Immediate | undefined;

  /** A request of `client` arrived; returns the source to submit it under. Pair with `end`. */
  begin(client: object | string): object | string {
    const now = performance.now();
    let c = this.clients.get(client);
    if (!c) {
      c = { inFlight: 0, turn: -1, concurrentUntil: -Infinity };
      this.clients.set(client, c);
    }
    if (c.inFlight > 0 || c.turn === this.turn) c.concurrentUntil = now + CONCURRENT_WINDOW_MS;
    c.inFlight++;
    c.turn = this.turn;
    this.turnEnd ??= setImmediate(this.nextTurn);
    return now < c.concurrentUntil ? {} : client;
  }

  /** The request's answer went out (or it failed). */
  end(client: object | string): void {
    const c = this.clients.get(client);
    if (c) c.inFlight--;
  }

  /** Clients tracked now (for tests). */
  get size(): number {
    return this.clients.size;
  }

  private readonly nextTurn = (): void => {
    this.turnEnd = undefined;
    this.turn++;
    const now = performance.now();
    for (const [key, c] of this.clients) if (c.inFlight <= 0 && now >= c.concurrentUntil) this.clients.delete(key);
  };
}
