import { EQUAL_REL } from './bare.js';
import type { BenchReport, LatencyRow, NaiveRow, TargetRow } from './report.js';
import { round1 } from './stats.js';

const OWN_COST_TARGET_US = 50;
const NAIVE_TARGET_RATIO = 2;

/** Issue 4's targets against this run's figures (null: the run did not measure it). */
export function evaluateTargets(r: BenchReport): TargetRow[] {
  const rows: TargetRow[] = [];
  for (const w of ['tiny', 'classifier']) {
    for (const transport of ['tcp', 'unix'] as const) {
      const l = r.latency.find((x) => x.workload === w && x.api === 'native_stream' && x.transport === transport && x.config === 'default' && x.client_poll_us === r.meta.client_poll_us);
      if (!l) continue;
      const againstRun = l.over_echo_run_us === undefined ? '' : ` (over echo+run: ${l.over_echo_run_us} µs)`;
      rows.push({
        name: `own cost p50, native ${transport}, ${w} (${l.frame_bytes} B)`, target: `≤ ${OWN_COST_TARGET_US} µs`,
        value: l.own_cost_us === undefined ? 'n/a' : `${l.own_cost_us} µs${againstRun}`, met: l.own_cost_us === undefined ? null : l.own_cost_us <= OWN_COST_TARGET_US,
        ...plainServerOwnCost(l),
      });
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
  for (const n of r.naive) rows.push({ name: `${n.workload} 8 streams vs naive`, target: `≥ ${NAIVE_TARGET_RATIO}x`, value: `${n.ratio}x (${n.agent_fps} vs ${n.naive_fps} frames/s)`, met: n.ratio >= NAIVE_TARGET_RATIO, ...bareCeiling(r, n) });
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


/**
 * The own cost, by the target's own formula (p50 − bare p50 − echo p50), of the echo+run server: a plain server
 * that pays the transport and one run of bare's session per frame, and nothing of the agent (no queue, no thread
 * hop, no busy polling). What the agent adds over a plain server is its own p50 minus this one's.
 */
function plainServerOwnCost(l: LatencyRow): Pick<TargetRow, 'reference'> {
  if (l.echo_run_p50_us === undefined || l.echo_p50_us === undefined) return {};
  const own = round1(l.echo_run_p50_us - l.bare_p50_us - l.echo_p50_us);
  return { reference: { value: `plain server (echo+run): ${own} µs`, met: own <= OWN_COST_TARGET_US } };
}

/**
 * No server serves a model faster than onnxruntime runs it alone: bare at its best batch size (batch 1 for a
 * model with a fixed batch), against the naive server's figure from the same run, is the ceiling of the ratio.
 */
function bareCeiling(r: BenchReport, n: NaiveRow): Pick<TargetRow, 'reference'> {
  const row = r.throughput.find((t) => t.workload === n.workload && t.server === 'agent' && t.api === 'native_stream' && t.streams === 8);
  if (!row || n.naive_fps <= 0) return {};
  const best = Math.max(row.bare_b1_fps, row.bare_b8_fps ?? 0);
  const ceiling = Math.round((100 * best) / n.naive_fps) / 100;
  return { reference: { value: `bare onnxruntime: ${ceiling}x (${best} frames/s at batch ${best === row.bare_b1_fps ? 1 : 8})`, met: ceiling >= NAIVE_TARGET_RATIO } };
}
