import t from 'tap';
import * as grpc from '@grpc/grpc-js';
import type { SensorStreamHandle } from '../agent/client/index.js';
import type { Tensor } from '../agent/runtime/index.js';
import { startTestAgent } from './helpers/agent.js';

// agent/client's `send()` waits for the transport to drain when it is full. A stream that ends meanwhile (the
// agent stopped or was killed, or the caller cancelled) never drains: `send()` must then reject with the
// stream's status instead of leaving the sensor loop blocked for ever.

const x: Tensor = { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(0.5) };

/**
 * Far more than the agent can take in while nobody reads results (the results the client's receive window
 * and buffers hold, plus one 64 KiB stream window of 4 KiB frames): 4000 frames, 16 MB.
 */
const FLOOD = 4000;

/**
 * Floods the stream without reading results, then starts one `send()`: its write finds the transport full,
 * and the flood makes sure it cannot drain before the stream ends. Returns the pending send and a probe of
 * whether it has settled.
 */
function blockedSend(stream: SensorStreamHandle): { sent: Promise<unknown>; settled: () => boolean } {
  let seq = 0;
  let full = false;
  while (seq < FLOOD) full = !stream.sendNoWait({ seq: seq++, inputs: { x } }) || full;
  if (!full) throw new Error('the transport never filled up');
  let settled = false;
  const sent = stream.send({ seq, inputs: { x } }).then(
    () => { settled = true; return undefined; },
    (err: unknown) => { settled = true; return err; },
  );
  return { sent, settled: () => settled };
}

/** Reads results until the stream ends; resolves with the error it ended with. */
async function streamEnd(stream: SensorStreamHandle): Promise<grpc.ServiceError | undefined> {
  try {
    for await (const _ of stream.results()) { /* the results of the frames the agent took in */ }
    return undefined;
  } catch (err) {
    return err as grpc.ServiceError;
  }
}

/** A few turns of the event loop: the status handlers that run when the stream ends have all run. */
async function settleTurns(): Promise<void> {
  for (let i = 0; i < 3; i++) await new Promise((r) => setImmediate(r));
}

const agentConfig = {
  models: ['tiny'],
  // The smallest stream window, and no drain wait on stop: the stop cuts the stream the flood holds open.
  config: { server: { http2_stream_window_bytes: 65_535, drain_timeout_ms: 0 } },
};

t.test('send() waiting for drain rejects with the stream\'s status when the agent goes away', async (t) => {
  const a = await startTestAgent(t, agentConfig);
  const stream = await a.client(a.unix).openStream({ model: 'tiny', maxInFlight: 1 });
  const blocked = blockedSend(stream);
  t.notOk(blocked.settled(), 'send() waits: the transport is full');
  await a.agent.stop();
  // Read only now, after the status came: results() still ends with it.
  const ended = await streamEnd(stream);
  t.type(ended, Error, 'results() threw the stream\'s error status');
  t.not(ended?.code, grpc.status.OK);
  await settleTurns();
  t.ok(blocked.settled(), 'send() settled once the stream\'s status arrived');
  const err = (blocked.settled() ? await blocked.sent : undefined) as grpc.ServiceError | undefined;
  t.type(err, Error, 'send() rejected');
  t.equal(err?.code, ended?.code, 'with the stream\'s status code');

  // The stream is over: a later send() rejects at once, with the same status, and counts nothing as awaited.
  let late: grpc.ServiceError | undefined;
  let lateSettled = false;
  stream.send({ seq: FLOOD + 1, inputs: { x } }).then(
    () => { lateSettled = true; },
    (e: unknown) => { lateSettled = true; late = e as grpc.ServiceError; },
  );
  await settleTurns();
  t.ok(lateSettled, 'send() after the end settles at once');
  t.type(late, Error, 'send() after the end rejects');
  t.equal(late?.code, ended?.code);
  t.match(late?.details, /stream ended before the frame was sent/);
});

t.test('send() waiting for drain rejects with CANCELLED when the caller cancels the stream', async (t) => {
  const a = await startTestAgent(t, agentConfig);
  const stream = await a.client().openStream({ model: 'tiny', maxInFlight: 1 });
  const blocked = blockedSend(stream);
  t.notOk(blocked.settled(), 'send() waits: the transport is full');
  const reading = streamEnd(stream);
  stream.cancel();
  const ended = await reading;
  t.equal(ended?.code, grpc.status.CANCELLED, 'the stream ended CANCELLED');
  await settleTurns();
  t.ok(blocked.settled(), 'send() settled');
  const err = (blocked.settled() ? await blocked.sent : undefined) as grpc.ServiceError | undefined;
  t.equal(err?.code, grpc.status.CANCELLED, 'send() rejected with CANCELLED');
  // The agent serves the next stream normally.
  const next = await a.client().openStream({ model: 'tiny' });
  await next.send({ seq: 1, inputs: { x } });
  next.end();
  const results = [];
  for await (const r of next.results()) results.push(r.status);
  t.same(results, ['OK'], 'a new stream is served');
});

t.test('send() resolves and leaves no listeners behind when the transport drains', async (t) => {
  const a = await startTestAgent(t, { models: ['tiny'] });
  const stream = await a.client().openStream({ model: 'tiny', maxInFlight: 4 });
  const call = (stream as unknown as { call: grpc.ClientDuplexStream<object, object> }).call;
  const reader = (async () => {
    let n = 0;
    for await (const r of stream.results()) if (r.status === 'OK') n++;
    return n;
  })();
  const before = ['drain', 'error', 'status', 'close'].map((e) => call.listenerCount(e));
  let seq = 0;
  while (stream.sendNoWait({ seq: seq++, inputs: { x } })) { /* until the transport is full */ }
  await stream.send({ seq: seq++, inputs: { x } });
  t.same(['drain', 'error', 'status', 'close'].map((e) => call.listenerCount(e)), before, 'the drain wait removed its listeners');
  stream.end();
  t.equal(await reader, seq, 'every frame answered OK');
});

t.test('a send after end() is refused on its own: the frames sent before still get their results', async (t) => {
  const a = await startTestAgent(t, { models: ['tiny'] });
  const client = a.client();
  const stream = await client.openStream({ model: 'tiny' });
  for (let seq = 1; seq <= 3; seq++) await stream.send({ seq, inputs: { x } });
  stream.end();
  await t.rejects(stream.send({ seq: 4, inputs: { x } }), { code: grpc.status.FAILED_PRECONDITION, message: /send\(\) after end\(\)/ });
  t.throws(() => stream.sendNoWait({ seq: 5, inputs: { x } }), { code: grpc.status.FAILED_PRECONDITION });
  const got: number[] = [];
  for await (const r of stream.results()) got.push(r.seq);
  t.same(got, [1, 2, 3], 'the results of the frames sent before end() all arrive');
  t.equal(client.awaitingResults, 0, 'the refused frames were never counted as awaited');
});
