import t from 'tap';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { generateSigningKey, parsePrivateKey, signManifest } from '../agent/fleet/index.js';
import { FileDeploymentTarget } from './helpers/fleet-file-target.js';
import { modelBytes, scratchDir, startDevice, startFleetHarness } from './helpers/fleet.js';

t.test('every rejection case is reported as rejected, naming the problem, and changes nothing', { timeout: 120_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const target = new FileDeploymentTarget(scratchDir(t));
  target.seed('cls', 3, modelBytes(2000, 'ONNX', 1));
  const dev = await startDevice(t, h, { target, config: { artifacts: { allow_http: true, chunk_timeout_ms: 1500 } } });
  const good = await h.artifact(modelBytes(10_000, 'ONNX', 2), 1024);
  const other = await h.artifact(modelBytes(10_000, 'ONNX', 3), 1024);
  const before = JSON.stringify(target.modelVersions('cls'));
  const registryBefore = JSON.stringify((await dev.agent.fleetStore.registry.entries()).map((e) => [e.model, e.version, e.state, e.sha256]));

  const expectRejected = async (name: string, payload: Record<string, unknown> | string, reason: RegExp, id?: string): Promise<void> => {
    await h.publish('edge/devices/dev-1/deployments', payload);
    const depId = id ?? (typeof payload === 'string' ? undefined : String(payload.deployment_id));
    const msg = await h.manager.waitFor((m) => m.topic.startsWith('edge/devices/dev-1/deployments/') && m.topic.endsWith('/status')
      && (depId === undefined || m.topic.includes(`/${depId}/`)) && m.json?.state === 'rejected' && reason.test(String(m.json?.reason)), 30_000, name);
    t.pass(`${name}: ${String(msg.json?.reason)}`);
    t.equal(JSON.stringify(target.modelVersions('cls')), before, `${name}: repository unchanged`);
  };

  const signed = (o: Record<string, unknown> = {}, artifact = good): Record<string, unknown> => h.manifest({ model: 'cls', version: 4, artifact, ...o });

  const { signature: _sig, ...unsigned } = signed();
  await expectRejected('unsigned', unsigned, /^unsigned: no signature$/);

  const stranger = generateSigningKey();
  const foreign = signManifest({ model: 'cls', version: 4, sha256: good.sha256, size: good.size, source: 'mqtt', chunkSize: 1024 }, 'someone-else', parsePrivateKey(stranger.privateKeyPem));
  await expectRejected('unknown key', foreign, /^unknown key: key_id 'someone-else' is not in fleet.trusted_keys$/);

  const impostor = signManifest({ model: 'cls', version: 4, sha256: good.sha256, size: good.size, source: 'mqtt', chunkSize: 1024 }, h.keyId, parsePrivateKey(stranger.privateKeyPem));
  await expectRejected('signed with another key under a trusted key_id', impostor, /^bad signature: does not verify with key 'fleet-1'$/);

  const tampered = { ...signed(), version: 5 };
  await expectRejected('tampered after signing', tampered, /^bad signature/);

  await expectRejected('model name with a path', signed({ model: '../../etc/cron.d' }), /^model name "\.\.\/\.\.\/etc\/cron\.d" is not a plain name/);

  await expectRejected('downgrade', signed({ version: 2 }), /^downgrade: version 2 is older than the active version 3 and allow_downgrade is not set$/);

  await expectRejected('same version, other bytes', signed({ version: 3 }), /^version 3 of 'cls' is already on disk with sha256 [0-9a-f]{64}, not [0-9a-f]{64}$/);

  await expectRejected('not JSON', '{"deployment_id": "x1", oops', /^not JSON/, undefined);

  // Hash mismatch: the fleet serves other bytes of the right size under the manifest's sha256.
  const claimed = 'f'.repeat(64);
  h.chunkServer.add({ sha256: claimed, size: other.size, path: other.path, chunkSize: 1024 });
  await expectRejected('hash mismatch', signed({ sha256: claimed }, other), new RegExp(`^hash mismatch: artifact sha256 is ${other.sha256}, the manifest says ${claimed}$`));

  // Size mismatch over MQTT: the manifest claims more bytes than the fleet has, so a chunk comes back short.
  await expectRejected('size mismatch (mqtt chunk)', signed({ size: good.size + 1500 }), /^size mismatch: chunk 9 has 784 bytes, the manifest's size 11500 and chunk_size 1024 make it 1024$/);

  // Size mismatch over HTTP: the server's length differs from the manifest's.
  await expectRejected('size mismatch (http)', signed({ size: good.size - 1, source: h.http.urlFor(good.sha256), chunkSize: undefined }), /^size mismatch: server sends 10000 bytes, the manifest says 9999$/);

  t.equal(target.activations.length, 0, 'nothing was activated');
  t.equal(JSON.stringify((await dev.agent.fleetStore.registry.entries()).map((e) => [e.model, e.version, e.state, e.sha256])), registryBefore, 'registry unchanged');
  await dev.agent.idle();
  t.same(readdirSync(join(dev.dataDir, 'fleet', 'downloads')), [], 'no partial download left behind');
  t.same(target.listModels(), ['cls'], 'no folder created for a rejected model');

  // A downgrade that says so is carried out.
  const down = signed({ version: 2, allowDowngrade: true });
  await h.publish('edge/devices/dev-1/deployments', down);
  await h.manager.waitForState(String(down.deployment_id), 'active');
  t.equal(target.modelVersions('cls').active, 2);
});

t.test('http sources are refused unless allowed; commands with bad signatures get a failed result', { timeout: 60_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const dev = await startDevice(t, h, { config: { artifacts: { allow_http: false } } });
  const a = await h.artifact(modelBytes(5000, 'ONNX', 9));
  const m = h.manifest({ model: 'cls', version: 1, artifact: a, source: h.http.urlFor(a.sha256), chunkSize: undefined });
  await h.publish('edge/devices/dev-1/deployments', m);
  const st = await h.manager.waitForState(m.deployment_id, 'rejected');
  t.match(st.json?.reason, /^artifact.source "http:\/\/127\.0\.0\.1:\d+\/artifacts\/[0-9a-f]+" is not 'mqtt' or an https:\/\/ URL$/);

  const cmd = h.command({ commandId: 'c-1', command: 'get_state' });
  await h.publish('edge/devices/dev-1/commands/c-1', { ...cmd, args: { extra: 1 } }, false);
  const res = await h.manager.waitFor((x) => x.topic === 'edge/devices/dev-1/commands/c-1/result', 10_000, 'command result');
  t.match(res.json, { command_id: 'c-1', ok: false, error: /^rejected: bad signature/ });
  // Garbage on every subscribed topic is reported or ignored, never fatal.
  for (const topic of ['edge/devices/dev-1/deployments', 'edge/devices/dev-1/commands/x', 'edge/devices/dev-1/artifacts/' + a.sha256 + '/0']) {
    await h.publish(topic, Buffer.from([0xff, 0x00, 0x7b]), false);
  }
  await h.manager.waitFor((x) => x.topic === 'edge/devices/dev-1/commands/x/result' && x.json?.ok === false, 10_000, 'garbage command answered');
  const good = h.command({ commandId: 'c-2', command: 'get_state' });
  await h.publish('edge/devices/dev-1/commands/c-2', good, false);
  const ok = await h.manager.waitFor((x) => x.topic === 'edge/devices/dev-1/commands/c-2/result', 10_000, 'good command answered');
  t.equal(ok.json?.ok, true, 'still answering after garbage');
  t.ok(dev.link.connected);
});
