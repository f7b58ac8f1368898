import t from 'tap';
import { ResultPoller } from '../agent/client/index.js';
import type { FrameResult } from '../agent/client/index.js';
import type { Tensor } from '../agent/runtime/index.js';
import { startTestAgent } from './helpers/agent.js';
import { sleep, turn, utilisation } from './helpers/event-loop.js';

t.test('while a lone result is awaited the loop polls, for at most its window', async (t) => {
  const poller = new ResultPoller(60_000);
  await sleep(100); // past the file's own start-up work
  t.equal(poller.polling, false, 'nothing sent: no poll');
  poller.sent();
  t.equal(poller.polling, true, 'a lone frame sent: polling');
  // Busy polling never waits in the OS, so however loaded the machine, the loop reads as busy.
  const waiting = await utilisation(40);
  t.ok(waiting > 0.7, `the loop is busy while the result is awaited (utilisation ${waiting.toFixed(2)})`);
  await sleep(40); // past the 60 ms window, the result still not here
  await turn(); // the poll's own check runs before this turn ends
  t.equal(poller.polling, false, 'the window passed: the loop may sleep again');
  poller.received();
  t.equal(poller.awaiting, 0);
});

t.test('the result stops the polling at once', async (t) => {
  const poller = new ResultPoller(200_000);
  poller.sent();
  await sleep(5);
  poller.received();
  await turn();
  t.equal(poller.polling, false);
});

t.test('it does not poll for a round trip longer than its window, nor with several results awaited', async (t) => {
  const poller = new ResultPoller(10_000);
  poller.sent();
  await sleep(30); // a 30 ms round trip: a large model
  poller.received();
  poller.sent();
  t.equal(poller.polling, false, 'the previous round trip did not fit the window: no poll');
  await sleep(2);
  poller.received(); // a short round trip, inside the window: poll for the next
  poller.sent();
  t.equal(poller.polling, true, 'back within the window: polls again');
  poller.sent(); // a second frame in flight: results will wake the loop anyway
  await turn();
  t.equal(poller.polling, false, 'two awaited: no poll');
  poller.received();
  poller.received();
});

t.test('a window of 0 never polls; abandoned results stop counting', async (t) => {
  const off = new ResultPoller(0);
  off.sent();
  t.equal(off.polling, false);
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
