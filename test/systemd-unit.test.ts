import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readFileSync, readlinkSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadConfig } from '../agent/config/index.js';
import { EdgeAgentClient } from '../agent/client/index.js';
import { freePort } from './helpers/mosquitto.js';
import { ROOT, tempDir } from './helpers/runtime.js';

// The unit file and scripts/install-service.sh. The installer runs for real, but staged under a DESTDIR (and
// once as --dry-run), so the test never touches this machine's users, /etc or systemd.

t.setTimeout(300_000);

const UNIT = join(ROOT, 'edge-config', 'systemd', 'edge-agent.service');
const SERVICE_CONFIG = join(ROOT, 'edge-config', 'systemd', 'agent.yaml');
const INSTALLER = join(ROOT, 'scripts', 'install-service.sh');
const ANALYZE = spawnSync('sh', ['-c', 'command -v systemd-analyze']).stdout?.toString().trim() || undefined;

function installer(args: readonly string[], env: NodeJS.ProcessEnv = {}): { code: number | null; out: string; err: string } {
  const r = spawnSync('bash', [INSTALLER, ...args], { env: { ...process.env, ...env }, encoding: 'utf8', timeout: 240_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** `[Section] Key=value` lines of a unit, keys may repeat. */
function unitKeys(text: string): Map<string, string[]> {
  const keys = new Map<string, string[]>();
  let section = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const s = /^\[(.+)\]$/.exec(line);
    if (s) { section = s[1] as string; continue; }
    const eq = line.indexOf('=');
    const key = `${section}.${line.slice(0, eq)}`;
    keys.set(key, [...(keys.get(key) ?? []), line.slice(eq + 1)]);
  }
  return keys;
}

t.test('the unit: notify service with a watchdog, dedicated user, read-only system but the data dir', async (t) => {
  const k = unitKeys(readFileSync(UNIT, 'utf8'));
  const one = (key: string) => k.get(key)?.join(' ');
  t.equal(one('Service.Type'), 'notify');
  t.equal(one('Service.NotifyAccess'), 'all', 'systemd-notify (a child) sends the notifications');
  t.match(one('Service.WatchdogSec'), /^\d+s$/);
  t.equal(one('Service.Restart'), 'on-failure');
  t.equal(one('Service.User'), 'edge-agent');
  t.equal(one('Service.Group'), 'edge-agent');
  t.equal(one('Service.SupplementaryGroups'), 'video render');
  t.equal(one('Service.StateDirectory'), 'edge-agent');
  t.equal(one('Service.ReadWritePaths'), '/var/lib/edge-agent', 'the data dir only');
  t.equal(one('Service.ProtectSystem'), 'strict');
  t.equal(one('Service.NoNewPrivileges'), 'true');
  t.equal(one('Service.PrivateTmp'), 'true');
  t.equal(one('Service.ProtectHome'), 'true');
  t.equal(one('Service.CapabilityBoundingSet'), '', 'no capabilities');
  t.equal(one('Service.ExecReload'), '/bin/kill -HUP $MAINPID');
  t.equal(one('Service.ExecStart'), '/opt/edge-agent/bin/edge-agent serve --config /etc/edge-agent/agent.yaml');
  t.same(k.get('Service.Environment'), ['NODE_ENV=production', 'EDGE_AGENT_DATA_DIR=/var/lib/edge-agent']);
  t.equal(k.get('Service.PrivateDevices'), undefined, 'the GPU device nodes stay visible');
  // Any device allow-list denies every other device; before systemd 252 ProtectClock= implied one (char-rtc).
  t.equal(k.get('Service.DeviceAllow'), undefined, 'no device allow-list that would deny the GPU nodes');
  t.equal(k.get('Service.ProtectClock'), undefined, 'no ProtectClock= (an implied DeviceAllow= on JetPack 5 and 6)');
  t.equal(k.get('Service.MemoryDenyWriteExecute'), undefined, "V8's JIT needs writable+executable pages");
  t.equal(one('Install.WantedBy'), 'multi-user.target');
});

t.test('the service config template is valid and points at the state directory', async (t) => {
  const { config } = loadConfig({ file: SERVICE_CONFIG, env: {} });
  t.equal(config.data_dir, '/var/lib/edge-agent');
  t.equal(config.model_repository, '/var/lib/edge-agent/models');
  t.same(config.server.listen, ['127.0.0.1:50051', 'unix:/var/lib/edge-agent/edge-agent.sock']);
  t.equal(config.server.unix_socket_mode, '0660');
  // What the unit's environment makes of it.
  const underUnit = loadConfig({ file: SERVICE_CONFIG, env: { EDGE_AGENT_DATA_DIR: '/var/lib/edge-agent' } });
  t.equal(underUnit.config.data_dir, '/var/lib/edge-agent');
});

t.test('install into a DESTDIR, run the staged app, verify the staged unit, reinstall, uninstall', async (t) => {
  const root = tempDir(t, 'edge-destdir-');
  const r = installer(['--with-demo-models'], { DESTDIR: root });
  t.equal(r.code, 0, `installer exit 0; stderr: ${r.err}`);
  const app = join(root, 'opt', 'edge-agent');

  t.test('files staged', async (t) => {
    const bin = join(app, 'bin', 'edge-agent');
    t.ok(lstatSync(bin).isSymbolicLink());
    t.equal(readlinkSync(bin), '../dist/agent/cli.js');
    t.ok((statSync(bin).mode & 0o111) !== 0, 'bin/edge-agent is executable');
    for (const f of ['package.json', 'proto/edge/v1/sensor_stream.proto', 'proto/inference/grpc_service.proto', 'dist/agent/main.js', 'node_modules/@grpc/grpc-js/package.json', 'node_modules/sqlite3/package.json', 'node_modules/onnxruntime-node/package.json', '.edge-agent-install']) {
      t.ok(existsSync(join(app, f)), `${f} installed`);
    }
    for (const dev of ['tap', 'typescript', '@tapjs/core']) t.notOk(existsSync(join(app, 'node_modules', dev)), `dev dependency ${dev} not installed`);
    t.notOk(existsSync(join(app, 'node_modules', 'onnxruntime-node', 'bin', 'napi-v6', 'win32')), "other platforms' onnxruntime binaries left out");
    t.ok(existsSync(join(app, 'node_modules', 'onnxruntime-node', 'bin', 'napi-v6', process.platform, process.arch)), "this platform's onnxruntime binary installed");
    t.equal(readFileSync(join(root, 'etc', 'systemd', 'system', 'edge-agent.service'), 'utf8'), readFileSync(UNIT, 'utf8'), 'the unit as shipped (default prefix)');
    t.equal(readFileSync(join(root, 'etc', 'edge-agent', 'agent.yaml'), 'utf8'), readFileSync(SERVICE_CONFIG, 'utf8'));
    t.equal(statSync(join(root, 'etc', 'edge-agent', 'agent.yaml')).mode & 0o777, 0o640);
    t.equal(statSync(join(root, 'var', 'lib', 'edge-agent')).mode & 0o777, 0o750);
    t.ok(existsSync(join(root, 'var', 'lib', 'edge-agent', 'models', 'tiny', '1', 'model.onnx')), '--with-demo-models');
    for (const skipped of ['useradd --system --gid edge-agent --groups video,render', 'systemctl enable edge-agent.service', 'chown -R edge-agent:edge-agent /var/lib/edge-agent']) {
      t.match(r.out, `skipped (DESTDIR): ${skipped}`, `system step listed, not run: ${skipped}`);
    }
  });

  t.test('the staged app serves from the prefix alone', async (t) => {
    const port = await freePort();
    const data = tempDir(t);
    // The staged config, with the telemetry listener moved off 8002 (a real agent's port; suites run in parallel).
    const config = join(data, 'agent.yaml');
    writeFileSync(config, `${readFileSync(join(root, 'etc', 'edge-agent', 'agent.yaml'), 'utf8')}\ntelemetry:\n  http:\n    port: 0\n`);
    const child = spawn(process.execPath, [join(app, 'bin', 'edge-agent'), 'serve', '--config', config,
      '--data-dir', data, '--model-repository', join(root, 'var', 'lib', 'edge-agent', 'models'), '--listen', `127.0.0.1:${port}`], { cwd: '/', stdio: ['ignore', 'pipe', 'pipe'] });
    t.teardown(() => { if (child.exitCode === null) child.kill('SIGKILL'); });
    let out = '';
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { out += d.toString(); });
    await new Promise<void>((resolve, reject) => {
      const timer = setInterval(() => { if (out.includes('"msg":"edge-agent ready"')) { clearInterval(timer); resolve(); } }, 50);
      child.once('exit', (code) => { clearInterval(timer); reject(new Error(`staged agent exited ${code}: ${out}`)); });
    });
    t.match(out, /"ready":\["classifier:1@cpu","filter:1@cpu","tiny:1@cpu","types:1@cpu"\]/);
    const client = new EdgeAgentClient({ address: `127.0.0.1:${port}` });
    t.teardown(() => client.close());
    t.equal(await client.checkHealth(), 'SERVING');
    const stream = await client.openStream({ model: 'tiny' });
    await stream.send({ seq: 1, inputs: { x: { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(0.25) } } });
    const first = await stream.results().next();
    t.equal(first.value?.status, 'OK', 'a frame is served by the installed copy');
    stream.end();
    child.kill('SIGTERM');
    t.equal(await new Promise((r) => child.once('exit', r)), 0, 'stops cleanly on SIGTERM');
  });

  t.test('systemd-analyze verify on the staged unit', { skip: ANALYZE ? false : 'systemd-analyze is not installed (apt-get install systemd)' }, async (t) => {
    // The unit names /opt/edge-agent; verify checks that ExecStart exists, so check a copy that points at the
    // staged prefix.
    const staged = join(root, 'verify', 'edge-agent.service');
    mkdirSync(join(root, 'verify'));
    writeFileSync(staged, readFileSync(join(root, 'etc', 'systemd', 'system', 'edge-agent.service'), 'utf8').replaceAll('/opt/edge-agent', app));
    const v = spawnSync(ANALYZE as string, ['verify', '--man=no', staged], { encoding: 'utf8' });
    t.equal(v.status, 0, 'systemd-analyze verify exits 0');
    t.equal(v.stderr.trim(), '', 'and warns about nothing (unknown keys and bad values are only warnings)');

    // The check can fail: a broken value is reported.
    writeFileSync(staged, readFileSync(staged, 'utf8').replace(/^WatchdogSec=.*$/m, 'WatchdogSec=thirty').replace('[Install]', 'ProtectSystm=strict\n[Install]'));
    const bad = spawnSync(ANALYZE as string, ['verify', '--man=no', staged], { encoding: 'utf8' });
    t.match(bad.stderr, /Failed to parse sec value.*thirty/);
    t.match(bad.stderr, /Unknown key.*ProtectSystm/);
  });

  t.test('reinstall keeps an edited config; uninstall removes app and unit, keeps config and data; --purge removes all', async (t) => {
    const cfg = join(root, 'etc', 'edge-agent', 'agent.yaml');
    writeFileSync(cfg, 'log:\n  level: debug\n');
    const again = installer([], { DESTDIR: root });
    t.equal(again.code, 0, again.err);
    t.equal(readFileSync(cfg, 'utf8'), 'log:\n  level: debug\n', 'edited config kept');
    t.match(again.out, /config: kept/);

    const un = installer(['--uninstall'], { DESTDIR: root });
    t.equal(un.code, 0, un.err);
    t.notOk(existsSync(app), 'app removed');
    t.notOk(existsSync(join(root, 'etc', 'systemd', 'system', 'edge-agent.service')), 'unit removed');
    t.ok(existsSync(cfg), 'config kept');
    t.ok(existsSync(join(root, 'var', 'lib', 'edge-agent', 'models')), 'data kept');
    t.match(un.out, 'skipped (DESTDIR): systemctl disable edge-agent.service');

    const purge = installer(['--uninstall', '--purge'], { DESTDIR: root });
    t.equal(purge.code, 0, purge.err);
    t.notOk(existsSync(join(root, 'etc', 'edge-agent')), 'config removed');
    t.notOk(existsSync(join(root, 'var', 'lib', 'edge-agent')), 'data removed');
  });
});

t.test('--prefix rewrites the unit; a prefix the script did not make is never deleted', async (t) => {
  const root = tempDir(t, 'edge-destdir-');
  // A node outside systemd's default PATH (as nvm or a tarball install has it).
  const nodeDir = tempDir(t, 'edge-node-');
  symlinkSync(process.execPath, join(nodeDir, 'node'));
  const r = installer(['--prefix', '/srv/edge', '--no-enable'], { DESTDIR: root, PATH: `${nodeDir}:${process.env.PATH}` });
  t.equal(r.code, 0, r.err);
  const unit = readFileSync(join(root, 'etc', 'systemd', 'system', 'edge-agent.service'), 'utf8');
  t.match(unit, /^ExecStart=\/srv\/edge\/bin\/edge-agent serve --config \/etc\/edge-agent\/agent\.yaml$/m);
  t.notMatch(unit, /\/opt\/edge-agent/);
  t.match(unit, new RegExp(`^Environment=NODE_ENV=production\nEnvironment=PATH=${nodeDir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin$`, 'm'), "node's folder is put on the unit's PATH");
  t.ok(existsSync(join(root, 'srv', 'edge', 'dist', 'agent', 'cli.js')));
  t.notMatch(r.out, /(\+ |skipped \(DESTDIR\): )systemctl enable/, '--no-enable: not enabled');
  t.match(r.out, /not enabled \(--no-enable\)/);

  const foreign = join(root, 'srv', 'other');
  mkdirSync(foreign, { recursive: true });
  writeFileSync(join(foreign, 'precious.txt'), 'keep me');
  const un = installer(['--uninstall', '--prefix', '/srv/other'], { DESTDIR: root });
  t.not(un.code, 0, 'refuses');
  t.match(un.err, /has no \.edge-agent-install: not removing a folder this script did not make/);
  t.equal(readFileSync(join(foreign, 'precious.txt'), 'utf8'), 'keep me');
  const over = installer(['--prefix', '/srv/other'], { DESTDIR: root });
  t.not(over.code, 0);
  t.match(over.err, /exists and was not made by this script: refusing to overwrite it/);

  for (const [args, re] of [
    [['--prefix', 'relative/dir'], /--prefix must be an absolute path/],
    [['--prefix', '/usr'], /refusing --prefix '\/usr'/],
    [['--purge'], /--purge only goes with --uninstall/],
    [['--frobnicate'], /unknown argument '--frobnicate'/],
  ] as const) {
    const bad = installer(args, { DESTDIR: root });
    t.equal(bad.code, 1, `${args.join(' ')}: exit 1`);
    t.match(bad.err, re);
  }
});

t.test('--dry-run lists every step, system ones included, and changes nothing', async (t) => {
  const unitPath = '/etc/systemd/system/edge-agent.service';
  const before = existsSync(unitPath);
  const appBefore = existsSync('/opt/edge-agent');
  const r = installer(['--dry-run', '--prefix', '/opt/edge-agent']);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /dry run: nothing is changed/);
  t.match(r.out, /\+ cp -a .*\/dist\/agent \/opt\/edge-agent\/dist\/agent/);
  t.match(r.out, /\+ install -m 0640 .*edge-config\/systemd\/agent\.yaml \/etc\/edge-agent\/agent\.yaml|config: kept/);
  t.match(r.out, /\+ sed 's\|\/opt\/edge-agent\|\/opt\/edge-agent\|g' .*edge-agent\.service > \/etc\/systemd\/system\/edge-agent\.service/);
  t.match(r.out, /\+ systemctl enable edge-agent\.service/);
  if (spawnSync('getent', ['passwd', 'edge-agent']).status !== 0) t.match(r.out, /\+ useradd --system --gid edge-agent/);
  t.equal(existsSync(unitPath), before, 'no unit written');
  t.equal(existsSync('/opt/edge-agent'), appBefore, 'no app copied');
  const un = installer(['--uninstall', '--dry-run']);
  t.equal(un.code, 0, un.err);
  t.match(un.out, /\+ systemctl disable/);
  t.match(un.out, /\+ rm -f \/etc\/systemd\/system\/edge-agent\.service/);
  t.equal(existsSync(unitPath), before);
});
