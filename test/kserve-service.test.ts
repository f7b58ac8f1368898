import t from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import * as ort from 'onnxruntime-node';
import { createKServeService, KSERVE_EXTENSIONS } from '../agent/server/kserve-service.js';
import type { InferenceRuntime } from '../agent/runtime/index.js';
import { copyDemoRepo, DEMO_REPO, ROOT, startRuntime } from './helpers/runtime.js';
import { mulberry32 as seeded } from '../scripts/demo-models.js';

// End to end: a real runtime over the demo models, the KServe service on a real grpc.Server on loopback, and a
// client generated from proto/inference/grpc_service.proto by @grpc/proto-loader, as any Triton client would be.

// ---- client ----

const PROTO_DIR = join(ROOT, 'proto', 'inference');
const clientDefinition = protoLoader.loadSync(join(PROTO_DIR, 'grpc_service.proto'), {
  includeDirs: [PROTO_DIR],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const ClientCtor = (grpc.loadPackageDefinition(clientDefinition) as unknown as { inference: { GRPCInferenceService: grpc.ServiceClientConstructor } })
  .inference.GRPCInferenceService;

// Decoded protobuf messages: the tests index into them freely and check the values they find.
type Msg = Record<string, any>;

interface Harness {
  address: string;
  client: grpc.Client;
  call(method: string, request: object, options?: grpc.CallOptions): Promise<Msg>;
  stream(requests: readonly object[]): Promise<Msg[]>;
}

async function serve(tt: { teardown(fn: () => void): void }, runtime: InferenceRuntime): Promise<Harness> {
  const server = new grpc.Server();
  const svc = createKServeService(runtime, { name: 'edge-agent', version: '9.9.9' });
  server.addService(svc.definition, svc.implementation);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  const address = `127.0.0.1:${port}`;
  const client = new ClientCtor(address, grpc.credentials.createInsecure());
  tt.teardown(() => {
    client.close();
    server.forceShutdown();
  });
  const c = client as unknown as Record<string, (...args: unknown[]) => unknown>;
  return {
    address,
    client,
    call: (method, request, options = {}) =>
      new Promise((resolve, reject) => {
        c[method]!.call(client, request, new grpc.Metadata(), options, (err: grpc.ServiceError | null, res: Msg) => (err ? reject(err) : resolve(res)));
      }),
    stream: (requests) =>
      new Promise((resolve, reject) => {
        const s = c['ModelStreamInfer']!.call(client) as grpc.ClientDuplexStream<object, Msg>;
        const got: Msg[] = [];
        s.on('data', (m: Msg) => got.push(m));
        s.on('error', reject);
        s.on('end', () => resolve(got));
        for (const r of requests) s.write(r);
        s.end();
      }),
  };
}

async function rejection(p: Promise<unknown>): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (err) {
    return err as grpc.ServiceError;
  }
  throw new Error('expected the call to fail');
}

// ---- direct onnxruntime reference ----

const sessions = new Map<string, Promise<ort.InferenceSession>>();
async function direct(model: string, feeds: Record<string, ort.Tensor>): Promise<Record<string, ort.Tensor>> {
  let s = sessions.get(model);
  if (!s) sessions.set(model, (s = ort.InferenceSession.create(join(DEMO_REPO, model, '1', 'model.onnx'))));
  return (await s).run(feeds);
}
t.teardown(async () => {
  for (const s of sessions.values()) await (await s).release();
});

function randomFloats(n: number, rnd: () => number): Float32Array {
  return Float32Array.from({ length: n }, () => rnd() * 2 - 1);
}

const bytesOf = (a: ArrayBufferView): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
const floats = (b: Buffer): Float32Array => new Float32Array(Uint8Array.from(b).buffer);

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = a.length === b.length ? 0 : Infinity;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

const u64 = (v: string) => ({ uint64_param: v });
const str = (v: string) => ({ string_param: v });
const flag = (v: boolean) => ({ bool_param: v });

// ---- shared server over classifier, tiny, filter, types ----

const runtime = await startRuntime(t, copyDemoRepo(t, ['classifier', 'tiny', 'filter', 'types']));
const h = await serve(t, runtime);

t.test('ServerLive, ServerReady, ServerMetadata', async (t) => {
  t.same(await h.call('ServerLive', {}), { live: true });
  t.same(await h.call('ServerReady', {}), { ready: true });
  const meta = await h.call('ServerMetadata', {});
  t.equal(meta['name'], 'edge-agent');
  t.equal(meta['version'], '9.9.9');
  t.same(meta['extensions'], KSERVE_EXTENSIONS);
});

t.test('ModelReady', async (t) => {
  t.same(await h.call('ModelReady', { name: 'classifier' }), { ready: true });
  t.same(await h.call('ModelReady', { name: 'classifier', version: '1' }), { ready: true });
  t.same(await h.call('ModelReady', { name: 'classifier', version: '2' }), { ready: false });
  t.same(await h.call('ModelReady', { name: 'nope' }), { ready: false });
  const bad = await rejection(h.call('ModelReady', { name: 'classifier', version: 'latest' }));
  t.equal(bad.code, grpc.status.INVALID_ARGUMENT);
  t.match(bad.details, /version 'latest' is not a non-negative integer/);
});

t.test('ModelMetadata: KServe datatypes, -1 for dynamic dims, onnxruntime platform', async (t) => {
  const meta = await h.call('ModelMetadata', { name: 'types' });
  t.equal(meta['name'], 'types');
  t.same(meta['versions'], ['1']);
  t.equal(meta['platform'], 'onnxruntime_onnx');
  t.same(meta['inputs'], [
    { name: 'f16', datatype: 'FP16', shape: ['-1', '4'] },
    { name: 'i64', datatype: 'INT64', shape: ['-1', '4'] },
    { name: 'u8', datatype: 'UINT8', shape: ['-1', '4'] },
  ]);
  t.same(meta['outputs'].map((o: Msg) => [o['name'], o['datatype']]), [['f16_out', 'FP16'], ['i64_out', 'INT64'], ['u8_out', 'UINT8'], ['sum', 'FP32']]);
  const filter = await h.call('ModelMetadata', { name: 'filter' });
  t.same(filter['inputs'].map((i: Msg) => i['name']), ['x'], 'state inputs are not client inputs');
  const err = await rejection(h.call('ModelMetadata', { name: 'nope' }));
  t.equal(err.code, grpc.status.NOT_FOUND);
  t.match(err.details, /model 'nope'/);
});

t.test('ModelConfig: batch dimension implied by max_batch_size, sequence state, instance group', async (t) => {
  const { config } = await h.call('ModelConfig', { name: 'classifier' });
  t.equal(config['name'], 'classifier');
  t.equal(config['platform'], 'onnxruntime_onnx');
  t.equal(config['backend'], 'onnxruntime');
  t.equal(config['max_batch_size'], 32);
  t.same(config['input'][0], { ...config['input'][0], name: 'image', data_type: 'TYPE_FP32', dims: ['3', '112', '112'] });
  t.same(config['output'][0], { ...config['output'][0], name: 'logits', data_type: 'TYPE_FP32', dims: ['10'] });
  t.equal(config['scheduling_choice'], 'dynamic_batching');
  t.equal(config['instance_group'][0]['kind'], 'KIND_CPU');
  t.equal(config['instance_group'][0]['count'], 1);

  const filter = (await h.call('ModelConfig', { name: 'filter' }))['config'];
  t.equal(filter['scheduling_choice'], 'sequence_batching');
  const state = filter['sequence_batching']['state'];
  t.same(state.map((s: Msg) => [s['input_name'], s['output_name'], s['data_type'], s['dims']]), [['h_in', 'h_out', 'TYPE_FP32', ['32']]]);
  t.equal((await rejection(h.call('ModelConfig', { name: 'nope' }))).code, grpc.status.NOT_FOUND);
});

t.test('ModelInfer FP32 (raw): outputs equal a direct onnxruntime run; id and version echoed', async (t) => {
  const image = randomFloats(3 * 112 * 112, seeded(11));
  const res = await h.call('ModelInfer', {
    model_name: 'classifier',
    id: 'frame-1',
    inputs: [{ name: 'image', datatype: 'FP32', shape: [1, 3, 112, 112] }],
    raw_input_contents: [bytesOf(image)],
  });
  t.equal(res['id'], 'frame-1');
  t.equal(res['model_name'], 'classifier');
  t.equal(res['model_version'], '1', 'empty model_version = the served version');
  t.same(res['outputs'].map((o: Msg) => [o['name'], o['datatype'], o['shape']]), [['logits', 'FP32', ['1', '10']]]);
  t.equal(res['outputs'][0]['contents'], null, 'raw by default: no typed contents');
  const want = await direct('classifier', { image: new ort.Tensor('float32', image, [1, 3, 112, 112]) });
  const diff = maxAbsDiff(floats(res['raw_output_contents'][0]), want['logits']!.data as Float32Array);
  t.ok(diff < 1e-5, `logits equal the direct run (max |diff| ${diff})`);
});

t.test('ModelInfer with typed contents answers with typed contents', async (t) => {
  const x = randomFloats(2 * 1024, seeded(12));
  const res = await h.call('ModelInfer', {
    model_name: 'tiny',
    model_version: '1',
    inputs: [{ name: 'x', datatype: 'FP32', shape: [2, 1024], contents: { fp32_contents: Array.from(x) } }],
  });
  t.same(res['raw_output_contents'], []);
  const y = res['outputs'][0];
  t.same(y['shape'], ['2', '16']);
  const want = await direct('tiny', { x: new ort.Tensor('float32', x, [2, 1024]) });
  t.ok(maxAbsDiff(y['contents']['fp32_contents'], want['y']!.data as Float32Array) < 1e-5, 'typed output equals the direct run');
});

t.test('ModelInfer FP16 (raw), INT64, UINT8: outputs equal a direct onnxruntime run', async (t) => {
  const f16 = new Uint16Array([0x3c00, 0x4000, 0xb800, 0x0000, 0x3555, 0x7bff, 0x8001, 0x4248]); // 1, 2, -0.5, 0, ~0.333, 65504, -tiny, 3.14
  const i64 = new BigInt64Array([-1n, 0n, 7n, 1n << 40n, -(1n << 62n), 123456789012345n, 2n, -3n]);
  const u8 = new Uint8Array([0, 1, 127, 128, 200, 254, 255, 42]);
  const res = await h.call('ModelInfer', {
    model_name: 'types',
    inputs: [
      { name: 'f16', datatype: 'FP16', shape: [2, 4] },
      { name: 'i64', datatype: 'INT64', shape: [2, 4] },
      { name: 'u8', datatype: 'UINT8', shape: [2, 4] },
    ],
    raw_input_contents: [bytesOf(f16), bytesOf(i64), bytesOf(u8)],
  });
  const want = await direct('types', {
    f16: new ort.Tensor('float16', f16, [2, 4]),
    i64: new ort.Tensor('int64', i64, [2, 4]),
    u8: new ort.Tensor('uint8', u8, [2, 4]),
  });
  const outputs = res['outputs'] as Msg[];
  t.same(outputs.map((o) => o['name']), ['f16_out', 'i64_out', 'u8_out', 'sum']);
  t.same(outputs.map((o) => o['datatype']), ['FP16', 'INT64', 'UINT8', 'FP32']);
  const raw = res['raw_output_contents'] as Buffer[];
  const wantF16 = want['f16_out']!.data as Uint16Array;
  t.equal(raw[0]!.toString('hex'), bytesOf(wantF16 instanceof Uint16Array ? wantF16 : new Uint16Array(wantF16)).toString('hex'), 'FP16 bits equal');
  t.equal(raw[1]!.toString('hex'), bytesOf(want['i64_out']!.data as BigInt64Array).toString('hex'), 'INT64 equal');
  t.equal(raw[2]!.toString('hex'), bytesOf(want['u8_out']!.data as Uint8Array).toString('hex'), 'UINT8 equal');
  t.ok(maxAbsDiff(floats(raw[3]!), want['sum']!.data as Float32Array) < 1e-3, 'sum equals');
  t.equal(new BigInt64Array(Uint8Array.from(raw[1]!).buffer)[3], (1n << 40n) + 1n, 'i64_out = i64 + 1');
});

t.test('requested outputs: only those, in the requested order', async (t) => {
  const res = await h.call('ModelInfer', {
    model_name: 'types',
    inputs: [
      { name: 'f16', datatype: 'FP16', shape: [1, 4] },
      { name: 'i64', datatype: 'INT64', shape: [1, 4] },
      { name: 'u8', datatype: 'UINT8', shape: [1, 4] },
    ],
    outputs: [{ name: 'u8_out' }, { name: 'i64_out' }],
    raw_input_contents: [Buffer.alloc(8), bytesOf(new BigInt64Array([1n, 2n, 3n, 4n])), Buffer.from([5, 6, 7, 8])],
  });
  t.same(res['outputs'].map((o: Msg) => o['name']), ['u8_out', 'i64_out']);
  t.same([...res['raw_output_contents'][0]], [5, 6, 7, 8]);
  t.same([...new BigInt64Array(Uint8Array.from(res['raw_output_contents'][1]).buffer)], [2n, 3n, 4n, 5n]);
});

t.test('wire bytes over loopback equal the hand-computed encodings', async (t) => {
  const ascii = (s: string) => Buffer.from(s, 'ascii').toString('hex');
  const le64 = (vals: bigint[]) => bytesOf(new BigInt64Array(vals)).toString('hex');
  // ModelInferRequest (tag = field << 3 | 2 for every LEN field below)
  const request = [
    `0a 05 ${ascii('types')}`, //                                               1 model_name
    `1a 02 ${ascii('w1')}`, //                                                  3 id
    `2a 0f 0a 03 ${ascii('f16')} 12 04 ${ascii('FP16')} 1a 02 01 04`, //        5 inputs {1 name, 2 datatype, 3 shape packed}
    `2a 10 0a 03 ${ascii('i64')} 12 05 ${ascii('INT64')} 1a 02 01 04`,
    `2a 0f 0a 02 ${ascii('u8')} 12 05 ${ascii('UINT8')} 1a 02 01 04`,
    `32 09 0a 07 ${ascii('i64_out')}`, //                                       6 outputs {1 name}
    `32 08 0a 06 ${ascii('u8_out')}`,
    `3a 08 003c 0040 00b8 0000`, //                                             7 raw_input_contents: fp16 1, 2, -0.5, 0
    `3a 20 ${le64([-1n, 0n, 7n, 1n << 40n])}`,
    `3a 04 0102feff`,
  ].join(' ');
  const expected = [
    `0a 05 ${ascii('types')}`, //                                               1 model_name
    `12 01 ${ascii('1')}`, //                                                   2 model_version
    `1a 02 ${ascii('w1')}`, //                                                  3 id
    `2a 14 0a 07 ${ascii('i64_out')} 12 05 ${ascii('INT64')} 1a 02 01 04`, //   5 outputs {name, datatype, shape}
    `2a 13 0a 06 ${ascii('u8_out')} 12 05 ${ascii('UINT8')} 1a 02 01 04`,
    `32 20 ${le64([0n, 1n, 8n, (1n << 40n) + 1n])}`, //                        6 raw_output_contents
    `32 04 0102feff`,
  ].join(' ');
  const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');
  const raw = new grpc.Client(h.address, grpc.credentials.createInsecure());
  t.teardown(() => raw.close());
  const identity = (b: Buffer): Buffer => b;
  const reply = await new Promise<Buffer>((resolve, reject) =>
    raw.makeUnaryRequest('/inference.GRPCInferenceService/ModelInfer', identity, identity, hex(request), (err, res) => (err ? reject(err) : resolve(res!))),
  );
  t.equal(reply.toString('hex'), hex(expected).toString('hex'));
});

t.test('unary errors carry the right gRPC status and a message naming the problem', async (t) => {
  const x = (over: object = {}) => ({ model_name: 'tiny', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [Buffer.alloc(4096)], ...over });
  const cases: [string, object, grpc.status, RegExp][] = [
    ['unknown model', x({ model_name: 'nope' }), grpc.status.NOT_FOUND, /model 'nope' is not loaded/],
    ['unknown version', x({ model_version: '7' }), grpc.status.NOT_FOUND, /version 7/],
    ['unknown input', x({ inputs: [{ name: 'q', datatype: 'FP32', shape: [1, 1024] }] }), grpc.status.INVALID_ARGUMENT, /unknown input 'q'/],
    ['wrong datatype', x({ inputs: [{ name: 'x', datatype: 'INT32', shape: [1, 1024] }] }), grpc.status.INVALID_ARGUMENT, /dtype int32 does not match the model's float32/],
    ['byte count', x({ raw_input_contents: [Buffer.alloc(4095)] }), grpc.status.INVALID_ARGUMENT, /4095 bytes do not match/],
    ['raw and typed', x({ inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1], contents: { fp32_contents: [1] } }] }), grpc.status.INVALID_ARGUMENT, /raw_input_contents/],
    ['BYTES', x({ inputs: [{ name: 'x', datatype: 'BYTES', shape: [1], contents: { bytes_contents: [Buffer.from('hi')] } }], raw_input_contents: [] }), grpc.status.INVALID_ARGUMENT, /BYTES is not supported/],
    ['unknown output', x({ outputs: [{ name: 'zz' }] }), grpc.status.INVALID_ARGUMENT, /unknown output 'zz'/],
    ['stateful without sequence', { model_name: 'filter', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 8] }], raw_input_contents: [Buffer.alloc(32)] }, grpc.status.INVALID_ARGUMENT, /stateful/],
    [
      'sequence never started',
      { model_name: 'filter', parameters: { sequence_id: u64('999') }, inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 8] }], raw_input_contents: [Buffer.alloc(32)] },
      grpc.status.FAILED_PRECONDITION,
      /never started/,
    ],
  ];
  for (const [what, req, code, re] of cases) {
    const err = await rejection(h.call('ModelInfer', req));
    t.equal(err.code, code, `${what}: ${grpc.status[code]}`);
    t.match(err.details, re, `${what}: message`);
  }
});

