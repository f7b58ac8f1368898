import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Database } from '../agent/store/database.js';
import { MemoryOutbox } from '../agent/store/outbox-memory.js';
import { SqliteOutbox } from '../agent/store/outbox-sqlite.js';
import type { Outbox, OutboxEntry, OutboxMessage, OutboxOptions } from '../agent/store/outbox.js';

/**
 * One contract, two implementations (the MQTT.js store habit): every behaviour the publisher and the fleet
 * rely on is asserted against the in-memory and the SQLite outbox alike.
 */
interface OutboxHarness {
  open(options?: OutboxOptions): Promise<Outbox>;
  /** Closes and opens the same storage again (only durable implementations). */
  reopen?: (current: Outbox, options?: OutboxOptions) => Promise<Outbox>;
  cleanup(): Promise<void>;
}

type Tap = typeof t;

function telemetry(body: Record<string, unknown> = {}): OutboxMessage {
  return {
    kind: 'telemetry',
    topic: 'edge/devices/d1/telemetry',
    payload: (s) => JSON.stringify({ seq: s.seq, dropped: s.dropped, dropped_total: s.droppedTotal, ...body }),
  };
}

function deploymentStatus(id: string, state: string): OutboxMessage {
  return {
    kind: 'deployment-status',
    topic: `edge/devices/d1/deployments/${id}/status`,
    retain: true,
    payload: (s) => JSON.stringify({ seq: s.seq, deployment_id: id, state }),
  };
}

function commandResult(id: string): OutboxMessage {
  return {
    kind: 'command-result',
    topic: `edge/devices/d1/commands/${id}/result`,
    payload: (s) => JSON.stringify({ seq: s.seq, command_id: id, ok: true }),
  };
}

function state(n: number): OutboxMessage {
  return { kind: 'state', topic: 'edge/devices/d1/state', retain: true, payload: (s) => JSON.stringify({ seq: s.seq, n }) };
}

function json(entry: OutboxEntry): Record<string, unknown> {
  return JSON.parse(entry.payload.toString('utf8')) as Record<string, unknown>;
}

async function all(outbox: Outbox): Promise<OutboxEntry[]> {
  return outbox.peek(0, 1_000_000);
}

