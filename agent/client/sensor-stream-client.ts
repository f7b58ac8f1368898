import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { dtypeFromWire, NATIVE_LOADER_OPTIONS, SENSOR_STREAM_PROTO, wireDType } from '../server/index.js';
import { allocate, elementCount, tensorBytes, viewBytes, type DType, type Tensor } from '../runtime/index.js';
import { ResultPoller } from './result-poller.js';


export type Qos = 'LOSSLESS' | 'LATEST_ONLY';
export type ResultStatus = 'OK' | 'DROPPED' | 'INVALID_ARGUMENT' | 'DEADLINE_EXCEEDED' | 'UNAVAILABLE' | 'RESOURCE_EXHAUSTED' | 'INTERNAL' | 'FAILED_PRECONDITION';

export interface StreamOpenOptions {
  readonly model: string;
  readonly version?: number;
  readonly qos?: Qos;
  readonly maxInFlight?: number;
  readonly defaultDeadlineUs?: number;
}

export interface OpenedInfo {
  readonly model: string;
  readonly version: number;
  readonly inputs: readonly { name: string; dtype: DType; shape: number[] }[];
  readonly outputs: readonly { name: string; dtype: DType; shape: number[] }[];
  readonly provider: string;
  readonly variant: string;
  readonly qos: Qos;
  readonly maxInFlight: number;
  readonly stateful: boolean;
}

export interface FrameResult {
  readonly seq: number;
  readonly status: ResultStatus;
  readonly message: string;
  readonly outputs: Readonly<Record<string, Tensor>>;
  readonly version: number;
  readonly timings: { queueUs: number; inferenceUs: number; totalUs: number };
  readonly captureTimeUs: number;
  readonly batchSize: number;
}

export interface FrameToSend {
  readonly seq: number;
  readonly inputs: Readonly<Record<string, Tensor>>;
  readonly captureTimeUs?: number;
  readonly deadlineUs?: number;
}

interface WireTensor { name: string; dtype: string; shape: number[]; data: Buffer }

function fromWire(t: WireTensor): Tensor {
  const dtype = dtypeFromWire(t.dtype) as DType;
  return { dtype, shape: t.shape, data: viewBytes(dtype, t.data) };
}

/** Frame → wire: tensors become raw bytes over the caller's buffers (no copy before grpc serialises). */
export function encodeFrame(frame: FrameToSend): { frame: object } {
  return {
    frame: {
      seq: frame.seq,
      capture_time_us: frame.captureTimeUs ?? 0,
      deadline_us: frame.deadlineUs ?? 0,
      inputs: Object.entries(frame.inputs).map(([name, t]) => ({ name, dtype: wireDType(t.dtype), shape: t.shape, data: tensorBytes(t) })),
    },
  };
}

/** A stream's final status as a grpc ServiceError (code, details, metadata), as grpc-js reports call errors. */
function statusError(status: grpc.StatusObject): grpc.ServiceError {
  return Object.assign(new Error(`${status.code} ${grpc.status[status.code]}: ${status.details}`), { ...status });
}

/** Why a frame could not be sent: the stream's final status (UNAVAILABLE if it closed without one). */
function streamEndedError(status: grpc.StatusObject | undefined): grpc.ServiceError {
  return statusError(status
    ? { ...status, details: `the stream ended before the frame was sent: ${status.details}` }
    : { code: grpc.status.UNAVAILABLE, details: 'the stream closed before the frame was sent', metadata: new grpc.Metadata() });
}

function sentAfterEnd(): grpc.ServiceError {
  return statusError({ code: grpc.status.FAILED_PRECONDITION, details: 'send() after end(): the stream takes no more frames', metadata: new grpc.Metadata() });
}

type Duplex = grpc.ClientDuplexStream<object, { kind: string; opened?: Record<string, unknown>; result?: Record<string, unknown> }>;

/**
 * One open sensor stream. `send` honours gRPC flow control (it resolves once the transport takes the frame),
 * results arrive through `results()` in sequence order.
 */
export class SensorStreamHandle {
  /** Frames sent whose results have not arrived. */
  private awaiting = 0;
  /** The stream's final status, once it arrived: nothing more can be sent. */
  private ended: grpc.StatusObject | undefined;
  /** `end()` was called. */
  private halfClosed = false;

