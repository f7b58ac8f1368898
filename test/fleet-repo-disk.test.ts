import t from 'tap';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, statfsSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { RuntimeDeploymentTarget } from '../agent/fleet/index.js';
import { ActiveVersions, ModelRepository } from '../agent/models/index.js';
import type { InferenceRuntime, RuntimeObserver } from '../agent/runtime/index.js';
import { distinct, scratchDir, startDevice, startFleetHarness, type FleetHarness, type TestDevice } from './helpers/fleet.js';
import { classifier, HEAVY, LIGHT, MEDIUM, SIZE } from './helpers/fleet-runtime-device.js';
import { tempDir, startRuntime } from './helpers/runtime.js';
import { CAN_MOUNT, smallDisk, tmpfsDisk } from './helpers/small-disk.js';

type Teardown = { teardown(fn: () => void | Promise<void>): void };

/**
 * A fleet device whose model repository is `root` (on a small filesystem of its own) while its data dir, where
 * artifacts are downloaded, is on the ordinary disk: installing crosses filesystems and copies, as on a device.
 * `cls` version 1 serves.
 */
async function deviceWithRepository(t: Teardown, root: string): Promise<{ h: FleetHarness; dev: TestDevice; runtime: InferenceRuntime; target: RuntimeDeploymentTarget }> {
  const h = await startFleetHarness(t);
  mkdirSync(join(root, 'cls', '1'), { recursive: true });
  writeFileSync(join(root, 'cls', '1', 'model.onnx'), classifier(LIGHT));
  writeFileSync(join(root, 'cls', 'config.yaml'), 'max_batch_size: 8\n');
  let target: RuntimeDeploymentTarget | undefined;
  const observer: RuntimeObserver = { onRequest: (o) => target?.observer.onRequest?.(o) };
  const runtime = await startRuntime(t, root, { execution: 'inline' }, observer);
  target = new RuntimeDeploymentTarget(new ModelRepository(root), runtime, new ActiveVersions(join(scratchDir(t), 'active-versions.json')));
  const dev = await startDevice(t, h, { target });
  return { h, dev, runtime, target };
}

async function servedVersion(runtime: InferenceRuntime): Promise<number> {
  const image = new Float32Array(3 * SIZE * SIZE).map((_, i) => Math.sin(i));
  return (await runtime.submit('cls', undefined, { inputs: { image: { dtype: 'float32', shape: [1, 3, SIZE, SIZE], data: image } } })).version;
}

function freeBytes(dir: string): number {
  const fs = statfsSync(dir);
  return fs.bavail * fs.bsize;
}

function claims(dev: TestDevice): string[] {
  return readdirSync(join(dev.dataDir, 'fleet', 'downloads')).filter((f) => f.endsWith('.claim'));
}

/** An ext2 filesystem of `bytes` in a loop-mounted image (no blocks reserved for root), unmounted at teardown. */
function ext2Disk(t: Teardown, bytes: number): string {
  const dir = tempDir(t, 'edge-ext2-');
  const image = join(dir, 'disk.img');
  closeSync(openSync(image, 'w'));
  truncateSync(image, bytes);
  execFileSync('mkfs.ext2', ['-q', '-F', '-m', '0', '-b', '4096', image], { stdio: 'pipe' });
  const mount = join(dir, 'disk');
  mkdirSync(mount);
  execFileSync('mount', ['-o', 'loop', image, mount], { stdio: 'pipe' });
  t.teardown(() => {
    execFileSync('umount', [mount], { stdio: 'pipe' });
  });
  return mount;
}

/** Whether this machine can loop-mount an ext2 image (root, loop devices, e2fsprogs); probed once. */
const CAN_LOOP_MOUNT = ((): boolean => {
  if (!CAN_MOUNT) return false;
  const probe: (() => void)[] = [];
  try {
    ext2Disk({ teardown: (fn) => { probe.push(fn as () => void); } }, 1024 * 1024);
    return true;
  } catch {
    return false;
  } finally {
    for (const fn of probe.reverse()) {
      try {
        fn();
      } catch {
        // Best effort: the probe's temp folder.
      }
    }
  }
})();

