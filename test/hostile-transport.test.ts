import t from 'tap';
import { readdirSync } from 'node:fs';
import http2 from 'node:http2';
import { connect } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { EdgeAgentClient, type SensorStreamHandle } from '../agent/client/index.js';
import { bytesOf, KServeClient, startHostileAgent, TINY_ELEMENTS, type HostileAgent } from './helpers/hostile-agent.js';
import { startTestAgent } from './helpers/agent.js';

// Hostile connections against the real CLI agent: bytes that are not HTTP/2, broken HTTP/2, broken gRPC
// framing on a valid HTTP/2 stream, a flood of streams, streams reset as fast as they open, and clients that
// never read. After each, the agent must still answer good requests correctly on both APIs.

const PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
const EMPTY_SETTINGS = Buffer.from([0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
/** A HEADERS frame (END_STREAM|END_HEADERS, stream 1) whose block is not valid HPACK. */
const BAD_HPACK = Buffer.from([0, 0, 20, 0x1, 0x05, 0, 0, 0, 1, ...Array<number>(20).fill(0xff)]);
/** A frame header announcing 16 MiB, over the 16 KiB SETTINGS_MAX_FRAME_SIZE. */
const OVERSIZED_FRAME = Buffer.concat([Buffer.from([0xff, 0xff, 0xff, 0x0, 0, 0, 0, 0, 1]), Buffer.alloc(100)]);
const H2_ERRORS = ['NO_ERROR', 'PROTOCOL_ERROR', 'INTERNAL_ERROR', 'FLOW_CONTROL_ERROR', 'SETTINGS_TIMEOUT', 'STREAM_CLOSED', 'FRAME_SIZE_ERROR', 'REFUSED_STREAM', 'CANCEL', 'COMPRESSION_ERROR', 'CONNECT_ERROR', 'ENHANCE_YOUR_CALM'];

/** Writes `bytes` on a fresh TCP connection; resolves with what came back, the GOAWAY code if any, and whether
 * the agent closed the connection within `waitMs`. */
function rawTcp(port: number, bytes: Buffer, waitMs = 3000): Promise<{ goaway?: string; closed: boolean; bytes: number }> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    let got = Buffer.alloc(0);
    const done = (closed: boolean): void => {
      clearTimeout(timer);
      s.destroy();
      let goaway: string | undefined;
      for (let i = 0; i + 9 <= got.length; i += 9 + got.readUIntBE(i, 3)) {
        if (got[i + 3] === 0x7 && i + 17 <= got.length) goaway = H2_ERRORS[got.readUInt32BE(i + 13)] ?? String(got.readUInt32BE(i + 13));
      }
      resolve({ ...(goaway ? { goaway } : {}), closed, bytes: got.length });
    };
    const timer = setTimeout(() => done(false), waitMs);
    s.on('connect', () => s.write(bytes));
    s.on('data', (d: Buffer) => { got = Buffer.concat([got, d]); });
    s.on('close', () => done(true));
    s.on('error', () => undefined);
  });
}

/** One gRPC call made by hand over node:http2, so the body can be anything; resolves with grpc-status and
 * grpc-message (or the HTTP status when gRPC never answered). */
function rawGrpc(port: number, path: string, body: Buffer, headers: http2.OutgoingHttpHeaders = {}): Promise<{ status: string; message: string }> {
  const session = http2.connect(`http://127.0.0.1:${port}`);
  session.on('error', () => undefined);
  return new Promise((resolve) => {
    const req = session.request({ ':method': 'POST', ':path': path, 'content-type': 'application/grpc', te: 'trailers', ...headers });
    let head: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders | undefined;
    req.on('response', (h) => { head = h; });
    req.on('trailers', (h) => { trailers = h; });
    req.on('data', () => undefined);
    req.on('error', () => undefined);
    req.on('close', () => {
      session.close();
      const h = trailers ?? head;
      const status = h['grpc-status'] !== undefined ? grpc.status[Number(h['grpc-status'])] as string : `HTTP ${String(head[':status'])}`;
      resolve({ status, message: decodeURIComponent(String(h['grpc-message'] ?? '')) });
    });
    req.end(body);
  });
}

/** gRPC length-prefixed message: flag byte, 4-byte big-endian length, payload. */
function lengthPrefixed(payload: Buffer, o: { compressed?: boolean; length?: number } = {}): Buffer {
  const head = Buffer.alloc(5);
  head[0] = o.compressed ? 1 : 0;
  head.writeUInt32BE(o.length ?? payload.length, 1);
  return Buffer.concat([head, payload]);
}

