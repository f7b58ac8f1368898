import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { signPayload } from '../../agent/fleet/index.js';
import { AgentProcess, pumpFrames, tinyFrame, versionRuns } from '../helpers/agent-process.js';
import { modelBytes, startFleetHarness, type FleetHarness, type SeenMessage } from '../helpers/fleet.js';
import { copyDemoRepo, tempDir } from '../helpers/runtime.js';

// Malformed and oversized MQTT payloads on every topic the real agent (compiled CLI) subscribes to: it stays up,
// keeps serving a stream that runs through the whole test, and reports rejections where the contract says so.

const DEVICE = 'e2e-hostile';
const GROUP = 'hostile-group';
const DEVICE_TOPIC = `edge/devices/${DEVICE}/deployments`;
const GROUP_TOPIC = `edge/groups/${GROUP}/deployments`;
const MAX_CHUNK = 262_144;
/** The agent announces maximumPacketSize = max_chunk_bytes + 64 KiB (MQTT 5); bigger publishes never reach it. */
const OVERSIZE = 1024 * 1024;

/**
 * Holds the chunk server's answers for chosen chunks of one artifact until released. The server answers one
 * chunk at a time in the order asked, so chunks queued behind a held one wait too: a test that must get the
 * others holds the last chunk asked for.
 */
class ChunkGate {
  private readonly gates = new Map<string, { held: (index: number) => boolean; open: Promise<void>; release: () => void }>();

  readonly beforeSend = async (sha256: string, index: number): Promise<void> => {
    const g = this.gates.get(sha256);
    if (g && g.held(index)) await g.open;
  };

  block(sha256: string, held: (index: number) => boolean): void {
    let release!: () => void;
    const open = new Promise<void>((r) => { release = r; });
    this.gates.set(sha256, { held, open, release });
  }

  release(sha256: string): void {
    this.gates.get(sha256)?.release();
    this.gates.delete(sha256);
  }

  releaseAll(): void {
    for (const sha of [...this.gates.keys()]) this.release(sha);
  }
}

function invalidId(payload: string | Buffer): string {
  return `invalid-${createHash('sha256').update(payload).digest('hex').slice(0, 12)}`;
}

function statusOf(h: FleetHarness, id: string, state: string): Promise<SeenMessage> {
  return h.manager.waitFor((m) => m.topic === `edge/devices/${DEVICE}/deployments/${id}/status` && m.json?.state === state, 20_000, `${id} → ${state}`);
}

/** The agent's reply topic for chunk `index` of an artifact, once the agent asked for that chunk. */
async function replyTopicFor(h: FleetHarness, sha256: string, index: number): Promise<string> {
  const req = await h.manager.waitFor(
    (m) => m.topic === `edge/artifacts/${sha256}/request` && Array.isArray(m.json?.chunks) && (m.json.chunks as unknown[]).includes(index),
    20_000, `the agent's request for chunk ${index} of ${sha256.slice(0, 12)}`,
  );
  const replyTo = `edge/devices/${DEVICE}/artifacts/${sha256}`;
  if (req.json?.reply_to !== replyTo) throw new Error(`the agent asked for replies on ${String(req.json?.reply_to)}, not ${replyTo}`);
  return `${replyTo}/${index}`;
}

function resultOf(h: FleetHarness, commandId: string): Promise<SeenMessage> {
  return h.manager.waitFor((m) => m.topic === `edge/devices/${DEVICE}/commands/${commandId}/result`, 20_000, `result of ${commandId}`);
}

