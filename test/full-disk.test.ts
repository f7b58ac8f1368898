import t from 'tap';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { Database, FleetStore, SqliteOutbox } from '../agent/store/index.js';
import { CAN_MOUNT, fillDisk, smallDisk } from './helpers/small-disk.js';

t.test('full data disk: the outbox and the deployment journal report it and keep what they had', { skip: CAN_MOUNT ? false : 'mounting a tmpfs needs root' }, async (t) => {
  const dir = smallDisk(t);
  const db = await Database.open(join(dir, 'edge-agent.db'));
  t.teardown(() => db.close().catch(() => undefined));
  const outbox = await SqliteOutbox.open(db, {});
  const fleet = await FleetStore.open(db);
  for (let i = 0; i < 5; i++) await outbox.enqueue({ kind: 'telemetry', topic: 'edge/devices/d/telemetry', retain: false, payload: () => JSON.stringify({ i }) });
  await outbox.enqueue({ kind: 'deployment-status', topic: 'edge/devices/d/deployments/x/status', retain: true, payload: () => JSON.stringify({ state: 'accepted' }) });
  await fleet.journal.create({ deploymentId: 'dep-1', model: 'tiny', version: 2, manifest: '{}', sourceTopic: 'edge/devices/d/deployments', state: 'accepted' });

  const filler = fillDisk(dir);
  const big = 'x'.repeat(200_000);
  const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) =>
    outbox.enqueue({ kind: 'telemetry', topic: 'edge/devices/d/telemetry', retain: false, payload: () => JSON.stringify({ i, big }) })));
  const failure = results.find((r) => r.status === 'rejected');
  t.ok(failure, 'writes fail once the disk is full');
  t.match(String((failure as PromiseRejectedResult | undefined)?.reason), /SQLITE_FULL|disk is full|ENOSPC/i, 'and say the disk is full');
  // Small journal writes may still fit in WAL pages SQLite already owns; keep writing until one cannot.
  let lastCommitted = 'accepted';
  let journalError: unknown;
  for (let i = 0; i < 5000 && journalError === undefined; i++) {
    const reason = `attempt ${i} ${'r'.repeat(2000)}`;
    try {
      await fleet.journal.update('dep-1', { state: 'downloading', reason });
      lastCommitted = reason;
    } catch (err) {
      journalError = err;
    }
  }
  t.match(String(journalError), /SQLITE_FULL|disk is full|ENOSPC/i, 'the journal reports the full disk');

  const kept = await outbox.peek(0, 100);
  t.equal(kept.filter((e) => e.kind === 'telemetry' && !e.payload.includes('big')).length, 5, 'the telemetry already stored is still there');
  t.equal(kept.filter((e) => e.kind === 'deployment-status').length, 1, 'so is the deployment status');
  const record = await fleet.journal.get('dep-1');
  t.equal(lastCommitted === 'accepted' ? record?.state : record?.reason, lastCommitted === 'accepted' ? 'accepted' : lastCommitted, 'the journal keeps its last committed state');

  rmSync(filler);
  const after = await outbox.enqueue({ kind: 'telemetry', topic: 'edge/devices/d/telemetry', retain: false, payload: () => JSON.stringify({ again: true }) });
  t.ok(after, 'with space again, writes work');
  t.equal((await fleet.journal.update('dep-1', { state: 'verifying' })).state, 'verifying');
  await outbox.close();
});
