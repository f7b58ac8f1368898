import type { MqttClient } from 'mqtt';

export type StatusKind = 'deployment-status' | 'state' | 'command-result';

/**
 * Where the fleet's statuses go. In production the telemetry outbox implements it: the record is committed to
 * SQLite before `enqueue` resolves and leaves only after the broker's PUBACK. Enqueueing never waits on the broker.
 */
export interface StatusSink {
  enqueue(kind: StatusKind, topic: string, payload: object, retain: boolean): Promise<void>;
}

/**
 * Publishes straight on the MQTT client (QoS 1), without durability: a status sent while the link is down is
 * queued in memory by the client and lost if the process dies. For tests and tools; the agent uses the outbox.
 */
export class DirectStatusPublisher implements StatusSink {
  constructor(private readonly client: () => MqttClient, private readonly onError?: (err: Error, topic: string) => void) {}

  enqueue(_kind: StatusKind, topic: string, payload: object, retain: boolean): Promise<void> {
    this.client().publish(topic, JSON.stringify(payload), { qos: 1, retain }, (err) => {
      if (err) this.onError?.(err, topic);
    });
    return Promise.resolve();
  }
}