const openFds = (pid: number): number => readdirSync(`/proc/${pid}/fd`).length;
const tinyFrame = { dtype: 'float32' as const, shape: [1, TINY_ELEMENTS], data: new Float32Array(TINY_ELEMENTS).fill(0.5) };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let agent: HostileAgent;
t.before(async () => {
  agent = await startHostileAgent(t, { models: ['tiny', 'classifier'] });
});
t.teardown(() => { t.comment(`hostile transport report:\n${agent.report.join('\n')}`); });

t.test('bytes that are not HTTP/2, and broken HTTP/2 frames: the connection is refused, the agent serves on', async (t) => {
  const cases: [string, Buffer, RegExp][] = [
    ['HTTP/1.1 request', Buffer.from('GET / HTTP/1.1\r\nHost: edge\r\n\r\n'), /./],
    ['random bytes', Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 7919) & 0xff)), /./],
    ['preface then junk', Buffer.concat([PREFACE, Buffer.from('\xff\xfe not a frame '.repeat(40), 'latin1')]), /PROTOCOL_ERROR|INTERNAL_ERROR|FRAME_SIZE_ERROR/],
    ['preface, invalid HPACK', Buffer.concat([PREFACE, EMPTY_SETTINGS, BAD_HPACK]), /COMPRESSION_ERROR/],
    ['preface, 16 MiB frame', Buffer.concat([PREFACE, EMPTY_SETTINGS, OVERSIZED_FRAME]), /FRAME_SIZE_ERROR/],
  ];
  for (const [what, bytes, goaway] of cases) {
    const r = await rawTcp(agent.port, bytes);
    agent.report.push(`tcp     | ${what.padEnd(28)} | ${r.goaway ? `GOAWAY ${r.goaway}` : 'no GOAWAY'}, ${r.closed ? 'connection closed' : 'connection left open'}`);
    t.ok(r.goaway !== undefined || r.closed, `${what}: the agent refused the connection (GOAWAY or close)`);
    if (r.goaway) t.match(r.goaway, goaway, `${what}: GOAWAY ${r.goaway}`);
    await agent.stillServing(t, what);
  }
});

t.test('broken gRPC framing on a valid HTTP/2 stream', async (t) => {
  const cases: [string, string, Buffer, http2.OutgoingHttpHeaders, string, RegExp][] = [
    ['garbage protobuf (KServe)', '/inference.GRPCInferenceService/ModelInfer', lengthPrefixed(Buffer.alloc(64, 0xff)), {}, 'INTERNAL', /deserializ/i],
    ['garbage protobuf (native)', '/edge.v1.SensorStream/Stream', lengthPrefixed(Buffer.alloc(64, 0xff)), {}, 'INTERNAL', /deserializ/i],
    ['length prefix says 4 GiB', '/inference.GRPCInferenceService/ModelInfer', lengthPrefixed(Buffer.alloc(16), { length: 0xffffffff }), {}, 'RESOURCE_EXHAUSTED', /larger than max \(4294967295 vs 16777216\)|server\.max_message_bytes/],
    ['message cut short', '/inference.GRPCInferenceService/ModelInfer', lengthPrefixed(Buffer.alloc(10), { length: 100 }), {}, 'UNIMPLEMENTED', /no request message/],
    ['gzip flag, bytes not gzip', '/inference.GRPCInferenceService/ModelInfer', lengthPrefixed(Buffer.alloc(32, 0x41), { compressed: true }), { 'grpc-encoding': 'gzip' }, 'INTERNAL', /decompress/i],
    ['unknown method', '/inference.GRPCInferenceService/Shutdown', lengthPrefixed(Buffer.alloc(0)), {}, 'UNIMPLEMENTED', /does not implement the method/],
    ['wrong content-type', '/inference.GRPCInferenceService/ModelInfer', lengthPrefixed(Buffer.alloc(0)), { 'content-type': 'text/plain' }, 'HTTP 415', /^$/],
  ];
  for (const [what, path, body, headers, status, re] of cases) {
    const r = await rawGrpc(agent.port, path, body, headers);
    agent.report.push(`grpc    | ${what.padEnd(28)} | ${r.status}: ${r.message}`);
    t.equal(r.status, status, `${what}: ${status}`);
    t.match(r.message, re, `${what}: message`);
    await agent.stillServing(t, what);
  }
});

