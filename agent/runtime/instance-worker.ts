import { parentPort, workerData } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';
import { errorMessage, ModelLoadError } from '../errors.js';
import type { OrtSession } from './ort-session.js';
import { createSession, type SessionRequest } from './session-factory.js';
import { typedView, type DType, type TensorData } from './tensor.js';

// One onnxruntime session per worker thread: `session.run` blocks its thread, never the agent's event loop.
const port = parentPort;
if (!port) throw new Error('instance-worker must run as a worker thread');

interface RunMessage {
  type: 'run';
  id: number;
  feeds: { name: string; dtype: DType; dims: number[]; buffer: ArrayBuffer; byteOffset: number; length: number }[];
}

async function main(): Promise<void> {
  const request = (workerData as { request: SessionRequest }).request;
  let session: OrtSession;
  try {
    const created = await createSession(request);
    session = created.session;
    port?.postMessage({
      type: 'created',
      info: {
        provider: created.provider, skipped: created.skipped, graphCache: created.graphCache, openMs: created.openMs,
        inputMetadata: session.inputMetadata.map((m) => ({ ...m })), outputMetadata: session.outputMetadata.map((m) => ({ ...m })),
      },
    });
  } catch (err) {
    port?.postMessage({ type: 'failed', message: errorMessage(err), modelLoad: err instanceof ModelLoadError });
    return;
  }
  port?.on('message', (m: RunMessage | { type: 'release' }) => {
    if (m.type === 'release') {
      void session.release().finally(() => process.exit(0));
      return;
    }
    const feeds: Record<string, ort.Tensor> = {};
    for (const f of m.feeds) feeds[f.name] = new ort.Tensor(f.dtype, typedView(f.dtype, f.buffer, f.byteOffset, f.length) as ort.Tensor.DataType, f.dims);
    // The input buffers go back with the answer so the main thread reuses them for the next batch.
    const inputs = m.feeds.map((f) => ({ name: f.name, buffer: f.buffer }));
    Promise.resolve().then(() => session.run(feeds)).then(
      (out) => {
        const outputs = [];
        const transfer: ArrayBuffer[] = inputs.map((i) => i.buffer);
        for (const [name, t] of Object.entries(out)) {
          let data = t.data as TensorData;
          const buf = data.buffer as ArrayBuffer;
          // Transfer the output's own buffer when it holds just this tensor; otherwise copy it out once.
          if (data.byteOffset !== 0 || buf.byteLength !== data.byteLength || transfer.includes(buf)) data = data.slice() as TensorData;
          transfer.push(data.buffer as ArrayBuffer);
          outputs.push({ name, dtype: t.type, dims: t.dims, buffer: data.buffer, byteOffset: 0, length: data.length });
        }
        port?.postMessage({ type: 'result', id: m.id, outputs, inputs }, transfer);
      },
      (err: unknown) => port?.postMessage({ type: 'error', id: m.id, message: `onnxruntime failed on model '${request.model}': ${errorMessage(err)}`, inputs }, inputs.map((i) => i.buffer)),
    );
  });
}

void main();
