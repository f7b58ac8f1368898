import { FailedPreconditionError, ResourceExhaustedError } from '../errors.js';
import type { TensorData } from './tensor.js';

interface SequenceSlot {
  /** State tensors by state-input name, each one stream's rows (batch size 1). */
  state: Record<string, TensorData> | undefined;
  lastUsed: number;
  /** A request of this sequence is running: the next must wait for its state. */
  busy: boolean;
}

/**
 * Per-sequence state of one stateful model. Native streams and KServe sequences both live here, keyed by an id
 * the server chooses. Idle sequences are freed after a timeout so a client that vanishes does not leak state.
 */
export class SequenceStore {
  private readonly slots = new Map<string, SequenceSlot>();

  constructor(
    private readonly options: { idleTimeoutMs: number; maxSequences: number; now?: () => number },
  ) {}

  private now(): number {
    return (this.options.now ?? Date.now)();
  }

  get size(): number {
    return this.slots.size;
  }

  /** Starts (or restarts, with fresh state) a sequence. */
  start(id: string): void {
    this.sweep();
    if (!this.slots.has(id) && this.slots.size >= this.options.maxSequences) {
      throw new ResourceExhaustedError('runtime.max_sequences', `too many open sequences (runtime.max_sequences = ${this.options.maxSequences})`);
    }
    const existing = this.slots.get(id);
    if (existing?.busy) throw new FailedPreconditionError(`sequence '${id}' cannot restart while a request of it is running`);
    this.slots.set(id, { state: undefined, lastUsed: this.now(), busy: false });
  }

  has(id: string): boolean {
    return this.slots.has(id);
  }

  /** The sequence must exist: a request for a sequence that was never started (or timed out) is refused. */
  require(id: string): void {
    if (!this.slots.has(id)) {
      throw new FailedPreconditionError(`sequence '${id}' was never started or has expired (send sequence_start first)`);
    }
  }

  isBusy(id: string): boolean {
    return this.slots.get(id)?.busy ?? false;
  }

  /** Marks the sequence running and returns its current state (undefined = initial zeros). */
  acquire(id: string): Record<string, TensorData> | undefined {
    const slot = this.slots.get(id);
    if (!slot) throw new FailedPreconditionError(`sequence '${id}' has expired`);
    slot.busy = true;
    slot.lastUsed = this.now();
    return slot.state;
  }

  /** Stores the next state (undefined: keep the old one, e.g. after a failed run) and frees the sequence. */
  release(id: string, next: Record<string, TensorData> | undefined, end: boolean): void {
    const slot = this.slots.get(id);
    if (!slot) return;
    if (end) {
      this.slots.delete(id);
      return;
    }
    if (next) slot.state = next;
    slot.busy = false;
    slot.lastUsed = this.now();
  }

  end(id: string): void {
    const slot = this.slots.get(id);
    if (slot && !slot.busy) this.slots.delete(id);
    else if (slot) slot.lastUsed = -Infinity; // freed by the next sweep once its run finishes
  }

  /** Frees sequences idle for longer than the timeout. */
  sweep(): number {
    const cutoff = this.now() - this.options.idleTimeoutMs;
    let freed = 0;
    for (const [id, slot] of this.slots) {
      if (!slot.busy && slot.lastUsed < cutoff) {
        this.slots.delete(id);
        freed++;
      }
    }
    return freed;
  }

  clear(): void {
    this.slots.clear();
  }
}
