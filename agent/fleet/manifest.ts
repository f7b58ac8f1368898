import { createHash } from 'node:crypto';
import { z } from 'zod';
import { isPlainModelName, modelConfigSchema } from '../models/index.js';
import type { TrustedKeys } from './signing.js';

const DTYPES = ['float32', 'float16', 'float64', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64', 'bool'] as const;

/** A tensor written in JSON: `data` is the flat row-major values, or base64 of the raw little-endian bytes. */
export const jsonTensorSchema = z.strictObject({
  dtype: z.enum(DTYPES),
  shape: z.array(z.number().int().min(0)).max(16),
  data: z.union([z.array(z.union([z.number(), z.boolean()])), z.string()]),
});

export const validationSpecSchema = z.strictObject({
  inputs: z.record(z.string(), jsonTensorSchema).optional(),
  expected_outputs: z.record(z.string(), jsonTensorSchema).optional(),
  /** Largest absolute difference accepted between an output and its expected value (default: target's choice). */
  tolerance: z.number().min(0).optional(),
});

/** A value that is safe as one MQTT topic level (no '/', '+', '#'). */
const TOPIC_SAFE = /^[A-Za-z0-9_.:-]{1,128}$/;

export const manifestSchema = z.object({
  deployment_id: z.string().regex(TOPIC_SAFE, { message: "expected 1-128 of letters, digits, '_', '.', ':', '-'" }),
  model: z.string(),
  version: z.number().int().positive().max(Number.MAX_SAFE_INTEGER),
  artifact: z.object({
    sha256: z.string().regex(/^[0-9a-f]{64}$/, { message: 'expected 64 lowercase hex digits' }),
    size: z.number().int().positive(),
    source: z.string().min(1),
    chunk_size: z.number().int().positive().optional(),
  }),
  config: z.record(z.string(), z.unknown()).optional(),
  validation: validationSpecSchema.optional(),
  allow_downgrade: z.boolean().optional(),
  created_at: z.string().min(1),
  key_id: z.string().min(1),
  signature: z.string().min(1),
});

export type DeploymentManifest = z.infer<typeof manifestSchema>;
export type JsonTensor = z.infer<typeof jsonTensorSchema>;

export const commandSchema = z.object({
  /** Must equal the command_id in the topic: the signature then binds the id and a replay under another id fails. */
  command_id: z.string().regex(TOPIC_SAFE),
  command: z.enum(['rollback', 'activate', 'delete_version', 'get_state']),
  args: z.record(z.string(), z.unknown()).default({}),
  /** When present, the command is only valid on this device. */
  device_id: z.string().optional(),
  created_at: z.string().min(1).optional(),
  key_id: z.string().min(1),
  signature: z.string().min(1),
});

export type FleetCommand = z.infer<typeof commandSchema>;

export type RejectionProblem =
  | 'not json' | 'unsigned' | 'unknown key' | 'bad signature' | 'invalid manifest' | 'model name' | 'source'
  | 'size' | 'chunk size' | 'config' | 'downgrade' | 'hash mismatch' | 'size mismatch' | 'version conflict' | 'disk space';

export class ManifestRejection extends Error {
  constructor(readonly problem: RejectionProblem, message: string) {
    super(message);
    this.name = 'ManifestRejection';
  }
}

export interface ManifestLimits {
  readonly maxArtifactBytes: number;
  readonly maxChunkBytes: number;
  readonly allowHttp: boolean;
}

/** What can be said about a payload before trusting it: enough to report a rejection on the right topic. */
export interface ManifestIdentity {
  readonly deploymentId: string;
  readonly model: string;
  readonly version: number;
}

/**
 * Identity of an untrusted payload for the status topic: its own deployment_id when that is a safe topic level,
 * otherwise `invalid-<first 12 hex of the payload's sha256>` so the rejection is still reported somewhere stable.
 */
export function identify(raw: unknown, payload: Buffer): ManifestIdentity {
  const obj = typeof raw === 'object' && raw !== null && !Array.isArray(raw) ? (raw as Record<string, unknown>) : {};
  const id = typeof obj.deployment_id === 'string' && TOPIC_SAFE.test(obj.deployment_id)
    ? obj.deployment_id
    : `invalid-${createHash('sha256').update(payload).digest('hex').slice(0, 12)}`;
  return {
    deploymentId: id,
    model: typeof obj.model === 'string' ? obj.model.slice(0, 128) : '',
    version: typeof obj.version === 'number' && Number.isFinite(obj.version) ? obj.version : 0,
  };
}

function firstIssue(err: z.ZodError): string {
  const issue = err.issues[0];
  if (!issue) return 'invalid';
  const path = issue.path.map(String).join('.');
  return path === '' ? issue.message : `${path}: ${issue.message}`;
}

/** A manifest or command payload as a JSON object, or ManifestRejection('not json'). */
function parseJsonObject(payload: Buffer): Record<string, unknown> {
  let raw: unknown;
  try {
    raw = JSON.parse(payload.toString('utf8'));
  } catch (err) {
    throw new ManifestRejection('not json', `not JSON: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new ManifestRejection('not json', 'not a JSON object');
  return raw as Record<string, unknown>;
}

/**
 * Checks everything that can be checked without the device's state, in the order that costs least to an
 * attacker: JSON, signature, then shape, name, source and sizes. Throws ManifestRejection naming the problem.
 */
export function verifyManifest(payload: Buffer, keys: TrustedKeys, limits: ManifestLimits): { manifest: DeploymentManifest; raw: Record<string, unknown> } {
  const obj = parseJsonObject(payload);
  const sig = keys.verify(obj);
  if (!sig.ok) throw new ManifestRejection(sig.problem, sig.message);
  const parsed = manifestSchema.safeParse(obj);
  if (!parsed.success) throw new ManifestRejection('invalid manifest', `invalid manifest: ${firstIssue(parsed.error)}`);
  const m = parsed.data;
  if (!isPlainModelName(m.model)) {
    throw new ManifestRejection('model name', `model name ${JSON.stringify(m.model)} is not a plain name (letters, digits, '_', '.', '-'; no path separators)`);
  }
  const source = m.artifact.source;
  if (source !== 'mqtt') {
    let url: URL | undefined;
    try {
      url = new URL(source);
    } catch {
      url = undefined;
    }
    if (!url || !(url.protocol === 'https:' || (url.protocol === 'http:' && limits.allowHttp))) {
      throw new ManifestRejection('source', `artifact.source ${JSON.stringify(source)} is not 'mqtt' or an https:// URL${limits.allowHttp ? ' (or http://)' : ''}`);
    }
  }
  if (m.artifact.size > limits.maxArtifactBytes) {
    throw new ManifestRejection('size', `artifact.size ${m.artifact.size} exceeds fleet.artifacts.max_artifact_bytes (${limits.maxArtifactBytes})`);
  }
  if (source === 'mqtt') {
    if (m.artifact.chunk_size === undefined) throw new ManifestRejection('chunk size', "artifact.chunk_size is required for source 'mqtt'");
    if (m.artifact.chunk_size > limits.maxChunkBytes) {
      throw new ManifestRejection('chunk size', `artifact.chunk_size ${m.artifact.chunk_size} exceeds fleet.artifacts.max_chunk_bytes (${limits.maxChunkBytes})`);
    }
  }
  if (m.config !== undefined) {
    const cfg = modelConfigSchema.safeParse(m.config);
    if (!cfg.success) throw new ManifestRejection('config', `invalid model config: ${firstIssue(cfg.error)}`);
  }
  return { manifest: m, raw: obj };
}

/** Verifies a signed command and that it is meant for this topic and device. */
export function verifyCommand(payload: Buffer, topicCommandId: string, deviceId: string, keys: TrustedKeys): FleetCommand {
  const raw = parseJsonObject(payload);
  const sig = keys.verify(raw);
  if (!sig.ok) throw new ManifestRejection(sig.problem, sig.message);
  const parsed = commandSchema.safeParse(raw);
  if (!parsed.success) throw new ManifestRejection('invalid manifest', `invalid command: ${firstIssue(parsed.error)}`);
  if (parsed.data.command_id !== topicCommandId) {
    throw new ManifestRejection('invalid manifest', `command_id '${parsed.data.command_id}' does not match the topic's '${topicCommandId}'`);
  }
  if (parsed.data.device_id !== undefined && parsed.data.device_id !== deviceId) {
    throw new ManifestRejection('invalid manifest', `command is for device '${parsed.data.device_id}', not '${deviceId}'`);
  }
  return parsed.data;
}
