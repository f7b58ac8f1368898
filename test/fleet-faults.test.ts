import t from 'tap';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FileDeploymentTarget } from './helpers/fleet-file-target.js';
import { distinct, modelBytes, scratchDir, startDevice, startFleetHarness } from './helpers/fleet.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

t.test('broker killed and restarted mid-download: the download resumes, only the in-flight window is asked again', { timeout: 90_000 }, async (t) => {
  let hold = false;
  const h = await startFleetHarness(t, { chunkServer: { beforeSend: async () => { while (hold) await sleep(10); } } });
  const dev = await startDevice(t, h, { config: { artifacts: { window: 8, chunk_timeout_ms: 1500 } } });
  const bytes = modelBytes(200 * 1024 + 77, 'ONNX', 11);
  const artifact = await h.artifact(bytes, 1024);
  const total = Math.ceil(bytes.length / 1024);
  const m = h.manifest({ model: 'cls', version: 1, artifact });
  await h.publish('edge/devices/dev-1/deployments', m);
  await until('a third of the chunks durable', async () => (await dev.agent.fleetStore.chunks.receivedCount(artifact.sha256)) >= total / 3);
  hold = true;
  await h.broker.stop();
  const durable = await dev.agent.fleetStore.chunks.receivedChunks(artifact.sha256);
  t.ok(durable.size >= total / 3 && durable.size < total, `${durable.size}/${total} chunks durable when the broker died`);
  await sleep(500);
  await h.broker.start();
  hold = false;
  await h.manager.waitForState(m.deployment_id, 'active', 60_000);
  t.ok(readFileSync(dev.target.versionPath('cls', 1)).equals(bytes), 'installed bytes verified');
  for (const i of durable) {
    if (h.chunkServer.askedFor.get(`${artifact.sha256}:${i}`) !== 1) t.fail(`chunk ${i} was durable before the outage but asked for again`);
  }
  const stats = dev.agent.downloadStats.get(artifact.sha256) as { requestedChunks: number; rerequestedChunks: number };
  t.equal(stats.requestedChunks, total, 'every chunk asked for');
  t.ok(stats.rerequestedChunks >= 1 && stats.rerequestedChunks <= 2 * 8, `re-requested ${stats.rerequestedChunks} chunks (the window in flight, at most twice), not ${total}`);
  // The fleet side may see a request the agent sent into the dying connection once more (QoS 1 resend) or not at all.
  t.ok(h.chunkServer.rerequests <= 2 * 8, `fleet side saw ${h.chunkServer.rerequests} repeated chunk requests (agent counted ${stats.rerequestedChunks})`);
  t.same(distinct(h.manager.states(m.deployment_id)).filter((s) => s !== 'downloading'), ['accepted', 'verifying', 'loading', 'warming', 'validating', 'active']);
});

t.test('a corrupt database is set aside and the registry rebuilt from the repository; nothing is redeployed', { timeout: 90_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const dataDir = scratchDir(t);
  const target = new FileDeploymentTarget(join(dataDir, 'models'));
  const d1 = await startDevice(t, h, { dataDir, target });
  const a1 = await h.artifact(modelBytes(6000, 'ONNX', 41));
  const m1 = h.manifest({ model: 'det', version: 1, artifact: a1 });
  await h.publish('edge/devices/dev-1/deployments', m1);
  await h.manager.waitForState(m1.deployment_id, 'active');
  await d1.stop();
  writeFileSync(join(dataDir, 'agent.db'), Buffer.alloc(8192, 0x5a));
  const activationsBefore = target.activations.length;
  const d2 = await startDevice(t, h, { dataDir, target });
  const rebuilt = d2.logger.lines.find((l) => l.msg.includes('model registry rebuilt from the model repository'));
  t.ok(rebuilt, 'clear log line about the rebuild');
  t.same((await d2.agent.fleetStore.registry.entries()).map((e) => [e.model, e.version, e.state, e.sha256]), [['det', 1, 'active', a1.sha256]]);
  // The retained manifest arrives again: the journal is gone, but the version on disk is recognised by its hash.
  await h.manager.waitFor((x) => x.topic.endsWith(`/${m1.deployment_id}/status`) && x.json?.reason === 'version 1 is already active', 20_000, 'recognised as already active');
  t.equal(target.activations.length, activationsBefore, 'no re-activation');
  t.equal(h.chunkServer.rerequests + h.chunkServer.chunksSent, Math.ceil(a1.size / 1024), 'no re-download');
});