t.test('ModelStreamInfer: responses in request order, a bad request answers with error_message and the stream goes on', async (t) => {
  const rnd = seeded(13);
  const xs = Array.from({ length: 6 }, () => randomFloats(1024, rnd));
  const good = (i: number) => ({ model_name: 'tiny', id: `r${i}`, inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [bytesOf(xs[i]!)] });
  const requests = [
    good(0),
    good(1),
    { model_name: 'nope', id: 'bad-model' },
    good(2),
    { ...good(3), id: 'bad-shape', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1000] }] },
    good(4),
    good(5),
  ];
  const responses = await h.stream(requests);
  t.same(responses.map((r) => r['infer_response']['id']), ['r0', 'r1', 'bad-model', 'r2', 'bad-shape', 'r4', 'r5']);
  t.match(responses[2]!['error_message'], /model 'nope' is not loaded/);
  t.match(responses[4]!['error_message'], /4096 bytes do not match float32 shape \[1,1000\]/);
  for (const i of [0, 1, 3, 5, 6]) {
    const r = responses[i]!;
    t.equal(r['error_message'], '', `${r['infer_response']['id']} succeeded`);
    const n = Number(r['infer_response']['id'].slice(1));
    const want = await direct('tiny', { x: new ort.Tensor('float32', xs[n]!, [1, 1024]) });
    t.ok(maxAbsDiff(floats(r['infer_response']['raw_output_contents'][0]), want['y']!.data as Float32Array) < 1e-5, `${r['infer_response']['id']} equals its direct run`);
  }
});

