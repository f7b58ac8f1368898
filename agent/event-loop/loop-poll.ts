/**
 * The polling itself, shared by the agent's spinner and the client's result poller: a chain of setImmediate
 * turns, each of which makes libuv poll its sockets without blocking, until a deadline or until `keepGoing`
 * says the reason for polling is gone.
 */
export class LoopPoll {
  private until = 0;
  private active = false;

  constructor(private readonly keepGoing: () => boolean) {}

  get polling(): boolean {
    return this.active;
  }

  /** Polls until `until` (performance.now() ms); a poll already running is extended or shortened to it. */
  pollUntil(until: number): void {
    this.until = until;
    if (this.active) return;
    this.active = true;
    setImmediate(this.step);
  }

  private readonly step = (): void => {
    if (performance.now() < this.until && this.keepGoing()) setImmediate(this.step);
    else this.active = false;
  };
}
