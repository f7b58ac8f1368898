import t from 'tap';
import { chmodSync } from 'node:fs';
import mqtt from 'mqtt';
import type { TelemetryRecord } from '../../agent/telemetry/telemetry-reporter.js';
import type { StatusReport } from '../../agent/telemetry/status-report.js';
import { AgentProcess, pumpFrames, tinyFrame } from '../helpers/agent-process.js';
import { MosquittoBroker } from '../helpers/mosquitto.js';
import { parsePrometheusText, sampleValue } from '../helpers/prometheus-text.js';
import { copyDemoRepo, tempDir } from '../helpers/runtime.js';

// Telemetry from the real agent (compiled CLI, child process) over a real mosquitto.

const DEVICE = 'e2e-telemetry';
const TOPIC = `edge/devices/${DEVICE}/telemetry`;

async function until<T>(what: string, probe: () => Promise<T | undefined> | T | undefined, timeoutMs = 30_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

t.test('records arrive with contiguous seq through a broker outage; /metrics and the records count every frame', async (t) => {
  // Persistence lets the fleet side's session (and what is queued for it) outlive the broker's restart, so what
  // this test sees after the outage does not depend on who reconnects first. mosquitto drops root to its own user.
  const persist = tempDir(t, 'edge-e2e-mqtt-db-');
  chmodSync(persist, 0o777);
  const broker = await MosquittoBroker.start({ extraConfig: `persistence true\npersistence_location ${persist}/\n` });
  t.teardown(() => broker.close());
  const fleetSide = await mqtt.connectAsync(broker.url, { clientId: 'e2e-telemetry-fleet', clean: false, protocolVersion: 5, properties: { sessionExpiryInterval: 600 }, reconnectPeriod: 100 });
  t.teardown(() => fleetSide.endAsync(true).catch(() => undefined));
  const records: TelemetryRecord[] = [];
  fleetSide.on('message', (topic, payload) => { if (topic === TOPIC) records.push(JSON.parse(payload.toString('utf8')) as TelemetryRecord); });
  await fleetSide.subscribeAsync(TOPIC, { qos: 1 });

  const agent = await AgentProcess.start(t, {
    dir: tempDir(t, 'edge-e2e-telemetry-'),
    repo: copyDemoRepo(t, ['tiny']),
    telemetry: { interval_s: 0.5, outbox: { drain_rate_per_s: 50 } },
    fleet: { broker_url: broker.url, device_id: DEVICE, state_interval_s: 0, reconnect: { min_ms: 200, max_ms: 1000 } },
  });
  const url = await agent.httpUrl();
  const status = async (): Promise<StatusReport> => (await (await fetch(`${url}/v1/status`)).json()) as StatusReport;
  const client = agent.client(t);

  let sent = 0;
  const send = async (n: number): Promise<void> => {
    const frames = pumpFrames(await client.openStream({ model: 'tiny' }), () => ({ x: tinyFrame(0.5) }), 4);
    await frames.waitForMore(n);
    await frames.stop();
    t.same(frames.results.filter((r) => r.status !== 'OK').map((r) => r.message), [], 'frames OK');
    sent += frames.results.length;
  };
  await send(40);
  await until('three records', () => (records.length >= 3 ? true : undefined));

  await broker.stop('SIGTERM');
  const outage = await until('the outbox holding five records', async () => {
    const s = await status();
    return s.outbox && s.outbox.rows >= 5 && s.fleet?.connected === false ? s : undefined;
  });
  await send(25); // served while the broker is down; counted in records made offline
  t.equal(outage.fleet?.connected, false, '/v1/status shows the fleet link down');
  await broker.start();

  const s = await until('the outbox drained', async () => {
    const x = await status();
    return x.outbox?.rows === 0 && x.fleet?.connected ? x : undefined;
  });
  const last = await until('records up to the last stored', () => {
    const max = Math.max(...records.map((r) => r.seq));
    return max >= outage.outbox!.rows + 3 ? max : undefined;
  });
  const seqs = [...new Set(records.map((r) => r.seq))].sort((a, b) => a - b);
  t.same(seqs, [...Array(last).keys()].map((i) => i + 1), `seq 1..${last} all arrived (${records.length - seqs.length} duplicates)`);
  t.equal(new Set(records.map((r) => r.epoch)).size, 1, 'one epoch');
  t.ok(records.every((r) => r.dropped === 0 && r.device_id === DEVICE), 'nothing dropped');
  t.equal(s.outbox?.dropped_total, 0);

  // Each interval's successes, over the records without duplicates, add up to every frame answered.
  const total = await until('records covering every frame', () => {
    const seen = new Map(records.map((r) => [r.seq, r]));
    const n = [...seen.values()].reduce((a, r) => a + (r.models.find((m) => m.model === 'tiny' && m.version === 1)?.success ?? 0), 0);
    return n >= sent ? n : undefined;
  });
  t.equal(total, sent, `the records count ${sent} successful frames`);

  const res = await fetch(`${url}/metrics`);
  t.equal(res.status, 200);
  const fams = parsePrometheusText(await res.text());
  const lbl = { model: 'tiny', version: '1' };
  t.equal(sampleValue(fams, 'nv_inference_request_success', 'nv_inference_request_success', lbl), sent, `nv_inference_request_success = ${sent}`);
  t.equal(sampleValue(fams, 'nv_inference_request_failure', 'nv_inference_request_failure', lbl), 0);
  t.equal(sampleValue(fams, 'nv_inference_count', 'nv_inference_count', lbl), sent);
  t.equal(sampleValue(fams, 'edge_agent_request_duration_us', 'edge_agent_request_duration_us_count', lbl), sent);
  t.equal(sampleValue(fams, 'edge_agent_streams_opened_total', 'edge_agent_streams_opened_total', {}), 2);
  t.equal(sampleValue(fams, 'edge_agent_fleet_connected', 'edge_agent_fleet_connected', {}), 1);
  t.equal(sampleValue(fams, 'edge_agent_outbox_dropped_total', 'edge_agent_outbox_dropped_total', {}), 0);

  // Second outage, and the agent is killed while offline: what it had stored is sent after the restart.
  await broker.stop('SIGTERM');
  const before = await until('records stored offline', async () => {
    const x = await status();
    return x.outbox && x.outbox.rows >= 3 && x.fleet?.connected === false ? x : undefined;
  });
  await agent.kill();
  const again = await agent.restart(t); // the broker is still down: starting never waits on it
  const url2 = await again.httpUrl();
  await until('the restarted agent storing more records', async () => {
    const x = (await (await fetch(`${url2}/v1/status`)).json()) as StatusReport;
    return x.outbox && x.outbox.rows >= before.outbox!.rows + 3 ? x : undefined;
  });
  await broker.start();
  await until('the restarted agent drained its outbox', async () => {
    const x = (await (await fetch(`${url2}/v1/status`)).json()) as StatusReport;
    return x.outbox?.rows === 0 && x.fleet?.connected ? x : undefined;
  });
  // An empty outbox means the broker acknowledged every record; the subscriber here may get the last ones a
  // little later.
  const expected = last + before.outbox!.rows + 3;
  const contiguous = (): boolean => {
    const seqs = new Set(records.map((r) => r.seq));
    const top = Math.max(...seqs);
    return top >= expected && seqs.size === top;
  };
  await until('the last records at the subscriber', () => (contiguous() ? true : undefined), 10_000).catch(() => undefined);
  const max = Math.max(...records.map((r) => r.seq));
  const all = [...new Set(records.map((r) => r.seq))].sort((a, b) => a - b);
  t.ok(max >= expected, `records of both processes arrived (seq up to ${max})`);
  t.same(all, [...Array(max).keys()].map((i) => i + 1), `seq 1..${max} all arrived across the kill (${records.length - all.length} duplicates)`);
  t.equal(new Set(records.map((r) => r.epoch)).size, 2, 'a new epoch after the restart');
  t.ok(records.every((r) => r.dropped === 0), 'nothing dropped');
});
