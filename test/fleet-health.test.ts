import t from 'tap';
import { existsSync } from 'node:fs';
import { FileDeploymentTarget } from './helpers/fleet-file-target.js';
import { modelBytes, scratchDir, startDevice, startFleetHarness } from './helpers/fleet.js';

/** Serves simulated frames on the active version until stopped (the traffic the health window judges). */
function traffic(target: FileDeploymentTarget, model: string): { stop: () => Promise<void>; served: { version: number; ok: boolean }[] } {
  const served: { version: number; ok: boolean }[] = [];
  let running = true;
  const loop = (async () => {
    while (running) {
      served.push(target.serve(model));
      await new Promise((r) => setTimeout(r, 5));
    }
  })();
  return { served, stop: async () => { running = false; await loop; } };
}

const health = { duration_s: 20, max_error_rate: 0.05, max_p99_factor: 2, min_requests: 20, poll_ms: 100 };

t.test('a version that fails its requests is rolled back automatically, with the figures', { timeout: 60_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const target = new FileDeploymentTarget(scratchDir(t));
  target.seed('cls', 1, modelBytes(3000, 'ONNX', 1));
  const dev = await startDevice(t, h, { target, config: { health } });
  const load = traffic(target, 'cls');
  t.teardown(load.stop);
  while (target.versionHealth('cls', 1).requests < 50) await new Promise((r) => setTimeout(r, 20));
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(modelBytes(5000, 'ERRORS', 2)) });
  await h.publish('edge/devices/dev-1/deployments', m);
  const rolled = await h.manager.waitForState(m.deployment_id, 'rolled_back');
  // The status can arrive before the next frame lands on v1; let one land before the traffic stops.
  for (let i = 0; i < 250 && load.served.at(-1)?.version !== 1; i++) await new Promise((r) => setTimeout(r, 20));
  await load.stop();
  t.match(rolled.json?.reason, /^rolled back to version 1: error rate 100\.0% \(\d+\/\d+\) exceeds 5\.0%$/);
  t.match(rolled.json?.details, { rolled_back_to: 1, health: { error_rate: 1, max_error_rate: 0.05, min_requests: 20 } });
  t.ok((rolled.json?.details as { health: { requests: number } }).health.requests >= 20, 'judged on at least min_requests');
  t.equal(rolled.json?.health, 'breached');
  t.same(target.modelVersions('cls').active, 1, 'previous version serves again');
  t.notOk(existsSync(target.versionPath('cls', 2)), 'bad version removed from disk');
  const reg = await dev.agent.fleetStore.registry.entries('cls');
  t.same(reg.map((e) => [e.version, e.state]), [[1, 'active'], [2, 'rolled_back']]);
  const history = await dev.agent.fleetStore.registry.activations('cls');
  t.same(history.map((a) => [a.version, a.cause]), [[2, 'deployment'], [1, 'rollback']]);
  const order = load.served.map((s) => s.version).filter((v, i, a) => i === 0 || a[i - 1] !== v);
  t.same(order, [1, 2, 1], 'traffic saw v1, then v2, then v1 again');
});

t.test('a version far slower than the previous one is rolled back on its p99', { timeout: 60_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const target = new FileDeploymentTarget(scratchDir(t));
  target.seed('cls', 1, modelBytes(3000, 'ONNX', 1));
  await startDevice(t, h, { target, config: { health } });
  const load = traffic(target, 'cls');
  t.teardown(load.stop);
  while (target.versionHealth('cls', 1).requests < 50) await new Promise((r) => setTimeout(r, 20));
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(modelBytes(5000, 'SLOW', 3)) });
  await h.publish('edge/devices/dev-1/deployments', m);
  const rolled = await h.manager.waitForState(m.deployment_id, 'rolled_back');
  t.match(rolled.json?.reason, /^rolled back to version 1: p99 latency 10000 us is 10\.00x the previous version's 1000 us \(limit 2x\)$/);
  t.match(rolled.json?.details, { health: { p99_us: 10000, previous_p99_us: 1000, p99_factor: 10, errors: 0 } });
  t.equal(target.modelVersions('cls').active, 1);
});

