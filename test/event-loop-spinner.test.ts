import t from 'tap';
import { EventLoopSpinner } from '../agent/server/index.js';
import { sleep, turn, utilisation } from './helpers/event-loop.js';

const client = {};

t.test('after an answer the loop keeps polling for its window, then sleeps again', async (t) => {
  const spinner = new EventLoopSpinner(60_000);
  await sleep(50);
  t.equal(spinner.polling, false, 'idle before any answer');
  spinner.poke();
  t.equal(spinner.polling, true);
  // Busy polling never waits in the OS, so however loaded the machine, the loop reads as busy.
  const during = await utilisation(30);
  t.ok(during > 0.7, `busy polling inside the window (utilisation ${during.toFixed(2)})`);
  await sleep(50);
  await turn();
  t.equal(spinner.polling, false, 'asleep once the window passed');
});

t.test('it spins only while arrivals come within the window after an answer', async (t) => {
  const spinner = new EventLoopSpinner(20_000);
  spinner.poke();
  await sleep(60); // the window passed with nothing arriving
  spinner.arrived(client); // a camera-paced frame, long after the answer
  spinner.poke();
  t.equal(spinner.polling, false, 'a frame 60 ms after the answer: no spin for the next');
  await sleep(25);
  spinner.arrived(client); // 25 ms after the answer: outside 20 ms
  spinner.poke();
  t.equal(spinner.polling, false, 'still no spin');
  spinner.arrived(client); // right after the answer: a closed-loop client
  spinner.poke();
  t.equal(spinner.polling, true, 'a frame right after the answer: spin again');
  await sleep(30);
});

t.test('a window of 0 never spins', async (t) => {
  const spinner = new EventLoopSpinner(0);
  spinner.arrived(client);
  spinner.poke();
  t.equal(spinner.polling, false);
});

t.test('it does not spin while frames are in flight: the loop is busy anyway and inference needs the CPU', async (t) => {
  let inFlight = 1;
  const spinner = new EventLoopSpinner(60_000, () => inFlight > 0);
  spinner.arrived(client);
  spinner.poke();
  t.equal(spinner.polling, false, 'an answer while others still run: no spin');
  inFlight = 0;
  spinner.arrived(client);
  spinner.poke();
  t.equal(spinner.polling, true, 'the last answer out: spin');
  inFlight = 1;
  await turn();
  t.equal(spinner.polling, false, 'a frame in flight again: the spin stops');
});

t.test('it does not spin while several clients feed the agent', async (t) => {
  const spinner = new EventLoopSpinner(60_000);
  const other = {};
  spinner.arrived(client);
  spinner.arrived(other);
  spinner.poke();
  t.equal(spinner.polling, false, 'two clients within 20 ms: no spin');
  await sleep(30);
  spinner.arrived(client);
  spinner.poke();
  t.equal(spinner.polling, true, 'one client alone again: spin');
  await sleep(70);
});
