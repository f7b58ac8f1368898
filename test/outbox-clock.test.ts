import t from 'tap';
import { join } from 'node:path';
import { Database } from '../agent/store/database.js';
import { MemoryOutbox } from '../agent/store/outbox-memory.js';
import { SqliteOutbox } from '../agent/store/outbox-sqlite.js';
import type { Outbox, OutboxMessage, OutboxOptions } from '../agent/store/outbox.js';
import { tempDir } from './helpers/runtime.js';

/**
 * Max age and the sync interval against wall-clock steps (NTP setting a clock that booted unset, `date -s`).
 * Both clocks are test clocks: `wall` is what Date.now would say, `mono` what performance.now would say.
 * The step handling lives in the shared ledger: the tests that need no restart run against both outboxes.
 */

const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
const BOOT_WALL = Date.UTC(2000, 0, 1); // an RTC that lost power
const NTP_WALL = Date.UTC(2026, 10, 30, 12);

class Clocks {
  wall: number;
  mono = 0;
  constructor(wall: number) {
    this.wall = wall;
  }

  /** Time passes: both clocks move. */
  advance(ms: number): void {
    this.wall += ms;
    this.mono += ms;
  }

  options(extra: OutboxOptions = {}): OutboxOptions {
    return { ...extra, now: () => this.wall, monotonicNow: () => this.mono };
  }
}

function telemetry(n: number): OutboxMessage {
  return { kind: 'telemetry', topic: 'edge/devices/d/telemetry', payload: (s) => JSON.stringify({ n, seq: s.seq, dropped: s.dropped }) };
}

type Tap = { teardown(fn: () => void | Promise<void>): void };

async function openOutbox(t: Tap, file: string, options: OutboxOptions): Promise<{ db: Database; outbox: SqliteOutbox }> {
  const db = await Database.open(file);
  t.teardown(() => db.close().catch(() => undefined));
  return { db, outbox: await SqliteOutbox.open(db, options) };
}

/** Opens a fresh outbox of one implementation. */
type OpenFresh = (t: Tap, options: OutboxOptions) => Promise<Outbox>;

const IMPLEMENTATIONS: readonly { readonly name: string; readonly open: OpenFresh }[] = [
  { name: 'SqliteOutbox', open: async (t, options) => (await openOutbox(t, join(tempDir(t), 'edge-agent.db'), options)).outbox },
  { name: 'MemoryOutbox', open: async (_t, options) => new MemoryOutbox(options) },
];

/** One record every 10 s for an hour (360 records), offline. */
async function offlineHour(outbox: Outbox, clocks: Clocks): Promise<void> {
  for (let n = 0; n < 360; n += 1) {
    await outbox.enqueue(telemetry(n));
    clocks.advance(10 * SECOND);
  }
}

for (const { name, open } of IMPLEMENTATIONS) {
  t.test(`${name}: a forward clock step does not age the backlog; monotonic age still evicts old entries`, async (t) => {
    const clocks = new Clocks(BOOT_WALL);
    const outbox = await open(t, clocks.options({ bounds: { maxAgeMs: 90 * MINUTE } }));
    await offlineHour(outbox, clocks);
    t.equal(outbox.stats().rows, 360);

    clocks.wall += HOUR; // the clock steps forward an hour; no time passed
    await outbox.enqueue(telemetry(360));
    t.equal(outbox.stats().rows, 361, 'nothing dropped: the oldest entry is 1 h old, not 2 h');
    t.equal(outbox.stats().droppedTotal, 0);
    const first = (await outbox.peek(0, 1))[0]!;
    t.equal(first.createdAt, BOOT_WALL + HOUR, 'the stored time moved with the step: it is 1 h before the corrected now');
    t.equal(outbox.stats().oldestCreatedAt, BOOT_WALL + HOUR);

    clocks.advance(45 * MINUTE); // the first 15 minutes of the backlog are now 90 minutes old and more
    const next = await outbox.enqueue(telemetry(361));
    t.equal(outbox.stats().droppedTotal, 90, 'records 0..89 (older than 90 min of elapsed time) are dropped');
    t.equal(outbox.stats().rows, 361 - 90 + 1);
    t.equal(JSON.parse(next!.payload.toString())['dropped'], 90, 'and reported');
    const kept = await outbox.peek(0, 1);
    t.equal(JSON.parse(kept[0]!.payload.toString())['n'], 90, 'the oldest kept is exactly 90 minutes old');
  });

  t.test(`${name}: a clock set from an unset RTC to the real date keeps the whole offline backlog (7-day default)`, async (t) => {
    const clocks = new Clocks(BOOT_WALL);
    const outbox = await open(t, clocks.options());
    await offlineHour(outbox, clocks);
    clocks.wall = NTP_WALL;
    const e = await outbox.enqueue(telemetry(360));
    t.equal(outbox.stats().rows, 361, 'the 26-year step drops nothing');
    t.equal(JSON.parse(e!.payload.toString())['dropped'], 0);
    t.equal(outbox.stats().oldestCreatedAt, NTP_WALL - HOUR, 'the backlog now carries the corrected times');
  });

  t.test(`${name}: a backward clock step does not keep old entries longer`, async (t) => {
    const clocks = new Clocks(NTP_WALL);
    const outbox = await open(t, clocks.options({ bounds: { maxAgeMs: 90 * MINUTE } }));
    await offlineHour(outbox, clocks);
    clocks.wall -= HOUR;
    await outbox.enqueue(telemetry(360));
    t.equal(outbox.stats().droppedTotal, 0);
    clocks.advance(31 * MINUTE); // records 0..5 are more than 90 minutes old (wall time says 31..91 minutes)
    await outbox.enqueue(telemetry(361));
    t.equal(outbox.stats().droppedTotal, 6, 'aged by elapsed time, not by the stepped-back wall clock');
  });

  t.test(`${name}: a payload renderer that throws at a step leaves the step for the next enqueue`, async (t) => {
    const clocks = new Clocks(BOOT_WALL);
    const outbox = await open(t, clocks.options({ bounds: { maxAgeMs: 90 * MINUTE } }));
    await offlineHour(outbox, clocks);
    clocks.wall = NTP_WALL;
    await t.rejects(outbox.enqueue({ kind: 'telemetry', topic: 't', payload: () => { throw new Error('render failed'); } }), /render failed/);
    t.equal(outbox.stats().oldestCreatedAt, BOOT_WALL, 'the shift was undone with the failed enqueue');
    await outbox.enqueue(telemetry(360));
    t.equal(outbox.stats().oldestCreatedAt, NTP_WALL - HOUR, 'the next enqueue shifts by the same step, once');
    t.equal(outbox.stats().droppedTotal, 0);
  });

  t.test(`${name}: without a monotonic clock option a test clock moves both: no steps are seen`, async (t) => {
    let wall = 1_000_000;
    const outbox = await open(t, { now: () => wall, bounds: { maxAgeMs: MINUTE } });
    await outbox.enqueue(telemetry(0));
    wall += 2 * MINUTE;
    await outbox.enqueue(telemetry(1));
    t.equal(outbox.stats().droppedTotal, 1, 'the moved clock aged the entry');
  });
}

