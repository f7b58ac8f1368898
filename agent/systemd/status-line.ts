/** What the status line needs to know about one model (runtime's ModelInfo fits). */
export interface ModelStatusView {
  readonly name: string;
  readonly version: number;
  readonly state: string;
  readonly provider: string;
}

/**
 * The one-line summary for `systemctl status`: how many models serve and on what, which failed, and
 * optionally how many streams are open, e.g.
 * `serving 3/4 models (classifier:1@cpu, filter:1@cpu, tiny:1@cpu); failed: broken; 2 streams`.
 */
export function agentStatusLine(models: readonly ModelStatusView[], extra: { streams?: number; note?: string } = {}): string {
  const ready = models.filter((m) => m.state === 'READY');
  const notReady = models.filter((m) => m.state !== 'READY');
  const parts = [`serving ${ready.length}/${models.length} models${ready.length > 0 ? ` (${ready.map((m) => `${m.name}:${m.version}@${m.provider}`).join(', ')})` : ''}`];
  if (notReady.length > 0) parts.push(`not ready: ${notReady.map((m) => `${m.name} (${m.state.toLowerCase()})`).join(', ')}`);
  if (extra.streams !== undefined) parts.push(`${extra.streams} stream${extra.streams === 1 ? '' : 's'}`);
  if (extra.note) parts.push(extra.note);
  return parts.join('; ');
}