t.test('a healthy version passes its window; old versions beyond keep_versions are deleted', { timeout: 90_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const target = new FileDeploymentTarget(scratchDir(t));
  target.seed('cls', 1, modelBytes(3000, 'ONNX', 1));
  const dev = await startDevice(t, h, { target, config: { keep_versions: 2, health: { ...health, duration_s: 0.5 } } });
  const load = traffic(target, 'cls');
  t.teardown(load.stop);
  for (const v of [2, 3, 4]) {
    const m = h.manifest({ model: 'cls', version: v, artifact: await h.artifact(modelBytes(4000 + v, 'ONNX', v)) });
    await h.publish('edge/devices/dev-1/deployments', m);
    const passed = await h.manager.waitFor((x) => x.topic.endsWith(`/${m.deployment_id}/status`) && x.json?.health === 'passed', 30_000, `v${v} passes`);
    t.equal(passed.json?.state, 'active');
    t.match(passed.json?.details, { health: { errors: 0, error_rate: 0 } });
  }
  await dev.agent.idle();
  t.same(target.modelVersions('cls').onDisk, [3, 4], 'kept the active and the one before');
  const reg = await dev.agent.fleetStore.registry.entries('cls');
  t.same(reg.map((e) => [e.version, e.state]), [[1, 'deleted'], [2, 'deleted'], [3, 'installed'], [4, 'active']]);
  await load.stop();
  t.ok(load.served.every((s) => s.ok), 'every frame served');
  const order = load.served.map((s) => s.version).filter((v, i, a) => i === 0 || a[i - 1] !== v);
  t.same(order, [1, 2, 3, 4], 'each switch happened once, in order');
});

t.test('signed commands: rollback, activate, delete_version, get_state; a repeated command_id runs once', { timeout: 60_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const target = new FileDeploymentTarget(scratchDir(t));
  target.seed('cls', 1, modelBytes(3000, 'ONNX', 1));
  const dev = await startDevice(t, h, { target, config: { health: { ...health, duration_s: 30 } } });
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(modelBytes(4000, 'ONNX', 2)) });
  await h.publish('edge/devices/dev-1/deployments', m);
  await h.manager.waitForState(m.deployment_id, 'active');
  const send = async (id: string, command: 'rollback' | 'activate' | 'delete_version' | 'get_state', args: Record<string, unknown> = {}): Promise<Record<string, unknown>> => {
    await h.publish(`edge/devices/dev-1/commands/${id}`, h.command({ commandId: id, command, args, deviceId: 'dev-1' }), false);
    const r = await h.manager.waitFor((x) => x.topic === `edge/devices/dev-1/commands/${id}/result`, 10_000, `result of ${id}`);
    return r.json ?? {};
  };
  const rb = await send('c1', 'rollback', { model: 'cls' });
  t.match(rb, { command_id: 'c1', command: 'rollback', ok: true, result: { model: 'cls', from: 2, to: 1 } });
  t.equal(target.modelVersions('cls').active, 1);
  const st = await h.manager.waitForState(m.deployment_id, 'rolled_back');
  t.match(st.json?.reason, /^rolled back to version 1 by command c1$/);

  const activations = target.activations.length;
  const again = h.command({ commandId: 'c1', command: 'rollback', args: { model: 'cls' }, deviceId: 'dev-1' });
  await h.publish('edge/devices/dev-1/commands/c1', again, false);
  await h.manager.waitFor((x) => x.topic === 'edge/devices/dev-1/commands/c1/result' && h.manager.seen.filter((y) => y.topic === x.topic).length >= 2, 10_000, 'second result of c1');
  t.equal(target.activations.length, activations, 'a repeated command_id did not run again');

  t.match(await send('c2', 'delete_version', { model: 'cls', version: 1 }), { ok: false, error: "version 1 of 'cls' is serving; activate another version first" });
  t.match(await send('c3', 'activate', { model: 'cls', version: 2 }), { ok: true, result: { model: 'cls', version: 2, previous: 1, changed: true } });
  t.match(await send('c4', 'activate', { model: 'cls', version: 9 }), { ok: false, error: "version 9 of 'cls' is not on disk (on disk: 1, 2)" });
  t.match(await send('c5', 'delete_version', { model: 'cls', version: 1 }), { ok: true, result: { deleted: true } });
  t.same(target.modelVersions('cls').onDisk, [2]);
  t.match(await send('c6', 'rollback', { model: 'cls' }), { ok: false, error: "model 'cls' has no earlier version on disk to roll back to" });
  t.match(await send('c7', 'activate', { model: '../x', version: 1 }), { ok: false, error: 'args.model must be a plain model name, got "../x"' });
  const state = await send('c8', 'get_state');
  t.match(state, { ok: true, result: { device_id: 'dev-1', agent_version: '0.1.0-test', models: [{ name: 'cls', active_version: 2, versions_on_disk: [2] }], pending: [] } });
  t.ok(typeof (state.result as { uptime_s: number }).uptime_s === 'number');
  await dev.agent.idle();
});