t.test('5000 streams opened and reset at once (HTTP/2 rapid reset) on one connection', async (t) => {
  const session = http2.connect(`http://127.0.0.1:${agent.port}`);
  let sessionError = '';
  session.on('error', (e: NodeJS.ErrnoException) => { sessionError = e.code ?? e.message; });
  let opened = 0;
  for (let i = 0; i < 5000 && !session.destroyed; i++) {
    const req = session.request({ ':method': 'POST', ':path': '/edge.v1.SensorStream/Stream', 'content-type': 'application/grpc', te: 'trailers' });
    req.on('error', () => undefined);
    req.close(http2.constants.NGHTTP2_CANCEL);
    opened++;
  }
  await new Promise<void>((resolve) => { if (session.destroyed) resolve(); else session.once('close', resolve); setTimeout(resolve, 3000); });
  session.destroy();
  agent.report.push(`http2   | ${'rapid reset x5000'.padEnd(28)} | ${opened} opened+reset; ${sessionError ? `agent ended the session (${sessionError})` : 'session survived'}`);
  t.ok(opened > 0);
  await agent.stillServing(t, 'rapid reset');
});

t.test('clients that never read their results cannot make the agent take more work or stop serving others', async (t) => {
  const tinyCount = async (): Promise<number> => Number((await agent.kserve.call('ModelStatistics', { name: 'tiny' }))['model_stats'][0]['inference_count']);
  /** Polls until the count stops moving (two equal samples a second apart); returns how much it grew. */
  const plateau = async (from: number): Promise<number> => {
    let last = await tinyCount();
    for (let i = 0; i < 20; i++) {
      await sleep(1000);
      const now = await tinyCount();
      if (now === last) return now - from;
      last = now;
    }
    throw new Error('the agent kept taking frames from a client that does not read');
  };
  const sent = 20_000;

  const reader = new EdgeAgentClient({ address: agent.tcp, channelOptions: { 'grpc.use_local_subchannel_pool': 1 } });
  t.teardown(() => reader.close());
  let before = await tinyCount();
  const stuck: SensorStreamHandle = await reader.openStream({ model: 'tiny', maxInFlight: 4 });
  for (let i = 0; i < sent; i++) stuck.sendNoWait({ seq: i, inputs: { x: tinyFrame } });
  const nativeTaken = await plateau(before);
  agent.report.push(`native  | ${'never reads, 20000 frames'.padEnd(28)} | agent ran ${nativeTaken} then stopped reading the stream`);
  t.ok(nativeTaken < sent, `native: the agent ran ${nativeTaken} of ${sent} frames, then stopped reading the stream`);
  await agent.stillServing(t, 'while a native client does not read');
  stuck.cancel();

  before = await tinyCount();
  const kserveReader = new KServeClient(agent.tcp, { 'grpc.use_local_subchannel_pool': 1 });
  t.teardown(() => kserveReader.close());
  const stream = kserveReader.openStream();
  stream.on('error', () => undefined);
  // Reads one response, then no more: the client library stops taking data from the connection once its
  // buffer is full, so HTTP/2 flow control reaches the agent. (A grpc-js call that never starts reading
  // buffers every response in the client instead, and the agent rightly keeps going.)
  stream.once('data', () => stream.pause());
  const request = { model_name: 'tiny', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, TINY_ELEMENTS] }], raw_input_contents: [bytesOf(tinyFrame.data)] };
  for (let i = 0; i < sent; i++) stream.write({ ...request, id: String(i) });
  const kserveTaken = await plateau(before);
  agent.report.push(`kserve  | ${'never reads, 20000 requests'.padEnd(28)} | agent ran ${kserveTaken} then stopped reading the stream`);
  t.ok(kserveTaken < sent, `KServe: the agent ran ${kserveTaken} of ${sent} requests, then stopped reading the stream`);
  await agent.stillServing(t, 'while a KServe client does not read');
  stream.cancel();
  await agent.stillServing(t, 'after the non-readers left');
});

