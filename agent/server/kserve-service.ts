import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { InvalidInputError, ModelNotFoundError, UnavailableError } from '../errors.js';
import type { TensorSpec } from '../runtime/tensor.js';
import type { InferenceRuntimeApi, ModelInfo, ModelStatistics } from '../runtime/types.js';
import {
  configDataType,
  decodeInferRequest,
  encodeInferResponse,
  kserveDatatype,
  parseVersion,
  type ModelInferRequestMessage,
  type ModelInferResponseMessage,
} from './kserve-codec.js';
import { PROTO_DIR } from './proto-path.js';
import { RequestSources } from './request-sources.js';
import { toGrpcStatus, toServiceError } from './status-map.js';

/** Directory of the KServe .proto files; `grpc_service.proto` imports `model_config.proto` from here. */
export const KSERVE_PROTO_DIR = join(PROTO_DIR, 'inference');
export const KSERVE_PROTO_FILE = 'grpc_service.proto';

/**
 * How the service decodes messages. `longs: String` because uint64 sequence ids, INT64/UINT64 typed contents
 * and statistics counters can exceed 2^53, where a JS number would silently round; strings are exact and
 * BigInt-convertible. `bytes` is left at protobufjs's default, a Buffer that views the received message
 * (raw tensor contents are not copied). `defaults` + `arrays` give every field a value; `oneofs` names the
 * set member of InferParameter.
 */
export const KSERVE_LOADER_OPTIONS: protoLoader.Options = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  arrays: true,
  oneofs: true,
  includeDirs: [KSERVE_PROTO_DIR],
};

export function loadKServePackageDefinition(): protoLoader.PackageDefinition {
  return protoLoader.loadSync(KSERVE_PROTO_FILE, KSERVE_LOADER_OPTIONS);
}

/** Extensions (Triton's names) this service actually implements, reported by ServerMetadata. */
export const KSERVE_EXTENSIONS: readonly string[] = ['model_repository', 'model_configuration', 'sequence', 'statistics'];

const PLATFORM = 'onnxruntime_onnx';
/** Requests a stream may have in flight before the service stops reading it (gRPC flow control then holds the client). */
const STREAM_MAX_IN_FLIGHT = 64;

export interface KServeServiceOptions {
  /** Called for failures that reach the client as INTERNAL (their text is not sent; it belongs in the log). */
  onInternalError?(rpc: string, err: unknown): void;
  /** Called when an inference request arrives and after its answer is sent (the event-loop spinner). */
  onArrival?(source: unknown): void;
  onAnswered?(): void;
}

interface NameVersion {
  name: string;
  version: string;
}

interface StreamResponse {
  error_message: string;
  infer_response: ModelInferResponseMessage | { model_name: string; model_version: string; id: string };
}

/**
 * The KServe v2 / Triton `inference.GRPCInferenceService` over the runtime. Add it to a grpc.Server beside the
 * native service: `server.addService(svc.definition, svc.implementation)`.
 */
export interface KServeService {
  readonly definition: grpc.ServiceDefinition;
  readonly implementation: grpc.UntypedServiceImplementation;
  /**
   * Shutdown: new inference requests are refused with UNAVAILABLE, and each open ModelStreamInfer stream ends
   * with UNAVAILABLE once every request it sent before has been answered. Resolves when the last has ended.
   */
  drain(): Promise<void>;
}

const SHUTTING_DOWN = 'edge-agent is shutting down';