t.test('a long stream (more requests than the in-flight window) is answered completely and in order', async (t) => {
  const rnd = seeded(18);
  const xs = Array.from({ length: 8 }, () => randomFloats(1024, rnd));
  const requests = Array.from({ length: 300 }, (_, i) => ({
    model_name: 'tiny',
    id: String(i),
    inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }],
    raw_input_contents: [bytesOf(xs[i % 8]!)],
  }));
  const responses = await h.stream(requests);
  t.equal(responses.length, 300);
  t.same(responses.map((r) => r['infer_response']['id']), requests.map((r) => r.id), 'request order');
  t.ok(responses.every((r) => r['error_message'] === ''), 'all succeeded');
  const want = await direct('tiny', { x: new ort.Tensor('float32', xs[5]!, [1, 1024]) });
  t.ok(maxAbsDiff(floats(responses[293]!['infer_response']['raw_output_contents'][0]), want['y']!.data as Float32Array) < 1e-5);
});

t.test('a stream the client cancels mid-flight leaves the server serving', async (t) => {
  const s = (h.client as unknown as { ModelStreamInfer(): grpc.ClientDuplexStream<object, Msg> }).ModelStreamInfer();
  s.on('error', () => undefined); // CANCELLED, expected
  const x = Buffer.alloc(4096);
  for (let i = 0; i < 20; i++) s.write({ model_name: 'tiny', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [x] });
  s.cancel();
  while (runtime.inFlight() > 0) await new Promise((r) => setTimeout(r, 5));
  t.same(await h.call('ServerLive', {}), { live: true });
  const res = await h.call('ModelInfer', { model_name: 'tiny', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [x] });
  t.same(res['outputs'][0]['shape'], ['1', '16']);
});

