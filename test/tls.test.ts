import t from 'tap';
import * as grpc from '@grpc/grpc-js';
import { EdgeAgentClient } from '../agent/client/index.js';
import { ConfigError } from '../agent/errors.js';
import { silentLogger } from '../agent/logger.js';
import { GrpcListeners } from '../agent/server/index.js';
import { startTestAgent } from './helpers/agent.js';
import { makePki } from './helpers/certs.js';
import { tempDir } from './helpers/runtime.js';

t.test('gRPC over TLS with required client certificates (mTLS)', async (t) => {
  const pki = makePki(tempDir(t));
  const a = await startTestAgent(t, {
    models: ['tiny'],
    config: { server: { tls: { cert: pki.serverCert, key: pki.serverKey, client_ca: pki.caCert, require_client_cert: true } } },
  });
  const port = a.tcp.split(':')[1];
  const creds = (cert?: string, key?: string): grpc.ChannelCredentials =>
    grpc.credentials.createSsl(pki.read(pki.caCert), key ? pki.read(key) : null, cert ? pki.read(cert) : null);

  const good = new EdgeAgentClient({ address: `localhost:${port}`, credentials: creds(pki.clientCert, pki.clientKey) });
  t.teardown(() => good.close());
  t.equal(await good.checkHealth(), 'SERVING', 'a client with a certificate from the trusted CA is served');
  const stream = await good.openStream({ model: 'tiny' });
  await stream.send({ seq: 1, inputs: { x: { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024) } } });
  for await (const r of stream.results()) {
    t.equal(r.status, 'OK', 'frames flow over TLS');
    break;
  }
  stream.end();

  for (const [what, c] of [
    ['no client certificate', creds()],
    ['a certificate from an untrusted CA', creds(pki.rogueCert, pki.rogueKey)],
    ['plaintext', grpc.credentials.createInsecure()],
  ] as const) {
    const bad = new EdgeAgentClient({ address: `localhost:${port}`, credentials: c });
    await t.rejects(bad.checkHealth(), { code: grpc.status.UNAVAILABLE }, `${what} is refused`);
    bad.close();
  }
  t.equal(await a.client(a.unix).checkHealth(), 'SERVING', 'the unix socket stays plaintext, guarded by its file mode');
});

t.test('plaintext on a non-loopback address needs insecure: true', async (t) => {
  const listeners = new GrpcListeners({ listen: ['0.0.0.0:0'], maxMessageBytes: 1024, unixSocketMode: 0o660, insecure: false, configSource: 'agent.yaml' }, silentLogger());
  await t.rejects(listeners.start(), ConfigError);
  await t.rejects(listeners.start(), /agent\.yaml: server\.listen: '0\.0\.0\.0:0' is not a loopback address: configure TLS or set server\.insecure: true/);
  const allowed = new GrpcListeners({ listen: ['0.0.0.0:0'], maxMessageBytes: 1024, unixSocketMode: 0o660, insecure: true, configSource: 'agent.yaml' }, silentLogger());
  const bound = await allowed.start();
  t.ok((bound[0]?.port ?? 0) > 0, 'with insecure: true it listens');
  await allowed.stop(100);
});

t.test('an unreadable certificate is a config error naming the key', async (t) => {
  const { serverCredentials } = await import('../agent/server/index.js');
  t.throws(() => serverCredentials({ cert: '/nope/server.crt', key: '/nope/server.key', require_client_cert: true }, 'agent.yaml'), /agent\.yaml: server\.tls\.cert: cannot read '\/nope\/server\.crt': ENOENT/);
});

t.test('unix socket: configured file mode, owner and group', async (t) => {
  const { statSync } = await import('node:fs');
  const a = await startTestAgent(t, { models: ['tiny'], config: { server: { unix_socket_mode: '0640', unix_socket_owner: 'daemon', unix_socket_group: 'daemon' } } });
  const st = statSync(a.unix.slice('unix:'.length));
  t.equal(st.mode & 0o777, 0o640, 'mode 0640');
  t.equal(st.uid, 1, 'owned by daemon (uid 1, from /etc/passwd)');
  t.equal(st.gid, 1, 'group daemon (gid 1, from /etc/group)');
  const { GrpcListeners: Listeners } = await import('../agent/server/index.js');
  const bad = new Listeners({ listen: [`unix:${a.dataDir}/other.sock`], maxMessageBytes: 1024, unixSocketMode: 0o660, unixSocketGroup: 'no-such-group', insecure: false, configSource: 'agent.yaml' }, silentLogger());
  await t.rejects(bad.start(), /agent\.yaml: server\.unix_socket_group: no group named 'no-such-group' on this system/);
  await bad.stop(100);
});
