/**
 * Counts open streams in total and per peer host, so one misbehaving client cannot take every slot. A refused
 * stream gets RESOURCE_EXHAUSTED with the limit's name.
 */
export class StreamAdmission {
  private total = 0;
  private readonly perPeer = new Map<string, number>();
  private readonly owners = new WeakMap<object, string>();

  constructor(private readonly limits: { maxStreams: number; maxStreamsPerPeer: number }) {}

  /** The peer's host: the port changes per connection, the host is the client. */
  static peerHost(peer: string): string {
    if (peer.startsWith('unix:')) return 'unix';
    const m = /^(?:ipv4:|ipv6:)?(\[.*\]|[^:]+(?::[^:]+)*?):\d+$/.exec(peer);
    return m?.[1] ?? peer;
  }

  /** Undefined when admitted (the caller then binds a stream); else the refusal message. */
  admit(peer: string): string | undefined {
    if (this.total >= this.limits.maxStreams) return `too many streams: server.max_streams = ${this.limits.maxStreams}`;
    const host = StreamAdmission.peerHost(peer);
    if ((this.perPeer.get(host) ?? 0) >= this.limits.maxStreamsPerPeer) {
      return `too many streams from ${host}: server.max_streams_per_peer = ${this.limits.maxStreamsPerPeer}`;
    }
    return undefined;
  }

  bind(stream: object, peer: string): void {
    const host = StreamAdmission.peerHost(peer);
    this.owners.set(stream, host);
    this.total++;
    this.perPeer.set(host, (this.perPeer.get(host) ?? 0) + 1);
  }

  release(stream: object): void {
    const host = this.owners.get(stream);
    if (host === undefined) return;
    this.owners.delete(stream);
    this.total--;
    const n = (this.perPeer.get(host) ?? 1) - 1;
    if (n <= 0) this.perPeer.delete(host);
    else this.perPeer.set(host, n);
  }

  get open(): number {
    return this.total;
  }
}
