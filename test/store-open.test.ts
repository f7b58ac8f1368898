import t from 'tap';
import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import sqlite3 from 'sqlite3';
import { agentConfigSchema } from '../agent/config/index.js';
import { ConfigError } from '../agent/errors.js';
import { silentLogger } from '../agent/logger.js';
import { Agent } from '../agent/main.js';
import { Database, FleetStore, SqliteOutbox } from '../agent/store/index.js';
import { copyDemoRepo, tempDir } from './helpers/runtime.js';
import { CAN_MOUNT, fillDisk, smallDisk } from './helpers/small-disk.js';

/**
 * What the state database does at start when it cannot be opened normally: only a damaged file is set aside
 * (and rebuilt by the callers); a locked, full, read-only or unwritable one stops the start with an error that
 * names the file, and keeps it as it is.
 */

type Recovery = { file: string; setAsideAs: string; reason: string };

const status = (i: number): Parameters<SqliteOutbox['enqueue']>[0] =>
  ({ kind: 'deployment-status', topic: 'edge/devices/d/deployments/dep/status', retain: true, payload: (s) => JSON.stringify({ i, seq: s.seq, epoch: s.epoch }) });

/** A healthy agent database: 3 pending deployment statuses and a journal row. Returns the outbox epoch. */
async function healthyDatabase(file: string): Promise<number> {
  const db = await Database.open(file);
  const outbox = await SqliteOutbox.open(db);
  const fleet = await FleetStore.open(db);
  for (let i = 0; i < 3; i += 1) await outbox.enqueue(status(i));
  await fleet.journal.create({ deploymentId: 'dep-1', model: 'tiny', version: 2, manifest: '{}', sourceTopic: 'edge/devices/d/deployments', state: 'downloading' });
  const epoch = outbox.stats().epoch;
  await outbox.close();
  await db.close();
  return epoch;
}

/** Opens the database as the agent does and says what it holds. */
async function contents(file: string): Promise<{ statuses: number; journal: string | undefined; recovered: Recovery[] }> {
  const recovered: Recovery[] = [];
  const db = await Database.open(file, { onRecovered: (i) => recovered.push(i) });
  try {
    const outbox = await SqliteOutbox.open(db);
    const fleet = await FleetStore.open(db);
    const statuses = (await outbox.peek(0, 100)).filter((e) => e.kind === 'deployment-status').length;
    return { statuses, journal: (await fleet.journal.get('dep-1'))?.state, recovered };
  } finally {
    await db.close();
  }
}

function setAside(dir: string): string[] {
  return readdirSync(dir).filter((f) => f.includes('.corrupt-'));
}

/** Another process's connection (a sqlite3 shell, a backup), holding a lock until released. */
async function holdLock(file: string, sql: string): Promise<{ release(): Promise<void> }> {
  const holder = await new Promise<sqlite3.Database>((resolve, reject) => {
    const d: sqlite3.Database = new sqlite3.Database(file, (err) => (err ? reject(err) : resolve(d)));
  });
  await new Promise<void>((resolve, reject) => holder.exec(sql, (err) => (err ? reject(err) : resolve())));
  return {
    release: async () => {
      await new Promise<void>((resolve) => holder.exec('ROLLBACK', () => resolve()));
      await new Promise<void>((resolve, reject) => holder.close((err) => (err ? reject(err) : resolve())));
    },
  };
}

const EXCLUSIVE = "PRAGMA locking_mode=EXCLUSIVE; BEGIN EXCLUSIVE; INSERT INTO outbox_counters (name, value) VALUES ('held', 1);";
const WRITING = "BEGIN IMMEDIATE; INSERT INTO outbox_counters (name, value) VALUES ('held', 1);";

t.test('a database locked by another connection: the start fails naming the file, the file is kept', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'edge-agent.db');
  await healthyDatabase(file);
  const lock = await holdLock(file, EXCLUSIVE);
  const recovered: Recovery[] = [];
  const err = await Database.open(file, { busyTimeoutMs: 200, onRecovered: (i) => recovered.push(i) }).then(() => undefined, (e: unknown) => e);
  t.type(err, ConfigError, 'a ConfigError (the CLI prints it on one line and exits 2)');
  t.match((err as Error).message, new RegExp(`^${file.replace(/[.]/g, '\\.')}: SQLITE_BUSY: database is locked \\(another process holds it\\?`), 'names the file, the cause and what to check');
  t.match((err as Error).message, /the file was left as it is/);
  t.same(recovered, [], 'not reported as recovered');
  t.same(setAside(dir), [], 'not set aside');
  await lock.release();
  const after = await contents(file);
  t.same(after, { statuses: 3, journal: 'downloading', recovered: [] }, 'everything is there once the lock is gone');
});

