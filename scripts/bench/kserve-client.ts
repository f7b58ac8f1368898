import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { join } from 'node:path';
import { PROTO_DIR } from '../../agent/server/index.js';
import type { Tensor } from '../../agent/runtime/index.js';
import { ResultPoller } from '../../agent/client/index.js';
import type { Outputs } from './bare.js';

/** The agent's KServe loader options (agent/server/kserve-service.ts), so client and echo decode alike. */
export const KSERVE_BENCH_LOADER_OPTIONS: protoLoader.Options = { keepCase: true, longs: String, enums: String, defaults: true, arrays: true, oneofs: true };

const DATATYPE: Record<string, string> = { float32: 'FP32', int64: 'INT64', float16: 'FP16', uint8: 'UINT8', int32: 'INT32', float64: 'FP64' };

interface InferResponse {
  outputs: { name: string; datatype: string; shape: string[] }[];
  raw_output_contents: Buffer[];
}

type Unary = (req: object, meta: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: InferResponse) => void) => void;

let ctor: grpc.ServiceClientConstructor | undefined;
function clientCtor(): grpc.ServiceClientConstructor {
  ctor ??= (grpc.loadPackageDefinition(protoLoader.loadSync('grpc_service.proto', { ...KSERVE_BENCH_LOADER_OPTIONS, includeDirs: [join(PROTO_DIR, 'inference')] })) as unknown as {
    inference: { GRPCInferenceService: grpc.ServiceClientConstructor };
  }).inference.GRPCInferenceService;
  return ctor;
}

export interface SequenceOptions {
  /** Triton sequence id (stateful models on the agent); the first request of a client sends sequence_start. */
  readonly id: number;
}

/** A ModelInferRequest with raw contents: the fast path Triton's clients use. */
export function inferRequest(model: string, inputs: Readonly<Record<string, Tensor>>, sequence?: { id: number; start: boolean }): object {
  const names = Object.keys(inputs);
  return {
    model_name: model, model_version: '', id: '',
    inputs: names.map((name) => {
      const t = inputs[name] as Tensor;
      return { name, datatype: DATATYPE[t.dtype], shape: t.shape.map(String) };
    }),
    raw_input_contents: names.map((name) => {
      const t = inputs[name] as Tensor;
      return Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    }),
    ...(sequence ? {
      parameters: {
        sequence_id: { int64_param: String(sequence.id) },
        ...(sequence.start ? { sequence_start: { bool_param: true } } : {}),
      },
    } : {}),
  };
}

const VIEW: Record<string, (b: Buffer) => ArrayLike<number | bigint>> = {
  FP32: (b) => new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength)),
  INT64: (b) => new BigInt64Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength)),
};

export function responseOutputs(res: InferResponse): Outputs {
  const out: Outputs = {};
  res.outputs.forEach((o, i) => {
    const raw = res.raw_output_contents[i] as Buffer;
    const view = (VIEW[o.datatype] ?? VIEW.FP32 as (b: Buffer) => ArrayLike<number>)(raw);
    out[o.name] = { dims: o.shape.map(Number), data: Array.from(view, Number) };
  });
  return out;
}

/** KServe v2 gRPC client for the bench: unary ModelInfer and the ModelStreamInfer stream. */
export class KServeBenchClient {
  private readonly client: grpc.Client;
  private readonly poller: ResultPoller;

  /** @param busyPollUs as EdgeAgentClient's option: poll while a lone response is awaited (0: off). */
  constructor(address: string, busyPollUs = 0) {
    this.poller = new ResultPoller(busyPollUs);
    const C = clientCtor();
    this.client = new C(address, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': 64 * 1024 * 1024 });
  }

  infer(request: object): Promise<InferResponse> {
    const fn = (this.client as unknown as { ModelInfer: Unary }).ModelInfer.bind(this.client);
    this.poller.sent();
    return new Promise((resolve, reject) => fn(request, new grpc.Metadata(), {}, (err, res) => {
      this.poller.received();
      if (err) reject(err);
      else resolve(res);
    }));
  }

  /** Triton's RepositoryModelLoad: (re)loads a model from the agent's repository; resolves once it serves. */
  repositoryModelLoad(model: string): Promise<void> {
    const fn = (this.client as unknown as { RepositoryModelLoad: Unary }).RepositoryModelLoad.bind(this.client);
    return new Promise((resolve, reject) => fn({ model_name: model }, new grpc.Metadata(), {}, (err) => (err ? reject(err) : resolve())));
  }

  /** A ModelStreamInfer call used closed-loop: `infer` writes one request and resolves with its response. */
  openStream(): { infer(request: object): Promise<InferResponse>; end(): void } {
    const call = (this.client as unknown as { ModelStreamInfer(): grpc.ClientDuplexStream<object, { error_message: string; infer_response: InferResponse }> }).ModelStreamInfer();
    const waiting: { resolve: (r: InferResponse) => void; reject: (e: Error) => void }[] = [];
    call.on('data', (m: { error_message: string; infer_response: InferResponse }) => {
      const w = waiting.shift();
      if (!w) return;
      this.poller.received();
      if (m.error_message) w.reject(new Error(m.error_message));
      else w.resolve(m.infer_response);
    });
    call.on('error', (err) => {
      this.poller.abandoned(waiting.length);
      for (const w of waiting.splice(0)) w.reject(err);
    });
    return {
      infer: (request) => new Promise((resolve, reject) => {
        waiting.push({ resolve, reject });
        call.write(request);
        this.poller.sent();
      }),
      end: () => call.end(),
    };
  }

  close(): void {
    this.client.close();
  }
}
