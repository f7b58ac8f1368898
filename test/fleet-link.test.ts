import t from 'tap';
import { execFileSync } from 'node:child_process';
import { chmodSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { MosquittoBroker, freePort } from './helpers/mosquitto.js';
import { modelBytes, scratchDir, startDevice, startFleetHarness, Watcher } from './helpers/fleet.js';

/** A CA, a server certificate for 127.0.0.1/localhost, and client certificates, made with openssl. */
function makePki(dir: string): Record<string, string> {
  const ssl = (...args: string[]): void => {
    execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  };
  const p = (f: string): string => join(dir, f);
  ssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', '/CN=edge-test-ca');
  ssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'rogue-ca.key', '-out', 'rogue-ca.crt', '-days', '2', '-subj', '/CN=rogue-ca');
  writeFileSync(p('server.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  const leaf = (name: string, ca: string, ext?: string): void => {
    ssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
    ssl('x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.crt`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-out', `${name}.crt`, '-days', '2', ...(ext ? ['-extfile', ext] : []));
  };
  leaf('server', 'ca', 'server.ext');
  leaf('dev-tls', 'ca');
  leaf('intruder', 'rogue-ca');
  // mosquitto started as root drops to its own user, which must be able to read its certificate and key.
  chmodSync(dir, 0o755);
  for (const f of readdirSync(dir)) chmodSync(join(dir, f), 0o644);
  return { ca: p('ca.crt'), rogueCa: p('rogue-ca.crt'), serverCrt: p('server.crt'), serverKey: p('server.key'), clientCrt: p('dev-tls.crt'), clientKey: p('dev-tls.key'), intruderCrt: p('intruder.crt'), intruderKey: p('intruder.key') };
}

t.test('mqtts with client certificates: a device with a CA-signed cert connects and deploys; others are kept out', { timeout: 90_000 }, async (t) => {
  const pki = makePki(scratchDir(t, 'edge-pki-'));
  const tlsPort = await freePort();
  const h = await startFleetHarness(t);
  // A second broker that only speaks TLS and requires a client certificate; the fleet side connects in plain to the first.
  const tlsBroker = await MosquittoBroker.start({
    extraConfig: [`listener ${tlsPort} 127.0.0.1`, `cafile ${pki.ca}`, `certfile ${pki.serverCrt}`, `keyfile ${pki.serverKey}`, 'require_certificate true', 'use_identity_as_username true', 'tls_version tlsv1.2'].join('\n'),
  });
  t.teardown(() => tlsBroker.close());
  const mgr = await Watcher.connect(t, tlsBroker.url, ['edge/devices/+/status', 'edge/devices/+/deployments/+/status']);
  const url = `mqtts://127.0.0.1:${tlsPort}`;
  const harnessOnTls = { ...h, broker: { url } as MosquittoBroker };

  const good = await startDevice(t, harnessOnTls, { config: { device_id: 'dev-tls', tls: { ca: pki.ca, cert: pki.clientCrt, key: pki.clientKey } } });
  const online = await mgr.waitFor((m) => m.topic === 'edge/devices/dev-tls/status' && m.json?.state === 'online', 15_000, 'dev-tls online over TLS');
  t.match(online.json, { state: 'online', device_id: 'dev-tls', agent_version: '0.1.0-test' });
  t.equal(good.link.protocolVersion, 5, 'MQTT 5 with mosquitto');

  // A deployment over the TLS link, served by a chunk server on the same broker.
  const { MqttArtifactServer, describeArtifact, signManifest } = await import('../agent/fleet/index.js');
  const server = new MqttArtifactServer({ client: mgr.client });
  await server.start();
  t.teardown(() => server.close());
  const path = join(h.dir, 'tls-model.onnx');
  writeFileSync(path, modelBytes(20_000, 'ONNX', 5));
  const a = await describeArtifact(path, 4096);
  server.add(a);
  const m = signManifest({ model: 'cls', version: 1, sha256: a.sha256, size: a.size, source: 'mqtt', chunkSize: 4096 }, h.keyId, h.privateKey);
  await mgr.client.publishAsync('edge/devices/dev-tls/deployments', JSON.stringify(m), { qos: 1, retain: true });
  await mgr.waitFor((x) => x.topic === `edge/devices/dev-tls/deployments/${m.deployment_id}/status` && x.json?.state === 'active', 30_000, 'deployment over TLS active');

  const noCert = await startDevice(t, harnessOnTls, { config: { device_id: 'dev-nocert', tls: { ca: pki.ca } } });
  const rogue = await startDevice(t, harnessOnTls, { config: { device_id: 'dev-rogue', tls: { ca: pki.ca, cert: pki.intruderCrt, key: pki.intruderKey } } });
  const wrongCa = await startDevice(t, harnessOnTls, { config: { device_id: 'dev-wrongca', tls: { ca: pki.rogueCa, cert: pki.clientCrt, key: pki.clientKey } } });
  await new Promise((r) => setTimeout(r, 3000));
  for (const d of [noCert, rogue, wrongCa]) {
    t.notOk(d.link.connected, 'refused');
    t.ok(d.logger.lines.some((l) => l.msg === 'fleet: broker connection error'), 'the refusal is logged');
  }
  t.notOk(mgr.seen.some((x) => /dev-(nocert|rogue|wrongca)/.test(x.topic)), 'none of them published anything');
  t.ok(wrongCa.logger.lines.some((l) => /certificate/i.test(JSON.stringify(l.obj))), 'an untrusted broker certificate is named in the log');
});

t.test('presence: online on connect, last will on a lost connection, offline on a clean stop; start never waits on the broker', { timeout: 60_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const port = await freePort();
  const later = await MosquittoBroker.start({ port });
  await later.stop();
  t.teardown(() => later.close());
  const w = await Watcher.connect(t, h.broker.url, []);
  const began = Date.now();
  const dev = await startDevice(t, { ...h, broker: later }, { config: { device_id: 'dev-p' } });
  t.ok(Date.now() - began < 2000, 'start returned while the broker is down');
  t.notOk(dev.link.connected);
  await later.start();
  const w2 = await Watcher.connect(t, later.url, ['edge/devices/dev-p/status']);
  await w2.waitFor((m) => m.json?.state === 'online', 15_000, 'online once the broker appears');
  t.equal(w.seen.length, 0);
  // Cut the TCP connection without DISCONNECT: the broker publishes the will.
  dev.link.client.stream.destroy();
  const will = await w2.waitFor((m) => m.json?.state === 'offline', 10_000, 'last will');
  t.match(will.json, { state: 'offline', device_id: 'dev-p', reason: 'connection lost' });
  await w2.waitFor((m) => m.json?.state === 'online' && m.at > will.at, 15_000, 'online again after reconnecting');
  await dev.stop();
  const off = await w2.waitFor((m) => m.json?.state === 'offline' && m.json?.reason === 'stopped', 10_000, 'offline on clean stop');
  t.ok(typeof off.json?.ts === 'string');
  // Retained: a late subscriber sees the last presence.
  const late = await Watcher.connect(t, later.url, ['edge/devices/dev-p/status']);
  const retained = await late.waitFor(() => true, 5000, 'retained presence');
  t.equal(retained.retain, true);
  t.equal(retained.json?.reason, 'stopped');
});

t.test('presence: a stop while a reconnect re-sends unacknowledged publishes still ends on offline (stopped)', { timeout: 60_000 }, async (t) => {
  const h = await startFleetHarness(t);
  const w = await Watcher.connect(t, h.broker.url, ['edge/devices/dev-r/status']);
  const dev = await startDevice(t, h, { config: { device_id: 'dev-r' } });
  await w.waitFor((m) => m.json?.state === 'online', 15_000, 'online');
  // A QoS 1 publish whose PUBACK cannot arrive (the connection is cut right behind it) stays in the client's
  // store. On the next connect mqtt.js re-sends it and waits for its PUBACK before emitting 'connect', while
  // `connected` is already true: the stop below lands in that window.
  const probe = 'edge/devices/dev-r/probe';
  let cut = false;
  let stopping: Promise<void> | undefined;
  let atStop: { connected: boolean; connects: number } | undefined;
  dev.link.client.on('packetsend', (p) => {
    if (!cut || stopping || p.cmd !== 'publish' || p.topic !== probe) return;
    atStop = { connected: dev.link.connected, connects: dev.link.connects };
    stopping = dev.link.stop();
  });
  dev.link.client.publish(probe, 'unacknowledged', { qos: 1 });
  dev.link.client.stream.destroy();
  cut = true;
  await w.waitFor((m) => m.json?.state === 'offline' && m.json?.reason === 'connection lost', 10_000, 'last will');
  const off = await w.waitFor((m) => m.json?.state === 'offline' && m.json?.reason === 'stopped', 15_000, 'offline on stop');
  await stopping;
  t.same(atStop, { connected: true, connects: 1 }, 'stop() ran after the CONNACK, before the link handled the reconnect');
  const late = await Watcher.connect(t, h.broker.url, ['edge/devices/dev-r/status']);
  const retained = await late.waitFor(() => true, 5000, 'retained presence');
  t.match(retained.json, { state: 'offline', reason: 'stopped' }, 'the retained presence is the stop');
  t.same(w.seen.slice(w.seen.indexOf(off) + 1).map((m) => m.json?.state), [], 'nothing was announced after the stop');
});
