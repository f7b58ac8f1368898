import type { ChildProcess } from 'node:child_process';

// Helper processes the agent keeps (device tools, the systemd notification relay) run detached, in a process
// group of their own, so that stopping one reaches whatever it started too.

/** Sends `signal` to the whole process group led by `pid`; an empty group (everything exited) is not an error. */
export function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    // ESRCH: the whole group has exited.
  }
}

/** Whether a helper child, and its pipes, keep the agent's event loop alive. */
export function holdEventLoop(child: ChildProcess, hold: boolean): void {
  const method = hold ? 'ref' : 'unref';
  child[method]();
  for (const s of [child.stdin, child.stdout, child.stderr]) (s as { ref?: () => void; unref?: () => void } | null)?.[method]?.();
}
