import WebSocket from 'ws';
import type { ChildServer } from './processes.js';

/** The node flag that lets `fullCollection` reach a child: its V8 inspector, on loopback, on a free port. */
export const INSPECT_FLAG = '--inspect=127.0.0.1:0';

/** Where a child started with INSPECT_FLAG listens (node announces it on stderr as it starts). */
export function inspectorUrl(child: ChildServer): string {
  const m = /ws:\/\/127\.0\.0\.1:\d+\/[\w-]+/.exec(child.stderrTail());
  if (!m) throw new Error(`${child.name} announced no inspector (was it started with ${INSPECT_FLAG}?); stderr: ${child.stderrTail().slice(-1000)}`);
  return m[0];
}

export interface Collected {
  /** The process's RSS once the collection's freed pages and buffers are returned (kB). */
  readonly rssKb: number;
  /** What the JS heap still holds: the live objects (kB). */
  readonly heapUsedKb: number;
}

/**
 * Makes the child run a full garbage collection, then reads its RSS and live heap. V8 defers full collections
 * (the agent lets the heap grow 300% past its live size first), so an RSS reading taken mid-run measures where
 * that cycle stands; two readings taken each after a full collection compare what the process keeps.
 * One connection per call: no inspector session stays attached while frames are measured.
 */
export async function fullCollection(child: ChildServer, url: string, settleMs = 250): Promise<Collected> {
  const ws = new WebSocket(url);
  try {
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    let nextId = 0;
    const call = (method: string, params: Record<string, unknown> = {}): Promise<Record<string, unknown>> => new Promise((resolve, reject) => {
      const id = ++nextId;
      const onMessage = (data: WebSocket.RawData): void => {
        const m = JSON.parse(data.toString()) as { id?: number; result?: Record<string, unknown>; error?: { message: string } };
        if (m.id !== id) return;
        ws.off('message', onMessage);
        if (m.error) reject(new Error(`${child.name}: inspector ${method}: ${m.error.message}`));
        else resolve(m.result ?? {});
      };
      ws.on('message', onMessage);
      ws.send(JSON.stringify({ id, method, params }));
    });
    await call('HeapProfiler.collectGarbage');
    // Array buffers' native memory is freed by a task after the collection, not inside it.
    await new Promise((r) => setTimeout(r, settleMs));
    const evaluated = await call('Runtime.evaluate', { expression: 'process.memoryUsage().heapUsed', returnByValue: true });
    const heapUsed = (evaluated.result as { value?: unknown } | undefined)?.value;
    if (typeof heapUsed !== 'number') throw new Error(`${child.name}: inspector did not return the heap size: ${JSON.stringify(evaluated)}`);
    return { rssKb: child.rssKb(), heapUsedKb: Math.round(heapUsed / 1024) };
  } finally {
    ws.close();
  }
}