t.test('the timeout parameter (µs) becomes the request deadline', async (t) => {
  const req = { model_name: 'tiny', parameters: { timeout: { int64_param: '1' } }, inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [Buffer.alloc(4096)] };
  const err = await rejection(h.call('ModelInfer', req));
  t.equal(err.code, grpc.status.DEADLINE_EXCEEDED, 'a 1 µs budget cannot be met');
  const [res] = await h.stream([req]);
  t.match(res!['error_message'], /deadline/i, 'on a stream the same failure is an error_message');
});

/** Runs the filter model step by step by hand, feeding h_out back as h_in (zeros before the first step). */
async function filterByHand(steps: readonly Float32Array[]): Promise<Float32Array[]> {
  let hState: Float32Array = new Float32Array(32);
  const ys: Float32Array[] = [];
  for (const x of steps) {
    const out = await direct('filter', { x: new ort.Tensor('float32', x, [1, 8]), h_in: new ort.Tensor('float32', hState, [1, 32]) });
    ys.push(out['y']!.data as Float32Array);
    hState = out['h_out']!.data as Float32Array;
  }
  return ys;
}

const filterStep = (id: object, x: Float32Array, over: { start?: boolean; end?: boolean; reqId?: string } = {}) => ({
  model_name: 'filter',
  id: over.reqId ?? '',
  parameters: { sequence_id: id, ...(over.start ? { sequence_start: flag(true) } : {}), ...(over.end ? { sequence_end: flag(true) } : {}) },
  inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 8] }],
  raw_input_contents: [bytesOf(x)],
});

