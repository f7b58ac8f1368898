import t from 'tap';
import { performance } from 'node:perf_hooks';
import { ResultPoller } from '../agent/client/index.js';
import type { FrameResult } from '../agent/client/index.js';
import type { Tensor } from '../agent/runtime/index.js';
import { startTestAgent } from './helpers/agent.js';

/** Share of the next `ms` the event loop spent not waiting in the OS for I/O (Node's event-loop utilisation). */
async function utilisation(ms: number): Promise<number> {
  const start = performance.eventLoopUtilization();
  await new Promise((r) => setTimeout(r, ms));
  return performance.eventLoopUtilization(start).utilization;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

t.test('while a lone result is awaited the loop polls, for at most its window', async (t) => {
  const poller = new ResultPoller(40_000);
  await sleep(100); // past the file's own start-up work
  const before = await utilisation(20);
  t.ok(before < 0.5, `idle before anything was sent (utilisation ${before.toFixed(2)})`);
  poller.sent();
  const waiting = await utilisation(25);
  t.ok(waiting > 0.7, `polling while the result is awaited (utilisation ${waiting.toFixed(2)})`);
  await sleep(25); // past the 40 ms window, the result still not here
  const late = await utilisation(20);
  t.ok(late < 0.5, `asleep once the window passed (utilisation ${late.toFixed(2)})`);
  poller.received();
  t.equal(poller.awaiting, 0);
});

t.test('the result stops the polling at once', async (t) => {
  const poller = new ResultPoller(200_000);
  poller.sent();
  await sleep(5);
  poller.received();
  const after = await utilisation(30);
  t.ok(after < 0.5, `asleep after the result (utilisation ${after.toFixed(2)})`);
});

t.test('it does not poll for a round trip longer than its window, nor with several results awaited', async (t) => {
  const poller = new ResultPoller(10_000);
  poller.sent();
  await sleep(30); // a 30 ms round trip: a large model
  poller.received();
  poller.sent();
  const slowModel = await utilisation(8);
  t.ok(slowModel < 0.5, `the previous round trip did not fit the window: no poll (utilisation ${slowModel.toFixed(2)})`);
  poller.received(); // a 8 ms round trip, inside the window: poll for the next
  poller.sent();
  const fast = await utilisation(8);
  t.ok(fast > 0.7, `back within the window: polls again (utilisation ${fast.toFixed(2)})`);
  poller.sent(); // a second frame in flight: results will wake the loop anyway
  await sleep(1);
  const two = await utilisation(8);
  t.ok(two < 0.5, `two awaited: no poll (utilisation ${two.toFixed(2)})`);
  poller.received();
  poller.received();
});

t.test('a window of 0 never polls; abandoned results stop counting', async (t) => {
  const off = new ResultPoller(0);
  off.sent();
  const u = await utilisation(20);
  t.ok(u < 0.5, `utilisation ${u.toFixed(2)}`);
  t.equal(off.awaiting, 1, 'it still counts what is awaited');
  off.abandoned(5);
  t.equal(off.awaiting, 0, 'never below zero');
  off.received();
  t.equal(off.awaiting, 0, 'a stray result does not go negative');
});

t.test('a polling client gets the same results as a sleeping one, and a cancelled stream releases what it awaited', async (t) => {
  const a = await startTestAgent(t, { models: ['tiny'] });
  const polling = a.client(a.tcp, { busyPollUs: 1000 });
  const sleeping = a.client(a.tcp);
  const frames: Tensor[] = Array.from({ length: 6 }, (_, i) => ({ dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024).fill(i / 10) }));
  const runs: FrameResult[][] = [];
  for (const client of [polling, sleeping]) {
    const stream = await client.openStream({ model: 'tiny', qos: 'LOSSLESS' });
    const results: FrameResult[] = [];
    const it = stream.results()[Symbol.asyncIterator]();
    for (const [i, f] of frames.entries()) {
      await stream.send({ seq: i + 1, inputs: { x: f } }); // closed loop: the poller's case
      const next = await it.next();
      if (!next.done) results.push(next.value);
    }
    stream.end();
    runs.push(results);
    t.equal(client.awaitingResults, 0, 'nothing awaited after the last result');
  }
  const [p, s] = runs as [FrameResult[], FrameResult[]];
  t.same(p.map((r) => r.seq), [1, 2, 3, 4, 5, 6], 'results in order');
  t.ok(p.every((r) => r.status === 'OK'), 'all OK');
  t.same(p.map((r) => Array.from(r.outputs.y?.data as Float32Array)), s.map((r) => Array.from(r.outputs.y?.data as Float32Array)), 'same outputs as the sleeping client');

  const stream = await polling.openStream({ model: 'tiny', qos: 'LOSSLESS', maxInFlight: 8 });
  for (let i = 0; i < 4; i++) stream.sendNoWait({ seq: i + 1, inputs: { x: frames[0] as Tensor } });
  t.equal(polling.awaitingResults, 4, 'four frames awaited');
  stream.cancel();
  for (let i = 0; i < 100 && polling.awaitingResults > 0; i++) await sleep(10);
  t.equal(polling.awaitingResults, 0, 'the cancelled stream no longer counts its frames (polling works for the next stream)');
  const next = await polling.openStream({ model: 'tiny', qos: 'LOSSLESS' });
  const got = next.results()[Symbol.asyncIterator]();
  await next.send({ seq: 1, inputs: { x: frames[1] as Tensor } });
  const r = await got.next();
  t.equal(r.done ? 'ended' : r.value.status, 'OK', 'the next stream still works');
  next.end();
});