function outboxContract(t: Tap, name: string, makeHarness: () => Promise<OutboxHarness>): void {
  t.test(`${name}: contract`, async (t) => {
    let h: OutboxHarness;
    t.beforeEach(async () => { h = await makeHarness(); });
    t.afterEach(async () => { await h.cleanup(); });

    t.test('stamps per-kind sequence numbers and keeps insertion order', async (t) => {
      const ob = await h.open();
      const a = await ob.enqueue(telemetry({ n: 1 }));
      const b = await ob.enqueue(deploymentStatus('dep1', 'accepted'));
      const c = await ob.enqueue(telemetry({ n: 2 }));
      t.ok(a && b && c);
      t.same([a!.seq, b!.seq, c!.seq], [1, 1, 2], 'telemetry and deployment statuses count separately');
      t.ok(a!.id < b!.id && b!.id < c!.id, 'ids grow in insertion order');
      const rows = await all(ob);
      t.same(rows.map((r) => r.id), [a!.id, b!.id, c!.id]);
      t.same(json(rows[0]!), { seq: 1, dropped: 0, dropped_total: 0, n: 1 }, 'payload rendered with its stamp');
      const epochs: number[] = [];
      await ob.enqueue({ kind: 'telemetry', topic: 't', payload: (s) => { epochs.push(s.epoch); return '{}'; } });
      await ob.enqueue({ kind: 'other', topic: 't', payload: (s) => { epochs.push(s.epoch); return '{}'; } });
      t.same(epochs, [ob.stats().epoch, ob.stats().epoch], 'entries carry the instance epoch');
      t.ok(ob.stats().epoch > 0);
      t.equal(rows[1]!.retain, true);
      t.equal(rows[0]!.retain, false);
      t.equal(rows[1]!.topic, 'edge/devices/d1/deployments/dep1/status');
      t.equal(rows[1]!.kind, 'deployment-status');
      const st = ob.stats();
      t.equal(st.rows, 5);
      t.equal(st.bytes, (await all(ob)).reduce((s, r) => s + r.payload.length, 0));
      await ob.close();
    });

    t.test('peek pages after an id; remove deletes acknowledged entries only', async (t) => {
      const ob = await h.open();
      const ids: number[] = [];
      for (let i = 0; i < 10; i += 1) ids.push((await ob.enqueue(telemetry({ i })))!.id);
      const first = await ob.peek(0, 4);
      t.same(first.map((r) => r.id), ids.slice(0, 4));
      const next = await ob.peek(first[3]!.id, 4);
      t.same(next.map((r) => r.id), ids.slice(4, 8));
      t.same(await ob.peek(ids[9]!, 4), [], 'nothing after the last id');
      t.same(await ob.peek(0, 0), [], 'limit 0 returns nothing');
      await ob.remove([ids[0]!, ids[1]!, 999_999]);
      t.same((await all(ob)).map((r) => r.id), ids.slice(2), 'unknown id ignored, known ones removed');
      t.equal(ob.stats().rows, 8);
      await ob.remove([]);
      t.equal(ob.stats().rows, 8);
      await ob.close();
    });

    t.test('max rows: drops the oldest telemetry first, never deployment statuses, reports the count', async (t) => {
      const ob = await h.open({ bounds: { maxRows: 5 } });
      await ob.enqueue(telemetry({ n: 1 }));
      await ob.enqueue(deploymentStatus('dep1', 'accepted'));
      await ob.enqueue(telemetry({ n: 2 }));
      await ob.enqueue(deploymentStatus('dep1', 'downloading'));
      await ob.enqueue(telemetry({ n: 3 }));
      t.equal(ob.stats().rows, 5);
      await ob.enqueue(telemetry({ n: 4 }));
      await ob.enqueue(telemetry({ n: 5 }));
      const rows = await all(ob);
      t.equal(rows.length, 5, 'bounded at max rows');
      t.same(rows.filter((r) => r.kind === 'deployment-status').map((r) => json(r)['state']), ['accepted', 'downloading'], 'statuses kept');
      const tel = rows.filter((r) => r.kind === 'telemetry').map(json);
      t.same(tel.map((p) => p['n']), [3, 4, 5], 'the two oldest telemetry entries went');
      t.same(tel.map((p) => p['dropped']), [0, 1, 1], 'each new entry reports the drop it caused');
      t.same(tel.map((p) => p['seq']), [3, 4, 5], 'sequence numbers keep counting: the gap is visible');
      t.equal(ob.stats().droppedTotal, 2);
      t.equal(ob.stats().pendingDrops, 0, 'reported drops are no longer pending');
      await ob.close();
    });

    t.test('a deployment status that overflows drops telemetry; the next telemetry reports it', async (t) => {
      const ob = await h.open({ bounds: { maxRows: 3 } });
      for (let n = 1; n <= 3; n += 1) await ob.enqueue(telemetry({ n }));
      await ob.enqueue(deploymentStatus('dep1', 'accepted'));
      t.equal(ob.stats().pendingDrops, 1, 'the drop waits for the next telemetry record');
      await ob.enqueue(telemetry({ n: 4 }));
      const tel = (await all(ob)).filter((r) => r.kind === 'telemetry').map(json);
      t.same(tel.map((p) => p['n']), [3, 4]);
      t.equal(tel[1]!['dropped'], 2, 'one dropped for the status, one for this record');
      await ob.close();
    });

    t.test('deployment statuses are never dropped, even past the bounds', async (t) => {
      const ob = await h.open({ bounds: { maxRows: 3, maxBytes: 200 } });
      for (let i = 0; i < 10; i += 1) await ob.enqueue(deploymentStatus(`dep${i}`, 'accepted'));
      const rows = await all(ob);
      t.equal(rows.length, 10, 'all ten kept');
      t.same(rows.map((r) => r.seq), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
      const dropped = await ob.enqueue(telemetry({ n: 1 }));
      t.equal(dropped, undefined, 'a telemetry record that cannot fit beside protected entries is dropped itself');
      t.equal(ob.stats().pendingDrops, 1);
      await ob.remove(rows.map((r) => r.id));
      const next = await ob.enqueue(telemetry({ n: 2 }));
      t.equal(next!.seq, 2, 'the dropped record used seq 1: the receiver sees the gap');
      t.equal(json(next!)['dropped'], 1, 'and the count that explains it');
      await ob.close();
    });

    t.test('max bytes: payload bytes are bounded', async (t) => {
      const ob = await h.open({ bounds: { maxBytes: 1000 } });
      const pad = 'x'.repeat(200);
      for (let n = 1; n <= 10; n += 1) await ob.enqueue(telemetry({ n, pad }));
      const st = ob.stats();
      t.ok(st.bytes <= 1000, `bytes ${st.bytes} <= 1000`);
      const tel = (await all(ob)).map(json);
      t.equal(tel.at(-1)!['n'], 10, 'newest kept');
      const totalDropped = tel.reduce((s, p) => s + (p['dropped'] as number), 0);
      t.equal(totalDropped + tel.length, 10, 'every record is either present or counted as dropped');
      t.equal(st.droppedTotal, 10 - tel.length);
      await ob.close();
    });

    t.test('max age: old telemetry goes at the next enqueue, statuses stay', async (t) => {
      let clock = 1_000_000;
      const ob = await h.open({ bounds: { maxAgeMs: 60_000 }, now: () => clock });
      await ob.enqueue(telemetry({ n: 1 }));
      await ob.enqueue(deploymentStatus('dep1', 'active'));
      clock += 30_000;
      await ob.enqueue(telemetry({ n: 2 }));
      clock += 40_000; // n=1 and the status are 70 s old now, n=2 is 40 s old
      await ob.enqueue(telemetry({ n: 3 }));
      const rows = await all(ob);
      t.same(rows.map((r) => (r.kind === 'telemetry' ? json(r)['n'] : 'status')), ['status', 2, 3]);
      t.equal(json(rows[2]!)['dropped'], 1);
      t.equal(ob.stats().oldestCreatedAt, 1_000_000, 'the status is the oldest entry');
      await ob.close();
    });

    t.test('a dropped record hands on the drop count it carried: counts are never lost', async (t) => {
      const ob = await h.open({ bounds: { maxRows: 2 } });
      // Outage: the outbox keeps dropping. Every record it keeps reports what went before it.
      for (let n = 1; n <= 20; n += 1) await ob.enqueue(telemetry({ n }));
      const kept = (await all(ob)).map(json);
      t.same(kept.map((p) => p['n']), [19, 20]);
      const reported = kept.reduce((s, p) => s + (p['dropped'] as number), 0);
      t.equal(reported, 18, 'the receiver can account for all 18 dropped records from the 2 it gets');
      t.equal(ob.stats().droppedTotal, 18);
      await ob.close();
    });

    t.test('a payload renderer that throws stores nothing and consumes no sequence number', async (t) => {
      const ob = await h.open();
      await t.rejects(ob.enqueue({ kind: 'telemetry', topic: 'x', payload: () => { throw new Error('render failed'); } }), /render failed/);
      await t.rejects(ob.enqueue({ kind: 'telemetry', topic: '', payload: () => '{}' }), /non-empty topic/);
      const e = await ob.enqueue(telemetry());
      t.equal(e!.seq, 1);
      t.equal(ob.stats().rows, 1);
      await ob.close();
    });

    t.test('listeners hear each stored entry; a throwing listener does not break enqueue', async (t) => {
      const ob = await h.open();
      const heard: number[] = [];
      ob.onEnqueued(() => { throw new Error('listener bug'); });
      const off = ob.onEnqueued((e) => heard.push(e.seq));
      await ob.enqueue(telemetry());
      await ob.enqueue(telemetry());
      off();
      await ob.enqueue(telemetry());
      t.same(heard, [1, 2]);
      t.equal(ob.stats().rows, 3);
      await ob.close();
    });

    t.test('rejects bounds that are not positive numbers', async (t) => {
      await t.rejects(h.open({ bounds: { maxRows: 0 } }), /maxRows must be a positive number/);
      await t.rejects(h.open({ bounds: { maxBytes: Number.NaN } }), /maxBytes must be a positive number/);
    });

    t.test('concurrent writers get unique, gap-free numbers in storage order', async (t) => {
      const ob = await h.open();
      const writes = Array.from({ length: 40 }, (_, i) => (i % 4 === 0 ? ob.enqueue(deploymentStatus(`d${i}`, 'accepted')) : ob.enqueue(telemetry({ i }))));
      const removals = ob.remove([1, 2, 3]);
      const entries = (await Promise.all(writes)).map((e) => e!);
      await removals;
      const stored = await all(ob);
      for (const kind of ['telemetry', 'deployment-status']) {
        const seqs = stored.filter((e) => e.kind === kind).map((e) => e.seq);
        t.same(seqs, Array.from({ length: seqs.length }, (_, i) => seqs[0]! + i), `${kind}: contiguous in id order`);
      }
      t.equal(new Set(entries.map((e) => e.id)).size, 40);
      t.equal(stored.length + 3, 40, 'removals interleaved with writes took effect on what existed');
      await ob.close();
    });

    t.test('a closed outbox refuses work', async (t) => {
      const ob = await h.open();
      await ob.close();
      await t.rejects(ob.enqueue(telemetry()), /closed/);
    });

    t.test('class reads: protected entries after one cursor, droppable ones after another, each in id order', async (t) => {
      const ob = await h.open();
      const put = [
        await ob.enqueue(telemetry({ n: 1 })),
        await ob.enqueue(commandResult('c1')),
        await ob.enqueue(telemetry({ n: 2 })),
        await ob.enqueue(state(1)),
        await ob.enqueue(deploymentStatus('dep1', 'accepted')),
        await ob.enqueue(telemetry({ n: 3 })),
        await ob.enqueue(commandResult('c2')),
      ].map((e) => e!);
      const ids = (kinds: string[]): number[] => put.filter((e) => kinds.includes(e.kind)).map((e) => e.id);
      const protectedIds = ids(['command-result', 'deployment-status']);
      const droppableIds = ids(['telemetry', 'state']);
      t.same((await ob.peek(0, 100, 'protected')).map((e) => e.id), protectedIds, 'command results and deployment statuses, in id order');
      t.same((await ob.peek(0, 100, 'droppable')).map((e) => e.id), droppableIds, 'telemetry and other droppable kinds, in id order');
      t.same((await ob.peek(0, 100)).map((e) => e.id), put.map((e) => e.id), 'without a class: everything, as before');
      t.same((await ob.peek(protectedIds[0]!, 1, 'protected')).map((e) => e.id), [protectedIds[1]], 'pages after the class cursor');
      t.same((await ob.peek(protectedIds[0]!, 100, 'droppable')).map((e) => e.id), droppableIds.filter((id) => id > protectedIds[0]!));
      t.same((await ob.peek(droppableIds[1]!, 2, 'droppable')).map((e) => e.id), droppableIds.slice(2, 4));
      t.same(await ob.peek(0, 0, 'protected'), []);
      t.same(await ob.peek(protectedIds.at(-1)!, 10, 'protected'), [], 'nothing after the last protected id');
      const cr = (await ob.peek(0, 1, 'protected'))[0]!;
      t.same([cr.kind, cr.seq, cr.topic, cr.retain, json(cr)['command_id']], ['command-result', 1, 'edge/devices/d1/commands/c1/result', false, 'c1'], 'the whole entry');
      await ob.remove([protectedIds[0]!, droppableIds[0]!]);
      t.same((await ob.peek(0, 100, 'protected')).map((e) => e.id), protectedIds.slice(1), 'removed entries are gone from the class read');
      t.same((await ob.peek(0, 100, 'droppable')).map((e) => e.id), droppableIds.slice(1));
      await t.rejects(ob.peek(0, 10, 'urgent' as never), { name: 'TypeError', message: /outbox read class must be 'protected' or 'droppable', got "urgent"/ });
      await ob.close();
    });

    t.test('class reads follow the configured protected kinds', async (t) => {
      const ob = await h.open({ protectedKinds: ['state'] });
      await ob.enqueue(deploymentStatus('dep1', 'accepted'));
      await ob.enqueue(state(1));
      await ob.enqueue(telemetry());
      t.same((await ob.peek(0, 10, 'protected')).map((e) => e.kind), ['state']);
      t.same((await ob.peek(0, 10, 'droppable')).map((e) => e.kind), ['deployment-status', 'telemetry']);
      await ob.close();
      const none = await h.open({ protectedKinds: [] });
      await none.enqueue(commandResult('c1'));
      t.same(await none.peek(0, 10, 'protected'), [], 'no protected kinds: the protected class is empty');
      t.ok((await none.peek(0, 10, 'droppable')).some((e) => e.kind === 'command-result'), 'a command result is droppable then');
      t.equal((await none.peek(0, 10, 'droppable')).length, (await none.peek(0, 10)).length, 'and the droppable class is everything');
      await none.close();
    });

    t.test('durable: entries, sequence numbers and pending drops survive a reopen', async (t) => {
      if (!h.reopen) {
        t.pass('not a durable implementation');
        return;
      }
      const ob = await h.open({ bounds: { maxRows: 3 } });
      for (let n = 1; n <= 5; n += 1) await ob.enqueue(telemetry({ n }));
      await ob.enqueue(deploymentStatus('dep1', 'accepted'));
      const before = await all(ob);
      const statsBefore = ob.stats();
      const again = await h.reopen(ob, { bounds: { maxRows: 3 } });
      const after = await all(again);
      t.same(after.map((r) => [r.id, r.seq, r.kind, r.payload.toString()]), before.map((r) => [r.id, r.seq, r.kind, r.payload.toString()]));
      const { epoch: epochBefore, ...restBefore } = statsBefore;
      const { epoch: epochAfter, ...restAfter } = again.stats();
      t.same(restAfter, restBefore, 'bookkeeping rebuilt from the tables');
      t.ok(epochAfter > epochBefore, `a reopen starts a new epoch (${epochBefore} → ${epochAfter})`);
      await again.remove(after.map((r) => r.id));
      const next = await again.enqueue(telemetry({ n: 6 }));
      t.equal(next!.seq, 6, 'sequence continues after restart and after the table emptied');
      t.ok(next!.id > after.at(-1)!.id, 'ids are never reused');
      t.equal(json(next!)['dropped'], statsBefore.pendingDrops, 'drops pending at shutdown are reported after it');
      const st = await again.enqueue(deploymentStatus('dep1', 'active'));
      t.equal(st!.seq, 2);
      t.same((await again.peek(0, 10, 'protected')).map((e) => e.id), [st!.id], 'class reads work on the rebuilt bookkeeping');
      t.same((await again.peek(0, 10, 'droppable')).map((e) => e.id), [next!.id]);
      await again.close();
    });
  });
}

outboxContract(t, 'MemoryOutbox', async () => ({
  open: async (options) => new MemoryOutbox(options),
  cleanup: async () => undefined,
}));

outboxContract(t, 'SqliteOutbox', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'edge-outbox-'));
  const file = join(dir, 'agent.db');
  const dbs: Database[] = [];
  const openDb = async (): Promise<Database> => {
    const db = await Database.open(file);
    dbs.push(db);
    return db;
  };
  return {
    open: async (options) => SqliteOutbox.open(await openDb(), options),
    reopen: async (current, options) => {
      await current.close();
      await dbs.pop()?.close();
      return SqliteOutbox.open(await openDb(), options);
    },
    cleanup: async () => {
      for (const db of dbs.splice(0)) await db.close().catch(() => undefined);
      rmSync(dir, { recursive: true, force: true });
    },
  };
});

