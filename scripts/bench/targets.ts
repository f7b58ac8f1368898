import { EQUAL_REL } from './bare.js';
import type { BenchReport, LatencyRow, TargetRow } from './report.js';
import { round1 } from './stats.js';

/** Issue 4's targets against this run's figures (null: the run did not measure it). */
export function evaluateTargets(r: BenchReport): TargetRow[] {
  const rows: TargetRow[] = [];
  for (const w of ['tiny', 'classifier']) {
    for (const transport of ['tcp', 'unix'] as const) {
      const l = r.latency.find((x) => x.workload === w && x.api === 'native_stream' && x.transport === transport && x.config === 'default' && x.client_poll_us === r.meta.client_poll_us);
      if (!l) continue;
      const againstRun = l.over_echo_run_us === undefined ? '' : ` (over echo+run: ${l.over_echo_run_us} µs)`;
      rows.push({ name: `own cost p50, native ${transport}, ${w} (${l.frame_bytes} B)`, target: '≤ 50 µs', value: l.own_cost_us === undefined ? 'n/a' : `${l.own_cost_us} µs${againstRun}`, met: l.own_cost_us === undefined ? null : l.own_cost_us <= 50 });
    }
  }
  const tinyRow = (pollUs: number): LatencyRow | undefined => r.latency.find((x) => x.workload === 'tiny' && x.api === 'native_stream' && x.transport === 'tcp' && x.config === 'default' && x.client_poll_us === pollUs);
  const tiny = tinyRow(r.meta.client_poll_us);
  const sleeping = r.meta.client_poll_us > 0 ? tinyRow(0) : undefined;
  if (tiny) {
    const client = r.meta.client_poll_us > 0 ? `client polling ${r.meta.client_poll_us} µs` : 'client sleeping';
    const value = `${tiny.overhead_us} µs (${client})${sleeping ? `; ${sleeping.overhead_us} µs with a sleeping client` : ''}`;
    rows.push({ name: 'tiny native TCP p50 over bare p50', target: '≤ 150 µs', value, met: tiny.overhead_us <= 150 });
  }
  const cls8 = r.throughput.find((t) => t.workload === 'classifier' && t.server === 'agent' && t.api === 'native_stream' && t.batching === true && t.streams === 8);
  const clsBare = cls8?.bare_b8_fps;
  if (cls8) rows.push({ name: 'classifier 8 streams batching on vs bare batch 8', target: '≥ 80%', value: clsBare ? `${round1((100 * cls8.fps) / clsBare)}% (${cls8.fps} vs ${clsBare} frames/s)` : 'n/a', met: clsBare ? cls8.fps >= 0.8 * clsBare : null });
  for (const n of r.naive) rows.push({ name: `${n.workload} 8 streams vs naive`, target: '≥ 2x', value: `${n.ratio}x (${n.agent_fps} vs ${n.naive_fps} frames/s)`, met: n.ratio >= 2 });
  if (r.rss) {
    const s = r.rss;
    rows.push({
      name: `RSS growth over ${s.frames} frames (after a full collection)`, target: '≤ 5%',
      value: `${s.growth_pct}% (${s.collected_before_kb} → ${s.collected_after_kb} kB; uncollected: quarter medians ${s.quarter_growth_pct}%, raw ${s.raw_growth_pct}%)`,
      met: s.growth_pct <= 5,
    });
  }
  if (r.cold_start) {
    const c = r.cold_start;
    const sumEmpty = Object.values(c.session_create_ms).reduce((a, v) => a + v.empty_ms, 0);
    const sumCached = Object.values(c.session_create_ms).reduce((a, v) => a + v.cached_ms, 0);
    rows.push({
      name: 'cold start, graph cache vs empty', target: 'measurably faster',
      value: `${c.cached.median_ms} vs ${c.empty.median_ms} ms to first result (saves ${c.saved_ms} ms); model loads ${c.cached.model_load_median_ms} vs ${c.empty.model_load_median_ms} ms`,
      // Measurable: first results come sooner, and sessions open faster from the cache for the models together.
      met: c.cached.median_ms < c.empty.median_ms && sumCached < sumEmpty,
    });
    rows.push({ name: 'graph cache: session creation, all models', target: 'faster from cache', value: `${round1(sumCached)} vs ${round1(sumEmpty)} ms (${Object.entries(c.session_create_ms).map(([k, v]) => `${k} ${v.cached_ms}/${v.empty_ms}`).join(', ')})`, met: sumCached < sumEmpty });
  }
  const unequal = r.latency.filter((l) => !l.outputs_equal);
  rows.push({ name: 'agent outputs equal bare', target: `relative ≤ ${EQUAL_REL}`, value: unequal.length === 0 ? `all ${r.latency.length} rows` : `${unequal.length} rows differ: ${unequal.map((l) => `${l.workload}/${l.api}/${l.transport}`).join(', ')}`, met: r.latency.length === 0 ? null : unequal.length === 0 });
  return rows;
}