export function createKServeService(
  runtime: InferenceRuntimeApi,
  server: { name: string; version: string },
  options: KServeServiceOptions = {},
): KServeService {
  const pkg = grpc.loadPackageDefinition(loadKServePackageDefinition()) as unknown as {
    inference: { GRPCInferenceService: grpc.ServiceClientConstructor };
  };
  const definition = pkg.inference.GRPCInferenceService.service;

  const report = (rpc: string, err: unknown): void => {
    if (options.onInternalError && toGrpcStatus(err).code === grpc.status.INTERNAL) options.onInternalError(rpc, err);
  };

  function unary<Req, Res>(rpc: string, handler: (req: Req, call: grpc.ServerUnaryCall<Req, Res>) => Res | Promise<Res>): grpc.handleUnaryCall<Req, Res> {
    return (call, callback) => {
      Promise.resolve()
        .then(() => handler(call.request, call))
        .then(
          (res) => {
            callback(null, res);
            options.onAnswered?.();
          },
          (err: unknown) => {
            report(rpc, err);
            callback(toServiceError(err));
          },
        );
    };
  }

  function readyModel(req: NameVersion, rpc: string): ModelInfo {
    if (req.name === '') throw new InvalidInputError(`${rpc}: model name is empty`);
    const info = runtime.modelInfo(req.name, parseVersion(req.version, `model '${req.name}'`));
    if (info.state !== 'READY') {
      throw new UnavailableError(`model '${req.name}' is not ready (state ${info.state}${info.reason ? `: ${info.reason}` : ''})`);
    }
    return info;
  }

  const sources = new RequestSources();
  let draining = false;
  /** Open ModelStreamInfer calls, each with what ends it once its answered requests are written. */
  const streams = new Map<grpc.ServerDuplexStream<ModelInferRequestMessage, StreamResponse>, () => void>();
  let lastStreamEnded: (() => void) | undefined;
  /** One drain for every caller. */
  let drainedAll: Promise<void> | undefined;

  async function infer(msg: ModelInferRequestMessage, deadline: number | undefined, source: object | string): Promise<ModelInferResponseMessage> {
    const decoded = decodeInferRequest(msg, deadline, source);
    const result = await runtime.submit(decoded.model, decoded.version, decoded.request);
    return encodeInferResponse(result, decoded.id, decoded.requestedOutputs, decoded.typedResponse);
  }

  /** Never rejects: a failed request becomes a response with error_message, as Triton's streaming API does. */
  function inferOnStream(msg: ModelInferRequestMessage, source: object | string): Promise<StreamResponse> {
    return Promise.resolve()
      .then(() => infer(msg, undefined, source))
      .then(
        (res): StreamResponse => ({ error_message: '', infer_response: res }),
        (err: unknown): StreamResponse => {
          report('ModelStreamInfer', err);
          return {
            error_message: toGrpcStatus(err).details,
            infer_response: { model_name: msg.model_name, model_version: msg.model_version, id: msg.id },
          };
        },
      );
  }

  const modelStreamInfer: grpc.handleBidiStreamingCall<ModelInferRequestMessage, StreamResponse> = (call) => {
    // Requests are submitted as they arrive (so a sequence reaches the runtime in order and independent
    // requests can batch); responses are written through one promise chain, so they leave in request order.
    if (draining) {
      call.emit('error', { code: grpc.status.UNAVAILABLE, details: `${SHUTTING_DOWN}; not accepting new streams` });
      return;
    }
    let tail: Promise<void> = Promise.resolve();
    let inFlight = 0;
    let paused = false;
    let closed = false;
    const close = (): void => {
      closed = true;
      streams.delete(call);
      if (draining && streams.size === 0) lastStreamEnded?.();
    };
    call.on('cancelled', close);
    call.on('error', close);
    call.on('close', close);
    // Every request accepted before the drain has its response on the wire before this status.
    streams.set(call, () => {
      tail = tail.then(() => {
        if (closed) return;
        call.emit('error', { code: grpc.status.UNAVAILABLE, details: `${SHUTTING_DOWN}; every request sent before was answered` });
        close();
      });
    });

    call.on('data', (msg: ModelInferRequestMessage) => {
      // Once the drain began, this stream's end is queued behind what it accepted: a later request is not
      // run, and the UNAVAILABLE status that ends the stream tells the client so.
      if (draining) return;
      options.onArrival?.(call);
      inFlight++;
      if (inFlight >= STREAM_MAX_IN_FLIGHT && !paused) {
        paused = true;
        call.pause();
      }
      const response = inferOnStream(msg, sources.begin(call));
      void response.then(() => sources.end(call));
      tail = tail
        .then(async () => {
          const res = await response;
          inFlight--;
          if (closed) return;
          const flowing = call.write(res);
          options.onAnswered?.();
          if (!flowing) await drained(call);
          if (paused && inFlight < STREAM_MAX_IN_FLIGHT / 2) {
            paused = false;
            call.resume();
          }
        })
        .catch(close); // a write on a call that went away: nothing left to deliver to
    });
    call.on('end', () => {
      tail = tail
        .then(() => {
          if (!closed) call.end();
        })
        .catch(close);
    });
  };

  const implementation: grpc.UntypedServiceImplementation = {
    ServerLive: unary('ServerLive', () => ({ live: true })),

    ServerReady: unary('ServerReady', () => ({ ready: runtime.isReady() })),

    ModelReady: unary('ModelReady', (req: NameVersion) => {
      if (req.name === '') throw new InvalidInputError('ModelReady: model name is empty');
      const version = parseVersion(req.version, `model '${req.name}'`);
      try {
        return { ready: runtime.modelInfo(req.name, version).state === 'READY' };
      } catch (err) {
        if (err instanceof ModelNotFoundError) return { ready: false };
        throw err;
      }
    }),

    ServerMetadata: unary('ServerMetadata', () => ({ name: server.name, version: server.version, extensions: [...KSERVE_EXTENSIONS] })),

    ModelMetadata: unary('ModelMetadata', (req: NameVersion) => {
      const info = readyModel(req, 'ModelMetadata');
      const meta = (t: TensorSpec) => ({ name: t.name, datatype: kserveDatatype(t.dtype), shape: [...t.shape] });
      return {
        name: info.name,
        versions: [String(info.version)],
        platform: PLATFORM,
        inputs: info.inputs.map(meta),
        outputs: info.outputs.map(meta),
      };
    }),

    ModelInfer: unary('ModelInfer', (req: ModelInferRequestMessage, call) => {
      if (draining) throw new UnavailableError(`${SHUTTING_DOWN}: request not run`);
      // Unary calls of one client share its connection: the peer address is that client.
      const peer = call.getPeer();
      options.onArrival?.(peer);
      const answered = infer(req, perfDeadline(call.getDeadline()), sources.begin(peer));
      void answered.then(() => sources.end(peer), () => sources.end(peer));
      return answered;
    }),

    ModelStreamInfer: modelStreamInfer,

    ModelConfig: unary('ModelConfig', (req: NameVersion) => ({ config: modelConfig(readyModel(req, 'ModelConfig')) })),

    ModelStatistics: unary('ModelStatistics', (req: NameVersion) => {
      const name = req.name === '' ? undefined : req.name;
      const version = parseVersion(req.version, `model '${req.name}'`);
      if (name === undefined && version !== undefined) throw new InvalidInputError('ModelStatistics: a version needs a model name');
      const stats = runtime.statistics(name, version);
      // An unknown model is an error, not an empty answer (Triton answers NOT_FOUND too).
      if (name !== undefined && stats.length === 0) runtime.modelInfo(name, version);
      return { model_stats: stats.map(statisticsMessage) };
    }),

    RepositoryIndex: unary('RepositoryIndex', (req: { repository_name: string; ready: boolean }) => ({
      models: runtime
        .listModels()
        .filter((m) => !req.ready || m.state === 'READY')
        .map((m) => ({ name: m.name, version: String(m.version), state: m.state, reason: m.reason ?? '' })),
    })),

    RepositoryModelLoad: unary('RepositoryModelLoad', async (req: { model_name: string; parameters: Record<string, unknown> }) => {
      if (req.model_name === '') throw new InvalidInputError('RepositoryModelLoad: model_name is empty');
      for (const key of Object.keys(req.parameters ?? {})) {
        if (key === 'config' || key.startsWith('file:')) {
          throw new InvalidInputError(
            `RepositoryModelLoad parameter '${key}' is not supported: edge-agent loads models only from its model repository`,
          );
        }
      }
      await runtime.loadModel(req.model_name);
      return {};
    }),

    RepositoryModelUnload: unary('RepositoryModelUnload', async (req: { model_name: string }) => {
      if (req.model_name === '') throw new InvalidInputError('RepositoryModelUnload: model_name is empty');
      await runtime.unloadModel(req.model_name);
      return {};
    }),
  };

  return {
    definition,
    implementation,
    drain: () => {
      if (drainedAll) return drainedAll;
      draining = true;
      drainedAll = streams.size === 0 ? Promise.resolve() : new Promise<void>((resolve) => { lastStreamEnded = resolve; });
      for (const end of [...streams.values()]) end();
      return drainedAll;
    },
  };
}

