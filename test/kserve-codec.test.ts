import t from 'tap';
import { InvalidInputError } from '../agent/errors.js';
import type { InferenceResult } from '../agent/runtime/types.js';
import {
  configDataType,
  decodeInferRequest,
  decodeSequence,
  dtypeOf,
  encodeInferResponse,
  kserveDatatype,
  parseVersion,
  type ModelInferRequestMessage,
} from '../agent/server/kserve-codec.js';
import { loadKServePackageDefinition } from '../agent/server/kserve-service.js';
import type { MethodDefinition } from '@grpc/proto-loader';

// Wire-level contract: message bytes are written out by hand (tag = field number << 3 | wire type), so a
// renumbered field or a changed type in proto/inference/*.proto fails here.

const pkg = loadKServePackageDefinition();
const service = pkg['inference.GRPCInferenceService'] as unknown as Record<string, MethodDefinition<object, object>>;
const modelInfer = service['ModelInfer']!;
const streamInfer = service['ModelStreamInfer']!;

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const ascii = (s: string): string => Buffer.from(s, 'ascii').toString('hex');

// float32 [1.0, -2.0] little-endian
const RAW_X = '0000803f 000000c0';

/** ModelInferRequest, field by field. */
const REQUEST_HEX = [
  `0a 04 ${ascii('tiny')}`, //                          1 model_name, LEN
  `12 01 ${ascii('1')}`, //                             2 model_version, LEN
  `1a 05 ${ascii('req-7')}`, //                         3 id, LEN
  // 4 parameters: map entry {1 key: "sequence_id", 2 value: InferParameter{5 uint64_param: varint 300}}
  `22 12 0a 0b ${ascii('sequence_id')} 12 03 28 ac02`,
  // 5 inputs: {1 name "x", 2 datatype "FP32", 3 shape packed [1, 2]}
  `2a 0d 0a 01 ${ascii('x')} 12 04 ${ascii('FP32')} 1a 02 01 02`,
  `32 03 0a 01 ${ascii('y')}`, //                       6 outputs: {1 name "y"}
  `3a 08 ${RAW_X}`, //                                  7 raw_input_contents, LEN
].join(' ');

/** ModelInferResponse for the same call: raw output contents. */
const RESPONSE_HEX = [
  `0a 04 ${ascii('tiny')}`, //                          1 model_name
  `12 01 ${ascii('1')}`, //                             2 model_version
  `1a 05 ${ascii('req-7')}`, //                         3 id
  `2a 0d 0a 01 ${ascii('y')} 12 04 ${ascii('FP32')} 1a 02 01 02`, // 5 outputs {name, datatype, shape}
  `32 08 ${RAW_X}`, //                                  6 raw_output_contents
].join(' ');

t.test('ModelInferRequest encodes to the hand-computed bytes', async (t) => {
  const bytes = modelInfer.requestSerialize({
    model_name: 'tiny',
    model_version: '1',
    id: 'req-7',
    parameters: { sequence_id: { uint64_param: '300' } },
    inputs: [{ name: 'x', datatype: 'FP32', shape: [1, 2] }],
    outputs: [{ name: 'y' }],
    raw_input_contents: [hex(RAW_X)],
  });
  t.equal(bytes.toString('hex'), hex(REQUEST_HEX).toString('hex'));
});

t.test('hand-computed request bytes decode into the runtime request', async (t) => {
  const msg = modelInfer.requestDeserialize(hex(REQUEST_HEX)) as ModelInferRequestMessage;
  const d = decodeInferRequest(msg);
  t.equal(d.model, 'tiny');
  t.equal(d.version, 1);
  t.equal(d.id, 'req-7');
  t.same(d.requestedOutputs, ['y']);
  t.same(d.request.outputs, ['y']);
  t.same(d.request.sequence, { id: 'kserve:300' });
  t.equal(d.typedResponse, false);
  const x = d.request.inputs['x']!;
  t.equal(x.dtype, 'float32');
  t.same(x.shape, [1, 2]);
  t.same(Array.from(x.data as Float32Array), [1, -2]);
});

