import type { Tensor, TensorSpec } from './tensor.js';

export type QosPolicy = 'LOSSLESS' | 'LATEST_ONLY';

/** Triton-style sequence control: the runtime keeps the sequence's state tensors between requests. */
export interface SequenceControl {
  readonly id: string;
  readonly start?: boolean;
  readonly end?: boolean;
  /**
   * The agent's own sequence for a native stream: it never idles out (the stream's close ends it), and a model
   * version that has not seen it yet starts it with fresh state (after a version switch under an open stream).
   */
  readonly owned?: boolean;
}

export interface InferenceRequest {
  /** Inputs by name; state inputs of a stateful model are supplied by the runtime and must not be sent. */
  readonly inputs: Readonly<Record<string, Tensor>>;
  /** Subset of outputs to return; all (non-state) outputs when absent. */
  readonly outputs?: readonly string[];
  readonly qos?: QosPolicy;
  /** Scope within which a LATEST_ONLY frame supersedes its queued predecessor (one per client stream). */
  readonly streamKey?: object;
  /**
   * Who sent it, for the batcher's count of sources still feeding the model (a stream, a client connection).
   * Absent: `streamKey`, or else the request is a source of its own.
   */
  readonly source?: object | string;
  /** Absolute deadline on the `performance.now()` clock (ms); a frame that cannot start by then is not run. */
  readonly deadline?: number;
  readonly sequence?: SequenceControl;
}

export interface InferenceTimings {
  readonly queueUs: number;
  readonly inferUs: number;
  readonly totalUs: number;
}

export interface InferenceResult {
  readonly model: string;
  readonly version: number;
  readonly outputs: Readonly<Record<string, Tensor>>;
  readonly timings: InferenceTimings;
  /** How many requests shared the `session.run` that produced this result. */
  readonly batchSize: number;
}

export type ModelState = 'LOADING' | 'READY' | 'UNAVAILABLE' | 'UNLOADING';

/** One state tensor pair of a stateful model: fed from the previous step's output. */
export interface StateSpec {
  readonly input: string;
  readonly output: string;
  readonly dtype: Tensor['dtype'];
  /** Shape of one stream's state including the batch axis (size 1 there). */
  readonly shape: readonly number[];
  readonly batchAxis: number;
}

export interface ModelInfo {
  readonly name: string;
  readonly version: number;
  /** All versions present in the repository for this model, ascending. */
  readonly versions: readonly number[];
  readonly state: ModelState;
  readonly reason?: string;
  /** Client-visible inputs and outputs (state tensors excluded). */
  readonly inputs: readonly TensorSpec[];
  readonly outputs: readonly TensorSpec[];
  readonly state_tensors: readonly StateSpec[];
  /** Execution provider serving this model (e.g. 'cpu', 'webgpu'). */
  readonly provider: string;
  /** Model file variant served ('fp32', 'int8', 'fp16'). */
  readonly variant: string;
  /** 0 = no batching dimension. */
  readonly maxBatchSize: number;
  readonly batching: boolean;
  readonly instanceCount: number;
  /** Sessions that serve instead of those while several streams feed the model (instances_under_load), once open. */
  readonly instancesUnderLoad: number;
  readonly path: string;
  /** The model's own default QoS (config.yaml `default_qos`), for streams that do not choose. */
  readonly defaultQos?: QosPolicy;
}

/** Outcome of one request, reported to observers (telemetry) after it finished. */
export interface RequestOutcome {
  readonly model: string;
  readonly version: number;
  readonly status: 'OK' | 'ERROR' | 'DROPPED' | 'DEADLINE_EXCEEDED';
  readonly timings?: InferenceTimings;
}

/** One `session.run` (execution), reported to observers. */
export interface ExecutionRecord {
  readonly model: string;
  readonly version: number;
  readonly batchSize: number;
  readonly inferUs: number;
  /** The batch was handed to its worker thread while the one before was still running there. */
  readonly handedAhead: boolean;
  /** It ran on one of the sessions that serve while several streams feed the model (instances_under_load). */
  readonly underLoad: boolean;
}

/** Hooks through which telemetry watches the runtime without the runtime knowing telemetry. */
export interface RuntimeObserver {
  onRequest?(outcome: RequestOutcome): void;
  onExecution?(record: ExecutionRecord): void;
  /**
   * `model-ready`: the version serves. `model-failed`: loading `version` (the one attempted; absent when there
   * was none to attempt) failed; a version already serving keeps serving. `model-unloaded`: without a version,
   * the whole model was unloaded; with one, that version was replaced by a switch and has answered everything
   * it accepted (`reason` names the replacement).
   */
  onModelEvent?(event: { type: 'model-ready' | 'model-failed' | 'model-unavailable' | 'model-unloaded'; model: string; version?: number; provider?: string; variant?: string; reason?: string }): void;
}

/** Triton-style cumulative statistics of one model version (durations in nanoseconds). */
export interface ModelStatistics {
  readonly name: string;
  readonly version: number;
  /** ms since epoch of the last inference, 0 if none. */
  readonly lastInference: number;
  /** Requests inferred (batch rows), and `session.run` executions. */
  readonly inferenceCount: number;
  readonly executionCount: number;
  readonly success: { count: number; ns: number };
  readonly fail: { count: number; ns: number };
  readonly queue: { count: number; ns: number };
  readonly computeInput: { count: number; ns: number };
  readonly computeInfer: { count: number; ns: number };
  readonly computeOutput: { count: number; ns: number };
}

/**
 * What the gRPC services (native and KServe) need from the runtime. A frame is a plain object of typed
 * arrays: the runtime never sees gRPC or MQTT types.
 */
export interface InferenceRuntimeApi {
  /** Queues one request. Rejects with an EdgeAgentError subclass (ModelNotFoundError, InvalidInputError,
   * FrameDroppedError, DeadlineExceededError, UnavailableError, FailedPreconditionError, ...). */
  submit(model: string, version: number | undefined, request: InferenceRequest): Promise<InferenceResult>;
  /** The served (or given) version's info; throws ModelNotFoundError. */
  modelInfo(model: string, version?: number): ModelInfo;
  /** Every model the repository holds, loaded or not (for RepositoryIndex). */
  listModels(): readonly ModelInfo[];
  /** True once every model that should load has loaded (or failed) and warm-up finished. */
  isReady(): boolean;
  /** (Re)loads a model from the repository; resolves when it is READY; rejects with ModelLoadError/ModelNotFoundError. */
  loadModel(model: string): Promise<void>;
  /** Stops accepting requests for the model, lets in-flight ones finish, then releases its sessions. */
  unloadModel(model: string): Promise<void>;
  /** Frees a sequence's state (stream closed, sequence_end handled internally). */
  endSequence(id: string): void;
  statistics(model?: string, version?: number): readonly ModelStatistics[];
}