  private constructor(private readonly call: Duplex, readonly opened: OpenedInfo, private readonly poller: ResultPoller) {
    // The stream's final status reaches readers through `results()`; a stream nobody reads must not crash.
    call.on('error', () => undefined);
    call.once('status', (status: grpc.StatusObject) => {
      this.ended = status;
      poller.abandoned(this.awaiting);
      this.awaiting = 0;
    });
  }

  static open(
    client: grpc.Client & { Stream(options?: grpc.CallOptions): Duplex }, options: StreamOpenOptions, callOptions: grpc.CallOptions = {}, poller = new ResultPoller(0),
  ): Promise<SensorStreamHandle> {
    const call = client.Stream(callOptions);
    call.write({
      open: {
        model: options.model, model_version: options.version ?? 0, qos: options.qos ?? 'QOS_POLICY_UNSPECIFIED',
        max_in_flight: options.maxInFlight ?? 0, default_deadline_us: options.defaultDeadlineUs ?? 0,
      },
    });
    return new Promise((resolve, reject) => {
      const onError = (err: Error): void => reject(err);
      call.once('error', onError);
      call.once('data', (msg) => {
        call.removeListener('error', onError);
        call.pause();
        if (!msg.opened) {
          reject(new Error('the agent did not answer `open` with `opened`'));
          return;
        }
        const o = msg.opened as { model: string; model_version: number; inputs: WireTensor[]; outputs: WireTensor[]; execution_provider: string; variant: string; qos: Qos; max_in_flight: number; stateful: boolean };
        const info = (l: WireTensor[]): { name: string; dtype: DType; shape: number[] }[] => l.map((x) => ({ name: x.name, dtype: dtypeFromWire(x.dtype) as DType, shape: x.shape }));
        resolve(new SensorStreamHandle(call, {
          model: o.model, version: o.model_version, inputs: info(o.inputs), outputs: info(o.outputs), provider: o.execution_provider,
          variant: o.variant, qos: o.qos, maxInFlight: o.max_in_flight, stateful: o.stateful,
        }, poller));
      });
    });
  }

  /**
   * Writes one frame; resolves when grpc-js accepted it into the transport (waits on backpressure). Rejects
   * with the stream's status (a grpc ServiceError) if the stream ended before or while it waited: a full
   * transport never drains once the stream is gone.
   */
  send(frame: FrameToSend): Promise<void> {
    if (this.ended) return Promise.reject(streamEndedError(this.ended));
    if (this.halfClosed) return Promise.reject(sentAfterEnd());
    const ok = this.write(frame);
    if (ok) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const settle = (err?: Error): void => {
        this.call.removeListener('drain', onDrain);
        this.call.removeListener('error', onError);
        this.call.removeListener('status', onStatus);
        this.call.removeListener('close', onClose);
        if (err) reject(err);
        else resolve();
      };
      const onDrain = (): void => settle();
      // grpc-js emits 'error' (a ServiceError) before 'status' when the status is not OK.
      const onError = (err: Error): void => settle(err);
      const onStatus = (status: grpc.StatusObject): void => settle(streamEndedError(status));
      const onClose = (): void => settle(streamEndedError(this.ended));
      this.call.once('drain', onDrain);
      this.call.once('error', onError);
      this.call.once('status', onStatus);
      this.call.once('close', onClose);
    });
  }

  /** Writes without waiting: for tests that flood the agent. Returns false when the transport is full. */
  sendNoWait(frame: FrameToSend): boolean {
    if (this.halfClosed) throw sentAfterEnd();
    return this.write(frame);
  }

  private write(frame: FrameToSend): boolean {
    const ok = this.call.write(encodeFrame(frame));
    this.awaiting++;
    this.poller.sent();
    return ok;
  }

  /**
   * No more frames; results of frames already sent still arrive. A send after this is refused
   * (FAILED_PRECONDITION) without touching the stream: writing after the end would destroy it, results and all.
   */
  end(): void {
    this.halfClosed = true;
    this.call.end();
  }

  cancel(): void {
    this.call.cancel();
  }

  /**
   * Results in sequence order; ends when the agent ends the stream (after `end()` and the last result), throws
   * its status if that was an error. Leaving the loop early cancels the call: nothing could read it any more.
   */
  async *results(): AsyncGenerator<FrameResult> {
    let finished = false;
    try {
      for await (const msg of this.call as AsyncIterable<{ result?: Record<string, unknown> }>) {
        const r = msg.result as { seq: number; status: ResultStatus; message: string; outputs: WireTensor[]; model_version: number; timings?: { queue_us: number; inference_us: number; total_us: number }; capture_time_us: number; batch_size: number } | undefined;
        if (!r) continue;
        if (this.awaiting > 0) {
          this.awaiting--;
          this.poller.received();
        }
        const outputs: Record<string, Tensor> = {};
        for (const t of r.outputs) outputs[t.name] = fromWire(t);
        yield {
          seq: r.seq, status: r.status, message: r.message, outputs, version: r.model_version,
          timings: { queueUs: r.timings?.queue_us ?? 0, inferenceUs: r.timings?.inference_us ?? 0, totalUs: r.timings?.total_us ?? 0 },
          captureTimeUs: r.capture_time_us, batchSize: r.batch_size,
        };
      }
      finished = true;
      // grpc-js reports an error status once, as an 'error' event: one that came before this loop started
      // reading reached nobody, and the readable side just ends.
      if (this.ended && this.ended.code !== grpc.status.OK) throw statusError(this.ended);
    } finally {
      // Destroying the readable side (what an early `break` does) does not end a grpc-js call by itself.
      if (!finished) this.call.cancel();
    }
  }
}

