import { z } from 'zod';
import { optionalFleetSchema } from './fleet-schema.js';
import { telemetrySchema } from './telemetry-schema.js';

/** Execution providers in the order the agent tries them; onnxruntime itself never falls back. */
export const EXECUTION_PROVIDERS = ['tensorrt', 'cuda', 'webgpu', 'cpu'] as const;
export type ExecutionProviderName = (typeof EXECUTION_PROVIDERS)[number];

/** Without `server.listen` anywhere, the unix socket is `<data_dir>/edge-agent.sock` (see loadConfig). */
export const DEFAULT_LISTEN = ['127.0.0.1:50051', 'unix:var/edge-agent.sock'] as const;
export const DEFAULT_SOCKET_NAME = 'edge-agent.sock';

const listenAddress = z.string().refine((s) => /^unix:.+/.test(s) || /^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$/.test(s), {
  message: "expected 'host:port', '[v6addr]:port' or 'unix:/path'",
}).refine((s) => s.startsWith('unix:') || Number(s.slice(s.lastIndexOf(':') + 1)) <= 65535, { message: 'port out of range (0-65535)' });

export const providerOptionsSchema = z.strictObject({
  device_id: z.number().int().min(0).default(0),
  /** TensorRT: build fp16/int8 engines; the engine cache lives under the data dir. */
  trt_fp16: z.boolean().default(true),
  trt_int8: z.boolean().default(false),
  intra_op_threads: z.number().int().min(0).default(0),
  inter_op_threads: z.number().int().min(0).default(0),
  /** onnxruntime's pool threads busy-wait for the next parallel section of a run instead of sleeping on a
   * futex (they stop when the run returns: session.force_spinning_stop). Off: in the bench's A/B (classifier,
   * 1 stream, three pairs) it did not lower the agent's latency and cost 3-17% more CPU per frame. */
  allow_spinning: z.boolean().default(false),
});

export const runtimeSchema = z.strictObject({
  execution_providers: z.array(z.enum(EXECUTION_PROVIDERS)).min(1).default([...EXECUTION_PROVIDERS]),
  provider_options: providerOptionsSchema.default(providerOptionsSchema.parse({})),
  /** `worker`: each model instance runs in its own thread, so inference never blocks gRPC, health or MQTT
   * (onnxruntime-node's run is synchronous). `inline`: on the event loop — saves a thread hop per batch.
   * `auto`: inline for models fast enough (inline_max_run_us), worker for the rest. */
  execution: z.enum(['worker', 'inline', 'auto']).default('auto'),
  /** `auto`: a model whose typical warm run (the median of a few, timed at 1, 2, 4, … rows up to
   * max_batch_size) is at most this long runs inline, stacking at most the rows that fit — the thread hop
   * costs more than it saves — and a model whose lone frame does not fit gets worker threads. */
  inline_max_run_us: z.number().int().min(0).default(1000),
  /** `auto`: a model runs inline only if opening its session took at most this long. An inline session is
   * opened on the event loop, on every reload too: a large model would hold every stream that long. */
  inline_max_open_ms: z.number().int().min(0).default(100),
  /**
   * Waits before each restart of a model's worker thread that died, by failures in a row; after the last, that
   * instance stops restarting until the model is reloaded (and a model with no instance left is UNAVAILABLE).
   */
  worker_restart_delays_ms: z.array(z.number().int().min(0).max(3_600_000)).max(20).default([0, 500, 2000, 8000, 30000]),
  graph_optimization: z.enum(['disabled', 'basic', 'extended', 'all']).default('all'),
  /** Cache the optimised graph under the data dir (keyed by model hash, provider, onnxruntime version). */
  graph_cache: z.boolean().default(true),
  default_qos: z.enum(['LOSSLESS', 'LATEST_ONLY']).default('LOSSLESS'),
  /** A sequence (KServe) or stream state that saw no request for this long is freed. */
  sequence_idle_timeout_s: z.number().positive().default(60),
  max_sequences: z.number().int().positive().default(1024),
  /** Largest single input tensor accepted, in bytes (RESOURCE_EXHAUSTED above it). */
  max_tensor_bytes: z.number().int().positive().default(64 * 1024 * 1024),
  /** Frames queued per model before new ones are refused with RESOURCE_EXHAUSTED. */
  max_queue: z.number().int().positive().default(4096),
  /** What to do with NaN/Inf in float inputs: serve them, or refuse with INVALID_ARGUMENT. */
  non_finite_inputs: z.enum(['serve', 'refuse']).default('serve'),
});

