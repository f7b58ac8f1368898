import { createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from 'node:crypto';
import { signedBytes } from './canonical-json.js';

/** DER prefix of an Ed25519 SubjectPublicKeyInfo; the raw 32-byte key follows it. */
const ED25519_SPKI_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

/** Reads an Ed25519 public key given as PEM (SPKI), base64 of the DER SPKI, or base64 of the raw 32 bytes. */
export function parsePublicKey(text: string): KeyObject {
  const trimmed = text.trim();
  let key: KeyObject;
  if (trimmed.includes('-----BEGIN')) {
    key = createPublicKey(trimmed);
  } else {
    if (!/^[A-Za-z0-9+/_-]+={0,2}$/.test(trimmed)) throw new Error('not PEM and not base64');
    const raw = Buffer.from(trimmed, 'base64');
    if (raw.length === 32) key = createPublicKey({ key: Buffer.concat([ED25519_SPKI_PREFIX, raw]), format: 'der', type: 'spki' });
    else key = createPublicKey({ key: raw, format: 'der', type: 'spki' });
  }
  if (key.asymmetricKeyType !== 'ed25519') throw new Error(`expected an Ed25519 key, got ${key.asymmetricKeyType ?? 'unknown'}`);
  return key;
}

export function parsePrivateKey(text: string): KeyObject {
  const key = createPrivateKey(text.trim());
  if (key.asymmetricKeyType !== 'ed25519') throw new Error(`expected an Ed25519 private key, got ${key.asymmetricKeyType ?? 'unknown'}`);
  return key;
}

/** Raw 32-byte public key as base64, the compact form for `fleet.trusted_keys`. */
export function publicKeyBase64(key: KeyObject): string {
  const der = key.export({ format: 'der', type: 'spki' });
  return der.subarray(ED25519_SPKI_PREFIX.length).toString('base64');
}

export function generateSigningKey(): { privateKeyPem: string; publicKey: string; publicKeyPem: string } {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  return {
    privateKeyPem: privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(),
    publicKey: publicKeyBase64(publicKey),
    publicKeyPem: publicKey.export({ format: 'pem', type: 'spki' }).toString(),
  };
}

/** Adds `key_id` and a base64 Ed25519 `signature` over the canonical JSON of everything else. */
export function signPayload<T extends Record<string, unknown>>(payload: T, keyId: string, privateKey: KeyObject): T & { key_id: string; signature: string } {
  const withKey = { ...payload, key_id: keyId } as Record<string, unknown>;
  delete withKey.signature;
  const signature = sign(null, signedBytes(withKey), privateKey).toString('base64');
  return { ...(withKey as T), key_id: keyId, signature };
}

export type SignatureVerdict =
  | { readonly ok: true; readonly keyId: string }
  | { readonly ok: false; readonly problem: 'unsigned' | 'unknown key' | 'bad signature'; readonly message: string };

/** The keys a device trusts, by key_id. Keys that do not parse are reported at construction, not at use. */
export class TrustedKeys {
  private readonly keys = new Map<string, KeyObject>();

  constructor(config: Readonly<Record<string, string>>) {
    for (const [keyId, text] of Object.entries(config)) {
      try {
        this.keys.set(keyId, parsePublicKey(text));
      } catch (err) {
        throw new Error(`fleet.trusted_keys.${keyId}: ${err instanceof Error ? err.message : String(err)}`);
      }
    }
  }

  get size(): number {
    return this.keys.size;
  }

  verify(payload: Readonly<Record<string, unknown>>): SignatureVerdict {
    const { signature, key_id: keyId } = payload;
    if (typeof signature !== 'string' || signature === '') return { ok: false, problem: 'unsigned', message: 'unsigned: no signature' };
    if (typeof keyId !== 'string' || keyId === '') return { ok: false, problem: 'unsigned', message: 'unsigned: no key_id' };
    const key = this.keys.get(keyId);
    if (!key) return { ok: false, problem: 'unknown key', message: `unknown key: key_id '${keyId}' is not in fleet.trusted_keys` };
    const sig = Buffer.from(signature, 'base64');
    let good = false;
    try {
      good = sig.length === 64 && verify(null, signedBytes(payload), key, sig);
    } catch {
      good = false;
    }
    return good ? { ok: true, keyId } : { ok: false, problem: 'bad signature', message: `bad signature: does not verify with key '${keyId}'` };
  }
}
