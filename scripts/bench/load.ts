import { performance } from 'node:perf_hooks';
import type * as ort from 'onnxruntime-node';
import { EdgeAgentClient, type FrameResult, type SensorStreamHandle } from '../../agent/client/index.js';
import type { Tensor } from '../../agent/runtime/index.js';
import { plainOutputs, type Outputs } from './bare.js';
import { inferRequest, KServeBenchClient, responseOutputs } from './kserve-client.js';
import { round1, timeLoop, type Window } from './stats.js';
import type { StateTensor } from './workloads.js';

/**
 * Load generators as probes: each opens its connections and streams once, then measures in blocks, so the bench
 * can interleave blocks of `bare`, `echo` and the agent in rounds. On a shared machine the load drifts from
 * second to second; rows measured in alternation see the same drift, and their differences (the agent's own
 * cost) stay meaningful.
 */

/** One client closed-loop: each block returns its round trips in µs. */
export interface LatencyProbe {
  /** Outputs of the first frames after opening (a fresh stream/sequence), to compare with `bare`. */
  readonly outputs: readonly Outputs[];
  /** Round trips so far, warm-up included (for CPU time per frame). */
  readonly count: number;
  /** The agent's own timings of each measured frame (native streams only): inference run, and decoded → result. */
  readonly agentTimings?: { readonly inferenceUs: number[]; readonly totalUs: number[] };
  block(window: Window): Promise<number[]>;
  close(): Promise<void>;
}

/** Many concurrent closed loops: each block returns frames/s and the round trips. */
export interface LoadProbe {
  block(window: LoadWindow): Promise<LoadBlock>;
  close(): Promise<void>;
}

export interface LoadBlock {
  readonly fps: number;
  readonly samplesUs: number[];
  /** Frames over the whole block, warm-up included (for CPU time per frame). */
  readonly totalFrames: number;
  /** Mean frames per inference run as the agent reports it (native streams only). */
  readonly meanBatch: number | undefined;
}

/** Throughput window: untimed warm-up, then at least this long measuring. */
export interface LoadWindow {
  readonly warmupMs: number;
  readonly durationMs: number;
}

function okOutputs(r: FrameResult): Record<string, Tensor> {
  if (r.status !== 'OK') throw new Error(`frame ${r.seq}: ${r.status} ${r.message}`);
  return r.outputs as Record<string, Tensor>;
}

function resultOutputs(r: FrameResult): Outputs {
  return plainOutputs(Object.fromEntries(Object.entries(okOutputs(r)).map(([k, t]) => [k, { dims: t.shape, data: t.data }])));
}

/** One native stream driven closed-loop: send a frame, await its result, send the next. */
class ClosedLoopStream {
  private seq = 0;
  private constructor(private readonly handle: SensorStreamHandle, private readonly it: AsyncIterator<FrameResult>) {}

  static async open(client: EdgeAgentClient, model: string): Promise<ClosedLoopStream> {
    const handle = await client.openStream({ model, qos: 'LOSSLESS' });
    return new ClosedLoopStream(handle, handle.results()[Symbol.asyncIterator]());
  }

  async roundTrip(inputs: Readonly<Record<string, Tensor>>): Promise<FrameResult> {
    const seq = ++this.seq;
    await this.handle.send({ seq, inputs });
    const next = await this.it.next();
    if (next.done) throw new Error('the agent ended the stream');
    if (next.value.seq !== seq) throw new Error(`expected the result of frame ${seq}, got ${next.value.seq}`);
    return next.value;
  }

  async close(): Promise<void> {
    this.handle.end();
    for (;;) if ((await this.it.next()).done) break;
  }
}

/** @param busyPollUs the client's poll while a result is awaited (EdgeAgentClient busyPollUs; 0: it sleeps). */
export async function openNativeProbe(address: string, model: string, inputs: Readonly<Record<string, Tensor>>, capture: number, busyPollUs = 0): Promise<LatencyProbe> {
  const client = new EdgeAgentClient({ address, busyPollUs });
  const stream = await ClosedLoopStream.open(client, model);
  const outputs: Outputs[] = [];
  for (let i = 0; i < capture; i++) outputs.push(resultOutputs(await stream.roundTrip(inputs)));
  let count = 0;
  const agentTimings = { inferenceUs: [] as number[], totalUs: [] as number[] };
  return {
    outputs,
    agentTimings,
    get count() { return count; },
    block: (window) => timeLoop(window, async () => {
      const r = await stream.roundTrip(inputs);
      okOutputs(r);
      count++;
      agentTimings.inferenceUs.push(r.timings.inferenceUs);
      agentTimings.totalUs.push(r.timings.totalUs);
    }),
    close: async () => {
      await stream.close();
      client.close();
    },
  };
}

