import t from 'tap';
import { join } from 'node:path';
import { FleetAgent, FleetTopics, MqttLink, TrustedKeys, generateSigningKey, parsePrivateKey, signCommand, type StatusSink } from '../agent/fleet/index.js';
import { CommandHandler, REJECTION_LIMITS } from '../agent/fleet/command-handler.js';
import { telemetrySchema } from '../agent/config/telemetry-schema.js';
import { Database, FleetStore } from '../agent/store/index.js';
import { SqliteOutbox } from '../agent/store/outbox-sqlite.js';
import { AgentMetrics } from '../agent/telemetry/agent-metrics.js';
import { OutboxStatusSink } from '../agent/telemetry/outbox-status-sink.js';
import { TelemetryService, outboxOptions } from '../agent/telemetry/telemetry-service.js';
import { FileDeploymentTarget } from './helpers/fleet-file-target.js';
import { deviceConfig, memoryLogger, modelBytes, scratchDir, startDevice, startFleetHarness, Watcher } from './helpers/fleet.js';

t.test('the journal keeps the first result stored for a command_id', async (t) => {
  const db = await Database.open(join(scratchDir(t), 'agent.db'));
  t.teardown(() => db.close());
  const { journal } = await FleetStore.open(db);
  const first = { command_id: 'c-1', ok: true, result: { model: 'cls', from: 3, to: 2 } };
  const second = { command_id: 'c-1', ok: true, result: { model: 'cls', from: 2, to: 3 } };
  t.same(await journal.recordCommand('c-1', 'rollback', first), first, 'a new id stores its result');
  t.same(await journal.recordCommand('c-1', 'rollback', second), first, 'a second result for the id gets the first back');
  t.same(await journal.commandResult('c-1'), first, 'and the stored result is unchanged');
});

t.test('one command_id delivered twice back to back runs once; both deliveries, a later one and one after a restart get the same result', { timeout: 60_000 }, async (t) => {
  const h = await startFleetHarness(t);
  // A slow activation keeps the first run going while the second delivery arrives.
  const target = new FileDeploymentTarget(scratchDir(t), { activationDelayMs: 400 });
  for (const v of [1, 2, 3]) target.seed('cls', v, modelBytes(2000, 'ONNX', v));
  const dataDir = scratchDir(t, 'edge-fleet-dev-');
  // The reported state goes out once the device's subscriptions are in place: commands sent before are lost.
  const states = (): number => h.manager.seen.filter((m) => m.topic === 'edge/devices/dev-1/state').length;
  const online = (after: number): Promise<unknown> => h.manager.waitFor(() => states() > after, 15_000, 'device subscribed');
  let seenStates = states();
  const dev = await startDevice(t, h, { target, dataDir });
  await online(seenStates);
  t.equal(target.modelVersions('cls').active, 3);

  const topic = 'edge/devices/dev-1/commands/c-dup';
  const resultTopic = `${topic}/result`;
  const results = (): Record<string, unknown>[] => h.manager.seen.filter((m) => m.topic === resultTopic).map((m) => m.json ?? {});
  const waitResults = (n: number, what: string): Promise<unknown> => h.manager.waitFor(() => results().length >= n, 15_000, what);
  const cmd = h.command({ commandId: 'c-dup', command: 'rollback', args: { model: 'cls' }, deviceId: 'dev-1' });
  await Promise.all([h.publish(topic, cmd, false), h.publish(topic, cmd, false)]);
  await waitResults(2, 'two results of c-dup');
  await dev.agent.idle();

  const [first, second] = results();
  t.match(first, { command_id: 'c-dup', command: 'rollback', ok: true, result: { model: 'cls', from: 3, to: 2 } }, 'the first run chose version 2');
  t.same(second, first, 'the second delivery got the same result');
  t.same(target.activations, [{ model: 'cls', version: 2 }], 'one activation');
  t.equal(target.modelVersions('cls').active, 2, 'the version the first run chose is serving');
  t.same(await dev.agent.fleetStore.journal.commandResult('c-dup'), first, 'the stored result is the one published');
  t.equal(dev.logger.lines.filter((l) => l.msg === 'fleet: command done' || l.msg === 'fleet: command failed').length, 1, 'the command ran once');

  await h.publish(topic, cmd, false);
  await waitResults(3, 'result of a later delivery');
  t.same(results()[2], first, 'a later delivery gets the stored result');
  t.equal(target.activations.length, 1, 'and runs nothing');

  await dev.stop();
  seenStates = states();
  const again = await startDevice(t, h, { target, dataDir });
  await online(seenStates);
  await h.publish(topic, cmd, false);
  await waitResults(4, 'result of a delivery after a restart');
  t.same(results()[3], first, 'after a restart, still the stored result');
  t.equal(target.activations.length, 1, 'still one activation');
  t.equal(target.modelVersions('cls').active, 2);
  t.equal(again.logger.lines.filter((l) => l.msg === 'fleet: command done').length, 0);
});

