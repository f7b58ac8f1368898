import { randomUUID, type KeyObject } from 'node:crypto';
import type { JsonTensor } from './manifest.js';
import { signPayload } from './signing.js';

/** The fleet manager's side: building and signing what devices verify. */
export interface ManifestInput {
  readonly deploymentId?: string;
  readonly model: string;
  readonly version: number;
  readonly sha256: string;
  readonly size: number;
  /** 'mqtt' or an http(s) URL. */
  readonly source: string;
  readonly chunkSize?: number;
  readonly config?: Record<string, unknown>;
  readonly validation?: { inputs?: Record<string, JsonTensor>; expected_outputs?: Record<string, JsonTensor>; tolerance?: number };
  readonly allowDowngrade?: boolean;
  readonly createdAt?: string;
}

export function signManifest(input: ManifestInput, keyId: string, privateKey: KeyObject): Record<string, unknown> & { deployment_id: string; signature: string } {
  const manifest = {
    deployment_id: input.deploymentId ?? `${input.model.replace(/[^A-Za-z0-9_.:-]/g, "_").slice(0, 80)}-v${input.version}-${randomUUID().slice(0, 8)}`,
    model: input.model,
    version: input.version,
    artifact: {
      sha256: input.sha256,
      size: input.size,
      source: input.source,
      ...(input.chunkSize !== undefined ? { chunk_size: input.chunkSize } : {}),
    },
    ...(input.config !== undefined ? { config: input.config } : {}),
    ...(input.validation !== undefined ? { validation: input.validation } : {}),
    ...(input.allowDowngrade !== undefined ? { allow_downgrade: input.allowDowngrade } : {}),
    created_at: input.createdAt ?? new Date().toISOString(),
  };
  return signPayload(manifest as Record<string, unknown> & { deployment_id: string }, keyId, privateKey);
}

export interface CommandInput {
  readonly commandId?: string;
  readonly command: 'rollback' | 'activate' | 'delete_version' | 'get_state';
  readonly args?: Record<string, unknown>;
  /** Binds the command to one device. */
  readonly deviceId?: string;
}

export function signCommand(input: CommandInput, keyId: string, privateKey: KeyObject): Record<string, unknown> & { command_id: string; signature: string } {
  const cmd = {
    command_id: input.commandId ?? randomUUID(),
    command: input.command,
    args: input.args ?? {},
    ...(input.deviceId !== undefined ? { device_id: input.deviceId } : {}),
    created_at: new Date().toISOString(),
  };
  return signPayload(cmd as Record<string, unknown> & { command_id: string }, keyId, privateKey);
}