t.test('ModelInferResponse encodes to the hand-computed bytes', async (t) => {
  const result: InferenceResult = {
    model: 'tiny',
    version: 1,
    outputs: { y: { dtype: 'float32', shape: [1, 2], data: new Float32Array([1, -2]) } },
    timings: { queueUs: 0, inferUs: 0, totalUs: 0 },
    batchSize: 1,
  };
  const bytes = modelInfer.responseSerialize(encodeInferResponse(result, 'req-7', undefined, false));
  t.equal(bytes.toString('hex'), hex(RESPONSE_HEX).toString('hex'));
});

t.test('typed INT64 response contents are packed varints (two\'s complement for negatives)', async (t) => {
  const result: InferenceResult = {
    model: 'm',
    version: 3,
    outputs: { z: { dtype: 'int64', shape: [2], data: new BigInt64Array([-1n, 5n]) } },
    timings: { queueUs: 0, inferUs: 0, totalUs: 0 },
    batchSize: 1,
  };
  const bytes = modelInfer.responseSerialize(encodeInferResponse(result, '', undefined, true));
  const expected = [
    `0a 01 ${ascii('m')}`,
    `12 01 ${ascii('3')}`,
    // 5 outputs {1 name "z", 2 datatype "INT64", 3 shape [2], 5 contents {3 int64_contents packed [-1, 5]}}
    `2a 1c 0a 01 ${ascii('z')} 12 05 ${ascii('INT64')} 1a 01 02 2a 0d 1a 0b ffffffffffffffffff01 05`,
  ].join(' ');
  t.equal(bytes.toString('hex'), hex(expected).toString('hex'));
});

t.test('ModelStreamInferResponse: error_message = 1, infer_response = 2', async (t) => {
  const bytes = streamInfer.responseSerialize({ error_message: 'bad', infer_response: { id: 'r' } });
  t.equal(bytes.toString('hex'), hex(`0a 03 ${ascii('bad')} 12 03 1a 01 ${ascii('r')}`).toString('hex'));
});

t.test('InferParameter oneof members and field numbers', async (t) => {
  const msg = modelInfer.requestDeserialize(
    hex(
      [
        `22 0e 0a 01 ${ascii('a')} 12 09 21 000000000000f83f`, // double_param = 4 (fixed64) 1.5
        `22 08 0a 01 ${ascii('b')} 12 03 ${'1a 01'} ${ascii('s')}`, // string_param = 3
        `22 07 0a 01 ${ascii('c')} 12 02 08 01`, // bool_param = 1
        `22 07 0a 01 ${ascii('d')} 12 02 10 7f`, // int64_param = 2
        // uint64_param = 5: 2^64 - 1 must survive exactly
        `22 10 0a 01 ${ascii('e')} 12 0b 28 ffffffffffffffffff01`,
      ].join(' '),
    ),
  ) as { parameters: Record<string, Record<string, unknown>> };
  const p = msg.parameters;
  t.same([p['a']!['parameter_choice'], p['a']!['double_param']], ['double_param', 1.5]);
  t.same([p['b']!['parameter_choice'], p['b']!['string_param']], ['string_param', 's']);
  t.same([p['c']!['parameter_choice'], p['c']!['bool_param']], ['bool_param', true]);
  t.same([p['d']!['parameter_choice'], p['d']!['int64_param']], ['int64_param', '127']);
  t.same([p['e']!['parameter_choice'], p['e']!['uint64_param']], ['uint64_param', '18446744073709551615']);
});

