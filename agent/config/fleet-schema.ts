import { hostname } from 'node:os';
import { z } from 'zod';

/** Characters that may appear in one MQTT topic level the agent builds (device id, group, key id). */
const TOPIC_LEVEL = /^[A-Za-z0-9_.:-]{1,128}$/;
const topicLevel = z.string().regex(TOPIC_LEVEL, { message: "expected 1-128 characters of letters, digits, '_', '.', ':', '-' (no '/', '+', '#')" });

const brokerUrl = z.string().refine((s) => /^(mqtts?|wss?):\/\/[^\s]+$/.test(s), {
  message: "expected 'mqtt://host:port' or 'mqtts://host:port'",
});

/** Device id default: the host name, with characters that cannot be in a topic level replaced. */
export function defaultDeviceId(): string {
  const cleaned = hostname().replace(/[^A-Za-z0-9_.:-]/g, '-').slice(0, 128);
  return cleaned === '' ? 'edge-device' : cleaned;
}

export const fleetTlsSchema = z.strictObject({
  /** PEM files; relative paths are resolved against the config file's folder by the config loader. */
  ca: z.string().min(1).optional(),
  cert: z.string().min(1).optional(),
  key: z.string().min(1).optional(),
  /** Name to check in the broker's certificate when it differs from the URL's host. */
  servername: z.string().min(1).optional(),
  reject_unauthorized: z.boolean().default(true),
}).refine((t) => (t.cert === undefined) === (t.key === undefined), { message: 'cert and key must be given together' });

export const fleetReconnectSchema = z.strictObject({
  /** First retry delay; each failed attempt doubles it (with ±20% jitter) up to max_ms, forever. */
  min_ms: z.number().int().positive().default(1000),
  max_ms: z.number().int().positive().default(60_000),
  connect_timeout_ms: z.number().int().positive().default(10_000),
});

export const fleetArtifactsSchema = z.strictObject({
  /** Chunks asked for at once over MQTT; the next ones are asked for as these arrive. */
  window: z.number().int().min(1).max(1024).default(16),
  /** No chunk for this long: the missing ones in the window are asked for again. */
  chunk_timeout_ms: z.number().int().positive().default(10_000),
  max_chunk_bytes: z.number().int().positive().default(4 * 1024 * 1024),
  max_artifact_bytes: z.number().int().positive().default(4 * 1024 * 1024 * 1024),
  /** Plain `http://` artifact sources (tests, closed networks); `https://` is always allowed. */
  allow_http: z.boolean().default(false),
  /** CA bundle (PEM file) for https artifact sources; the system's CAs when absent. */
  http_ca: z.string().min(1).optional(),
  http_timeout_ms: z.number().int().positive().default(30_000),
  /** Failed HTTP attempts (4xx other than 408/429) before the deployment fails; network errors retry forever. */
  http_max_client_errors: z.number().int().positive().default(3),
});

export const fleetHealthSchema = z.strictObject({
  /** How long the new version is watched after activation; 0 disables automatic rollback. */
  duration_s: z.number().min(0).default(60),
  /** Errors / requests above this rolls back. */
  max_error_rate: z.number().min(0).max(1).default(0.05),
  /** New p99 above this factor of the previous version's p99 rolls back. */
  max_p99_factor: z.number().positive().default(2),
  /** Figures are only judged once the new version has served this many requests. */
  min_requests: z.number().int().min(1).default(20),
  poll_ms: z.number().int().positive().default(1000),
});

export const fleetSchema = z.strictObject({
  broker_url: brokerUrl,
  device_id: topicLevel.default(defaultDeviceId),
  /** Group deployments apply when the device topic has none for that model; earlier groups win over later. */
  groups: z.array(topicLevel).default([]),
  username: z.string().min(1).optional(),
  password: z.string().optional(),
  keepalive_s: z.number().int().min(0).max(65_535).default(30),
  topic_prefix: topicLevel.default('edge'),
  /** 5 falls back to 3.1.1 when the broker refuses MQTT 5. */
  mqtt_version: z.union([z.literal(5), z.literal(4)]).default(5),
  tls: fleetTlsSchema.optional(),
  reconnect: fleetReconnectSchema.default(fleetReconnectSchema.parse({})),
  /** Ed25519 public keys by key_id: PEM (SPKI) or base64 of the raw 32-byte key. */
  trusted_keys: z.record(topicLevel, z.string().min(1)).default({}),
  artifacts: fleetArtifactsSchema.default(fleetArtifactsSchema.parse({})),
  health: fleetHealthSchema.default(fleetHealthSchema.parse({})),
  /** Versions of a model kept on disk (the active one included); older ones are deleted after a healthy deployment. */
  keep_versions: z.number().int().min(1).default(3),
  /** Retained deployments arriving together (device and group topics on subscribe) are weighed after this pause. */
  settle_ms: z.number().int().min(0).default(300),
  /** Reported state is republished at least this often (and on every change). 0: only on change. */
  state_interval_s: z.number().min(0).default(300),
  /**
   * Command payloads that do not verify are answered (with the reason) only this often: `reply_burst` at once,
   * then one per `reply_interval_s`. Answers are outbox entries that are never dropped, so a flood must not
   * turn into one.
   */
  rejected_commands: z.strictObject({
    reply_burst: z.number().int().min(0).default(5),
    reply_interval_s: z.number().positive().default(10),
  }).default({ reply_burst: 5, reply_interval_s: 10 }),
});

/** The `fleet:` section; absent means the agent runs stand-alone. */
export const optionalFleetSchema = fleetSchema.optional();

export type FleetConfig = z.infer<typeof fleetSchema>;
export type FleetConfigInput = z.input<typeof fleetSchema>;
export type FleetTlsConfig = z.infer<typeof fleetTlsSchema>;
export type FleetHealthConfig = z.infer<typeof fleetHealthSchema>;
export type FleetArtifactsConfig = z.infer<typeof fleetArtifactsSchema>;
