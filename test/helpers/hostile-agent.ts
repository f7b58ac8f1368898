import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import * as ort from 'onnxruntime-node';
import type { Test } from 'tap';
import { EdgeAgentClient } from '../../agent/client/index.js';
import { boundTcpPort, startCli, type RunningCli } from './cli.js';
import { copyDemoRepo, DEMO_REPO, ROOT, tempDir } from './runtime.js';

// A real agent (the compiled CLI as a child process) for the hostile-input suites: a crash is a child that
// exited, not a test process that died. Each case is followed by `stillServing`, which checks that the agent
// answers good requests on both APIs with the same outputs as a direct onnxruntime run.

type Teardown = { teardown(fn: () => void | Promise<void>): void };

/** Decoded KServe protobuf messages; tests read fields by name. */
export type Msg = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

const KSERVE_PROTO_DIR = join(ROOT, 'proto', 'inference');
const kserveCtor = (grpc.loadPackageDefinition(protoLoader.loadSync(join(KSERVE_PROTO_DIR, 'grpc_service.proto'), {
  includeDirs: [KSERVE_PROTO_DIR], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
})) as unknown as { inference: { GRPCInferenceService: grpc.ServiceClientConstructor } }).inference.GRPCInferenceService;

/** A Triton/KServe client generated from the .proto, as any KServe client would be. */
export class KServeClient {
  readonly client: grpc.Client;
  constructor(address: string, channelOptions: grpc.ChannelOptions = {}) {
    this.client = new kserveCtor(address, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': 64 * 1024 * 1024, ...channelOptions });
  }

  call(method: string, request: object, options: grpc.CallOptions = {}): Promise<Msg> {
    const c = this.client as unknown as Record<string, (...args: unknown[]) => unknown>;
    return new Promise((resolve, reject) => {
      c[method]!.call(this.client, request, new grpc.Metadata(), options, (err: grpc.ServiceError | null, res: Msg) => (err ? reject(err) : resolve(res)));
    });
  }

  /** A ModelStreamInfer call the caller drives. */
  openStream(): grpc.ClientDuplexStream<object, Msg> {
    return (this.client as unknown as { ModelStreamInfer(): grpc.ClientDuplexStream<object, Msg> }).ModelStreamInfer();
  }

  close(): void {
    this.client.close();
  }
}

/** The error a call failed with (throws if it succeeded). */
export async function rejection(p: Promise<unknown>): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (err) {
    return err as grpc.ServiceError;
  }
  throw new Error('expected the call to fail');
}

export const TINY_ELEMENTS = 1024;
/** The reference frame every liveness check sends to `tiny`. */
export const REFERENCE_X = Float32Array.from({ length: TINY_ELEMENTS }, (_, i) => Math.sin(i / 7));
export const bytesOf = (a: ArrayBufferView): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

/** `tiny` run directly by onnxruntime (no agent) on `x`. */
export async function directTiny(x: Float32Array): Promise<Float32Array> {
  const session = await ort.InferenceSession.create(join(DEMO_REPO, 'tiny', '1', 'model.onnx'));
  try {
    const out = await session.run({ x: new ort.Tensor('float32', x, [1, TINY_ELEMENTS]) });
    return out['y']!.data as Float32Array;
  } finally {
    await session.release();
  }
}

/** Equal within 1e-5; NaN equals NaN (a NaN input may give NaN outputs on both sides). */
export function sameOutputs(a: ArrayLike<number>, b: ArrayLike<number>, tol = 1e-5): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i] as number;
    const y = b[i] as number;
    if (Number.isNaN(x) || Number.isNaN(y)) { if (!(Number.isNaN(x) && Number.isNaN(y))) return false; continue; }
    if (x !== y && Math.abs(x - y) > tol) return false;
  }
  return true;
}

export interface HostileAgent {
  readonly run: RunningCli;
  readonly port: number;
  readonly tcp: string;
  readonly unix: string;
  readonly repo: string;
  readonly native: EdgeAgentClient;
  readonly kserve: KServeClient;
  /** One report line per case: what was thrown, what the agent answered. */
  readonly report: string[];
  /** Asserts the agent process is alive and serves a good request correctly on both APIs. */
  stillServing(t: Test, label: string): Promise<void>;
}

/**
 * Starts the real CLI over a copy of the demo models (`models`) with `configYaml` appended to a config that
 * sets the listeners and the data dir. `prepareRepo` may add broken models before the agent starts.
 */
export async function startHostileAgent(
  t: Teardown,
  options: { models?: readonly string[]; configYaml?: string; prepareRepo?: (repo: string) => void } = {},
): Promise<HostileAgent> {
  const dir = tempDir(t, 'edge-hostile-');
  const repo = copyDemoRepo(t, options.models ?? ['tiny', 'classifier', 'filter', 'types']);
  options.prepareRepo?.(repo);
  const sock = join(dir, 'agent.sock');
  const config = join(dir, 'agent.yaml');
  writeFileSync(config, [
    `model_repository: ${JSON.stringify(repo)}`,
    `data_dir: ${JSON.stringify(join(dir, 'var'))}`,
    // Port 0: suites run in parallel, and 8002 belongs to a real agent.
    'telemetry:\n  http:\n    port: 0',
    options.configYaml ?? '',
  ].join('\n'));
  // Listeners come from flags so a test's configYaml may still set other server.* keys.
  const run = startCli(['serve', '--config', config, '--listen', '127.0.0.1:0', '--listen', `unix:${sock}`], { EDGE_AGENT_LOG_LEVEL: 'info' });
  t.teardown(() => { if (run.child.exitCode === null) run.child.kill('SIGKILL'); });
  const port = await boundTcpPort(run);
  await run.waitFor(/"msg":"edge-agent ready"/, 60_000);
  const tcp = `127.0.0.1:${port}`;
  const native = new EdgeAgentClient({ address: tcp });
  const kserve = new KServeClient(tcp);
  t.teardown(() => { native.close(); kserve.close(); });
  const want = await directTiny(REFERENCE_X);
  const report: string[] = [];

  const stillServing = async (a: Test, label: string): Promise<void> => {
    a.equal(run.child.exitCode, null, `${label}: the agent process is still running`);
    a.equal(await native.checkHealth(), 'SERVING', `${label}: health SERVING`);
    const stream = await native.openStream({ model: 'tiny' });
    await stream.send({ seq: 7, inputs: { x: { dtype: 'float32', shape: [1, TINY_ELEMENTS], data: REFERENCE_X } } });
    const r = (await stream.results().next()).value;
    stream.end();
    a.ok(r?.status === 'OK' && sameOutputs(r.outputs['y']?.data as Float32Array, want), `${label}: next native frame answered correctly (${r?.status} ${r?.message ?? ''})`);
    const res = await kserve.call('ModelInfer', { model_name: 'tiny', inputs: [{ name: 'x', datatype: 'FP32', shape: [1, TINY_ELEMENTS] }], raw_input_contents: [bytesOf(REFERENCE_X)] });
    const y = new Float32Array(Uint8Array.from(res['raw_output_contents'][0] as Buffer).buffer);
    a.ok(sameOutputs(y, want), `${label}: next KServe ModelInfer answered correctly`);
  };
  return { run, port, tcp, unix: `unix:${sock}`, repo, native, kserve, report, stillServing };
}
