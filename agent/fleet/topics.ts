/** The topic contract, under a configurable prefix (default `edge`). */
export class FleetTopics {
  constructor(readonly prefix: string, readonly deviceId: string) {}

  get device(): string {
    return `${this.prefix}/devices/${this.deviceId}`;
  }
  /** Retained online/offline presence (and the last will). */
  get status(): string {
    return `${this.device}/status`;
  }
  get state(): string {
    return `${this.device}/state`;
  }
  get deviceDeployments(): string {
    return `${this.device}/deployments`;
  }
  groupDeployments(group: string): string {
    return `${this.prefix}/groups/${group}/deployments`;
  }
  deploymentStatus(deploymentId: string): string {
    return `${this.device}/deployments/${deploymentId}/status`;
  }
  /** Filter for commands; `+` matches one level, so `.../commands/{id}/result` does not loop back. */
  get commands(): string {
    return `${this.device}/commands/+`;
  }
  commandResult(commandId: string): string {
    return `${this.device}/commands/${commandId}/result`;
  }
  artifactRequest(sha256: string): string {
    return `${this.prefix}/artifacts/${sha256}/request`;
  }
  /** Where the fleet answers chunk requests: `{replyTo}/{index}`. */
  artifactReplyTo(sha256: string): string {
    return `${this.device}/artifacts/${sha256}`;
  }
  get telemetry(): string {
    return `${this.device}/telemetry`;
  }
}

/** MQTT topic filter match (`+` one level, `#` the rest). */
export function topicMatches(filter: string, topic: string): boolean {
  const f = filter.split('/');
  const t = topic.split('/');
  for (let i = 0; i < f.length; i++) {
    const part = f[i];
    if (part === '#') return true;
    if (i >= t.length) return false;
    if (part !== '+' && part !== t[i]) return false;
  }
  return f.length === t.length;
}