t.test('a sequence (unary calls, uint64 id beyond 2^53) equals running the steps by hand with state fed back', async (t) => {
  const rnd = seeded(14);
  const steps = Array.from({ length: 5 }, () => randomFloats(8, rnd));
  const want = await filterByHand(steps);
  const id = u64('18446744073709551557'); // exact only as a 64-bit integer
  for (let i = 0; i < steps.length; i++) {
    const res = await h.call('ModelInfer', filterStep(id, steps[i]!, { start: i === 0, end: i === steps.length - 1 }));
    t.same(res['outputs'].map((o: Msg) => o['name']), ['y'], 'state outputs are not returned');
    const diff = maxAbsDiff(floats(res['raw_output_contents'][0]), want[i]!);
    t.ok(diff < 1e-5, `step ${i} equals the hand run (max |diff| ${diff})`);
  }
  const after = await rejection(h.call('ModelInfer', filterStep(id, steps[0]!)));
  t.equal(after.code, grpc.status.FAILED_PRECONDITION, 'the sequence was freed at sequence_end');
  // A sequence id that differs only beyond 2^53 is another sequence.
  const near = await rejection(h.call('ModelInfer', filterStep(u64('18446744073709551556'), steps[0]!)));
  t.equal(near.code, grpc.status.FAILED_PRECONDITION);
});

