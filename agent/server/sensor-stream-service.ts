import { performance } from 'node:perf_hooks';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { join } from 'node:path';
import { EdgeAgentError, errorMessage, InvalidInputError, UnavailableError, type ErrorCode } from '../errors.js';
import type { Logger } from '../logger.js';
import type { InferenceRequest, InferenceResult, InferenceRuntimeApi, QosPolicy } from '../runtime/index.js';
import { decodeTensors, encodeTensors, tensorInfo, type WireTensor } from './native-codec.js';
import { PROTO_DIR } from './proto-path.js';
import { capStatusDetails, toGrpcStatus } from './status-map.js';
import type { StreamAdmission } from './stream-admission.js';

export const SENSOR_STREAM_PROTO = join(PROTO_DIR, 'edge', 'v1', 'sensor_stream.proto');

/** int64 as JS numbers: shapes, versions and µs timestamps all fit in 2^53. Bytes stay Buffers (views). */
export const NATIVE_LOADER_OPTIONS: protoLoader.Options = { keepCase: true, longs: Number, enums: String, defaults: true, arrays: true, oneofs: true, includeDirs: [PROTO_DIR] };

interface WireOpen { model: string; model_version: number; qos: string; max_in_flight: number; default_deadline_us: number }
interface WireFrame { seq: number; capture_time_us: number; inputs: WireTensor[]; deadline_us: number }
interface WireRequest { kind?: 'open' | 'frame'; open?: WireOpen; frame?: WireFrame }

interface WireResult {
  seq: number;
  status: string;
  message: string;
  outputs: WireTensor[];
  model_version: number;
  timings?: { queue_us: number; inference_us: number; total_us: number };
  capture_time_us: number;
  batch_size: number;
}

const RESULT_STATUS: Partial<Record<ErrorCode, string>> = {
  INVALID_ARGUMENT: 'INVALID_ARGUMENT', DROPPED: 'DROPPED', DEADLINE_EXCEEDED: 'DEADLINE_EXCEEDED',
  UNAVAILABLE: 'UNAVAILABLE', RESOURCE_EXHAUSTED: 'RESOURCE_EXHAUSTED', FAILED_PRECONDITION: 'FAILED_PRECONDITION',
  NOT_FOUND: 'INVALID_ARGUMENT',
};

/** Per-stream defaults; a config reload replaces them for streams opened afterwards. */
export interface StreamDefaults {
  readonly defaultQos: QosPolicy;
  readonly defaultMaxInFlight: number;
  readonly maxInFlightLimit: number;
}

export interface SensorStreamOptions {
  readonly runtime: InferenceRuntimeApi;
  readonly log: Logger;
  readonly defaults: StreamDefaults;
  readonly admission: StreamAdmission;
  /** Called when a frame arrives and after each answer is written (the event-loop spinner). */
  readonly onArrival?: (source: object) => void;
  readonly onAnswered?: () => void;
  /** Active-stream gauge for telemetry. */
  readonly onStreamOpened?: () => void;
  readonly onStreamClosed?: () => void;
}

type DuplexCall = grpc.ServerDuplexStream<WireRequest, { opened?: unknown; result?: WireResult }>;

let streamCounter = 0;

/**
 * One client stream: binds to a model on `open`, then turns frames into runtime requests. Results go back in
 * the order frames arrived, whatever order the batcher finished them in. Flow control is pull-based: at
 * `max_in_flight` frames (accepted, not yet written back) the call is paused, so grpc-js stops reading and
 * HTTP/2 flow control pushes back on the client; it resumes when results drain.
 */
class SensorStream {
  private bound: { model: string; version: number | undefined; qos: QosPolicy; maxInFlight: number; deadlineUs: number; stateful: boolean } | undefined;
  private readonly pending: { settled: boolean; result?: WireResult }[] = [];
  private inFlight = 0;
  private paused = false;
  private writeBlocked = false;
  private clientDone = false;
  private closed = false;
  private draining = false;
  private readonly seqId = `stream-${process.pid}-${++streamCounter}`;
  private seqStarted = false;
  private readonly streamKey = {};
  /** Frames this stream accepted into the agent (for tests and telemetry). */
  accepted = 0;

  constructor(
    private readonly call: DuplexCall,
    private readonly o: SensorStreamOptions,
    private readonly defaults: () => StreamDefaults,
    private readonly onClose: (s: SensorStream) => void,
  ) {
    call.on('data', (msg: WireRequest) => this.onMessage(msg));
    call.on('end', () => { this.clientDone = true; this.maybeFinish(); });
    call.on('cancelled', () => this.close());
    call.on('error', () => this.close());
    call.on('drain', () => { this.writeBlocked = false; this.flush(); });
  }