t.test('raw input bytes are viewed, not copied', async (t) => {
  // An aligned float32 payload inside the received message: the tensor must share its memory.
  const wire = modelInfer.requestSerialize({
    model_name: 'm',
    inputs: [{ name: 'x', datatype: 'UINT8', shape: [4] }],
    raw_input_contents: [Buffer.from([9, 8, 7, 6])],
  });
  const msg = modelInfer.requestDeserialize(wire) as ModelInferRequestMessage;
  const x = decodeInferRequest(msg).request.inputs['x']!;
  t.equal(x.data.buffer, wire.buffer, 'uint8 tensor views the message buffer');
  t.same(Array.from(x.data as Uint8Array), [9, 8, 7, 6]);
});

t.test('datatype mapping', async (t) => {
  const pairs = [
    ['BOOL', 'bool'], ['UINT8', 'uint8'], ['UINT16', 'uint16'], ['UINT32', 'uint32'], ['UINT64', 'uint64'],
    ['INT8', 'int8'], ['INT16', 'int16'], ['INT32', 'int32'], ['INT64', 'int64'],
    ['FP16', 'float16'], ['FP32', 'float32'], ['FP64', 'float64'],
  ] as const;
  for (const [k, d] of pairs) {
    t.equal(dtypeOf(k, 'x'), d);
    t.equal(kserveDatatype(d), k);
    t.equal(configDataType(d), `TYPE_${k}`);
  }
  t.throws(() => dtypeOf('BYTES', 'x'), { message: /BYTES is not supported.*no string tensors/ });
  t.throws(() => dtypeOf('BF16', 'x'), { message: /BF16 is not supported/ });
  t.throws(() => dtypeOf('FP8', 'x'), { message: /unknown datatype 'FP8'/ });
  t.throws(() => dtypeOf('BYTES', 'x'), InvalidInputError);
});

const base = (over: Partial<ModelInferRequestMessage>): ModelInferRequestMessage => ({
  model_name: 'm',
  model_version: '',
  id: '',
  parameters: {},
  inputs: [],
  outputs: [],
  raw_input_contents: [],
  ...over,
});

t.test('typed contents become typed arrays of the declared datatype', async (t) => {
  const d = decodeInferRequest(
    base({
      inputs: [
        { name: 'f', datatype: 'FP32', shape: ['2'], contents: { fp32_contents: [0.5, -1] } },
        { name: 'd', datatype: 'FP64', shape: ['1'], contents: { fp64_contents: [1e300] } },
        { name: 'i8', datatype: 'INT8', shape: ['2'], contents: { int_contents: [-128, 127] } },
        { name: 'i64', datatype: 'INT64', shape: ['2'], contents: { int64_contents: ['-9223372036854775808', '9007199254740993'] } },
        { name: 'u8', datatype: 'UINT8', shape: ['1', '3'], contents: { uint_contents: [0, 128, 255] } },
        { name: 'u64', datatype: 'UINT64', shape: ['1'], contents: { uint64_contents: ['18446744073709551615'] } },
        { name: 'b', datatype: 'BOOL', shape: ['2'], contents: { bool_contents: [true, false] } },
      ],
    }),
  );
  const i = d.request.inputs;
  t.equal(d.typedResponse, true);
  t.type(i['f']!.data, Float32Array);
  t.same(Array.from(i['f']!.data as Float32Array), [0.5, -1]);
  t.same(Array.from(i['d']!.data as Float64Array), [1e300]);
  t.same(Array.from(i['i8']!.data as Int8Array), [-128, 127]);
  t.same(Array.from(i['i64']!.data as BigInt64Array), [-9223372036854775808n, 9007199254740993n]);
  t.same(i['u8']!.shape, [1, 3]);
  t.type(i['u8']!.data, Uint8Array);
  t.same(Array.from(i['u64']!.data as BigUint64Array), [18446744073709551615n]);
  t.same(Array.from(i['b']!.data as Uint8Array), [1, 0]);
  t.equal(i['b']!.dtype, 'bool');
});