t.test('two interleaved sequences on one stream keep their own state', async (t) => {
  const rnd = seeded(15);
  const a = Array.from({ length: 4 }, () => randomFloats(8, rnd));
  const b = Array.from({ length: 4 }, () => randomFloats(8, rnd));
  const [wantA, wantB] = [await filterByHand(a), await filterByHand(b)];
  const requests: object[] = [];
  for (let i = 0; i < 4; i++) {
    const edge = { start: i === 0, end: i === 3 };
    requests.push(filterStep(u64('7'), a[i]!, { ...edge, reqId: `a${i}` }));
    requests.push(filterStep(str('camera-b'), b[i]!, { ...edge, reqId: `b${i}` }));
  }
  const responses = await h.stream(requests);
  t.same(responses.map((r) => r['infer_response']['id']), ['a0', 'b0', 'a1', 'b1', 'a2', 'b2', 'a3', 'b3']);
  for (const r of responses) {
    const id = r['infer_response']['id'] as string;
    t.equal(r['error_message'], '', `${id} succeeded`);
    const want = (id[0] === 'a' ? wantA : wantB)[Number(id[1])]!;
    t.ok(maxAbsDiff(floats(r['infer_response']['raw_output_contents'][0]), want) < 1e-5, `${id} equals its own sequence's hand run`);
  }
});