t.test('SqliteOutbox: bounded power-cut window, deployment statuses synced at once', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'edge-outbox-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const db = await Database.open(join(dir, 'agent.db'));
  t.teardown(() => db.close());
  let clock = 5_000_000;
  const ob = await SqliteOutbox.open(db, { now: () => clock, syncIntervalMs: 60_000 });
  await ob.enqueue(telemetry());
  clock += 30_000;
  await ob.enqueue(telemetry());
  t.equal(ob.syncs, 0, 'no fsync per record');
  clock += 31_000;
  await ob.enqueue(telemetry());
  t.equal(ob.syncs, 1, 'a checkpoint once the sync interval passed');
  await ob.enqueue(deploymentStatus('dep1', 'active'));
  t.equal(ob.syncs, 2, 'a deployment status is made durable right away');
  const off = await SqliteOutbox.open(db, { syncIntervalMs: 0 });
  clock += 3_600_000;
  await off.enqueue(telemetry());
  t.equal(off.syncs, 0, '0 leaves checkpoints to SQLite');
});

t.test('SqliteOutbox shares the database with other concerns and uses WAL', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'edge-outbox-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const db = await Database.open(join(dir, 'agent.db'));
  t.teardown(() => db.close());
  const ob = await SqliteOutbox.open(db);
  await ob.enqueue(telemetry());
  const mode = await db.get<{ journal_mode: string }>('PRAGMA journal_mode');
  t.equal(mode?.journal_mode, 'wal');
  const again = await SqliteOutbox.open(db);
  t.equal(again.stats().rows, 1, 'opening twice runs the migration once');
});