t.test('a database another connection is writing: the outbox open fails naming the file', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'edge-agent.db');
  await healthyDatabase(file);
  const lock = await holdLock(file, WRITING);
  const db = await Database.open(file, { busyTimeoutMs: 200 });
  t.teardown(() => db.close().catch(() => undefined));
  const err = await SqliteOutbox.open(db).then(() => undefined, (e: unknown) => e);
  t.type(err, ConfigError);
  t.match((err as Error).message, `${file}: SQLITE_BUSY`);
  t.match((err as Error).message, /another process holds it\?/);
  await db.close();
  await lock.release();
  t.same(setAside(dir), []);
  t.same(await contents(file), { statuses: 3, journal: 'downloading', recovered: [] });
});

t.test('the agent: a locked database stops the start with an error naming the file', async (t) => {
  const dataDir = tempDir(t, 'edge-agent-');
  const file = join(dataDir, 'edge-agent.db');
  await healthyDatabase(file);
  const lock = await holdLock(file, EXCLUSIVE);
  const config = agentConfigSchema.parse({
    model_repository: copyDemoRepo(t, ['tiny']),
    data_dir: dataDir,
    server: { listen: ['127.0.0.1:0'] },
    runtime: { execution_providers: ['cpu'] },
    telemetry: { http: { port: 0 } },
  });
  const agent = new Agent({ config, configSource: '<test>', log: silentLogger() });
  const err = await agent.start().then(() => undefined, (e: unknown) => e);
  await agent.stop();
  await lock.release();
  t.type(err, ConfigError);
  t.match((err as Error).message, `${file}: SQLITE_BUSY: database is locked (another process holds it?`);
  t.same(setAside(dataDir), []);
  t.same(await contents(file), { statuses: 3, journal: 'downloading', recovered: [] });
});

t.test('a corrupted header is set aside; the new database numbers in a new epoch', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'edge-agent.db');
  const oldEpoch = await healthyDatabase(file);
  const fd = openSync(file, 'r+');
  writeSync(fd, Buffer.alloc(100, 0x41), 0, 100, 0);
  closeSync(fd);

  const recovered: Recovery[] = [];
  const db = await Database.open(file, { onRecovered: (i) => recovered.push(i) });
  t.teardown(() => db.close().catch(() => undefined));
  t.equal(recovered.length, 1, 'reported');
  t.match(recovered[0]!.reason, /SQLITE_NOTADB|not a database/);
  t.same(setAside(dir), [recovered[0]!.setAsideAs.slice(dir.length + 1)], 'the damaged file lies beside the new one');
  const outbox = await SqliteOutbox.open(db);
  t.equal(outbox.stats().rows, 0, 'a fresh database');
  const e = await outbox.enqueue(status(0));
  t.equal(e!.seq, 1, 'sequences restart at 1');
  t.not(outbox.stats().epoch, oldEpoch, `so the epoch differs from the old database's (${oldEpoch})`);
  t.ok(Number.isSafeInteger(outbox.stats().epoch) && outbox.stats().epoch > 0);
  const epoch = outbox.stats().epoch;
  await db.close();
  const again = await Database.open(file);
  t.teardown(() => again.close().catch(() => undefined));
  t.equal((await SqliteOutbox.open(again)).stats().epoch, epoch + 1, 'and keeps changing at every open');
});

t.test('a damaged page (quick_check fails) is set aside', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'edge-agent.db');
  {
    const db = await Database.open(file);
    const outbox = await SqliteOutbox.open(db);
    for (let i = 0; i < 200; i += 1) await outbox.enqueue({ kind: 'telemetry', topic: 't', payload: () => 'x'.repeat(900) });
    await db.get('PRAGMA wal_checkpoint(TRUNCATE)');
    await db.close();
  }
  const size = statSync(file).size;
  const fd = openSync(file, 'r+');
  writeSync(fd, Buffer.alloc(4096, 0xff), 0, 4096, Math.floor(size / 2 / 4096) * 4096);
  closeSync(fd);
  const recovered: Recovery[] = [];
  const db = await Database.open(file, { onRecovered: (i) => recovered.push(i) });
  t.teardown(() => db.close().catch(() => undefined));
  t.equal(recovered.length, 1);
  t.comment(`damaged page: ${recovered[0]?.reason}`);
  t.match(recovered[0]!.reason, /integrity check|SQLITE_CORRUPT/);
  t.equal(setAside(dir).length, 1);
  t.equal((await SqliteOutbox.open(db)).stats().rows, 0);
});