/** Per-client state a caller carries itself when the server keeps none (the naive server, stateful models). */
class CarriedState {
  private state: Record<string, Tensor>;
  constructor(private readonly specs: readonly StateTensor[]) {
    this.state = Object.fromEntries(specs.map((s) => [s.input, { dtype: s.dtype, shape: [...s.shape], data: new Float32Array(s.shape.reduce((a, b) => a * b, 1)) }]));
  }

  with(inputs: Readonly<Record<string, Tensor>>): Record<string, Tensor> {
    return { ...inputs, ...this.state };
  }

  update(out: Outputs): Outputs {
    const visible = { ...out };
    for (const s of this.specs) {
      const o = out[s.output];
      if (!o) throw new Error(`the server returned no state output '${s.output}'`);
      this.state[s.input] = { dtype: s.dtype, shape: o.dims, data: Float32Array.from(o.data) };
      delete visible[s.output];
    }
    return visible;
  }
}

export type KServeMode = 'unary' | 'stream';

export interface KServeTarget {
  readonly address: string;
  readonly model: string;
  readonly inputs: Readonly<Record<string, Tensor>>;
  /** Stateful model served by the agent: send Triton sequence parameters (the agent keeps the state). */
  readonly sequence?: boolean;
  /** Stateful model served by the naive server: the client sends the state and reads the next one back. */
  readonly carryState?: readonly StateTensor[];
}

let nextSequenceId = 1;

/** One closed-loop KServe client (unary calls or one ModelStreamInfer stream). */
function kserveLoop(client: KServeBenchClient, target: KServeTarget, mode: KServeMode): { step(decode: boolean): Promise<Outputs | undefined>; end(): void } {
  const stream = mode === 'stream' ? client.openStream() : undefined;
  const seqId = target.sequence ? nextSequenceId++ : 0;
  let first = true;
  const carried = target.carryState && target.carryState.length > 0 ? new CarriedState(target.carryState) : undefined;
  return {
    step: async (decode) => {
      const inputs = carried ? carried.with(target.inputs) : target.inputs;
      const req = inferRequest(target.model, inputs, target.sequence ? { id: seqId, start: first } : undefined);
      first = false;
      const res = stream ? await stream.infer(req) : await client.infer(req);
      if (carried) return carried.update(responseOutputs(res));
      return decode ? responseOutputs(res) : undefined;
    },
    end: () => stream?.end(),
  };
}

export async function openKServeProbe(target: KServeTarget, mode: KServeMode, capture: number, busyPollUs = 0): Promise<LatencyProbe> {
  const client = new KServeBenchClient(target.address, busyPollUs);
  const loop = kserveLoop(client, target, mode);
  const outputs: Outputs[] = [];
  for (let i = 0; i < capture; i++) outputs.push(await loop.step(true) as Outputs);
  let count = 0;
  return {
    outputs,
    get count() { return count; },
    block: (window) => timeLoop(window, async () => { await loop.step(false); count++; }),
    close: async () => {
      loop.end();
      client.close();
    },
  };
}

/** onnxruntime in this process, batch 1, closed-loop: the latency limit. */
export function bareLatencyProbe(session: ort.InferenceSession, feeds: Record<string, ort.Tensor>): LatencyProbe {
  let count = 0;
  return {
    outputs: [],
    get count() { return count; },
    block: (window) => timeLoop(window, async () => { await session.run(feeds); count++; }),
    close: () => Promise.resolve(),
  };
}

/**
 * Drives `loops` closed loops concurrently: an untimed warm-up (at least `warmupMs` and one round of every
 * loop), then a measured phase of at least `durationMs` and two rounds per loop, so a slow model still yields
 * a figure in a short (CI) window.
 */