t.test('a version that does not fit the repository disk is refused before copying; the repository is unchanged', { skip: CAN_MOUNT ? false : 'mounting a tmpfs needs root', timeout: 90_000 }, async (t) => {
  const root = join(smallDisk(t, '1m'), 'models');
  const { h, dev, runtime, target } = await deviceWithRepository(t, root);
  t.equal(await servedVersion(runtime), 1);
  const before = readdirSync(join(root, 'cls')).sort();
  const free = freeBytes(root);
  const heavy = classifier(HEAVY);
  t.ok(heavy.length > free, `the model (${heavy.length} bytes) is larger than the repository disk's ${free} free bytes`);

  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(heavy, 65536), chunkSize: 65536, config: { max_batch_size: 4 } });
  await h.publish('edge/devices/dev-1/deployments', m);
  const failed = await h.manager.waitForState(m.deployment_id, 'failed', 60_000);
  const configBytes = 'max_batch_size: 4\n'.length;
  const needed = Math.ceil(heavy.length / 4096) * 4096 + 4096;
  t.equal(failed.json?.reason,
    `disk space: version 2 of 'cls' needs ${needed} bytes (model.onnx ${heavy.length}, fleet-config.yaml ${configBytes}) but the model repository at ${root} has ${free} bytes free; free space there and deploy again`,
    'the reason names the repository, the bytes needed and the bytes free');
  t.same(distinct(h.manager.states(m.deployment_id)), ['accepted', 'downloading', 'verifying', 'failed']);
  t.same(readdirSync(join(root, 'cls')).sort(), before, 'no version folder, no temp folder');
  t.equal(freeBytes(root), free, 'not a byte of the repository disk used');
  t.match(target.modelVersions('cls'), { active: 1, onDisk: [1] });
  t.equal(await servedVersion(runtime), 1, 'version 1 still serves');
  t.equal((await dev.agent.fleetStore.journal.get(m.deployment_id))?.state, 'failed', 'the journal says failed');
  t.equal(await dev.agent.fleetStore.registry.entry('cls', 2), undefined, 'version 2 never reached the registry');
  t.same(claims(dev), [], "the deployment's claim on the download is gone");

  // The repository is still usable: a version that fits goes through.
  const ok = h.manifest({ model: 'cls', version: 3, artifact: await h.artifact(classifier(MEDIUM), 8192), chunkSize: 8192, config: { max_batch_size: 4 } });
  await h.publish('edge/devices/dev-1/deployments', ok);
  await h.manager.waitForState(ok.deployment_id, 'active', 60_000);
  t.match(target.modelVersions('cls'), { active: 3, onDisk: [1, 3] });
  t.equal(await servedVersion(runtime), 3);
});

t.test('a repository disk that fills while the version is written (no inodes left) keeps no partial version', { skip: CAN_MOUNT ? false : 'mounting a tmpfs needs root', timeout: 90_000 }, async (t) => {
  const disk = tmpfsDisk(t, 'size=4m,nr_inodes=64');
  const root = join(disk, 'models');
  const { h, dev, runtime, target } = await deviceWithRepository(t, root);
  const before = readdirSync(join(root, 'cls')).sort();
  // Use up the inodes, then give back two: enough for the temp version folder and its model.onnx (bytes are
  // plenty, so the free-space check passes), none for fleet-config.yaml.
  const filler = join(disk, 'filler');
  mkdirSync(filler);
  let n = 0;
  let full: unknown;
  try {
    for (; n < 10_000; n++) writeFileSync(join(filler, String(n)), '');
  } catch (err) {
    full = err;
  }
  t.equal((full as NodeJS.ErrnoException | undefined)?.code, 'ENOSPC', `inodes used up after ${n} files`);
  rmSync(join(filler, String(n - 1)));
  rmSync(join(filler, String(n - 2)));
  const free = freeBytes(root);
  const model = classifier(MEDIUM);

  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(model, 8192), chunkSize: 8192, config: { max_batch_size: 4 } });
  await h.publish('edge/devices/dev-1/deployments', m);
  const failed = await h.manager.waitForState(m.deployment_id, 'failed', 60_000);
  t.match(String(failed.json?.reason), `disk full while installing version 2 of 'cls' in the model repository at ${root} (ENOSPC`, 'the reason names the repository');
  t.match(String(failed.json?.reason), `open '${join(root, 'cls', '.installing-2', 'fleet-config.yaml')}'`, 'it failed at the config, after model.onnx was copied');
  t.match(String(failed.json?.reason), 'the partial version was removed');
  t.same(distinct(h.manager.states(m.deployment_id)), ['accepted', 'downloading', 'verifying', 'failed']);
  t.same(readdirSync(join(root, 'cls')).sort(), before, 'no version folder, no temp folder');
  t.equal(freeBytes(root), free, 'the copied model file was removed');
  t.match(target.modelVersions('cls'), { active: 1, onDisk: [1] });
  t.equal(await servedVersion(runtime), 1, 'version 1 still serves');
  t.equal(await dev.agent.fleetStore.registry.entry('cls', 2), undefined);
  t.same(claims(dev), []);
});