t.test('hostile payloads on every subscribed topic: the agent stays up, serves on, and reports rejections', async (t) => {
  const gate = new ChunkGate();
  t.teardown(() => gate.releaseAll());
  const h = await startFleetHarness(t, { chunkServer: { beforeSend: gate.beforeSend } });
  const repo = copyDemoRepo(t, ['tiny']);
  const agent = await AgentProcess.start(t, {
    dir: tempDir(t, 'edge-e2e-hostile-'),
    repo,
    fleet: {
      broker_url: h.broker.url,
      device_id: DEVICE,
      groups: [GROUP],
      trusted_keys: { [h.keyId]: h.publicKey },
      settle_ms: 50,
      state_interval_s: 0,
      reconnect: { min_ms: 200, max_ms: 1000 },
      artifacts: { chunk_timeout_ms: 1000, window: 8, max_chunk_bytes: MAX_CHUNK },
      health: { duration_s: 0 },
      // Every rejection below is answered, so each case's reason can be checked (the default answers 5, then 1/10 s).
      rejected_commands: { reply_burst: 1000 },
    },
  });
  await h.manager.waitFor((m) => m.topic === `edge/devices/${DEVICE}/status` && m.json?.state === 'online', 20_000, 'presence online');
  const frames = pumpFrames(await agent.client(t).openStream({ model: 'tiny' }), () => ({ x: tinyFrame() }), 2);
  t.teardown(() => frames.stop());
  await frames.waitForMore(5);
  const tinyBytes = readFileSync(join(repo, 'tiny', '1', 'model.onnx'));
  const signed = await h.artifact(tinyBytes, 8192);
  const fakeSignature = randomBytes(64).toString('base64');
  const deep = (n: number): string => `${'['.repeat(n)}${']'.repeat(n)}`;

  await t.test('deployment topics (device and group): every malformed payload is rejected, naming the problem', async (t) => {
    // `tag` keeps the device and group variants of a case distinct (a rejection already reported is not repeated).
    const cases: { name: string; payload: (tag: string) => string | Buffer; id?: (tag: string) => string; reason: RegExp }[] = [
      { name: 'not JSON', payload: (tag) => `not json { ${tag}`, reason: /^not JSON: / },
      { name: 'random bytes', payload: (tag) => Buffer.concat([Buffer.from([0xff, 0xfe, 0x00]), randomBytes(4096), Buffer.from(tag)]), reason: /^not JSON: / },
      { name: 'a JSON array', payload: (tag) => `[1,2,"${tag}"]`, reason: /^not a JSON object$/ },
      { name: 'a JSON string', payload: (tag) => `"${tag}"`, reason: /^not a JSON object$/ },
      { name: 'an empty object', payload: (tag) => `{}${tag === 'g' ? ' ' : ''}`, reason: /^unsigned: no signature$/ },
      { name: 'a deployment_id that is not a topic level', payload: (tag) => JSON.stringify({ deployment_id: `../+/#/${tag}`, model: 'tiny', version: 9 }), reason: /^unsigned: no signature$/ },
      {
        name: 'an unknown key', id: (tag) => `unknown-key-${tag}`, reason: /^unknown key: key_id 'nobody' is not in fleet\.trusted_keys$/,
        payload: (tag) => JSON.stringify({ ...h.manifest({ model: 'tiny', version: 5, artifact: signed, chunkSize: 8192, deploymentId: `unknown-key-${tag}` }), key_id: 'nobody' }),
      },
      {
        name: 'a tampered manifest', id: (tag) => `tampered-${tag}`, reason: /^bad signature: does not verify with key 'fleet-1'$/,
        payload: (tag) => JSON.stringify({ ...h.manifest({ model: 'tiny', version: 5, artifact: signed, chunkSize: 8192, deploymentId: `tampered-${tag}` }), version: 6 }),
      },
      {
        name: 'JSON nested 50000 deep', id: (tag) => `deep-${tag}`, reason: /^bad signature: /,
        payload: (tag) => `{"deployment_id":"deep-${tag}","key_id":"fleet-1","signature":"${fakeSignature}","x":${deep(50_000)}}`,
      },
      { name: '200 KiB of JSON', payload: (tag) => JSON.stringify({ pad: 'x'.repeat(200 * 1024), tag }), reason: /^unsigned: no signature$/ },
      {
        name: 'a signed manifest with a path for a model name', id: (tag) => `path-${tag}`, reason: /^model name "\.\.\/\.\.\/etc" is not a plain name/,
        payload: (tag) => JSON.stringify(h.manifest({ model: '../../etc', version: 5, artifact: signed, chunkSize: 8192, deploymentId: `path-${tag}` })),
      },
      {
        name: 'a signed manifest whose chunk size is over the limit', id: (tag) => `chunk-${tag}`, reason: /^artifact\.chunk_size 1048576 exceeds fleet\.artifacts\.max_chunk_bytes \(262144\)$/,
        payload: (tag) => JSON.stringify(h.manifest({ model: 'tiny', version: 5, artifact: signed, chunkSize: 1024 * 1024, deploymentId: `chunk-${tag}` })),
      },
      {
        name: 'a signed manifest with a version past 2^53', id: (tag) => `huge-version-${tag}`, reason: /^invalid manifest: version: /,
        payload: (tag) => JSON.stringify(signPayload({ deployment_id: `huge-version-${tag}`, model: 'tiny', version: 2 ** 60, artifact: { sha256: signed.sha256, size: signed.size, source: 'mqtt', chunk_size: 8192 }, created_at: 'now' }, h.keyId, h.privateKey)),
      },
    ];
    for (const c of cases) {
      for (const [tag, topic] of [['d', DEVICE_TOPIC], ['g', GROUP_TOPIC]] as const) {
        const payload = c.payload(tag);
        const id = c.id?.(tag) ?? invalidId(payload);
        await h.publish(topic, Buffer.isBuffer(payload) ? payload : Buffer.from(payload));
        const s = await statusOf(h, id, 'rejected');
        t.match(s.json?.reason, c.reason, `${c.name} on the ${tag === 'd' ? 'device' : 'group'} topic: ${String(s.json?.reason).slice(0, 100)}`);
      }
    }

    // Over the packet size the agent announced: the broker never delivers it; the next payload is handled.
    const oversize = JSON.stringify({ deployment_id: 'oversize', pad: 'x'.repeat(OVERSIZE) });
    await h.publish(DEVICE_TOPIC, oversize);
    const sentinel = '{"sentinel":true}';
    await h.publish(DEVICE_TOPIC, sentinel);
    await statusOf(h, invalidId(sentinel), 'rejected');
    t.notOk(h.manager.seen.some((m) => m.topic.includes('/deployments/oversize/')), `a ${OVERSIZE}-byte payload never reached the agent`);
    t.ok(agent.alive, 'the agent is running');
    t.ok(frames.results.every((r) => r.status === 'OK'), `${frames.results.length} frames OK so far`);
  });

  await t.test('command topic: malformed commands get a failed result naming the problem; unusable ids are ignored', async (t) => {
    const other = h.command({ command: 'get_state', deviceId: 'someone-else' });
    const renamed = h.command({ command: 'get_state', commandId: 'signed-as-a' });
    const cases: { id: string; payload: string | Buffer; error: RegExp }[] = [
      { id: 'c-garbage', payload: 'rm -rf /', error: /^rejected: not JSON: / },
      { id: 'c-binary', payload: randomBytes(2048), error: /^rejected: not JSON: / },
      { id: 'c-array', payload: '[]', error: /^rejected: not a JSON object$/ },
      { id: 'c-unsigned', payload: '{"command":"rollback","args":{"model":"tiny"}}', error: /^rejected: unsigned: no signature$/ },
      { id: 'c-deep', payload: `{"command_id":"c-deep","key_id":"fleet-1","signature":"${fakeSignature}","args":${deep(50_000)}}`, error: /^rejected: bad signature/ },
      { id: 'c-id-rewritten', payload: JSON.stringify({ ...other, command_id: 'c-id-rewritten' }), error: /^rejected: bad signature/ },
      { id: 'c-replayed', payload: JSON.stringify(renamed), error: /^rejected: invalid manifest|^rejected: command_id 'signed-as-a' does not match the topic's 'c-replayed'$/ },
      { id: 'c-for-other', payload: JSON.stringify(h.command({ command: 'get_state', deviceId: 'someone-else', commandId: 'c-for-other' })), error: /^rejected: command is for device 'someone-else', not 'e2e-hostile'$/ },
      { id: 'c-unknown', payload: JSON.stringify(signPayload({ command_id: 'c-unknown', command: 'format_disk', args: {} }, h.keyId, h.privateKey)), error: /^rejected: invalid command: command: / },
      { id: 'c-bad-model', payload: JSON.stringify(h.command({ command: 'rollback', commandId: 'c-bad-model', args: { model: '../../etc' } })), error: /^args\.model must be a plain model name/ },
    ];
    for (const c of cases) {
      await h.publish(`edge/devices/${DEVICE}/commands/${c.id}`, Buffer.isBuffer(c.payload) ? c.payload : Buffer.from(c.payload), false);
      const r = await resultOf(h, c.id);
      t.match(r.json, { command_id: c.id, ok: false }, `${c.id}: failed result`);
      t.match(r.json?.error, c.error, `${c.id}: ${String(r.json?.error).slice(0, 100)}`);
    }
    // Ignored: an empty payload, ids that cannot be a topic level, a payload over the packet size.
    await h.publish(`edge/devices/${DEVICE}/commands/c-empty`, '', false);
    await h.publish(`edge/devices/${DEVICE}/commands/${'x'.repeat(200)}`, JSON.stringify(h.command({ command: 'get_state' })), false);
    await h.publish(`edge/devices/${DEVICE}/commands/c oversize`, 'x', false);
    await h.publish(`edge/devices/${DEVICE}/commands/c-oversize`, Buffer.alloc(OVERSIZE, 0x20), false);
    // A burst of garbage: each gets its result, in order, and serving goes on.
    const burst = Array.from({ length: 60 }, (_, i) => `c-burst-${i}`);
    await Promise.all(burst.map((id) => h.manager.client.publishAsync(`edge/devices/${DEVICE}/commands/${id}`, `garbage ${id}`, { qos: 1 })));
    const good = h.command({ command: 'get_state', deviceId: DEVICE });
    await h.publish(`edge/devices/${DEVICE}/commands/${good.command_id}`, JSON.stringify(good), false);
    const ok = await resultOf(h, good.command_id);
    t.match(ok.json, { ok: true, command: 'get_state', result: { device_id: DEVICE, models: [{ name: 'tiny', active_version: 1 }] } }, 'a good command after all that works');
    for (const id of burst) await resultOf(h, id);
    t.pass(`all ${burst.length} burst commands answered`);
    const ignored = ['c-empty', 'x'.repeat(200), 'c oversize', 'c-oversize'];
    t.same(h.manager.seen.filter((m) => ignored.some((id) => m.topic === `edge/devices/${DEVICE}/commands/${id}/result`)).map((m) => m.topic), [], 'ignored commands got no result');
    const status = await (await fetch(`${await agent.httpUrl()}/v1/status`)).json() as { fleet: { commands_rejected?: { total: number; last_reason: string } } };
    t.ok((status.fleet.commands_rejected?.total ?? 0) >= cases.length - 1 + burst.length, `/v1/status counts the rejected payloads (${status.fleet.commands_rejected?.total})`);
    t.match(status.fleet.commands_rejected?.last_reason, /not JSON/, 'and names the last reason');
    t.ok(agent.alive, 'the agent is running');
  });

  await t.test('artifact chunk replies: garbage never corrupts a download; a wrong length or wrong bytes reject it', async (t) => {
    // The device topic still holds the last malformed manifest (retained): a group deployment must go through.
    gate.block(signed.sha256, (i) => i >= 4);
    const good = h.manifest({ model: 'tiny', version: 2, artifact: signed, chunkSize: 8192 });
    await h.publish(GROUP_TOPIC, good);
    await h.manager.waitFor((m) => m.topic.endsWith(`/${good.deployment_id}/status`) && m.json?.state === 'downloading' && Number(m.json.progress) > 0, 20_000, 'download started');
    const replyTo = `edge/devices/${DEVICE}/artifacts/${signed.sha256}`;
    for (const [suffix, body] of [
      ['abc', 'not an index'], ['-1', 'x'], ['007', 'leading zeros'], ['99999', 'beyond the artifact'], ['123456789012345', 'too many digits'],
      ['1/extra', 'a level too deep'], ['0', randomBytes(8192)], ['5', Buffer.alloc(OVERSIZE)],
    ] as const) {
      await h.manager.client.publishAsync(`${replyTo}/${suffix}`, body, { qos: 1 });
    }
    gate.release(signed.sha256);
    const active = await h.manager.waitFor((m) => m.topic.endsWith(`/${good.deployment_id}/status`) && (m.json?.state === 'active' || m.json?.state === 'rejected' || m.json?.state === 'failed'), 30_000, 'deployment finished');
    t.equal(active.json?.state, 'active', `the download ignored the garbage and verified (${String(active.json?.reason ?? '')})`);
    // An unsigned payload reusing the id of the deployment that just succeeded changes nothing and reports nothing.
    await h.publish(DEVICE_TOPIC, JSON.stringify({ deployment_id: good.deployment_id, model: 'tiny', version: 1 }));
    const sentinel = '{"sentinel":2}';
    await h.publish(GROUP_TOPIC, sentinel);
    await statusOf(h, invalidId(sentinel), 'rejected');
    t.same(h.manager.statuses(good.deployment_id).filter((s) => s.json?.state !== 'active' && s.at > active.at).map((s) => s.json?.state), [], 'no status for the reused id');
    await h.publish(GROUP_TOPIC, good); // the group topic is the good manifest again (redelivery: nothing happens)

    // A forged reply is published only once the agent asked for that chunk: the agent asks only after the broker
    // acknowledged its subscription to the replies (a reply published before that is dropped, and the agent then
    // waits forever for the held chunk). The real chunk is held until the verdict: the forged one is the only
    // answer for that index.
    const wrongLength = await h.artifact(modelBytes(40_000, 'ONNX', 3), 8192);
    gate.block(wrongLength.sha256, (i) => i === 2);
    const m3 = h.manifest({ model: 'tiny', version: 3, artifact: wrongLength, chunkSize: 8192 });
    await h.publish(DEVICE_TOPIC, m3);
    await h.manager.client.publishAsync(await replyTopicFor(h, wrongLength.sha256, 2), randomBytes(100), { qos: 1 });
    const r3 = await statusOf(h, m3.deployment_id, 'rejected');
    gate.release(wrongLength.sha256);
    t.match(r3.json?.reason, /^size mismatch: chunk 2 has 100 bytes, the manifest's size 40000 and chunk_size 8192 make it 8192$/);

    // Right length, one byte wrong, in the last chunk (5 chunks; the server answers 0-3, then holds 4).
    const wrongBytesContent = modelBytes(40_000, 'ONNX', 4);
    const wrongBytes = await h.artifact(wrongBytesContent, 8192);
    gate.block(wrongBytes.sha256, (i) => i === 4);
    const m4 = h.manifest({ model: 'tiny', version: 4, artifact: wrongBytes, chunkSize: 8192 });
    await h.publish(DEVICE_TOPIC, m4);
    const forged = Buffer.from(wrongBytesContent.subarray(4 * 8192));
    forged[100] = (forged[100] as number) ^ 0xff;
    await h.manager.client.publishAsync(await replyTopicFor(h, wrongBytes.sha256, 4), forged, { qos: 1 });
    const r4 = await statusOf(h, m4.deployment_id, 'rejected');
    gate.release(wrongBytes.sha256);
    // The hash named is that of the real chunks 0-3 followed by the forged 4: exactly what was received.
    const assembled = createHash('sha256').update(wrongBytesContent.subarray(0, 4 * 8192)).update(forged).digest('hex');
    t.equal(r4.json?.reason, `hash mismatch: artifact sha256 is ${assembled}, the manifest says ${wrongBytes.sha256}`);
    t.notOk(agent.logs().some((l) => l.msg === 'model ready' && (l.version === 3 || l.version === 4)), 'neither bad artifact was loaded');
  });

  await frames.waitForMore(5);
  await frames.stop();
  t.ok(agent.alive, 'the agent process is still running');
  t.equal(frames.error(), undefined, 'the stream ran through the whole test');
  t.same(frames.results.filter((r) => r.status !== 'OK').map((r) => r.message), [], `all ${frames.results.length} frames OK`);
  t.same(versionRuns(frames.results.map((r) => r.version)), [1, 2], 'version 1, then the good deployment');
  t.equal(await agent.client(t).checkHealth(), 'SERVING');
  t.notOk(agent.logs().some((l) => l.level >= 50 && /crashed|unhandled/i.test(l.msg)), 'no crash logged');
});
