import { performance } from 'node:perf_hooks';
import { LoopPoll } from '../event-loop/index.js';

/**
 * Keeps a client's event loop polling while it awaits a result, so the answer is read without a thread
 * wake-up: the client-side counterpart of the agent's `server.busy_poll_us`, for a latency-critical caller
 * that sends a frame and waits for its result (a control loop). On the development VM it took 50–70 µs off a
 * 4 KiB round trip over loopback TCP, the same for the agent and for a bare gRPC echo.
 *
 * It polls only while exactly one frame is outstanding (with several in flight the loop is woken by results
 * anyway, and a spin would take a core from whatever produces them), for at most `windowUs` after a send, and
 * only if the previous round trip fitted that window: waiting 3 ms for a large model's result would spin on
 * the core its inference needs, and gain nothing a wake-up costs.
 */
export class ResultPoller {
  private outstanding = 0;
  private sentAt = 0;
  private lastRoundTripUs = 0;
  private readonly loop = new LoopPoll(() => this.outstanding === 1);

  /** @param windowUs how long to poll after a send; 0 turns polling off. */
  constructor(private readonly windowUs: number) {}

  /** Whether the event loop is being kept polling now. */
  get polling(): boolean {
    return this.loop.polling;
  }

  /** Results awaited: sent, and neither arrived nor abandoned. */
  get awaiting(): number {
    return this.outstanding;
  }

  /** A frame or request went out; a result for it is now awaited. */
  sent(): void {
    this.outstanding++;
    if (this.windowUs <= 0) return;
    const now = performance.now();
    this.sentAt = now;
    if (this.outstanding !== 1 || this.lastRoundTripUs > this.windowUs) return;
    this.loop.pollUntil(now + this.windowUs / 1000);
  }

  /** A result (of any status) arrived, or the call carrying it ended. */
  received(): void {
    if (this.outstanding === 0) return;
    this.outstanding--;
    if (this.windowUs > 0 && this.outstanding === 0) this.lastRoundTripUs = (performance.now() - this.sentAt) * 1000;
  }

  /** `count` awaited results will never come (their call ended). */
  abandoned(count: number): void {
    this.outstanding = Math.max(0, this.outstanding - count);
  }
}