t.test('a step is stored with the entries: after a restart in the corrected clock the backlog keeps its age', async (t) => {
  const clocks = new Clocks(BOOT_WALL);
  const file = join(tempDir(t), 'edge-agent.db');
  const first = await openOutbox(t, file, clocks.options({ bounds: { maxAgeMs: 90 * MINUTE } }));
  await offlineHour(first.outbox, clocks);
  clocks.wall = NTP_WALL;
  await first.outbox.enqueue(telemetry(360));
  await first.outbox.close();
  await first.db.close();

  // A restart 10 minutes later: a new process, its monotonic clock starts again.
  clocks.advance(10 * MINUTE);
  clocks.mono = 0;
  const second = await openOutbox(t, file, clocks.options({ bounds: { maxAgeMs: 90 * MINUTE } }));
  t.equal(second.outbox.stats().oldestCreatedAt, NTP_WALL - HOUR);
  await second.outbox.enqueue(telemetry(361));
  t.equal(second.outbox.stats().rows, 362, 'nothing dropped: the oldest entry is 70 minutes old');
  t.equal(second.outbox.stats().droppedTotal, 0);
});

t.test('at a restart, entries stamped by an unset clock or in the future count as written at the restart', async (t) => {
  const file = join(tempDir(t), 'edge-agent.db');
  const offline = new Clocks(BOOT_WALL);
  const first = await openOutbox(t, file, offline.options());
  for (let n = 0; n < 5; n += 1) {
    await first.outbox.enqueue(telemetry(n));
    offline.advance(10 * SECOND);
  }
  await first.outbox.close();
  await first.db.close();

  // Rebooted with a set clock before the agent started: the old times (year 2000) cannot be aged.
  const synced = new Clocks(NTP_WALL);
  const second = await openOutbox(t, file, synced.options());
  t.equal(second.outbox.stats().oldestCreatedAt, NTP_WALL, 'unset-clock times become the restart time');
  await second.outbox.enqueue(telemetry(5));
  t.equal(second.outbox.stats().rows, 6, 'nothing dropped for being "26 years old"');
  t.equal(second.outbox.stats().droppedTotal, 0);
  await second.outbox.close();
  await second.db.close();

  // Rebooted again without network: the clock reads 2000 again, the stored times are 26 years ahead.
  const unset = new Clocks(BOOT_WALL);
  const third = await openOutbox(t, file, unset.options({ bounds: { maxAgeMs: HOUR } }));
  t.equal(third.outbox.stats().oldestCreatedAt, BOOT_WALL, 'future times become the restart time');
  unset.advance(10 * MINUTE);
  unset.wall = NTP_WALL + 2 * HOUR; // NTP again
  await third.outbox.enqueue(telemetry(6));
  t.equal(third.outbox.stats().droppedTotal, 0);
  t.equal(third.outbox.stats().oldestCreatedAt, NTP_WALL + 2 * HOUR - 10 * MINUTE, 'aged by the 10 minutes this run saw, not pushed into the future');
  unset.advance(51 * MINUTE);
  await third.outbox.enqueue(telemetry(7));
  t.equal(third.outbox.stats().droppedTotal, 6, 'and the six from before the restart are dropped once older than max age in this run');
});

t.test('the sync interval runs on elapsed time: a backward step does not postpone the checkpoint', async (t) => {
  const clocks = new Clocks(NTP_WALL);
  const { outbox } = await openOutbox(t, join(tempDir(t), 'edge-agent.db'), clocks.options({ syncIntervalMs: 60 * SECOND }));
  await outbox.enqueue(telemetry(0));
  t.equal(outbox.syncs, 0);
  clocks.wall -= HOUR;
  clocks.advance(61 * SECOND);
  await outbox.enqueue(telemetry(1));
  t.equal(outbox.syncs, 1, 'a checkpoint 61 s later, although the wall clock went back an hour');
});