async function concurrentLoops(loops: number, window: LoadWindow, step: (i: number) => Promise<number | undefined>): Promise<LoadBlock> {
  const samples: number[] = [];
  let batchSum = 0;
  let batchCount = 0;
  let warmRounds = 0;
  let totalFrames = 0;
  let measuring = false;
  let stop = false;
  let measureStart = 0;
  let measureEnd = 0;
  const warmUntil = performance.now() + window.warmupMs;
  const minSamples = loops * 2;
  let warmed: () => void = () => undefined;
  const allWarm = new Promise<void>((resolve) => { warmed = resolve; });
  const runners = Array.from({ length: loops }, async (_, i) => {
    let first = true;
    while (!stop) {
      const t0 = performance.now();
      const batch = await step(i);
      const t1 = performance.now();
      totalFrames++;
      if (first) {
        first = false;
        if (++warmRounds === loops) warmed();
      }
      if (!measuring || stop) continue;
      samples.push((t1 - t0) * 1000);
      if (batch !== undefined) {
        batchSum += batch;
        batchCount++;
      }
      if (t1 - measureStart >= window.durationMs && samples.length >= minSamples) {
        stop = true;
        measureEnd = t1;
      }
    }
  });
  await allWarm;
  const wait = warmUntil - performance.now();
  if (wait > 0) await sleep(wait);
  measureStart = performance.now();
  measuring = true;
  await Promise.all(runners);
  return { fps: round1(samples.length / ((measureEnd - measureStart) / 1000)), samplesUs: samples, totalFrames, meanBatch: batchCount ? round1(batchSum / batchCount) : undefined };
}

/** `streams` native streams on one connection, each closed-loop. */
export async function openNativeLoad(address: string, model: string, inputs: Readonly<Record<string, Tensor>>, streams: number): Promise<LoadProbe> {
  const client = new EdgeAgentClient({ address });
  const handles = await Promise.all(Array.from({ length: streams }, () => ClosedLoopStream.open(client, model)));
  return {
    block: (window) => concurrentLoops(streams, window, async (i) => {
      const r = await (handles[i] as ClosedLoopStream).roundTrip(inputs);
      okOutputs(r);
      return r.batchSize;
    }),
    close: async () => {
      await Promise.all(handles.map((h) => h.close()));
      client.close();
    },
  };
}

/** `clients` concurrent closed-loop KServe unary clients on one channel. */
export function openKServeLoad(target: KServeTarget, clients: number): LoadProbe {
  const client = new KServeBenchClient(target.address);
  const loops = Array.from({ length: clients }, () => kserveLoop(client, target, 'unary'));
  return {
    block: (window) => concurrentLoops(clients, window, async (i) => {
      await (loops[i] as ReturnType<typeof kserveLoop>).step(false);
      return undefined;
    }),
    close: () => {
      client.close();
      return Promise.resolve();
    },
  };
}

/** onnxruntime in this process, `rows` frames a run, back to back: the throughput limit at that batch size. */
export function bareLoad(session: ort.InferenceSession, feeds: Record<string, ort.Tensor>, rows: number): LoadProbe {
  return {
    block: async (window) => {
      let runs = 0;
      const samples = await timeLoop({ warmupMs: Math.min(window.warmupMs, 200), durationMs: window.durationMs, minSamples: 3, maxSamples: 1_000_000 }, async () => { await session.run(feeds); runs++; });
      const total = samples.reduce((a, b) => a + b, 0);
      return { fps: round1((rows * samples.length) / (total / 1e6)), samplesUs: samples, totalFrames: rows * runs, meanBatch: rows };
    },
    close: () => Promise.resolve(),
  };
}

/**
 * Pushes `frames` frames through `streams` native streams with `window` frames in flight on each (the way a
 * sensor streams: it does not wait for each result). For the RSS row; returns frames/s.
 */
export async function nativeFlood(address: string, model: string, inputs: Readonly<Record<string, Tensor>>, streams: number, window: number, frames: number): Promise<number> {
  const client = new EdgeAgentClient({ address });
  try {
    const perStream = Math.ceil(frames / streams);
    const t0 = performance.now();
    await Promise.all(Array.from({ length: streams }, async () => {
      const handle = await client.openStream({ model, qos: 'LOSSLESS', maxInFlight: window });
      const it = handle.results()[Symbol.asyncIterator]();
      let sent = 0;
      let received = 0;
      while (received < perStream) {
        while (sent < perStream && sent - received < window) await handle.send({ seq: ++sent, inputs });
        const next = await it.next();
        if (next.done) throw new Error(`the agent ended the stream after ${received} results`);
        okOutputs(next.value);
        received++;
      }
      handle.end();
      while (!(await it.next()).done) { /* drain to the stream's end */ }
    }));
    return round1((perStream * streams) / ((performance.now() - t0) / 1000));
  } finally {
    client.close();
  }
}

/** Spawn → first result of a freshly started agent: opens a stream and sends one frame. */
export async function firstResultAt(address: string, model: string, inputs: Readonly<Record<string, Tensor>>): Promise<{ at: number; outputs: Outputs }> {
  const client = new EdgeAgentClient({ address });
  try {
    const stream = await ClosedLoopStream.open(client, model);
    const r = await stream.roundTrip(inputs);
    const at = performance.now();
    const outputs = resultOutputs(r);
    await stream.close();
    return { at, outputs };
  } finally {
    client.close();
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
