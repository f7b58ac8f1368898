import { LoopPoll } from '../event-loop/index.js';

/**
 * Keeps the event loop polling for a short while after the agent answers, instead of letting the thread sleep
 * at once — but only while that pays. A client that sends its next frame about one round trip after each
 * result gets it read without a wake-up, and the CPU has not gone idle under the inference that follows (on
 * the development VM, native 4 KiB own cost p50: 86–107 µs without, 27 µs over TCP and 3 µs over the unix
 * socket with a 1 ms window). A camera sending every 33 ms gains nothing from a 1 ms spin, so the spinner
 * learns from the last gap between an answer and the next arrival: it spins only if that gap fitted the
 * window. And it spins only for a lone client with nothing in flight: with frames running the loop is busy
 * anyway, and with several clients feeding the agent a spin takes the core that inference and the clients
 * need (Silero at 8 streams lost 17 % throughput to it). The same idea as onnxruntime's `allow_spinning`, one
 * level up.
 */
/** Arrivals from two clients this close together mean the agent is shared; no spinning for this long after. */
const SHARED_WINDOW_MS = 20;

export class EventLoopSpinner {
  private readonly loop = new LoopPoll(() => !this.working());
  private lastAnswerAt = -Infinity;
  /** Whether the last arrival came within the window after an answer (a spin would have caught it). */
  private worthIt = true;
  private lastSource: unknown;
  private lastArrivalAt = -Infinity;
  /** Until when another client counts as active beside the last one. */
  private sharedUntil = -Infinity;

  /**
   * @param windowUs how long to keep polling after an answer; 0 turns spinning off.
   * @param working whether the agent has frames in flight (then it never spins).
   */
  constructor(private readonly windowUs: number, private readonly working: () => boolean = () => false) {}

  /** Whether the event loop is being kept polling now. */
  get polling(): boolean {
    return this.loop.polling;
  }

  /** A frame or request arrived from `source` (a stream, or a connection's peer address). */
  readonly arrived = (source: unknown): void => {
    const now = performance.now();
    this.worthIt = (now - this.lastAnswerAt) * 1000 <= this.windowUs;
    if (source !== this.lastSource && now - this.lastArrivalAt < SHARED_WINDOW_MS) this.sharedUntil = now + SHARED_WINDOW_MS;
    this.lastSource = source;
    this.lastArrivalAt = now;
  };

  /** An answer went out: poll for another window before sleeping, if arrivals have been that close. */
  readonly poke = (): void => {
    if (this.windowUs <= 0) return;
    const now = performance.now();
    this.lastAnswerAt = now;
    if (!this.worthIt || now < this.sharedUntil || this.working()) return;
    this.loop.pollUntil(now + this.windowUs / 1000);
  };
}
