#!/usr/bin/env node
// Streams N frames to a running edge-agent over the native API and prints each result (with --verbose) and
// the latency percentiles. A sensor process would look like this loop.
//
//   node dist/scripts/stream-frames.js --address 127.0.0.1:50051 --model classifier --frames 200
//   node dist/scripts/stream-frames.js --address unix:var/edge-agent.sock --model filter --qos LOSSLESS
import { Command, Option } from 'commander';
import * as hdr from 'hdr-histogram-js';
import { EdgeAgentClient, syntheticInputs, type FrameResult } from '../agent/client/index.js';

const program = new Command('stream-frames')
  .option('-a, --address <addr>', "agent address: 'host:port' or 'unix:/path'", '127.0.0.1:50051')
  .option('-m, --model <name>', 'model to stream to', 'classifier')
  .option('-n, --frames <n>', 'frames to send', (v) => Number.parseInt(v, 10), 200)
  .addOption(new Option('-q, --qos <policy>', 'QoS policy').choices(['LOSSLESS', 'LATEST_ONLY']).default('LOSSLESS'))
  .option('--max-in-flight <n>', 'frames the agent may hold for this stream', (v) => Number.parseInt(v, 10), 8)
  .option('--rate <fps>', 'frames per second (0: as fast as the agent answers)', (v) => Number(v), 0)
  .option('-v, --verbose', 'print every result')
  .parse();
const o = program.opts<{ address: string; model: string; frames: number; qos: 'LOSSLESS' | 'LATEST_ONLY'; maxInFlight: number; rate: number; verbose?: boolean }>();

const client = new EdgeAgentClient({ address: o.address });
const stream = await client.openStream({ model: o.model, qos: o.qos, maxInFlight: o.maxInFlight });
const info = stream.opened;
console.log(`streaming ${o.frames} frames to ${info.model} v${info.version} on ${info.provider} (${info.variant}), qos ${info.qos}${info.stateful ? ', stateful' : ''}`);

const inputs = syntheticInputs(info.inputs);

const latency = hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: 3 });
const sentAt = new Map<number, number>();
const counts: Record<string, number> = {};
// Never more frames outstanding than the agent holds: otherwise the latency would include the client's own
// transport buffers, not the agent's.
let received = 0;
let wakeSender: (() => void) | undefined;
const done = (async () => {
  let n = 0;
  for await (const r of stream.results() as AsyncIterable<FrameResult>) {
    const started = sentAt.get(r.seq);
    if (started !== undefined) latency.recordValue(Math.max(1, Math.round((performance.now() - started) * 1000)));
    sentAt.delete(r.seq);
    counts[r.status] = (counts[r.status] ?? 0) + 1;
    received++;
    wakeSender?.();
    if (o.verbose) {
      const first = Object.entries(r.outputs)[0];
      console.log(`#${r.seq} ${r.status}${r.message ? ` (${r.message})` : ''} v${r.version} batch=${r.batchSize} queue=${r.timings.queueUs}us infer=${r.timings.inferenceUs}us total=${r.timings.totalUs}us${first ? ` ${first[0]}[0..3]=${Array.from(first[1].data.slice(0, 3) as ArrayLike<number>).map((v) => Number(v).toFixed(4)).join(',')}` : ''}`);
    }
    ++n;
  }
  return n;
})();
const interval = o.rate > 0 ? 1000 / o.rate : 0;
const t0 = performance.now();
for (let seq = 0; seq < o.frames; seq++) {
  if (interval > 0) {
    const due = t0 + seq * interval;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
  while (seq - received >= o.maxInFlight) await new Promise<void>((r) => { wakeSender = r; });
  sentAt.set(seq, performance.now());
  await stream.send({ seq, inputs, captureTimeUs: Math.round(Date.now() * 1000) });
}
stream.end();
await done;
client.close();
const secs = (performance.now() - t0) / 1000;
const p = (q: number): string => `${latency.getValueAtPercentile(q)} us`;
console.log(`results: ${Object.entries(counts).map(([k, v]) => `${k}=${v}`).join(' ')} in ${secs.toFixed(2)} s (${(o.frames / secs).toFixed(1)} frames/s)`);
console.log(`latency (client send → result): p50 ${p(50)}  p90 ${p(90)}  p99 ${p(99)}  max ${latency.maxValue} us`);
