import t from 'tap';
import { availableParallelism } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { MemoryOutbox } from '../agent/store/outbox-memory.js';
import { AgentMetrics } from '../agent/telemetry/agent-metrics.js';
import { TelemetryReporter, telemetryTopic } from '../agent/telemetry/telemetry-reporter.js';

// Interval lengths, rates and CPU % must not follow the wall clock: NTP (or a person) setting it during an
// interval would otherwise report a 0.001 s interval with a huge throughput, or an hour-long one.

const HOUR = 3_600_000;
/** Process CPU time over elapsed time cannot exceed every core busy the whole time (small slack for rounding). */
const CPU_CEILING = availableParallelism() * 100 * 1.05 + 5;

function traffic(m: AgentMetrics, n: number): void {
  for (let i = 0; i < n; i += 1) m.onRequest({ model: 'tiny', version: 1, status: 'OK', timings: { queueUs: 10, inferUs: 100, totalUs: 120 } });
}

/** Keeps one core busy for `ms` (measured on the monotonic clock), so the interval has CPU time to report. */
function burn(ms: number): void {
  const until = performance.now() + ms;
  while (performance.now() < until) { /* spin */ }
}

t.test('a wall-clock step inside an interval changes its timestamps, not its length or rates', async (t) => {
  let wall = Date.UTC(2026, 10, 30, 12);
  let mono = 5_000;
  const m = new AgentMetrics({ now: () => wall, monotonicNow: () => mono });
  t.teardown(() => m.close());

  traffic(m, 1200);
  wall += 10_000;
  mono += 10_000;
  wall -= HOUR; // NTP steps the clock back at the end of the interval
  const back = m.closeInterval();
  t.equal(back.seconds, 10, 'interval length from the monotonic clock');
  t.equal(back.models[0]!.throughput_rps, 120, '1200 successes in 10 s');
  t.equal(back.started_at, Date.UTC(2026, 10, 30, 12), 'started_at is wall-clock time');
  t.equal(back.ended_at, Date.UTC(2026, 10, 30, 12) + 10_000 - HOUR, 'ended_at is wall-clock time, step included');
  t.ok(back.process.cpu_percent >= 0 && back.process.cpu_percent <= CPU_CEILING, `cpu_percent ${back.process.cpu_percent} is sane`);

  traffic(m, 600);
  wall += 5_000 + HOUR; // and forward again, by more than the interval itself
  mono += 5_000;
  const forward = m.closeInterval();
  t.equal(forward.seconds, 5);
  t.equal(forward.models[0]!.throughput_rps, 120);
  t.equal(forward.started_at, back.ended_at, 'intervals still chain by wall-clock timestamps');
});

t.test('the default clocks: a stepped Date.now does not shorten or stretch the interval', async (t) => {
  const realNow = Date.now;
  let offset = 0;
  Date.now = () => realNow() + offset;
  t.teardown(() => { Date.now = realNow; });
  const m = new AgentMetrics(); // as main.ts builds it
  t.teardown(() => m.close());

  traffic(m, 100);
  const started = performance.now();
  burn(40);
  await sleep(20);
  const elapsedS = (performance.now() - started) / 1000;
  offset = -HOUR;
  const back = m.closeInterval();
  t.ok(back.seconds >= 0.05 && back.seconds < elapsedS + 5, `seconds ${back.seconds} after at least 60 ms and a 1 h step back`);
  t.equal(back.models[0]!.throughput_rps, 100 / back.seconds, 'throughput over the measured length');
  t.ok(back.models[0]!.throughput_rps <= 100 / 0.05, `throughput ${back.models[0]!.throughput_rps} not inflated`);
  t.ok(back.process.cpu_percent > 0 && back.process.cpu_percent <= CPU_CEILING, `cpu_percent ${back.process.cpu_percent} at most ${CPU_CEILING}`);
  t.ok(back.ended_at - back.started_at < -HOUR + 60_000, 'the timestamps do show the step');

  traffic(m, 100);
  burn(40);
  await sleep(20);
  offset = HOUR;
  const forward = m.closeInterval();
  t.ok(forward.seconds >= 0.05 && forward.seconds < 60, `seconds ${forward.seconds} after a 2 h step forward`);
  t.ok(forward.models[0]!.throughput_rps > 0.05, `throughput ${forward.models[0]!.throughput_rps} not diluted over hours`);
  t.ok(forward.process.cpu_percent > 1, `cpu_percent ${forward.process.cpu_percent} not diluted over hours`);
});

t.test('the telemetry record the fleet receives carries the monotonic length', async (t) => {
  let wall = Date.UTC(2026, 10, 30, 12);
  let mono = 0;
  const metrics = new AgentMetrics({ now: () => wall, monotonicNow: () => mono });
  t.teardown(() => metrics.close());
  const outbox = new MemoryOutbox({ now: () => wall });
  t.teardown(() => outbox.close());
  const reporter = new TelemetryReporter({
    metrics, outbox, deviceId: 'dev-clock', agentVersion: 't', topic: telemetryTopic('edge', 'dev-clock'), intervalMs: 10_000, now: () => wall,
    monotonicNow: () => mono,
  });
  traffic(metrics, 1200);
  wall += 10_000 - HOUR;
  mono += 10_000;
  const record = await reporter.tick();
  t.ok(record, 'stored');
  t.equal(record!.interval.seconds, 10);
  t.equal(record!.interval.started_at, new Date(Date.UTC(2026, 10, 30, 12)).toISOString());
  t.equal(record!.models[0]!.throughput_rps, 120);
  t.equal(record!.agent.uptime_s, 10, 'uptime counts elapsed time, not the stepped wall clock');
  t.ok(record!.agent.cpu_percent <= CPU_CEILING, `cpu_percent ${record!.agent.cpu_percent}`);
});
