import type { Outbox } from '../store/outbox.js';

/**
 * The fleet's status sink (agent/fleet/status-sink.ts `StatusSink`) on the outbox: a status is committed to
 * SQLite before `enqueue` resolves and leaves after its PUBACK. Each payload gains `seq` (per kind, kept
 * across restarts) and `epoch`, so the fleet can order statuses and drop duplicates as it does telemetry.
 */
export class OutboxStatusSink {
  constructor(private readonly outbox: Outbox) {}

  async enqueue(kind: string, topic: string, payload: object, retain: boolean): Promise<void> {
    await this.outbox.enqueue({
      kind,
      topic,
      retain,
      payload: (stamp) => JSON.stringify({ ...payload, seq: stamp.seq, epoch: stamp.epoch }),
    });
  }
}