t.test('a copy that passes the free-space check but runs out of blocks midway keeps no partial version', { skip: CAN_LOOP_MOUNT ? false : 'needs root, loop devices and mkfs.ext2', timeout: 90_000 }, async (t) => {
  const root = join(ext2Disk(t, 8 * 1024 * 1024), 'models');
  const { h, dev, runtime, target } = await deviceWithRepository(t, root);
  const before = readdirSync(join(root, 'cls')).sort();
  const free = freeBytes(root);
  // ext2 gives the temp version folder a block, and a file this large needs indirect blocks beside its data: the
  // data alone fits what statfs reports, the file does not, so the copy fails once it has written most of it.
  const size = free - 4096;
  const m = h.manifest({ model: 'cls', version: 2, artifact: await h.artifact(Buffer.alloc(size, 7), 65536), chunkSize: 65536 });
  await h.publish('edge/devices/dev-1/deployments', m);
  const failed = await h.manager.waitForState(m.deployment_id, 'failed', 60_000);
  t.match(String(failed.json?.reason), `disk full while installing version 2 of 'cls' in the model repository at ${root} (ENOSPC`);
  t.match(String(failed.json?.reason), `copyfile '${join(dev.dataDir, 'fleet', 'downloads')}`, 'the free-space check passed and the copy itself ran out of space');
  t.same(readdirSync(join(root, 'cls')).sort(), before, 'no version folder, no temp folder');
  t.equal(freeBytes(root), free, 'every block the copy took is free again');
  t.match(target.modelVersions('cls'), { active: 1, onDisk: [1] });
  t.equal(await servedVersion(runtime), 1, 'version 1 still serves');
  t.same(claims(dev), []);
});

t.test('a version copied across filesystems leaves the event loop serving: frames complete while it is written', { skip: CAN_MOUNT ? false : 'mounting a tmpfs needs root', timeout: 90_000 }, async (t) => {
  // The repository on a filesystem of its own, the artifact on the ordinary disk: the install copies and fsyncs.
  // Done on the event loop (as it once was), no frame could complete before the install did.
  const root = tmpfsDisk(t, 'size=128m');
  mkdirSync(join(root, 'cls', '1'), { recursive: true });
  writeFileSync(join(root, 'cls', '1', 'model.onnx'), classifier(LIGHT));
  writeFileSync(join(root, 'cls', 'config.yaml'), 'max_batch_size: 8\n');
  const runtime = await startRuntime(t, root, { execution: 'inline' });
  const target = new RuntimeDeploymentTarget(new ModelRepository(root), runtime, new ActiveVersions(join(scratchDir(t), 'active-versions.json')));
  const artifact = join(scratchDir(t), 'artifact.onnx');
  const bytes = randomBytes(48 * 1024 * 1024);
  writeFileSync(artifact, bytes);

  let installed = false;
  const install = target.install('cls', 2, artifact, { max_batch_size: 4 }).finally(() => { installed = true; });
  let servedWhileInstalling = 0;
  const versions = new Set<number>();
  while (!installed) {
    versions.add(await servedVersion(runtime));
    if (!installed) servedWhileInstalling++;
  }
  await install;
  t.same([...versions], [1], 'version 1 served throughout');
  t.ok(servedWhileInstalling > 0, `frames were served while the 48 MB version was copied and fsynced (${servedWhileInstalling})`);
  const digest = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');
  t.equal(digest(readFileSync(join(root, 'cls', '2', 'model.onnx'))), digest(bytes), 'the installed model file is the artifact, whole');
  t.equal(readFileSync(join(root, 'cls', '2', 'fleet-config.yaml'), 'utf8'), 'max_batch_size: 4\n', 'the version carries its config');
  t.notOk(existsSync(artifact), 'the artifact left the data dir');
  t.same(readdirSync(join(root, 'cls')).filter((f) => f.startsWith('.')), [], 'no temp folder is left');
});
