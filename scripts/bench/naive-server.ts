// The baseline: a KServe ModelInfer server as a user would write it in an afternoon — grpc-js unary calls, one
// onnxruntime session per model, one session.run per request, no batching, no streams, no worker threads.
//   node dist/scripts/bench/naive-server.js tiny=/path/model.onnx classifier=/path/model.onnx
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import * as ort from 'onnxruntime-node';
import { join } from 'node:path';
import { PROTO_DIR } from '../../agent/server/index.js';

type Msg = Record<string, any>; // decoded protobuf, loosely typed as a user writes it
const TYPES: Record<string, [ort.Tensor.Type, new (b: ArrayBuffer) => ort.Tensor.DataType]> = { FP32: ['float32', Float32Array], INT64: ['int64', BigInt64Array] };
const DATATYPE: Record<string, string> = { float32: 'FP32', int64: 'INT64' };

const definition = protoLoader.loadSync('grpc_service.proto', { includeDirs: [join(PROTO_DIR, 'inference')], keepCase: true, longs: String, enums: String, defaults: true });
const { inference } = grpc.loadPackageDefinition(definition) as Msg;
const sessions = new Map<string, ort.InferenceSession>();
for (const arg of process.argv.slice(2)) {
  const [name, path] = arg.split('=') as [string, string];
  sessions.set(name, await ort.InferenceSession.create(path));
}

const server = new grpc.Server({ 'grpc.max_receive_message_length': 16 * 1024 * 1024 });
server.addService(inference.GRPCInferenceService.service, {
  async ModelInfer(call: grpc.ServerUnaryCall<Msg, Msg>, callback: grpc.sendUnaryData<Msg>) {
    try {
      const req = call.request;
      const session = sessions.get(req.model_name);
      if (!session) return callback({ code: grpc.status.NOT_FOUND, details: `no model ${req.model_name}` });
      const feeds: Record<string, ort.Tensor> = {};
      req.inputs.forEach((input: Msg, i: number) => {
        const raw: Buffer = req.raw_input_contents[i];
        const [type, Ctor] = TYPES[input.datatype] as [ort.Tensor.Type, new (b: ArrayBuffer) => ort.Tensor.DataType];
        const bytes = raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength) as ArrayBuffer; // aligned copy
        feeds[input.name] = new ort.Tensor(type, new Ctor(bytes), input.shape.map(Number));
      });
      const results = await session.run(feeds);
      const names = Object.keys(results);
      callback(null, {
        model_name: req.model_name, model_version: '1', id: req.id,
        outputs: names.map((n) => ({ name: n, datatype: DATATYPE[results[n]!.type], shape: results[n]!.dims.map(String) })),
        raw_output_contents: names.map((n) => Buffer.from((results[n]!.data as Float32Array).buffer, (results[n]!.data as Float32Array).byteOffset, (results[n]!.data as Float32Array).byteLength)),
      });
    } catch (err) {
      callback({ code: grpc.status.INTERNAL, details: String(err) });
    }
  },
});
server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) throw err;
  console.log(JSON.stringify({ listening: { tcp: `127.0.0.1:${port}` } }));
});