  private fail(code: grpc.status, details: string): void {
    if (this.closed) return;
    this.call.emit('error', { code, details: capStatusDetails(details), metadata: new grpc.Metadata() });
    this.close();
  }

  private close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.bound?.stateful) this.o.runtime.endSequence(this.seqId);
    this.onClose(this);
  }

  private onMessage(msg: WireRequest): void {
    if (this.closed) return;
    if (msg.kind === 'open' && msg.open) return this.open(msg.open);
    if (msg.kind === 'frame' && msg.frame) {
      if (!this.bound) return this.fail(grpc.status.FAILED_PRECONDITION, 'the first message of a stream must be `open` (model, qos, max_in_flight)');
      return this.frame(msg.frame);
    }
    this.fail(grpc.status.INVALID_ARGUMENT, 'empty StreamRequest: set `open` or `frame`');
  }

  private open(open: WireOpen): void {
    if (this.bound) return this.fail(grpc.status.FAILED_PRECONDITION, 'stream is already open; send frames');
    if (!open.model) return this.fail(grpc.status.INVALID_ARGUMENT, 'open.model is empty');
    const version = open.model_version > 0 ? open.model_version : undefined;
    let info;
    try {
      info = this.o.runtime.modelInfo(open.model, version);
    } catch (err) {
      const s = toGrpcStatus(err);
      return this.fail(s.code, s.details);
    }
    if (info.state !== 'READY') return this.fail(grpc.status.UNAVAILABLE, `model '${open.model}' is ${info.state.toLowerCase()}${info.reason ? `: ${info.reason}` : ''}`);
    const d = this.defaults();
    const requested = open.max_in_flight || d.defaultMaxInFlight;
    if (requested > d.maxInFlightLimit) {
      return this.fail(grpc.status.RESOURCE_EXHAUSTED, `open.max_in_flight ${requested} exceeds server.max_in_flight_limit ${d.maxInFlightLimit}`);
    }
    const qos: QosPolicy = open.qos === 'LOSSLESS' || open.qos === 'LATEST_ONLY' ? open.qos : info.defaultQos ?? d.defaultQos;
    const stateful = info.state_tensors.length > 0;
    this.bound = { model: info.name, version, qos, maxInFlight: requested, deadlineUs: open.default_deadline_us, stateful };
    this.write({
      opened: {
        model: info.name, model_version: info.version, inputs: tensorInfo(info.inputs), outputs: tensorInfo(info.outputs),
        execution_provider: info.provider, variant: info.variant, qos, max_in_flight: requested, stateful,
      },
    });
  }

  private frame(frame: WireFrame): void {
    const b = this.bound as NonNullable<SensorStream['bound']>;
    const arrived = performance.now();
    this.o.onArrival?.(this.streamKey);
    const slot: { settled: boolean; result?: WireResult } = { settled: false };
    this.pending.push(slot);
    this.inFlight++;
    this.accepted++;
    if (this.inFlight >= b.maxInFlight && !this.paused) {
      this.paused = true;
      this.call.pause();
    }
    const base = { seq: frame.seq, capture_time_us: frame.capture_time_us };
    if (this.draining) {
      this.settle(slot, this.errorResult(base, new UnavailableError('edge-agent is shutting down: frame not run')));
      return;
    }
    let request: InferenceRequest;
    try {
      const deadlineUs = frame.deadline_us || b.deadlineUs;
      // Per-frame objects are built with every key present (no conditional spreads): object spread cost
      // several µs a frame here and kept V8's GC busy (profiled: about a tenth of the agent's main thread).
      request = {
        inputs: decodeTensors(frame.inputs),
        qos: b.qos,
        streamKey: this.streamKey,
        deadline: deadlineUs > 0 ? arrived + deadlineUs / 1000 : undefined,
        sequence: b.stateful ? { id: this.seqId, start: !this.seqStarted, owned: true } : undefined,
      };
    } catch (err) {
      this.settle(slot, this.errorResult(base, err));
      return;
    }
    if (b.stateful) this.seqStarted = true;
    this.o.runtime.submit(b.model, b.version, request).then(
      (r) => this.settle(slot, this.okResult(base, r)),
      (err: unknown) => {
        // A stateful stream whose first frame failed validation has not started its sequence yet.
        if (b.stateful && err instanceof InvalidInputError && request.sequence?.start) this.seqStarted = false;
        this.settle(slot, this.errorResult(base, err));
      },
    );
  }

  private okResult(base: { seq: number; capture_time_us: number }, r: InferenceResult): WireResult {
    return {
      seq: base.seq, capture_time_us: base.capture_time_us, status: 'OK', message: '', outputs: encodeTensors(r.outputs), model_version: r.version, batch_size: r.batchSize,
      timings: { queue_us: Math.round(r.timings.queueUs), inference_us: Math.round(r.timings.inferUs), total_us: Math.round(r.timings.totalUs) },
    };
  }

  private errorResult(base: { seq: number; capture_time_us: number }, err: unknown): WireResult {
    const code = err instanceof EdgeAgentError ? RESULT_STATUS[err.code] ?? 'INTERNAL' : 'INTERNAL';
    if (code === 'INTERNAL') this.o.log.error({ err: errorMessage(err), model: this.bound?.model }, 'frame failed');
    return { seq: base.seq, status: code, message: code === 'INTERNAL' ? toGrpcStatus(err).details : errorMessage(err), outputs: [], model_version: 0, capture_time_us: base.capture_time_us, batch_size: 0 };
  }

  private settle(slot: { settled: boolean; result?: WireResult }, result: WireResult): void {
    slot.settled = true;
    slot.result = result;
    this.flush();
  }

  /** Writes settled results in arrival order, honouring the socket's backpressure. */
  private flush(): void {
    while (!this.closed && !this.writeBlocked && this.pending.length > 0 && (this.pending[0] as { settled: boolean }).settled) {
      const slot = this.pending.shift() as { result: WireResult };
      this.inFlight--;
      if (!this.write({ result: slot.result })) this.writeBlocked = true;
      this.o.onAnswered?.();
    }
    const b = this.bound;
    if (this.paused && !this.writeBlocked && b && this.inFlight < b.maxInFlight) {
      this.paused = false;
      this.call.resume();
    }
    this.maybeFinish();
  }

  private write(msg: { opened?: unknown; result?: WireResult }): boolean {
    if (this.closed) return true;
    return this.call.write(msg);
  }

  private maybeFinish(): void {
    if (this.closed || this.pending.length > 0) return;
    if (this.clientDone) {
      this.call.end();
      this.close();
    } else if (this.draining) {
      // Every frame the agent accepted has its result on the wire before this status: the client knows that
      // frames it sent without a result were not run, and that it should reconnect.
      this.fail(grpc.status.UNAVAILABLE, 'edge-agent is shutting down; every accepted frame was answered');
    }
  }

  /** Shutdown: answer the frames already accepted, refuse newer ones (UNAVAILABLE results), then end the stream. */
  drain(): void {
    this.draining = true;
    this.maybeFinish();
  }
}

