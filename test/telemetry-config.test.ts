import t from 'tap';
import { telemetrySchema } from '../agent/config/telemetry-schema.js';
import { outboxOptions } from '../agent/telemetry/telemetry-service.js';

t.test('defaults', async (t) => {
  const c = telemetrySchema.parse({});
  t.same(c, {
    enabled: true,
    interval_s: 10,
    http: { enabled: true, host: '127.0.0.1', port: 8002 },
    outbox: { max_rows: 10_000, max_bytes: 16 * 1024 * 1024, max_age_s: 604_800, sync_interval_s: 60, drain_rate_per_s: 20, max_in_flight: 8 },
    device: { nvidia_smi: true, tegrastats: true, thermal: true, command_timeout_ms: 3000 },
  });
  t.same(outboxOptions(c.outbox), { bounds: { maxRows: 10_000, maxBytes: 16 * 1024 * 1024, maxAgeMs: 604_800_000 }, syncIntervalMs: 60_000 });
  const partial = telemetrySchema.parse({ http: { port: 9102 }, outbox: { max_rows: 50 } });
  t.equal(partial.http.host, '127.0.0.1', 'a partial section keeps the other defaults');
  t.equal(partial.outbox.max_bytes, 16 * 1024 * 1024);
});

t.test('bad values are refused with the key named', async (t) => {
  const bad: [unknown, RegExp][] = [
    [{ interval_s: 0 }, /interval_s/],
    [{ http: { port: 70_000 } }, /port/],
    [{ http: { host: '0.0.0.0/8' } }, /host/],
    [{ outbox: { max_rows: 0 } }, /max_rows/],
    [{ outbox: { drain_rate_per_s: -1 } }, /drain_rate_per_s/],
    [{ outbox: { max_rows: 10, extra: 1 } }, /extra/],
    [{ intervall_s: 5 }, /intervall_s/],
  ];
  for (const [input, key] of bad) {
    const r = telemetrySchema.safeParse(input);
    t.notOk(r.success, JSON.stringify(input));
    if (!r.success) t.match(JSON.stringify(r.error.issues), key);
  }
});
