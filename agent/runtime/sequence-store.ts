import { FailedPreconditionError, ResourceExhaustedError } from '../errors.js';
import type { SequenceControl } from './types.js';
import type { TensorData } from './tensor.js';

interface SequenceSlot {
  /** State tensors by state-input name, each one stream's rows (batch size 1). */
  state: Record<string, TensorData> | undefined;
  lastUsed: number;
  /** A request of this sequence is running: the next must wait for its state. */
  busy: boolean;
  /** Requests of this sequence accepted and not finished (queued or running): the slot outlives its end until they have run. */
  pending: number;
  /** In submission order: false once an `end` (or the stream's close) was accepted; a later request must start again. */
  open: boolean;
  /** The agent's own sequence for a native stream: it lives as long as the stream and never idles out. */
  owned: boolean;
}

/**
 * Per-sequence state of one stateful model version. Native streams and KServe sequences both live here, keyed by
 * an id the server chooses. Requests are admitted in submission order and run in it, so `start` and `end` take
 * effect where they were sent: a pipelined `end` then `start` of the same id runs the end on the old state and
 * the start on fresh state, and a sequence ended (or its stream closed) while frames of it are queued keeps its
 * state until they have run. Idle sequences of clients that vanished are freed after a timeout; a stream's own
 * sequence is freed when the stream closes.
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

  /**
   * Admits one request of a sequence (before it is queued), or refuses it: a request that neither starts a
   * sequence nor continues an open one gets FAILED_PRECONDITION. A stream's own sequence (`owned`) starts by
   * itself on a version that has not seen it yet, which is what a version switch under an open stream needs.
   */
  admit(seq: SequenceControl): void {
    let slot = this.slots.get(seq.id);
    if (seq.start || (seq.owned && !slot)) {
      if (!slot) {
        if (this.slots.size >= this.options.maxSequences) this.sweep();
        if (this.slots.size >= this.options.maxSequences) {
          throw new ResourceExhaustedError('runtime.max_sequences', `too many open sequences (runtime.max_sequences = ${this.options.maxSequences})`);
        }
        slot = { state: undefined, lastUsed: this.now(), busy: false, pending: 0, open: true, owned: false };
        this.slots.set(seq.id, slot);
      }
      slot.open = true;
    } else if (!slot?.open) {
      throw new FailedPreconditionError(
        slot ? `sequence '${seq.id}' has ended (send sequence_start to begin it again)` : `sequence '${seq.id}' was never started, has expired, or began on another version of the model (send sequence_start)`,
      );
    }
    if (seq.owned) slot.owned = true;
    slot.pending++;
    slot.lastUsed = this.now();
    if (seq.end) slot.open = false;
  }

  /** An admitted request that will not run (dropped, or its deadline passed while queued). */
  abandon(id: string): void {
    const slot = this.slots.get(id);
    if (!slot) return;
    slot.pending--;
    this.freeIfDone(id, slot);
  }

  isBusy(id: string): boolean {
    return this.slots.get(id)?.busy ?? false;
  }

  /** Marks the sequence running and returns the state its request starts from (undefined = initial zeros). */
  acquire(id: string, fresh: boolean): Record<string, TensorData> | undefined {
    const slot = this.slots.get(id);
    // Unreachable while admit/release keep `pending` right: a slot with admitted requests is never freed.
    if (!slot) throw new FailedPreconditionError(`sequence '${id}' has expired`);
    slot.busy = true;
    slot.lastUsed = this.now();
    return fresh ? undefined : slot.state;
  }

  /** A request that acquired the sequence will run again (its batch failed): no longer running, still admitted. */
  putBack(id: string): void {
    const slot = this.slots.get(id);
    if (slot) slot.busy = false;
  }

  /**
   * A request of the sequence finished: stores the next state (undefined: keep the old one, e.g. after a failed
   * run), or forgets it when the request ended the sequence, and frees the slot once nothing of it is left.
   */
  release(id: string, next: Record<string, TensorData> | undefined, end: boolean): void {
    const slot = this.slots.get(id);
    if (!slot) return;
    if (end) slot.state = undefined;
    else if (next) slot.state = next;
    slot.busy = false;
    slot.pending--;
    slot.lastUsed = this.now();
    this.freeIfDone(id, slot);
  }

  /** Ends a sequence from outside (its stream closed): freed now, or as soon as its admitted requests have run. */
  end(id: string): void {
    const slot = this.slots.get(id);
    if (!slot) return;
    slot.open = false;
    this.freeIfDone(id, slot);
  }

  private freeIfDone(id: string, slot: SequenceSlot): void {
    if (!slot.open && slot.pending <= 0) this.slots.delete(id);
  }

  /** Frees sequences idle for longer than the timeout that no stream owns and no request waits on. */
  sweep(): number {
    const cutoff = this.now() - this.options.idleTimeoutMs;
    let freed = 0;
    for (const [id, slot] of this.slots) {
      if (!slot.owned && slot.pending <= 0 && slot.lastUsed < cutoff) {
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