export interface SensorStreamService {
  readonly definition: grpc.ServiceDefinition;
  readonly implementation: grpc.UntypedServiceImplementation;
  /** Streams open now. */
  readonly activeStreams: () => number;
  /** Frames accepted over all streams since start. */
  readonly framesAccepted: () => number;
  /** Stops taking frames on every open stream; resolves once each has answered what it accepted. */
  drain(): Promise<void>;
  /** New defaults for streams opened from now on (open streams keep what they were opened with). */
  setDefaults(defaults: StreamDefaults): void;
}

export function createSensorStreamService(o: SensorStreamOptions): SensorStreamService {
  const pkg = grpc.loadPackageDefinition(protoLoader.loadSync(SENSOR_STREAM_PROTO, NATIVE_LOADER_OPTIONS)) as unknown as {
    edge: { v1: { SensorStream: grpc.ServiceClientConstructor } };
  };
  const definition = pkg.edge.v1.SensorStream.service;
  const streams = new Set<SensorStream>();
  let acceptedClosed = 0;
  let draining = false;
  let drainWaiter: (() => void) | undefined;
  let defaults = o.defaults;

  const onClose = (s: SensorStream): void => {
    if (!streams.delete(s)) return;
    acceptedClosed += s.accepted;
    o.admission.release(s);
    o.onStreamClosed?.();
    if (draining && streams.size === 0) drainWaiter?.();
  };

  const implementation: grpc.UntypedServiceImplementation = {
    Stream: (call: DuplexCall) => {
      if (draining) {
        call.emit('error', { code: grpc.status.UNAVAILABLE, details: 'edge-agent is shutting down; not accepting new streams' });
        return;
      }
      const refusal = o.admission.admit(call.getPeer());
      if (refusal) {
        call.emit('error', { code: grpc.status.RESOURCE_EXHAUSTED, details: refusal });
        return;
      }
      const s = new SensorStream(call, o, () => defaults, onClose);
      o.admission.bind(s, call.getPeer());
      streams.add(s);
      o.onStreamOpened?.();
    },
  };

  return {
    definition,
    implementation,
    activeStreams: () => streams.size,
    framesAccepted: () => acceptedClosed + [...streams].reduce((n, s) => n + s.accepted, 0),
    setDefaults: (d) => { defaults = d; },
    drain: () => {
      draining = true;
      if (streams.size === 0) return Promise.resolve();
      const done = new Promise<void>((resolve) => { drainWaiter = resolve; });
      for (const s of streams) s.drain();
      return done;
    },
  };
}
