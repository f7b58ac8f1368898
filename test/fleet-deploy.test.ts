import t from 'tap';
import { readFileSync } from 'node:fs';
import { FileDeploymentTarget } from './helpers/fleet-file-target.js';
import { distinct, modelBytes, scratchDir, startDevice, startFleetHarness } from './helpers/fleet.js';

t.test('a signed deployment over MQTT chunks reaches active, reporting each state, and serves the new version', { timeout: 90_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const target = new FileDeploymentTarget(scratchDir(t));
  target.seed('det', 1, modelBytes(3000, 'ONNX', 1));
  const dev = await startDevice(t, h, { target });
  const bytes = modelBytes(50_000 + 123, 'ONNX', 2);
  const artifact = await h.artifact(bytes, 4096);
  const m = h.manifest({ model: 'det', version: 2, artifact, chunkSize: 4096, config: { max_batch_size: 8 } });
  await h.publish('edge/devices/dev-1/deployments', m);
  const active = await h.manager.waitForState(m.deployment_id, 'active');
  t.equal(active.retain, false, 'live status delivery (retained flag only set for late subscribers)');
  t.same(distinct(h.manager.states(m.deployment_id)), ['accepted', 'downloading', 'verifying', 'loading', 'warming', 'validating', 'active']);
  t.same(active.json, { deployment_id: m.deployment_id, model: 'det', version: 2, state: 'active', health: 'skipped', ts: active.json?.ts });
  t.same(target.modelVersions('det'), { active: 2, onDisk: [1, 2], provider: 'file', variant: 'fp32' });
  t.ok(readFileSync(target.versionPath('det', 2)).equals(bytes), 'installed bytes are the artifact');
  t.same(JSON.parse(readFileSync(`${target.root}/det/config.json`, 'utf8')), { max_batch_size: 8 });
  t.equal(target.serve('det').version, 2);
  const stats = dev.agent.downloadStats.get(artifact.sha256);
  t.equal(stats?.kind, 'mqtt');
  t.equal(h.chunkServer.chunksSent, Math.ceil(bytes.length / 4096), 'each chunk sent once');
  const registry = await dev.agent.fleetStore.registry.entries('det');
  t.same(registry.map((e) => [e.version, e.state, e.sha256 === artifact.sha256]), [[1, 'installed', false], [2, 'active', true]]);
  const journal = await dev.agent.fleetStore.journal.events(m.deployment_id);
  t.same(journal.map((e) => e.state), ['accepted', 'downloading', 'verifying', 'accepted', 'loading', 'warming', 'validating', 'active'], 'journal holds every step (accepted again after install)');
  // Re-delivery of the retained manifest (a reconnect) is recognised and does nothing.
  await h.broker.stop();
  await h.broker.start();
  await h.manager.waitFor((m2) => m2.topic === 'edge/devices/dev-1/status' && m2.json?.state === 'online' && m2.at > active.at, 20_000, 'device back online');
  await new Promise((r) => setTimeout(r, 500));
  await dev.agent.idle();
  t.equal(target.activations.length, 1, 'activated exactly once');
  const state = await h.manager.waitFor((x) => x.topic === 'edge/devices/dev-1/state' && (x.json?.models as { active_version: number }[] | undefined)?.[0]?.active_version === 2
    && Array.isArray(x.json?.pending) && x.json.pending.length === 0, 5000, 'reported state: v2 active, nothing pending');
  t.match(state.json, { device_id: 'dev-1', agent_version: '0.1.0-test', models: [{ name: 'det', active_version: 2, versions_on_disk: [1, 2], provider: 'file', variant: 'fp32' }] });
});

t.test('an http source is downloaded with Range resume after the connection is cut', { timeout: 90_000 }, async (t) => {
  const h = await startFleetHarness(t, { httpBytesPerSecond: 400_000 });
  const dev = await startDevice(t, h);
  const bytes = modelBytes(3 * 1024 * 1024 + 17, 'ONNX', 3);
  const artifact = await h.artifact(bytes);
  const m = h.manifest({ model: 'seg', version: 1, artifact, source: h.http.urlFor(artifact.sha256), chunkSize: undefined });
  await h.publish('edge/devices/dev-1/deployments', m);
  await h.manager.waitForState(m.deployment_id, 'downloading');
  // Let about a third arrive, then drop the link.
  while (h.http.bytesSent < 1024 * 1024) await new Promise((r) => setTimeout(r, 50));
  h.http.cutConnections();
  await h.manager.waitForState(m.deployment_id, 'active', 60_000);
  t.equal(h.http.ranges[0], undefined, 'first request from the start');
  const resumed = h.http.ranges.slice(1).map((r) => Number(/^bytes=(\d+)-$/.exec(r ?? '')?.[1]));
  t.ok(resumed.length >= 1 && resumed[0]! > 0, `second request resumes at ${resumed[0]}`);
  t.ok(h.http.bytesSent < bytes.length * 1.5, `bytes sent ${h.http.bytesSent} is well under twice the size (no restart from zero)`);
  t.ok(readFileSync((dev.target as FileDeploymentTarget).versionPath('seg', 1)).equals(bytes));
  const stats = dev.agent.downloadStats.get(artifact.sha256);
  t.match(stats, { kind: 'http', resumedFrom: 0 });
  t.ok((stats as { rangeRequests: number }).rangeRequests >= 1);
});

