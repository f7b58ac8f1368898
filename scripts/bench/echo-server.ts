import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { agentConfigSchema } from '../../agent/config/index.js';
import { NATIVE_LOADER_OPTIONS, PROTO_DIR, SENSOR_STREAM_PROTO, tuneHttp2Sessions } from '../../agent/server/index.js';
import type * as ort from 'onnxruntime-node';
import { bareFeeds, openBareSession, type BenchProvider } from './bare.js';
import { KSERVE_BENCH_LOADER_OPTIONS } from './kserve-client.js';
import { workload } from './workloads.js';

/**
 * The transport floor: edge.v1.SensorStream and KServe's ModelInfer/ModelStreamInfer over the same grpc-js
 * server, proto definitions, loader options, listeners and message limits as the agent, answering every frame
 * at once with zero-filled outputs of the model's real output sizes. No runtime, no queue, no inference: what
 * is left of a round trip here is what gRPC itself costs.
 *
 *   node dist/scripts/bench/echo-server.js --unix PATH --outputs '{"tiny":[{"name":"y","dtype":"float32","shape":[1,16]}]}'
 * Prints {"listening":{"tcp":"127.0.0.1:PORT","unix":"unix:PATH"}} when ready.
 *
 * With `--run '{"classifier":"FILE"}' --provider cpu` it is the floor for a model instead: before answering a
 * native frame of that model it runs bare's session once, in this process, on bare's own feeds (not the
 * frame's bytes: nothing is decoded), on the event loop. That is the least any server can do per frame with
 * this gRPC stack and this model: the transport plus one inference run, with nothing of the agent between.
 */

interface OutputSpec { name: string; dtype: string; shape: number[] }

const NATIVE_DTYPE: Record<string, string> = { float32: 'FLOAT32', int64: 'INT64', float16: 'FLOAT16', uint8: 'UINT8', int32: 'INT32' };
const KSERVE_DTYPE: Record<string, string> = { float32: 'FP32', int64: 'INT64', float16: 'FP16', uint8: 'UINT8', int32: 'INT32' };
const BYTES: Record<string, number> = { float32: 4, int64: 8, float16: 2, uint8: 1, int32: 4 };

function optionalArg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function arg(name: string): string {
  const v = optionalArg(name);
  if (v === undefined) throw new Error(`echo-server: missing ${name}`);
  return v;
}

const outputs = JSON.parse(arg('--outputs')) as Record<string, OutputSpec[]>;
const unixPath = arg('--unix');
const runs = new Map<string, { session: ort.InferenceSession; feeds: Record<string, ort.Tensor> }>();
for (const [model, file] of Object.entries(JSON.parse(optionalArg('--run') ?? '{}') as Record<string, string>)) {
  const session = await openBareSession(file, (optionalArg('--provider') ?? 'cpu') as BenchProvider);
  const feeds = bareFeeds(workload(model), 1);
  await session.run(feeds); // onnxruntime's first run initialises lazily; bare's first run is untimed too
  runs.set(model, { session, feeds });
}
const zeros = (o: OutputSpec): Buffer => Buffer.alloc(o.shape.reduce((a, b) => a * b, 1) * (BYTES[o.dtype] ?? 4));

const native = grpc.loadPackageDefinition(protoLoader.loadSync(SENSOR_STREAM_PROTO, NATIVE_LOADER_OPTIONS)) as unknown as { edge: { v1: { SensorStream: grpc.ServiceClientConstructor } } };
const kserve = grpc.loadPackageDefinition(protoLoader.loadSync('grpc_service.proto', { ...KSERVE_BENCH_LOADER_OPTIONS, includeDirs: [join(PROTO_DIR, 'inference')] })) as unknown as {
  inference: { GRPCInferenceService: grpc.ServiceClientConstructor };
};

interface WireFrame { seq: number; capture_time_us: number }
interface WireRequest { kind?: string; open?: { model: string }; frame?: WireFrame }

function nativeStream(call: grpc.ServerDuplexStream<WireRequest, object>): void {
  let model = '';
  call.on('data', (msg: WireRequest) => {
    if (msg.kind === 'open' && msg.open) {
      model = msg.open.model;
      const outs = outputs[model] ?? [];
      call.write({ opened: { model, model_version: 1, inputs: [], outputs: outs.map((o) => ({ name: o.name, dtype: NATIVE_DTYPE[o.dtype], shape: o.shape })), execution_provider: 'none', variant: 'fp32', qos: 'LOSSLESS', max_in_flight: 8, stateful: false } });
      return;
    }
    const f = msg.frame as WireFrame;
    const outs = outputs[model] ?? [];
    const answer = (): boolean => call.write({
      result: {
        seq: f.seq, status: 'OK', message: '', model_version: 1, capture_time_us: f.capture_time_us, batch_size: 1,
        outputs: outs.map((o) => ({ name: o.name, dtype: NATIVE_DTYPE[o.dtype], shape: o.shape, data: zeros(o) })),
        timings: { queue_us: 0, inference_us: 0, total_us: 0 },
      },
    });
    const run = runs.get(model);
    if (run) void run.session.run(run.feeds).then(answer, (err: unknown) => call.destroy(err as Error));
    else answer();
  });
  call.on('end', () => call.end());
  call.on('error', () => undefined);
}

interface InferRequest { model_name: string; model_version: string; id: string }

function inferResponse(req: InferRequest): object {
  const outs = outputs[req.model_name] ?? [];
  return {
    model_name: req.model_name, model_version: '1', id: req.id,
    outputs: outs.map((o) => ({ name: o.name, datatype: KSERVE_DTYPE[o.dtype], shape: o.shape })),
    raw_output_contents: outs.map(zeros),
  };
}

const server = new grpc.Server({
  // The agent's listener options (agent/server/grpc-server.ts), so message limits and stream caps match.
  'grpc.max_receive_message_length': 16 * 1024 * 1024,
  'grpc.max_send_message_length': 16 * 1024 * 1024,
  'grpc.max_concurrent_streams': 1000,
});
server.addService(native.edge.v1.SensorStream.service, { Stream: nativeStream });
server.addService(kserve.inference.GRPCInferenceService.service, {
  ModelInfer: (call: grpc.ServerUnaryCall<InferRequest, object>, cb: grpc.sendUnaryData<object>) => cb(null, inferResponse(call.request)),
  ModelStreamInfer: (call: grpc.ServerDuplexStream<InferRequest, object>) => {
    call.on('data', (req: InferRequest) => call.write({ error_message: '', infer_response: inferResponse(req) }));
    call.on('end', () => call.end());
    call.on('error', () => undefined);
  },
});

const bind = (address: string): Promise<number> => new Promise((resolve, reject) => server.bindAsync(address, grpc.ServerCredentials.createInsecure(), (err, port) => (err ? reject(err) : resolve(port))));
const port = await bind('127.0.0.1:0');
rmSync(unixPath, { force: true }); // a socket left by a killed run would make bind fail
await bind(`unix:${unixPath}`);
// The agent's transport settings (TCP_NODELAY, HTTP/2 windows at the agent's defaults), so the floor is its floor.
const defaults = agentConfigSchema.parse({}).server;
tuneHttp2Sessions(server, { streamWindowBytes: defaults.http2_stream_window_bytes, connectionWindowBytes: defaults.http2_connection_window_bytes });
process.stdout.write(`${JSON.stringify({ listening: { tcp: `127.0.0.1:${port}`, unix: `unix:${unixPath}` } })}\n`);
process.on('SIGTERM', () => { server.forceShutdown(); process.exit(0); });