export interface EdgeAgentClientOptions {
  /** 'host:port' or 'unix:/path'. */
  readonly address: string;
  readonly credentials?: grpc.ChannelCredentials;
  readonly channelOptions?: grpc.ChannelOptions;
  /**
   * Poll the event loop for up to this long while a lone frame's result is awaited, instead of sleeping
   * (see ResultPoller): for closed-loop callers that want the lowest latency and have a core to spare.
   * Default 0: off.
   */
  readonly busyPollUs?: number;
}

/** A typed client of edge-agent's native streaming API and its health service. */
export class EdgeAgentClient {
  private readonly client: grpc.Client & { Stream(options?: grpc.CallOptions): Duplex };
  private readonly poller: ResultPoller;
  private readonly health: grpc.Client & { Check(req: { service: string }, cb: (err: grpc.ServiceError | null, res?: { status: string }) => void): void };

  constructor(readonly options: EdgeAgentClientOptions) {
    const pkg = grpc.loadPackageDefinition(protoLoader.loadSync([SENSOR_STREAM_PROTO, 'grpc/health/v1/health.proto'], NATIVE_LOADER_OPTIONS)) as unknown as {
      edge: { v1: { SensorStream: grpc.ServiceClientConstructor } };
      grpc: { health: { v1: { Health: grpc.ServiceClientConstructor } } };
    };
    const creds = options.credentials ?? grpc.credentials.createInsecure();
    const chanOpts = { 'grpc.max_receive_message_length': 64 * 1024 * 1024, ...options.channelOptions };
    this.client = new pkg.edge.v1.SensorStream(options.address, creds, chanOpts) as unknown as EdgeAgentClient['client'];
    this.health = new pkg.grpc.health.v1.Health(options.address, creds, chanOpts) as unknown as EdgeAgentClient['health'];
    // One poller for the client's streams: "one frame outstanding" is about the whole event loop.
    this.poller = new ResultPoller(options.busyPollUs ?? 0);
  }

  /** Frames sent on this client's streams whose results have not arrived (a stream's end abandons its own). */
  get awaitingResults(): number {
    return this.poller.awaiting;
  }

  openStream(options: StreamOpenOptions, callOptions?: grpc.CallOptions): Promise<SensorStreamHandle> {
    return SensorStreamHandle.open(this.client, options, callOptions, this.poller);
  }

  /** grpc.health.v1 status of the agent ('') or of a model. */
  checkHealth(service = ''): Promise<string> {
    return new Promise((resolve, reject) => this.health.Check({ service }, (err, res) => (err ? reject(err) : resolve(res?.status ?? 'UNKNOWN'))));
  }

  close(): void {
    this.client.close();
    this.health.close();
  }
}

/**
 * Synthetic sensor data in a model's input shapes (dynamic dimensions as 1; float inputs a slow sine, others
 * zero): enough to exercise a stream end to end, e.g. from `opened.inputs`.
 */
export function syntheticInputs(specs: OpenedInfo['inputs']): Record<string, Tensor> {
  const inputs: Record<string, Tensor> = {};
  for (const spec of specs) {
    const shape = spec.shape.map((d) => (d < 0 ? 1 : d));
    const data = allocate(spec.dtype, elementCount(shape));
    if (data instanceof Float32Array) for (let i = 0; i < data.length; i++) data[i] = Math.sin(i * 0.01);
    inputs[spec.name] = { dtype: spec.dtype, shape, data };
  }
  return inputs;
}
