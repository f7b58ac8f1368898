import { readFileSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import type { ServerConfig } from '../config/index.js';
import { ConfigError } from '../errors.js';

function read(source: string, key: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new ConfigError(source, key, `cannot read '${path}': ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
}

/**
 * Server credentials for the TCP listeners: TLS with the configured certificate, and client-certificate
 * verification (mTLS) against `client_ca` when it is set. Undefined when TLS is not configured.
 */
export function serverCredentials(tls: ServerConfig['tls'], source: string): grpc.ServerCredentials | undefined {
  if (!tls) return undefined;
  const cert = read(source, 'server.tls.cert', tls.cert);
  const key = read(source, 'server.tls.key', tls.key);
  const ca = tls.client_ca ? read(source, 'server.tls.client_ca', tls.client_ca) : null;
  try {
    return grpc.ServerCredentials.createSsl(ca, [{ cert_chain: cert, private_key: key }], ca !== null && tls.require_client_cert);
  } catch (err) {
    throw new ConfigError(source, 'server.tls', `invalid certificate or key: ${(err as Error).message}`);
  }
}