/** Triton's ModelConfig for a served model: the batch dimension is implied by max_batch_size, not listed in dims. */
export function modelConfig(info: ModelInfo): Record<string, unknown> {
  const batched = info.maxBatchSize > 0;
  const dims = (shape: readonly number[], batchAxis = 0) => (batched ? shape.filter((_, i) => i !== batchAxis) : [...shape]);
  const config: Record<string, unknown> = {
    name: info.name,
    platform: PLATFORM,
    backend: 'onnxruntime',
    version_policy: { latest: { num_versions: 1 } },
    max_batch_size: info.maxBatchSize,
    input: info.inputs.map((t) => ({ name: t.name, data_type: configDataType(t.dtype), dims: dims(t.shape) })),
    output: info.outputs.map((t) => ({ name: t.name, data_type: configDataType(t.dtype), dims: dims(t.shape) })),
    instance_group: [{ name: `${info.name}_0`, kind: info.provider === 'cpu' ? 'KIND_CPU' : 'KIND_GPU', count: info.instanceCount }],
    default_model_filename: 'model.onnx',
    parameters: { provider: { string_value: info.provider }, variant: { string_value: info.variant } },
  };
  if (info.state_tensors.length > 0) {
    config['sequence_batching'] = {
      direct: {},
      state: info.state_tensors.map((s) => ({
        input_name: s.input,
        output_name: s.output,
        data_type: configDataType(s.dtype),
        dims: dims(s.shape, s.batchAxis),
      })),
    };
  } else if (info.batching) {
    config['dynamic_batching'] = {};
  }
  return config;
}

