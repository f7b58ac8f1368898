import t from 'tap';
import { generateKeyPairSync } from 'node:crypto';
import {
  canonicalJson, generateSigningKey, parsePrivateKey, parsePublicKey, publicKeyBase64, signCommand, signManifest, TrustedKeys,
  verifyCommand, verifyManifest, ManifestRejection,
} from '../agent/fleet/index.js';

t.test('canonical JSON sorts keys at every level, keeps array order, no whitespace', async (t) => {
  const text = canonicalJson({ b: 1, a: { z: [3, { y: true, x: null }], c: 'é"\n' }, u: undefined, n: 1.5e-7 });
  t.equal(text, '{"a":{"c":"é\\"\\n","z":[3,{"x":null,"y":true}]},"b":1,"n":1.5e-7}');
  t.equal(canonicalJson([undefined, 1]), '[null,1]');
  t.equal(canonicalJson('x'), '"x"');
  t.throws(() => canonicalJson(undefined), /no JSON form/);
});

t.test('keys: raw base64, DER base64 and PEM forms all verify; other key types are refused', async (t) => {
  const k = generateSigningKey();
  const priv = parsePrivateKey(k.privateKeyPem);
  const signed = signManifest({ model: 'm', version: 1, sha256: 'a'.repeat(64), size: 10, source: 'mqtt', chunkSize: 4 }, 'k', priv);
  const der = parsePublicKey(k.publicKeyPem).export({ format: 'der', type: 'spki' }).toString('base64');
  for (const form of [k.publicKey, k.publicKeyPem, der]) {
    const keys = new TrustedKeys({ k: form });
    t.same(keys.verify(signed), { ok: true, keyId: 'k' });
  }
  t.equal(publicKeyBase64(parsePublicKey(k.publicKeyPem)), k.publicKey);
  const rsa = generateKeyPairSync('rsa', { modulusLength: 1024 }).publicKey.export({ format: 'pem', type: 'spki' }).toString();
  t.throws(() => new TrustedKeys({ bad: rsa }), /fleet\.trusted_keys\.bad: expected an Ed25519 key/);
  t.throws(() => new TrustedKeys({ bad: 'not a key!' }), /fleet\.trusted_keys\.bad/);
});

t.test('manifest verification names each problem', async (t) => {
  const k = generateSigningKey();
  const priv = parsePrivateKey(k.privateKeyPem);
  const keys = new TrustedKeys({ k: k.publicKey });
  const limits = { maxArtifactBytes: 1e6, maxChunkBytes: 1024, allowHttp: false };
  const good = signManifest({ model: 'm', version: 2, sha256: 'a'.repeat(64), size: 10, source: 'mqtt', chunkSize: 4 }, 'k', priv);
  const check = (payload: unknown): string => {
    try {
      verifyManifest(Buffer.from(typeof payload === 'string' ? payload : JSON.stringify(payload)), keys, limits);
      return 'ok';
    } catch (err) {
      t.ok(err instanceof ManifestRejection);
      return `${(err as ManifestRejection).problem}: ${(err as Error).message}`;
    }
  };
  t.equal(check(good), 'ok');
  t.match(check('{nope'), /^not json: not JSON/);
  const { signature: _s, ...unsigned } = good;
  t.match(check(unsigned), /^unsigned: unsigned: no signature/);
  t.match(check({ ...good, key_id: 'other' }), /^unknown key: unknown key: key_id 'other'/);
  t.match(check({ ...good, version: 3 }), /^bad signature: bad signature/);
  t.match(check({ ...good, signature: 'AAAA' }), /^bad signature/);
  const sign = (o: Record<string, unknown>): string => check(signManifest({ model: 'm', version: 2, sha256: 'a'.repeat(64), size: 10, source: 'mqtt', chunkSize: 4, ...o }, 'k', priv));
  t.match(sign({ model: '../etc' }), /^model name: model name "\.\.\/etc" is not a plain name/);
  t.match(sign({ model: 'a/b' }), /^model name/);
  t.match(sign({ source: 'http://example/x' }), /^source: artifact.source "http:\/\/example\/x" is not 'mqtt' or an https:\/\/ URL/);
  t.equal(sign({ source: 'https://example/x' }), 'ok');
  t.match(sign({ chunkSize: 4096 }), /^chunk size: artifact.chunk_size 4096 exceeds fleet.artifacts.max_chunk_bytes \(1024\)/);
  t.match(sign({ chunkSize: undefined }), /^chunk size: artifact.chunk_size is required/);
  t.match(sign({ size: 2e6 }), /^size: artifact.size 2000000 exceeds/);
  t.match(sign({ sha256: 'xyz' }), /^invalid manifest: invalid manifest: artifact.sha256: expected 64 lowercase hex digits/);
  t.match(sign({ config: { max_batch_size: 'many' } }), /^config: invalid model config: max_batch_size/);
  // A signed field the schema does not know is still covered by the signature.
  const extra = { ...good, note: 'x' };
  t.match(check(extra), /^bad signature/);
});

t.test('commands are bound to their topic id and device', async (t) => {
  const k = generateSigningKey();
  const priv = parsePrivateKey(k.privateKeyPem);
  const keys = new TrustedKeys({ k: k.publicKey });
  const cmd = signCommand({ commandId: 'c1', command: 'rollback', args: { model: 'm' }, deviceId: 'dev-1' }, 'k', priv);
  t.equal(verifyCommand(Buffer.from(JSON.stringify(cmd)), 'c1', 'dev-1', keys).command, 'rollback');
  t.throws(() => verifyCommand(Buffer.from(JSON.stringify(cmd)), 'c2', 'dev-1', keys), /does not match the topic's 'c2'/);
  t.throws(() => verifyCommand(Buffer.from(JSON.stringify(cmd)), 'c1', 'dev-2', keys), /is for device 'dev-1', not 'dev-2'/);
  t.throws(() => verifyCommand(Buffer.from(JSON.stringify({ ...cmd, args: { model: 'x' } })), 'c1', 'dev-1', keys), /bad signature/);
});