t.test('an empty (0-byte) file is set aside with its -wal, reported, and replaced', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'edge-agent.db');
  writeFileSync(file, '');
  writeFileSync(`${file}-wal`, Buffer.alloc(4096, 7));
  const recovered: Recovery[] = [];
  const db = await Database.open(file, { onRecovered: (i) => recovered.push(i) });
  t.teardown(() => db.close().catch(() => undefined));
  t.equal(recovered.length, 1, 'reported: the callers rebuild what the file held');
  t.match(recovered[0]!.reason, /empty \(0 bytes\)/);
  t.equal(statSync(recovered[0]!.setAsideAs).size, 0);
  t.equal(statSync(`${recovered[0]!.setAsideAs}-wal`).size, 4096, 'the WAL beside it was kept (SQLite would have deleted it)');
  t.equal((await SqliteOutbox.open(db)).stats().rows, 0);
  t.ok(statSync(file).size > 0, 'a real database now');
});

t.test('a database path that cannot be opened fails naming it', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'edge-agent.db');
  mkdirSync(file); // a directory where the file should be
  const err = await Database.open(file).then(() => undefined, (e: unknown) => e);
  t.type(err, ConfigError);
  t.match((err as Error).message, `${file}: SQLITE_CANTOPEN`);
  t.ok(statSync(file).isDirectory(), 'left as it is');
  t.same(setAside(dir), []);
});


/** Opens the database and its outbox as the agent's start does; returns the failure and any set-aside reports. */
async function openAsAtStart(file: string): Promise<{ err: unknown; recovered: Recovery[] }> {
  const recovered: Recovery[] = [];
  try {
    const db = await Database.open(file, { onRecovered: (i) => recovered.push(i) });
    try {
      await SqliteOutbox.open(db);
    } finally {
      await db.close().catch(() => undefined);
    }
  } catch (err) {
    return { err, recovered };
  }
  return { err: undefined, recovered };
}

t.test('a full disk at start: the start fails naming the file; once space is freed nothing is lost', { skip: CAN_MOUNT ? false : 'mounting a tmpfs needs root' }, async (t) => {
  const disk = smallDisk(t);
  const dir = join(disk, 'var');
  const file = join(dir, 'edge-agent.db');
  await healthyDatabase(file);
  const filler = fillDisk(disk);

  const { err, recovered } = await openAsAtStart(file);
  t.comment(`full disk: ${String(err)}`);
  t.type(err, ConfigError, 'the start fails');
  t.match((err as Error).message, new RegExp(`^${file.replace(/[.]/g, '\\.')}: SQLITE_(FULL|IOERR)`), 'naming the file and the cause');
  t.match((err as Error).message, /disk is full|full disk/, 'and saying to check the free space');
  t.same(recovered, [], 'not taken for corruption');
  t.same(setAside(dir), [], 'not set aside');

  rmSync(filler);
  t.same(await contents(file), { statuses: 3, journal: 'downloading', recovered: [] }, 'with space again, the next start has every status and the journal');
});

t.test('a read-only filesystem at start: the start fails naming the file, which is kept', { skip: CAN_MOUNT ? false : 'mounting a tmpfs needs root' }, async (t) => {
  const disk = smallDisk(t);
  const dir = join(disk, 'var');
  const file = join(dir, 'edge-agent.db');
  await healthyDatabase(file);
  execFileSync('mount', ['-o', 'remount,ro', disk], { stdio: 'pipe' });
  const { err, recovered } = await openAsAtStart(file);
  t.comment(`read-only: ${String(err)}`);
  t.type(err, ConfigError, 'the start fails');
  t.match((err as Error).message, new RegExp(`^${file.replace(/[.]/g, '\\.')}: SQLITE_(READONLY|CANTOPEN)`));
  t.match((err as Error).message, /read-only|cannot open/);
  t.same(recovered, []);
  execFileSync('mount', ['-o', 'remount,rw', disk], { stdio: 'pipe' });
  t.same(setAside(dir), []);
  t.ok(existsSync(file));
  t.same(await contents(file), { statuses: 3, journal: 'downloading', recovered: [] });
});