function statisticsMessage(s: ModelStatistics): Record<string, unknown> {
  const d = (x: { count: number; ns: number }) => ({ count: Math.round(x.count), ns: Math.round(x.ns) });
  return {
    name: s.name,
    version: String(s.version),
    last_inference: Math.round(s.lastInference),
    inference_count: s.inferenceCount,
    execution_count: s.executionCount,
    inference_stats: {
      success: d(s.success),
      fail: d(s.fail),
      queue: d(s.queue),
      compute_input: d(s.computeInput),
      compute_infer: d(s.computeInfer),
      compute_output: d(s.computeOutput),
    },
  };
}

/** A gRPC deadline (wall clock) on the runtime's performance.now() clock; undefined when the call has none. */
function perfDeadline(deadline: grpc.Deadline): number | undefined {
  const ms = deadline instanceof Date ? deadline.getTime() : deadline;
  if (!Number.isFinite(ms)) return undefined;
  return performance.now() + (ms - Date.now());
}

function drained(call: grpc.ServerDuplexStream<unknown, unknown>): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      call.off('drain', done);
      call.off('cancelled', done);
      call.off('close', done);
      call.off('error', done);
      resolve();
    };
    call.on('drain', done);
    call.on('cancelled', done);
    call.on('close', done);
    call.on('error', done);
  });
}