t.test('ModelStatistics and RepositoryIndex', async (t) => {
  const before = (await h.call('ModelStatistics', { name: 'tiny' }))['model_stats'][0];
  const x = randomFloats(3 * 1024, seeded(16));
  await h.call('ModelInfer', { model_name: 'tiny', inputs: [{ name: 'x', datatype: 'FP32', shape: [3, 1024] }], raw_input_contents: [bytesOf(x)] });
  const after = (await h.call('ModelStatistics', { name: 'tiny', version: '1' }))['model_stats'][0];
  t.equal(after['name'], 'tiny');
  t.equal(after['version'], '1');
  t.equal(BigInt(after['inference_count']) - BigInt(before['inference_count']), 3n, 'inference_count counts batch rows');
  t.equal(BigInt(after['execution_count']) - BigInt(before['execution_count']), 1n);
  const s = after['inference_stats'];
  t.equal(BigInt(s['success']['count']) - BigInt(before['inference_stats']['success']['count']), 1n, 'one more successful request');
  t.ok(BigInt(s['success']['ns']) > BigInt(before['inference_stats']['success']['ns']), 'success duration grew');
  t.ok(BigInt(s['compute_infer']['ns']) > 0n && BigInt(s['queue']['count']) > 0n);
  t.ok(Number(after['last_inference']) > Date.now() - 60_000, 'last_inference is a recent ms timestamp');

  const all = (await h.call('ModelStatistics', {}))['model_stats'] as Msg[];
  t.same(all.map((m) => m['name']).sort(), ['classifier', 'filter', 'tiny', 'types']);
  t.equal((await rejection(h.call('ModelStatistics', { name: 'nope' }))).code, grpc.status.NOT_FOUND);

  const index = (await h.call('RepositoryIndex', {}))['models'] as Msg[];
  t.same(index.map((m) => [m['name'], m['version'], m['state']]), [['classifier', '1', 'READY'], ['filter', '1', 'READY'], ['tiny', '1', 'READY'], ['types', '1', 'READY']]);
});