t.test('malformed requests are refused with a message naming the problem', async (t) => {
  const fp = (over: object) => ({ name: 'x', datatype: 'FP32', shape: ['2'], contents: null, ...over });
  const cases: [string, ModelInferRequestMessage, RegExp][] = [
    ['empty model name', base({ model_name: '' }), /model_name is empty/],
    ['bad version', base({ model_version: 'v2' }), /version 'v2' is not a non-negative integer/],
    ['raw and typed together', base({ inputs: [fp({ contents: { fp32_contents: [1, 2] } })], raw_input_contents: [Buffer.alloc(8)] }), /typed contents while the request also uses raw_input_contents/],
    ['raw count mismatch', base({ inputs: [fp({}), fp({ name: 'y' })], raw_input_contents: [Buffer.alloc(8)] }), /raw_input_contents has 1 entries for 2 inputs/],
    ['raw byte length', base({ inputs: [fp({})], raw_input_contents: [Buffer.alloc(7)] }), /7 bytes do not match float32 shape \[2\]/],
    ['no data at all', base({ inputs: [fp({})] }), /input 'x' has no data/],
    ['typed FP16', base({ inputs: [fp({ datatype: 'FP16', contents: { fp32_contents: [1, 2] } })] }), /FP16 has no typed contents field; send it in raw_input_contents/],
    ['wrong typed field', base({ inputs: [fp({ contents: { int_contents: [1, 2] } })] }), /fp32_contents has 0 values, shape \[2\] needs 2 \(the values are in int_contents/],
    ['typed count', base({ inputs: [fp({ contents: { fp32_contents: [1] } })] }), /fp32_contents has 1 values, shape \[2\] needs 2/],
    ['int8 range', base({ inputs: [fp({ datatype: 'INT8', contents: { int_contents: [1, 300] } })] }), /value 300 is out of range for INT8/],
    ['negative dim', base({ inputs: [fp({ shape: ['-1'], contents: { fp32_contents: [] } })] }), /dimension -1/],
    ['BYTES input', base({ inputs: [fp({ datatype: 'BYTES', contents: { bytes_contents: [Buffer.from('a')] } })] }), /BYTES is not supported/],
    ['duplicate input', base({ inputs: [fp({ contents: { fp32_contents: [1, 2] } }), fp({ contents: { fp32_contents: [1, 2] } })] }), /input 'x' is given twice/],
    ['duplicate output', base({ outputs: [{ name: 'y' }, { name: 'y' }] }), /output 'y' is requested twice/],
    ['classification', base({ outputs: [{ name: 'y', parameters: { classification: { int64_param: '3', parameter_choice: 'int64_param' } } }] }), /classification.*not supported/],
    ['timeout type', base({ parameters: { timeout: { string_param: '5', parameter_choice: 'string_param' } } }), /timeout must be an int64 parameter/],
  ];
  for (const [what, msg, re] of cases) {
    t.throws(() => decodeInferRequest(msg), InvalidInputError, what);
    t.throws(() => decodeInferRequest(msg), { message: re }, what);
  }
});

t.test('sequence parameters', async (t) => {
  const u64 = (v: string) => ({ uint64_param: v, parameter_choice: 'uint64_param' as const });
  const i64 = (v: string) => ({ int64_param: v, parameter_choice: 'int64_param' as const });
  const str = (v: string) => ({ string_param: v, parameter_choice: 'string_param' as const });
  const bool = (v: boolean) => ({ bool_param: v, parameter_choice: 'bool_param' as const });
  t.same(decodeSequence({ sequence_id: u64('18446744073709551615'), sequence_start: bool(true) }), { id: 'kserve:18446744073709551615', start: true });
  t.same(decodeSequence({ sequence_id: i64('42'), sequence_end: bool(true) }), { id: 'kserve:42', end: true });
  t.same(decodeSequence({ sequence_id: str('cam-1'), sequence_start: bool(false) }), { id: 'kserve:cam-1' });
  t.equal(decodeSequence({}), undefined);
  t.equal(decodeSequence({ sequence_id: u64('0') }), undefined, 'id 0 means no sequence (Triton)');
  t.throws(() => decodeSequence({ sequence_start: bool(true) }), { message: /need a non-zero, non-empty sequence_id/ });
  t.throws(() => decodeSequence({ sequence_id: i64('-3') }), { message: /negative/ });
  t.throws(() => decodeSequence({ sequence_id: bool(true) }), { message: /sequence_id must be an int64, uint64 or string parameter/ });
  t.throws(() => decodeSequence({ sequence_id: u64('1'), sequence_end: i64('1') }), { message: /sequence_end must be a bool parameter/ });
});

t.test('timeout parameter and transport deadline become the earlier deadline', async (t) => {
  const before = performance.now();
  const withTimeout = decodeInferRequest(base({ parameters: { timeout: { int64_param: '2000000', parameter_choice: 'int64_param' } } }));
  t.ok(withTimeout.request.deadline! >= before + 2000 && withTimeout.request.deadline! <= performance.now() + 2000);
  const transport = performance.now() + 5;
  const both = decodeInferRequest(base({ parameters: { timeout: { int64_param: '2000000', parameter_choice: 'int64_param' } } }), transport);
  t.equal(both.request.deadline, transport);
  t.equal(decodeInferRequest(base({})).request.deadline, undefined);
});

t.test('version strings', async (t) => {
  t.equal(parseVersion('', 'm'), undefined);
  t.equal(parseVersion('12', 'm'), 12);
  t.throws(() => parseVersion('-1', 'm'), InvalidInputError);
  t.throws(() => parseVersion('1.5', 'm'), InvalidInputError);
});

t.test('responses: raw views by default, typed on request, FP16 forces raw, requested order', async (t) => {
  const y = new Float32Array([1, 2, 3, 4]);
  const h = new Uint16Array([0x3c00, 0xc000]);
  const z = new BigUint64Array([18446744073709551615n]);
  const result: InferenceResult = {
    model: 'm',
    version: 2,
    outputs: {
      y: { dtype: 'float32', shape: [2, 2], data: y },
      z: { dtype: 'uint64', shape: [1], data: z },
      h: { dtype: 'float16', shape: [2], data: h },
    },
    timings: { queueUs: 0, inferUs: 0, totalUs: 0 },
    batchSize: 1,
  };
  const raw = encodeInferResponse(result, 'id', ['z', 'y'], false);
  t.same(raw.outputs.map((o) => o.name), ['z', 'y']);
  t.equal(raw.raw_output_contents.length, 2);
  t.equal(raw.raw_output_contents[1]!.buffer, y.buffer, 'raw output views the tensor memory');
  t.equal(raw.outputs[1]!.contents, undefined);
  t.equal(raw.model_version, '2');

  const typed = encodeInferResponse(result, 'id', ['y', 'z'], true);
  t.equal(typed.raw_output_contents.length, 0);
  t.same(typed.outputs[0]!.contents, { fp32_contents: [1, 2, 3, 4] });
  t.same(typed.outputs[1]!.contents, { uint64_contents: ['18446744073709551615'] });
  const back = modelInfer.responseDeserialize(modelInfer.responseSerialize(typed)) as { outputs: { contents: { uint64_contents: string[] } }[] };
  t.same(back.outputs[1]!.contents.uint64_contents, ['18446744073709551615'], 'uint64 max survives the wire');

  const withHalf = encodeInferResponse(result, 'id', undefined, true);
  t.equal(withHalf.raw_output_contents.length, 3, 'an FP16 output makes the whole response raw');
  t.same(withHalf.outputs.map((o) => o.datatype), ['FP32', 'UINT64', 'FP16']);
  t.ok(withHalf.outputs.every((o) => o.contents === undefined));
});