t.test('a flood of unsigned commands keeps the outbox within its bounds and telemetry flowing', { timeout: 90_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const telemetry = await Watcher.connect(t, h.broker.url, ['edge/devices/+/telemetry']);
  // The device as main.ts wires it: statuses and telemetry share one SQLite outbox, drained by the publisher.
  const dataDir = scratchDir(t, 'edge-fleet-dev-');
  const db = await Database.open(join(dataDir, 'edge-agent.db'));
  const telemetryConfig = telemetrySchema.parse({
    interval_s: 0.2, http: { enabled: false }, device: { nvidia_smi: false, tegrastats: false, thermal: false },
    outbox: { max_rows: 50, max_bytes: 16_384 },
  });
  const outbox = await SqliteOutbox.open(db, outboxOptions(telemetryConfig.outbox));
  const bounds = outbox.stats().bounds;
  let maxRows = 0;
  let maxBytes = 0;
  outbox.onEnqueued(() => {
    const s = outbox.stats();
    maxRows = Math.max(maxRows, s.rows);
    maxBytes = Math.max(maxBytes, s.bytes);
  });
  const metrics = new AgentMetrics();
  const config = deviceConfig(h);
  const logger = memoryLogger();
  const service = new TelemetryService({
    config: telemetryConfig, metrics, outbox, deviceId: 'dev-1', agentVersion: '0.1.0-test', topicPrefix: 'edge',
    statusSource: () => ({ agentVersion: '0.1.0-test', deviceId: 'dev-1', models: [], fleet: null }),
  });
  const target = new FileDeploymentTarget(join(dataDir, 'models'));
  target.seed('cls', 1, modelBytes(2000, 'ONNX', 1));
  const link = new MqttLink({ config, agentVersion: '0.1.0-test', logger });
  const agent = new FleetAgent({
    config, agentVersion: '0.1.0-test', dataDir, db, target, link, logger, statusSink: new OutboxStatusSink(outbox), databaseRecovered: false,
  });
  t.teardown(async () => {
    await agent.stop();
    await service.stop();
    await link.stop();
    await outbox.close();
    await db.close();
  });
  await service.start();
  await agent.start();
  link.start();
  service.attachMqtt(link.client);
  await h.manager.waitFor((m) => m.topic === 'edge/devices/dev-1/state', 15_000, 'device online');
  await telemetry.waitFor((m) => m.json?.device_id === 'dev-1', 15_000, 'telemetry before the flood');

  const FLOOD = 500;
  for (let i = 0; i < FLOOD; i += 1) h.manager.client.publish(`edge/devices/dev-1/commands/junk-${i}`, '{"not":"signed"}', { qos: 0 });
  // Delivered after the flood (same client, same subscription: in order), so its answer means the flood was handled.
  await h.publish('edge/devices/dev-1/commands/c-after', h.command({ commandId: 'c-after', command: 'get_state', deviceId: 'dev-1' }), false);
  const after = await h.manager.waitFor((m) => m.topic === 'edge/devices/dev-1/commands/c-after/result', 10_000, 'the signed command after the flood answered');
  t.equal(after.json?.ok, true, 'a verified command is still answered');
  const seqAfter = Math.max(...telemetry.seen.map((m) => Number(m.json?.seq ?? 0)));
  await telemetry.waitFor((m) => Number(m.json?.seq) > seqAfter + 2, 10_000, 'telemetry after the flood');
  t.pass('telemetry still flows after the flood');

  t.ok(maxRows <= bounds.maxRows, `outbox rows peaked at ${maxRows} (max_rows ${bounds.maxRows})`);
  t.ok(maxBytes <= bounds.maxBytes, `outbox bytes peaked at ${maxBytes} (max_bytes ${bounds.maxBytes})`);
  const rejections = h.manager.seen.filter((m) => /\/commands\/junk-\d+\/result$/.test(m.topic));
  t.ok(rejections.length >= 1, 'the first rejected payloads are answered, naming the problem');
  t.ok(rejections.length <= REJECTION_LIMITS.replyBurst + 3, `answers are rate-limited (${rejections.length} of ${FLOOD})`);
  // Which of the first payloads get the answers depends on arrival order across topics; each answer names its own.
  for (const r of rejections) t.match(r.json, { command_id: r.topic.split('/').at(-2), ok: false, error: /^rejected: unsigned/ });
  const lines = logger.lines.filter((l) => l.msg === 'fleet: command rejected');
  t.ok(lines.length >= 1 && lines.length <= 3, `log lines rate-limited (${lines.length})`);
  t.match(lines[0]?.obj, { command_id: 'junk-0', reason: /^unsigned/ });
});