t.test('a retained group deployment is picked up by a device that connects later; the device topic wins', { timeout: 90_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const a1 = await h.artifact(modelBytes(9000, 'ONNX', 4));
  const a2 = await h.artifact(modelBytes(7000, 'ONNX', 5));
  const a3 = await h.artifact(modelBytes(5000, 'ONNX', 6));
  const group = h.manifest({ model: 'cls', version: 5, artifact: a1 });
  await h.publish('edge/groups/clinic-a/deployments', group);
  const other = h.manifest({ model: 'ocr', version: 1, artifact: a3 });
  await h.publish('edge/groups/fleet-all/deployments', other);
  // dev-2 is pinned by its device topic to another version of the same model.
  const pinned = h.manifest({ model: 'cls', version: 3, artifact: a2 });
  await h.publish('edge/devices/dev-2/deployments', pinned);
  await new Promise((r) => setTimeout(r, 300));

  const d1 = await startDevice(t, h, { config: { device_id: 'dev-1', groups: ['clinic-a', 'fleet-all'] } });
  const d2 = await startDevice(t, h, { config: { device_id: 'dev-2', groups: ['clinic-a', 'fleet-all'] } });
  await h.manager.waitFor((m) => m.topic === `edge/devices/dev-1/deployments/${group.deployment_id}/status` && m.json?.state === 'active', 30_000, 'dev-1 group deployment active');
  await h.manager.waitFor((m) => m.topic === `edge/devices/dev-2/deployments/${pinned.deployment_id}/status` && m.json?.state === 'active', 30_000, 'dev-2 device deployment active');
  const overridden = await h.manager.waitFor((m) => m.topic === `edge/devices/dev-2/deployments/${group.deployment_id}/status`, 10_000, 'dev-2 reports the group deployment as overridden');
  t.equal(overridden.json?.state, 'rejected');
  t.match(overridden.json?.reason, new RegExp(`overridden: deployment ${pinned.deployment_id} on the device topic takes precedence`));
  for (const d of [d1, d2]) {
    await h.manager.waitFor((m) => m.topic === `edge/devices/${d === d1 ? 'dev-1' : 'dev-2'}/deployments/${other.deployment_id}/status` && m.json?.state === 'active', 30_000, 'other-model group deployment active');
  }
  t.same(d1.target.modelVersions('cls').active, 5);
  t.same(d2.target.modelVersions('cls').active, 3);
  t.same(d2.target.modelVersions('ocr').active, 1, 'a group deployment of another model still applies to the pinned device');
});

t.test('a newer deployment supersedes one still downloading', { timeout: 90_000 }, async (t) => {
  const gate: { open: boolean } = { open: false };
  const h = await startFleetHarness(t, { chunkServer: { beforeSend: async () => { while (!gate.open) await new Promise((r) => setTimeout(r, 20)); } } });
  const dev = await startDevice(t, h);
  const slow = await h.artifact(modelBytes(40_000, 'ONNX', 7));
  const fast = await h.artifact(modelBytes(20_000, 'ONNX', 8));
  const m1 = h.manifest({ model: 'cls', version: 1, artifact: slow });
  await h.publish('edge/devices/dev-1/deployments', m1);
  await h.manager.waitForState(m1.deployment_id, 'downloading');
  const m2 = h.manifest({ model: 'cls', version: 2, artifact: fast });
  await h.publish('edge/devices/dev-1/deployments', m2);
  const failed = await h.manager.waitForState(m1.deployment_id, 'failed');
  t.equal(failed.json?.reason, `superseded by deployment ${m2.deployment_id}`);
  gate.open = true;
  await h.manager.waitForState(m2.deployment_id, 'active');
  t.same(dev.target.modelVersions('cls'), { active: 2, onDisk: [2], provider: 'file', variant: 'fp32' });
});