t.test('RepositoryModelUnload lets in-flight requests finish; RepositoryModelLoad brings the model back', async (t) => {
  // The classifier (milliseconds a run, in a worker, one frame a run) keeps requests in flight long enough.
  const repo = copyDemoRepo(t, ['classifier', 'types']);
  writeFileSync(join(repo, 'classifier', 'config.yaml'), 'max_batch_size: 32\ndynamic_batching: { enabled: false }\n');
  const rt = await startRuntime(t, repo, { execution: 'worker' });
  const hh = await serve(t, rt);
  const x = randomFloats(3 * 112 * 112, seeded(17));
  const req = { model_name: 'classifier', inputs: [{ name: 'image', datatype: 'FP32', shape: [1, 3, 112, 112] }], raw_input_contents: [bytesOf(x)] };
  const inflight = Array.from({ length: 8 }, () => hh.call('ModelInfer', req));
  const answered = (): number => rt.statistics('classifier')[0]?.success.count ?? 0;
  while (rt.inFlight() + answered() < 8) await new Promise((r) => setImmediate(r));
  const inFlightAtUnload = rt.inFlight();
  await hh.call('RepositoryModelUnload', { model_name: 'classifier' });
  t.ok(inFlightAtUnload > 0, `the unload came with requests in flight (${inFlightAtUnload})`);
  const done = await Promise.allSettled(inflight);
  t.same(done.map((d) => d.status), Array(8).fill('fulfilled'), 'requests accepted before the unload were answered');

  t.same(await hh.call('ModelReady', { name: 'classifier' }), { ready: false });
  const unavailable = await rejection(hh.call('ModelInfer', req));
  t.equal(unavailable.code, grpc.status.UNAVAILABLE);
  t.match(unavailable.details, /classifier/);
  t.equal((await rejection(hh.call('ModelMetadata', { name: 'classifier' }))).code, grpc.status.UNAVAILABLE);
  const index = (await hh.call('RepositoryIndex', {}))['models'] as Msg[];
  t.same(index.map((m) => [m['name'], m['state']]), [['classifier', 'UNAVAILABLE'], ['types', 'READY']]);
  t.same(((await hh.call('RepositoryIndex', { ready: true }))['models'] as Msg[]).map((m) => m['name']), ['types']);

  await hh.call('RepositoryModelLoad', { model_name: 'classifier' });
  t.same(await hh.call('ModelReady', { name: 'classifier' }), { ready: true });
  const res = await hh.call('ModelInfer', req);
  const want = await direct('classifier', { image: new ort.Tensor('float32', x, [1, 3, 112, 112]) });
  t.ok(maxAbsDiff(floats(res['raw_output_contents'][0]), want['logits']!.data as Float32Array) < 1e-5, 'serves again after the load');

  t.equal((await rejection(hh.call('RepositoryModelLoad', { model_name: 'nope' }))).code, grpc.status.NOT_FOUND);
  const override = await rejection(hh.call('RepositoryModelLoad', { model_name: 'classifier', parameters: { config: { string_param: '{}' } } }));
  t.equal(override.code, grpc.status.INVALID_ARGUMENT);
  t.match(override.details, /'config' is not supported/);
  t.equal((await rejection(hh.call('RepositoryModelUnload', { model_name: '' }))).code, grpc.status.INVALID_ARGUMENT);
});

t.test('drain: every caller is answered once the open streams have ended with UNAVAILABLE', async (t) => {
  const runtime = await startRuntime(t, copyDemoRepo(t, ['tiny']));
  const server = new grpc.Server();
  const svc = createKServeService(runtime, { name: 'edge-agent', version: '9.9.9' });
  server.addService(svc.definition, svc.implementation);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  const client = new ClientCtor(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  t.teardown(() => { client.close(); server.forceShutdown(); });
  const stream = (client as unknown as { ModelStreamInfer(): grpc.ClientDuplexStream<object, Msg> }).ModelStreamInfer();
  const ended = new Promise<grpc.ServiceError>((resolve) => stream.on('error', resolve));
  const answered = new Promise<void>((resolve) => stream.once('data', () => resolve()));
  stream.write({ model_name: 'tiny', id: 'r0', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [Buffer.alloc(4096)] });
  await answered;
  const drains = [svc.drain(), svc.drain()];
  t.equal((await ended).code, grpc.status.UNAVAILABLE, 'the stream ends with UNAVAILABLE');
  await t.resolves(Promise.all(drains), 'both drain() calls resolve');
  const late = await rejection(new Promise((resolve, reject) => (client as unknown as Record<string, (...a: unknown[]) => void>)['ModelInfer']!.call(client,
    { model_name: 'tiny', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [Buffer.alloc(4096)] }, new grpc.Metadata(), {},
    (err: grpc.ServiceError | null, res: Msg) => (err ? reject(err) : resolve(res)))));
  t.equal(late.code, grpc.status.UNAVAILABLE, 'ModelInfer after the drain is refused');
  t.match(late.details, /edge-agent is shutting down/);
});