t.test('rejected payloads: answers follow a token bucket on the monotonic clock, logs are rate-limited, a verified id is never answered with a rejection', async (t) => {
  const key = generateSigningKey();
  const privateKey = parsePrivateKey(key.privateKeyPem);
  const db = await Database.open(join(scratchDir(t), 'agent.db'));
  t.teardown(() => db.close());
  const store = await FleetStore.open(db);
  const target = new FileDeploymentTarget(scratchDir(t));
  target.seed('cls', 1, modelBytes(2000, 'ONNX', 1));
  const sent: { topic: string; payload: Record<string, unknown> }[] = [];
  const sink: StatusSink = {
    enqueue: (_kind, topic, payload) => {
      sent.push({ topic, payload: payload as Record<string, unknown> });
      return Promise.resolve();
    },
  };
  const logger = memoryLogger();
  let clock = 0;
  const handler = new CommandHandler({
    keys: new TrustedKeys({ 'fleet-1': key.publicKey }), deviceId: 'dev-1', store, target, logger, topics: new FleetTopics('edge', 'dev-1'), sink,
    withModelLock: (_model, fn) => fn(),
    stopHealthWatch: () => Promise.resolve(),
    report: () => Promise.resolve(),
    reportedState: () => Promise.resolve({ device_id: 'dev-1', agent_version: 't', ts: '', uptime_s: 0, models: [], pending: [] }),
    publishState: () => Promise.resolve(),
    monotonicNow: () => clock,
  });
  t.teardown(() => handler.close());
  const answered = (id: string): Record<string, unknown>[] => sent.filter((m) => m.topic === `edge/devices/dev-1/commands/${id}/result`).map((m) => m.payload);
  const junk = (id: string): Promise<void> => handler.handle(`edge/devices/dev-1/commands/${id}`, Buffer.from('{"not":"signed"}'));
  const { replyBurst, replyIntervalMs, logIntervalMs } = REJECTION_LIMITS;

  for (let i = 0; i < replyBurst + 3; i += 1) await junk(`r-${i}`);
  t.same(sent.map((m) => m.payload.command_id), Array.from({ length: replyBurst }, (_, i) => `r-${i}`), `the first ${replyBurst} are answered`);
  t.match(answered('r-0')[0], { command_id: 'r-0', ok: false, error: 'rejected: unsigned: no signature' });
  clock += replyIntervalMs - 1;
  await junk('r-a');
  t.same(answered('r-a'), [], 'no token yet');
  clock += 1;
  await junk('r-b');
  t.equal(answered('r-b').length, 1, 'one token after one interval');
  t.match(handler.rejections(), { total: replyBurst + 5, answered: replyBurst + 1, lastReason: 'unsigned: no signature', lastCommandId: 'r-b' });

  const lines = (): { level: string; msg: string; obj: object }[] => logger.lines.filter((l) => l.msg === 'fleet: command rejected');
  t.equal(logIntervalMs, replyIntervalMs, '(the log interval ends where the first token comes back)');
  t.equal(lines().length, 2, 'one log line per interval');
  t.match(lines()[0]!.obj, { command_id: 'r-0', reason: 'unsigned: no signature', not_logged: 0 });
  t.match(lines()[1]!.obj, { command_id: 'r-b', not_logged: replyBurst + 3, rejected_total: replyBurst + 5 }, 'the next line counts what was not logged');

  // A verified command, then a forged payload under its id once the bucket is full again.
  const good = signCommand({ commandId: 'v-1', command: 'activate', args: { model: 'cls', version: 1 }, deviceId: 'dev-1' }, 'fleet-1', privateKey);
  await handler.handle('edge/devices/dev-1/commands/v-1', Buffer.from(JSON.stringify(good)));
  t.match(answered('v-1'), [{ command_id: 'v-1', ok: true, result: { model: 'cls', version: 1, changed: false } }]);
  clock += replyIntervalMs * replyBurst;
  const forged = { ...good, args: { model: 'cls', version: 2 } };
  await handler.handle('edge/devices/dev-1/commands/v-1', Buffer.from(JSON.stringify(forged)));
  t.equal(answered('v-1').length, 1, 'the forged payload got no answer on the verified command\'s result topic');
  t.match(await store.journal.commandResult('v-1'), { ok: true, result: { version: 1 } }, 'the stored result stands');
  t.match(handler.rejections(), { total: replyBurst + 6, answered: replyBurst + 1, lastCommandId: 'v-1' });
  for (let i = 0; i <= replyBurst; i += 1) await junk(`r-c${i}`);
  t.same(Array.from({ length: replyBurst + 1 }, (_, i) => answered(`r-c${i}`).length), [...Array<number>(replyBurst).fill(1), 0], 'the forged payload used no token: a full burst is left');
});
