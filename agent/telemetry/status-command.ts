import type { StatusReport } from './status-report.js';

export interface StatusCommandOptions {
  /** Base URL of the agent's telemetry listener, e.g. `http://127.0.0.1:8002`. */
  readonly url: string;
  /** Print the raw JSON of /v1/status (for scripts) instead of the summary. */
  readonly json: boolean;
  readonly timeoutMs?: number;
  /** Where output goes (stdout / stderr by default). */
  readonly out?: (text: string) => void;
  readonly err?: (text: string) => void;
}

/**
 * `edge-agent status`: asks a running agent for /v1/status and prints a summary (or the JSON). Returns the
 * process exit code: 0 with an answer, 1 when the agent cannot be reached or answers with an error.
 */
export async function runStatusCommand(options: StatusCommandOptions): Promise<number> {
  const out = options.out ?? ((s: string) => { process.stdout.write(s); });
  const err = options.err ?? ((s: string) => { process.stderr.write(s); });
  const endpoint = `${options.url.replace(/\/+$/, '')}/v1/status`;
  let body: string;
  try {
    const res = await fetch(endpoint, { signal: AbortSignal.timeout(options.timeoutMs ?? 5000) });
    body = await res.text();
    if (!res.ok) {
      err(`edge-agent status: ${endpoint} answered ${res.status}: ${errorOf(body)}\n`);
      return 1;
    }
  } catch (e) {
    const cause = (e as { cause?: { code?: string; message?: string } }).cause;
    const why = cause?.code ?? cause?.message ?? (e instanceof Error ? e.message : String(e));
    err(`edge-agent status: cannot reach ${endpoint} (${why}). Is the agent running, with telemetry.http enabled on that address?\n`);
    return 1;
  }
  let report: StatusReport;
  try {
    report = JSON.parse(body) as StatusReport;
    if (typeof report !== 'object' || report === null || !report.agent || !Array.isArray(report.models)) throw new Error('missing agent/models');
  } catch (e) {
    err(`edge-agent status: ${endpoint} did not answer with an agent status (${e instanceof Error ? e.message : String(e)})\n`);
    return 1;
  }
  out(options.json ? `${JSON.stringify(report, null, 2)}\n` : formatStatus(report));
  return 0;
}

function errorOf(body: string): string {
  try {
    const parsed = JSON.parse(body) as { error?: unknown };
    if (typeof parsed.error === 'string') return parsed.error;
  } catch { /* not JSON: show it as it is */ }
  return body.slice(0, 300);
}

export function formatDuration(seconds: number): string {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86_400);
  const h = Math.floor((s % 86_400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${m}m`;
  if (m > 0) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

const ms = (us: number): string => (us / 1000).toFixed(2);

function table(rows: readonly (readonly string[])[]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) => r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  ').trimEnd()).join('\n');
}

/** The human summary printed by `edge-agent status`. */
export function formatStatus(r: StatusReport): string {
  const lines: string[] = [];
  const a = r.agent;
  const cpu = a.cpu_percent === null ? 'CPU n/a' : `CPU ${a.cpu_percent.toFixed(1)}%`;
  lines.push(`edge-agent ${a.version} on ${a.device_id}: up ${formatDuration(a.uptime_s)}, pid ${a.pid}, RSS ${formatBytes(a.rss_bytes)}, ${cpu}, ${a.active_streams} stream${a.active_streams === 1 ? '' : 's'}`);
  if (r.fleet === null) lines.push('fleet:   not configured (stand-alone)');
  else {
    const pending = r.fleet.pending_deployment ? `, deployment ${r.fleet.pending_deployment} in progress` : '';
    const broker = r.fleet.broker ? ` ${r.fleet.connected ? 'to' : 'from'} ${r.fleet.broker}` : '';
    lines.push(`fleet:   ${r.fleet.connected ? 'connected' : 'DISCONNECTED'}${broker}${pending}`);
    const rejected = r.fleet.commands_rejected;
    if (rejected && rejected.total > 0) lines.push(`         ${rejected.total} command payloads rejected, last: ${rejected.last_reason ?? '?'}`);
  }
  if (r.outbox) {
    const o = r.outbox;
    const oldest = o.rows > 0 ? `, oldest ${formatDuration(o.oldest_age_s)}` : '';
    lines.push(`outbox:  ${o.rows} entr${o.rows === 1 ? 'y' : 'ies'} waiting (${formatBytes(o.bytes)})${oldest}, ${o.in_flight} in flight, ${o.dropped_total} dropped since created`);
  }
  lines.push('');
  if (r.models.length === 0) lines.push('no models');
  else {
    const rows: string[][] = [['MODEL', 'VERSION', 'STATE', 'PROVIDER', 'VARIANT', 'REQ/S', 'P50 ms', 'P90 ms', 'P99 ms', 'MAX ms', 'ERRORS', 'DROPPED', 'LATE']];
    for (const m of r.models) {
      const f = m.figures;
      const l = f?.latency_us.total;
      rows.push([
        m.name, String(m.version), m.state, m.provider ?? '-', m.variant ?? '-',
        f ? f.throughput_rps.toFixed(1) : '-',
        l && l.count > 0 ? ms(l.p50) : '-', l && l.count > 0 ? ms(l.p90) : '-', l && l.count > 0 ? ms(l.p99) : '-', l && l.count > 0 ? ms(l.max) : '-',
        f ? String(f.errors) : '-', f ? String(f.dropped) : '-', f ? String(f.deadline_misses) : '-',
      ]);
    }
    lines.push(table(rows));
    for (const m of r.models) if (m.reason) lines.push(`  ${m.name} v${m.version}: ${m.reason}`);
    lines.push(r.interval ? `(latency and rates over the last ${r.interval.seconds.toFixed(1)} s interval, ended ${r.interval.ended_at})` : '(no interval closed yet: figures appear after the first telemetry interval)');
  }
  const d = r.device;
  if (d && (d.gpus.length > 0 || d.thermal.length > 0)) {
    lines.push('');
    for (const g of d.gpus) {
      const parts: string[] = [];
      if (g.utilization_percent !== undefined) parts.push(`${g.utilization_percent}% busy`);
      if (g.memory_used_mib !== undefined && g.memory_total_mib !== undefined) parts.push(`${(g.memory_used_mib / 1024).toFixed(1)}/${(g.memory_total_mib / 1024).toFixed(1)} GiB`);
      if (g.temperature_c !== undefined) parts.push(`${g.temperature_c} °C`);
      lines.push(`gpu ${g.index} (${g.source}): ${parts.join(', ') || 'no readings'}`);
    }
    if (d.thermal.length > 0) lines.push(`thermal: ${d.thermal.map((z) => `${z.type} ${z.temperature_c.toFixed(1)} °C`).join(', ')}`);
  }
  return `${lines.join('\n')}\n`;
}