t.test('thousands of streams from one client: each over the limit gets RESOURCE_EXHAUSTED naming it', async (t) => {
  const limited = await startHostileAgent(t, { models: ['tiny'], configYaml: 'server:\n  max_streams: 150\n  max_streams_per_peer: 100\n' });
  const tcpClient = new EdgeAgentClient({ address: limited.tcp });
  const unixClient = new EdgeAgentClient({ address: limited.unix });
  t.teardown(() => { tcpClient.close(); unixClient.close(); });
  const openMany = async (client: EdgeAgentClient, n: number): Promise<{ open: SensorStreamHandle[]; refused: grpc.ServiceError[] }> => {
    const settled = await Promise.allSettled(Array.from({ length: n }, () => client.openStream({ model: 'tiny' })));
    return {
      open: settled.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : [])),
      refused: settled.flatMap((s) => (s.status === 'rejected' ? [s.reason as grpc.ServiceError] : [])),
    };
  };

  const tcp = await openMany(tcpClient, 2000);
  t.equal(tcp.open.length, 100, '100 streams admitted from 127.0.0.1');
  t.equal(tcp.refused.length, 1900);
  t.ok(tcp.refused.every((e) => e.code === grpc.status.RESOURCE_EXHAUSTED), 'every refusal is RESOURCE_EXHAUSTED');
  t.match(tcp.refused[0]?.details, /too many streams from 127\.0\.0\.1: server\.max_streams_per_peer = 100/);
  // The unix socket is another peer: it gets the 50 slots left under the total.
  const unix = await openMany(unixClient, 60);
  t.equal(unix.open.length, 50, '50 more over the unix socket, up to server.max_streams');
  t.match(unix.refused[0]?.details, /too many streams: server\.max_streams = 150/);
  limited.report.push(`native  | ${'2000+60 streams, limits 100/150'.padEnd(28)} | ${tcp.open.length + unix.open.length} admitted; ${tcp.refused[0]?.details}; ${unix.refused[0]?.details}`);
  agent.report.push(...limited.report);

  const admitted = [...tcp.open, ...unix.open];
  const results = await Promise.all(admitted.slice(0, 5).map(async (s, i) => {
    await s.send({ seq: i, inputs: { x: tinyFrame } });
    return (await s.results().next()).value;
  }));
  t.ok(results.every((r) => r?.status === 'OK'), 'admitted streams serve');
  for (const s of admitted) s.end();
  for (const s of admitted) for await (const _ of s.results()) { /* drain to the end */ }
  const again = await openMany(tcpClient, 100);
  t.equal(again.open.length, 100, 'slots are released when streams end');
  for (const s of again.open) s.end();
  for (const s of again.open) for await (const _ of s.results()) { /* drain to the end */ }
  await limited.stillServing(t, 'after the stream flood');
});

t.test('connections that end in an HTTP/2 protocol error are closed, not leaked', async (t) => {
  const a = await startHostileAgent(t, { models: ['tiny'], configYaml: 'server:\n  keepalive_time_ms: 1000\n  keepalive_timeout_ms: 1000\n  max_connection_idle_ms: 2000\n' });
  const pid = a.run.child.pid as number;
  const baseline = openFds(pid);
  for (let i = 0; i < 50; i++) await rawTcp(a.port, Buffer.concat([PREFACE, EMPTY_SETTINGS, i % 2 ? BAD_HPACK : OVERSIZED_FRAME]), 200);
  let now = openFds(pid);
  for (let i = 0; i < 20 && now > baseline + 2; i++) {
    await sleep(500);
    now = openFds(pid);
  }
  t.ok(now <= baseline + 2, `${now} open fds (baseline ${baseline}) after 50 connections ended in protocol errors`);
  await a.stillServing(t, 'after protocol-error connections');
});

t.test('HTTP/2 receive windows: the configured stream and connection windows are what a client may send', async (t) => {
  const h = await startTestAgent(t, { models: ['tiny'], config: { server: { http2_stream_window_bytes: 2 * 1024 * 1024, http2_connection_window_bytes: 24 * 1024 * 1024 } } });
  const session = http2.connect(`http://${h.tcp}`);
  t.teardown(() => session.destroy());
  await new Promise<void>((resolve, reject) => { session.once('remoteSettings', () => resolve()); session.once('error', reject); });
  t.equal(session.remoteSettings.initialWindowSize, 2 * 1024 * 1024, 'each stream may carry 2 MiB before the agent reads it');
  // The connection window arrives as a WINDOW_UPDATE right after the settings.
  const deadline = Date.now() + 5000;
  while ((session.state.remoteWindowSize ?? 0) < 24 * 1024 * 1024 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  t.equal(session.state.remoteWindowSize, 24 * 1024 * 1024, 'the whole connection may carry 24 MiB');
  // And frames still flow over gRPC with them.
  const stream = await h.client().openStream({ model: 'tiny' });
  await stream.send({ seq: 1, inputs: { x: { dtype: 'float32', shape: [1, 1024], data: new Float32Array(1024) } } });
  for await (const r of stream.results()) {
    t.equal(r.status, 'OK');
    break;
  }
  stream.end();
});