export const serverSchema = z.strictObject({
  listen: z.array(listenAddress).min(1).default([...DEFAULT_LISTEN]),
  /** Largest gRPC message accepted; bigger ones get RESOURCE_EXHAUSTED before they are decoded. */
  max_message_bytes: z.number().int().positive().default(16 * 1024 * 1024),
  /** Frames a native stream may have in flight when it does not ask (and the most it may ask for). */
  default_max_in_flight: z.number().int().positive().default(8),
  max_in_flight_limit: z.number().int().positive().default(64),
  max_streams: z.number().int().positive().default(1024),
  max_streams_per_peer: z.number().int().positive().default(256),
  /** On SIGTERM: how long accepted frames may take to finish before the process exits anyway. */
  drain_timeout_ms: z.number().int().min(0).default(10_000),
  unix_socket_mode: z.string().regex(/^0?[0-7]{3}$/).default('0660'),
  /** Owner and group of unix sockets (names or numeric ids); unset: the agent's own. */
  unix_socket_owner: z.string().regex(/^[A-Za-z0-9_.-]+$/).optional(),
  unix_socket_group: z.string().regex(/^[A-Za-z0-9_.-]+$/).optional(),
  /** Allow plain TCP on a non-loopback address without TLS. */
  insecure: z.boolean().default(false),
  /** HTTP/2 pings on idle connections; a peer that does not answer within the timeout is closed. */
  keepalive_time_ms: z.number().int().positive().default(30_000),
  keepalive_timeout_ms: z.number().int().positive().default(10_000),
  /** Connections without a call for this long are closed (frees what a broken or idle client held). */
  max_connection_idle_ms: z.number().int().positive().default(300_000),
  /** HTTP/2 receive windows: how much a client may send on one stream, and on one connection (all its streams
   * together), before the agent has read it. HTTP/2's default of 64 KiB for the whole connection made eight
   * camera streams of 196 KB frames wait on window updates (the bench: 318 → 433 frames/s with these). */
  http2_stream_window_bytes: z.number().int().min(65_535).max(2 ** 31 - 1).default(1024 * 1024),
  http2_connection_window_bytes: z.number().int().min(65_535).max(2 ** 31 - 1).default(16 * 1024 * 1024),
  /** After answering, keep the event loop polling this long before the thread may sleep, while clients send
   * their next frames within it: they are then read without a wake-up. 0 turns it off. */
  busy_poll_us: z.number().int().min(0).max(100_000).default(1000),
  /** TLS for every TCP listener (unix sockets rely on file permissions). */
  tls: z
    .strictObject({
      cert: z.string().min(1),
      key: z.string().min(1),
      /** CA bundle for client certificates; set it to require mTLS. */
      client_ca: z.string().min(1).optional(),
      /** With client_ca: refuse clients without a valid certificate (default true). */
      require_client_cert: z.boolean().default(true),
    })
    .optional(),
});

export const logSchema = z.strictObject({
  level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
});

export const v8Schema = z.strictObject({
  /** How far the JS heap may grow past its live size before a full collection (V8's --heap-growing-percent);
   * 0 leaves it to V8. See agent/v8-heap.ts for why the agent raises it. */
  heap_growing_percent: z.number().int().min(0).max(1000).default(300),
});

export const agentConfigSchema = z.strictObject({
  model_repository: z.string().min(1).default('models'),
  data_dir: z.string().min(1).default('var'),
  server: serverSchema.default(serverSchema.parse({})),
  runtime: runtimeSchema.default(runtimeSchema.parse({})),
  log: logSchema.default(logSchema.parse({})),
  telemetry: telemetrySchema.default(telemetrySchema.parse({})),
  v8: v8Schema.default(v8Schema.parse({})),
  /** Absent: the agent runs stand-alone (no broker, no deployments; telemetry stays local). */
  fleet: optionalFleetSchema,
});

export type AgentConfig = z.infer<typeof agentConfigSchema>;
export type RuntimeConfig = z.infer<typeof runtimeSchema>;
export type ServerConfig = z.infer<typeof serverSchema>;
export type ProviderOptions = z.infer<typeof providerOptionsSchema>;
