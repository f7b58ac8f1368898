import t from 'tap';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { NATIVE_LOADER_OPTIONS, SENSOR_STREAM_PROTO } from '../agent/server/index.js';
import { bytesOf, directTiny, rejection, sameOutputs, startHostileAgent, TINY_ELEMENTS, type HostileAgent, type Msg } from './helpers/hostile-agent.js';

// Hostile tensors and requests, table-driven, against the real CLI agent over both APIs. Every case asserts the
// agent's answer (status and a message naming the problem), then that the agent is still up and answers the
// next good request correctly. The report of every case is printed at the end.

const nativeCtor = (grpc.loadPackageDefinition(protoLoader.loadSync(SENSOR_STREAM_PROTO, NATIVE_LOADER_OPTIONS)) as unknown as {
  edge: { v1: { SensorStream: grpc.ServiceClientConstructor } };
}).edge.v1.SensorStream;

interface WireTensor { name: string; dtype: string | number; shape: (number | string)[]; data: Buffer }
const wt = (name: string, dtype: string | number, shape: (number | string)[], data: Buffer | number): WireTensor =>
  ({ name, dtype, shape, data: typeof data === 'number' ? Buffer.alloc(data) : data });

/** What one raw native stream got back: the `opened`, the results, and the status it ended with. */
interface NativeOutcome { opened?: Msg; results: Msg[]; status: grpc.status; details: string }

/** A native stream driven message by message, so frames can carry anything the proto can encode. */
function rawNativeStream(address: string, messages: readonly object[], expectResults: number): Promise<NativeOutcome> {
  const client = new nativeCtor(address, grpc.credentials.createInsecure());
  const call = (client as unknown as { Stream(): grpc.ClientDuplexStream<object, Msg> }).Stream();
  const out: NativeOutcome = { results: [], status: grpc.status.OK, details: '' };
  return new Promise((resolve) => {
    const finish = (): void => { client.close(); resolve(out); };
    call.on('data', (m: Msg) => {
      if (m['opened']) out.opened = m['opened'];
      if (m['result']) out.results.push(m['result']);
      if (out.results.length >= expectResults && expectResults > 0) call.end();
    });
    call.on('error', (e: grpc.ServiceError) => { out.status = e.code; out.details = e.details; finish(); });
    call.on('end', finish);
    for (const m of messages) call.write(m);
    if (expectResults === 0) call.end();
  });
}

const openTiny = { open: { model: 'tiny' } };
const frame = (inputs: WireTensor[], seq = 1): object => ({ frame: { seq, inputs } });
const good = (): Float32Array => Float32Array.from({ length: TINY_ELEMENTS }, (_, i) => Math.cos(i / 5));
const withNonFinite = (): Float32Array => { const x = good(); x[0] = NaN; x[1] = Infinity; x[2] = -Infinity; return x; };

/** Frames one tiny stream answers with a per-frame result (the stream itself goes on). */
const FRAME_CASES: readonly [string, WireTensor[], string, RegExp][] = [
  ['wrong dtype', [wt('x', 'INT32', [1, 1024], 4096)], 'INVALID_ARGUMENT', /input 'x': dtype int32 does not match the model's float32/],
  ['dtype not set', [wt('x', 'DATA_TYPE_UNSPECIFIED', [1, 1024], 4096)], 'INVALID_ARGUMENT', /tensor 'x': dtype DATA_TYPE_UNSPECIFIED is not set or not supported/],
  ['dtype outside the enum', [wt('x', 99, [1, 1024], 4096)], 'INVALID_ARGUMENT', /tensor 'x': dtype 99 is not set or not supported/],
  ['rank too low', [wt('x', 'FLOAT32', [1024], 4096)], 'INVALID_ARGUMENT', /input 'x': shape \[1024\] does not match the model's \[-1,1024\]/],
  ['rank too high', [wt('x', 'FLOAT32', [1, 1, 1024], 4096)], 'INVALID_ARGUMENT', /input 'x': shape \[1,1,1024\] does not match/],
  ['rank 100', [wt('x', 'FLOAT32', Array(100).fill(1), 4)], 'INVALID_ARGUMENT', /tensor 'x': rank 100 exceeds the maximum/],
  ['negative dim', [wt('x', 'FLOAT32', [-1, 1024], 4096)], 'INVALID_ARGUMENT', /tensor 'x': dimension -1 .*is not a non-negative integer/],
  ['huge dims (2^40 x 2^40)', [wt('x', 'FLOAT32', [2 ** 40, 2 ** 40], 4096)], 'INVALID_ARGUMENT', /tensor 'x': 4096 bytes do not match float32 shape \[1099511627776,1099511627776\]/],
  ['dim past 2^53', [wt('x', 'FLOAT32', ['9223372036854775807', '1024'], 4096)], 'INVALID_ARGUMENT', /tensor 'x': dimension 9223372036854776000 .*is not a non-negative integer/],
  ['byte count short', [wt('x', 'FLOAT32', [1, 1024], 4095)], 'INVALID_ARGUMENT', /tensor 'x': 4095 bytes do not match float32 shape \[1,1024\] \(expected 4096 bytes\)/],
  ['byte count long', [wt('x', 'FLOAT32', [1, 1024], 8192)], 'INVALID_ARGUMENT', /tensor 'x': 8192 bytes do not match float32 shape \[1,1024\] \(expected 4096 bytes\)/],
  ['empty tensor', [wt('x', 'FLOAT32', [0, 1024], 0)], 'INVALID_ARGUMENT', /input 'x': empty tensor, shape \[0,1024\]/],
  ['no inputs', [], 'INVALID_ARGUMENT', /missing input 'x' for model 'tiny'/],
  ['unknown input name', [wt('q', 'FLOAT32', [1, 1024], 4096)], 'INVALID_ARGUMENT', /unknown input 'q' for model 'tiny' \(inputs: x\)/],
  ['input given twice', [wt('x', 'FLOAT32', [1, 1024], 4096), wt('x', 'FLOAT32', [1, 1024], 4096)], 'INVALID_ARGUMENT', /tensor 'x' appears twice in the frame/],
  ['tensor without a name', [wt('', 'FLOAT32', [1, 1024], 4096)], 'INVALID_ARGUMENT', /a tensor has no name/],
  ['batch over max_batch_size', [wt('x', 'FLOAT32', [33, 1024], 33 * 4096)], 'INVALID_ARGUMENT', /batch size 33 exceeds max_batch_size 32 of model 'tiny'/],
];

/** Streams the agent ends with a gRPC status. */
const STREAM_CASES: readonly [string, object[], grpc.status, RegExp][] = [
  ['unknown model', [{ open: { model: 'no-such-model' } }], grpc.status.NOT_FOUND, /model 'no-such-model' is not loaded/],
  ['unknown model version', [{ open: { model: 'tiny', model_version: 9 } }], grpc.status.NOT_FOUND, /model 'tiny' version 9 is not loaded/],
  ['empty model name', [{ open: { model: '' } }], grpc.status.INVALID_ARGUMENT, /open\.model is empty/],
  ['frame before open', [frame([wt('x', 'FLOAT32', [1, 1024], 4096)])], grpc.status.FAILED_PRECONDITION, /the first message of a stream must be `open`/],
  ['empty StreamRequest', [{}], grpc.status.INVALID_ARGUMENT, /empty StreamRequest: set `open` or `frame`/],
  ['open twice', [openTiny, openTiny], grpc.status.FAILED_PRECONDITION, /stream is already open/],
  ['max_in_flight over the limit', [{ open: { model: 'tiny', max_in_flight: 1_000_000 } }], grpc.status.RESOURCE_EXHAUSTED, /open\.max_in_flight 1000000 exceeds server\.max_in_flight_limit 64/],
  ['frame over max_message_bytes', [{ open: { model: 'classifier' } }, frame([wt('image', 'FLOAT32', [2, 3, 112, 112], 2 * 3 * 112 * 112 * 4)])], grpc.status.RESOURCE_EXHAUSTED, /larger than max/i],
];

const KSERVE_CASES: readonly [string, object, grpc.status, RegExp][] = (() => {
  const x = (over: object = {}) => ({ model_name: 'tiny', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [Buffer.alloc(4096)], ...over });
  const input = (over: object) => ({ inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024], ...over }] });
  return [
    ['wrong datatype', x(input({ datatype: 'INT32' })), grpc.status.INVALID_ARGUMENT, /input 'x': dtype int32 does not match the model's float32/],
    ['unknown datatype', x(input({ datatype: 'FP128' })), grpc.status.INVALID_ARGUMENT, /input 'x': unknown datatype 'FP128'/],
    ['empty datatype', x(input({ datatype: '' })), grpc.status.INVALID_ARGUMENT, /input 'x': unknown datatype ''/],
    ['rank too low', x(input({ shape: [1024] })), grpc.status.INVALID_ARGUMENT, /input 'x': shape \[1024\] does not match the model's \[-1,1024\]/],
    ['negative dim', x(input({ shape: [-5, 1024] })), grpc.status.INVALID_ARGUMENT, /dimension -5 .*is not a non-negative integer/],
    ['int64 max dim', x(input({ shape: ['9223372036854775807', 1024] })), grpc.status.INVALID_ARGUMENT, /dimension 9223372036854776000 .*is not a non-negative integer/],
    ['huge dims (2^40 x 2^40)', x(input({ shape: [2 ** 40, 2 ** 40] })), grpc.status.INVALID_ARGUMENT, /4096 bytes do not match float32 shape \[1099511627776,1099511627776\]/],
    ['byte count mismatch', x({ raw_input_contents: [Buffer.alloc(4095)] }), grpc.status.INVALID_ARGUMENT, /tensor 'x': 4095 bytes do not match float32 shape \[1,1024\] \(expected 4096 bytes\)/],
    ['empty tensor', x({ ...input({ shape: [0, 1024] }), raw_input_contents: [Buffer.alloc(0)] }), grpc.status.INVALID_ARGUMENT, /input 'x': empty tensor, shape \[0,1024\]/],
    ['typed contents count mismatch', x({ ...input({ contents: { fp32_contents: [1, 2, 3] } }), raw_input_contents: [] }), grpc.status.INVALID_ARGUMENT, /input 'x': fp32_contents has 3 values, shape \[1,1024\] needs 1024/],
    ['more raw entries than inputs', x({ raw_input_contents: [Buffer.alloc(4096), Buffer.alloc(4096)] }), grpc.status.INVALID_ARGUMENT, /raw_input_contents has 2 entries for 1 inputs/],
    ['no data', x({ raw_input_contents: [] }), grpc.status.INVALID_ARGUMENT, /input 'x' has no data/],
    ['no inputs', x({ inputs: [], raw_input_contents: [] }), grpc.status.INVALID_ARGUMENT, /missing input 'x'/],
    ['unknown model', x({ model_name: 'no-such-model' }), grpc.status.NOT_FOUND, /model 'no-such-model' is not loaded/],
    ['empty model name', x({ model_name: '' }), grpc.status.INVALID_ARGUMENT, /model_name is empty/],
    ['version not a number', x({ model_version: 'latest' }), grpc.status.INVALID_ARGUMENT, /version 'latest' is not a non-negative integer/],
    ['batch over max_batch_size', x({ ...input({ shape: [33, 1024] }), raw_input_contents: [Buffer.alloc(33 * 4096)] }), grpc.status.INVALID_ARGUMENT, /batch size 33 exceeds max_batch_size 32/],
  ];
})();

let agent: HostileAgent;
t.before(async () => {
  agent = await startHostileAgent(t, { configYaml: 'server:\n  max_message_bytes: 262144\n' });
});
t.teardown(() => { t.comment(`hostile input report:\n${agent.report.join('\n')}`); });

t.test('native stream: bad frames get a per-frame error naming the tensor; the stream and the agent go on', async (t) => {
  for (const [what, inputs, status, re] of FRAME_CASES) {
    const x = good();
    // The bad frame sits between two good ones on the same stream.
    const out = await rawNativeStream(agent.tcp, [openTiny, frame([wt('x', 'FLOAT32', [1, 1024], bytesOf(x))], 1), frame(inputs, 2), frame([wt('x', 'FLOAT32', [1, 1024], bytesOf(x))], 3)], 3);
    const bad = out.results[1];
    agent.report.push(`native  | ${what.padEnd(32)} | ${bad?.['status']}: ${bad?.['message']}`);
    t.equal(bad?.['status'], status, `${what}: ${status}`);
    t.match(bad?.['message'], re, `${what}: message names the problem`);
    t.same(out.results.map((r) => [r['seq'], r['status']]), [[1, 'OK'], [2, status], [3, 'OK']], `${what}: frames before and after it served, in order`);
    await agent.stillServing(t, what);
  }
});

t.test('native stream: requests that end the stream get a gRPC status naming the problem', async (t) => {
  for (const [what, messages, code, re] of STREAM_CASES) {
    const out = await rawNativeStream(agent.tcp, messages, 1);
    agent.report.push(`native  | ${what.padEnd(32)} | ${grpc.status[out.status]}: ${out.details}`);
    t.equal(out.status, code, `${what}: ${grpc.status[code]}`);
    t.match(out.details, re, `${what}: details`);
    await agent.stillServing(t, what);
  }
});

t.test('KServe ModelInfer: each bad request gets the right status and a message naming the problem', async (t) => {
  for (const [what, request, code, re] of KSERVE_CASES) {
    const err = await rejection(agent.kserve.call('ModelInfer', request));
    agent.report.push(`kserve  | ${what.padEnd(32)} | ${grpc.status[err.code]}: ${err.details}`);
    t.equal(err.code, code, `${what}: ${grpc.status[code]}`);
    t.match(err.details, re, `${what}: details`);
    await agent.stillServing(t, what);
  }
});

t.test('KServe ModelStreamInfer: every bad request is answered with error_message in order; the stream goes on', async (t) => {
  const stream = agent.kserve.openStream();
  const got: Msg[] = [];
  const done = new Promise<void>((resolve, reject) => { stream.on('data', (m: Msg) => got.push(m)); stream.on('end', resolve); stream.on('error', reject); });
  const goodReq = (id: string) => ({ model_name: 'tiny', id, inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [bytesOf(good())] });
  for (const [what, request] of KSERVE_CASES) {
    stream.write({ ...request, id: what });
    stream.write(goodReq(`after ${what}`));
  }
  stream.end();
  await done;
  t.equal(got.length, KSERVE_CASES.length * 2, 'one response per request');
  KSERVE_CASES.forEach(([what, , , re], i) => {
    t.equal(got[2 * i]?.['infer_response']?.['id'], what);
    t.match(got[2 * i]?.['error_message'], re, `${what}: error_message`);
    t.equal(got[2 * i + 1]?.['error_message'], '', `the request after '${what}' succeeded`);
  });
  await agent.stillServing(t, 'ModelStreamInfer');
});

t.test('NaN and Inf inputs are served by default and equal a direct onnxruntime run', async (t) => {
  const x = withNonFinite();
  const want = await directTiny(x);
  const out = await rawNativeStream(agent.tcp, [openTiny, frame([wt('x', 'FLOAT32', [1, 1024], bytesOf(x))])], 1);
  const r = out.results[0];
  t.equal(r?.['status'], 'OK', 'native: served');
  const y = (b: Buffer) => new Float32Array(Uint8Array.from(b).buffer);
  t.ok(sameOutputs(y(r?.['outputs'][0]['data']), want), 'native: outputs equal the direct run (NaN where it has NaN)');
  const res = await agent.kserve.call('ModelInfer', { model_name: 'tiny', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [bytesOf(x)] });
  t.ok(sameOutputs(y(res['raw_output_contents'][0]), want), 'KServe: outputs equal the direct run');
  agent.report.push(`both    | ${'NaN/Inf inputs (serve)'.padEnd(32)} | OK, outputs equal onnxruntime's`);
  await agent.stillServing(t, 'NaN/Inf served');
});

t.test('runtime.non_finite_inputs: refuse answers NaN/Inf with INVALID_ARGUMENT on both APIs', async (t) => {
  const strict = await startHostileAgent(t, { models: ['tiny'], configYaml: 'runtime:\n  non_finite_inputs: refuse\n' });
  const cases: [string, Float32Array][] = [
    ['NaN', (() => { const x = good(); x[10] = NaN; return x; })()],
    ['+Inf', (() => { const x = good(); x[1023] = Infinity; return x; })()],
    ['-Inf', (() => { const x = good(); x[0] = -Infinity; return x; })()],
  ];
  for (const [what, x] of cases) {
    const out = await rawNativeStream(strict.tcp, [openTiny, frame([wt('x', 'FLOAT32', [1, 1024], bytesOf(x))])], 1);
    t.equal(out.results[0]?.['status'], 'INVALID_ARGUMENT', `native ${what}: refused`);
    t.match(out.results[0]?.['message'], /input 'x': contains NaN or Inf \(runtime\.non_finite_inputs = refuse\)/);
    const err = await rejection(strict.kserve.call('ModelInfer', { model_name: 'tiny', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 1024] }], raw_input_contents: [bytesOf(x)] }));
    t.equal(err.code, grpc.status.INVALID_ARGUMENT, `KServe ${what}: refused`);
    t.match(err.details, /contains NaN or Inf \(runtime\.non_finite_inputs = refuse\)/);
    agent.report.push(`both    | ${`${what} input (refuse)`.padEnd(32)} | INVALID_ARGUMENT: ${err.details}`);
    await strict.stillServing(t, `${what} refused`);
  }
  // Extreme but finite values are not refused.
  const big = Float32Array.from({ length: 1024 }, (_, i) => (i % 2 ? 3.4e38 : -3.4e38));
  const out = await rawNativeStream(strict.tcp, [openTiny, frame([wt('x', 'FLOAT32', [1, 1024], bytesOf(big))])], 1);
  t.equal(out.results[0]?.['status'], 'OK', 'float32 max magnitude is finite: served');
});
