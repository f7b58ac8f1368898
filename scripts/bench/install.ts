import { randomFillSync } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { agentConfigSchema } from '../../agent/config/index.js';
import { RuntimeDeploymentTarget } from '../../agent/fleet/index.js';
import { silentLogger } from '../../agent/logger.js';
import { ActiveVersions, ModelRepository } from '../../agent/models/index.js';
import { InferenceRuntime } from '../../agent/runtime/index.js';
import { fsyncPathSync } from '../../agent/store/index.js';
import { round1 } from './stats.js';

export interface InstallRun {
  /** From the call to the file being in place and fsynced. */
  readonly duration_ms: number;
  /** The longest stretch in which the event loop did not turn: what every stream's next frame waits. */
  readonly longest_stall_ms: number;
}

export interface InstallResult {
  readonly model_mb: number;
  /** The artifact (the fleet's download) and the repository on different filesystems: installing copies. */
  readonly crossed_filesystems: boolean;
  /** The agent's install (RuntimeDeploymentTarget.install): copy and fsyncs on libuv's thread pool. */
  readonly agent: readonly InstallRun[];
  /** The same copy and fsyncs done synchronously, as the agent did before (and as a plain script would). */
  readonly synchronous: readonly InstallRun[];
}

/** Runs `fn` while a 1 ms interval timer watches the event loop; returns how long it took and the longest gap. */
async function watched(fn: () => Promise<void> | void): Promise<InstallRun> {
  let last = performance.now();
  let longest = 0;
  const timer = setInterval(() => {
    const now = performance.now();
    longest = Math.max(longest, now - last);
    last = now;
  }, 1);
  await new Promise((r) => setTimeout(r, 20));
  longest = 0;
  last = performance.now();
  const t0 = performance.now();
  await fn();
  const duration = performance.now() - t0;
  // The gap that ends with the work: a synchronous copy is one gap, seen by the timer's next turn.
  await new Promise((r) => setTimeout(r, 5));
  clearInterval(timer);
  return { duration_ms: round1(duration), longest_stall_ms: round1(longest) };
}

/**
 * A fleet update installs the downloaded model into the repository while the agent serves. On a device the
 * repository usually has a partition of its own, so that is a copy and fsyncs of the whole model. The row
 * measures how long the event loop stops turning during it, for the agent's install and for the same work done
 * synchronously, alternating, in this process (the artifact in /dev/shm when that is another filesystem).
 */
export async function measureInstall(mb: number, rounds: number, log: (line: string) => void): Promise<InstallResult> {
  const work = mkdtempSync(join(tmpdir(), 'edge-bench-install-'));
  const shm = existsSync('/dev/shm') ? mkdtempSync(join('/dev/shm', 'edge-bench-install-')) : undefined;
  const repoRoot = join(work, 'models');
  const sourceDir = shm && statSync(shm).dev !== statSync(work).dev ? shm : join(work, 'downloads');
  mkdirSync(repoRoot);
  mkdirSync(sourceDir, { recursive: true });
  const repository = new ModelRepository(repoRoot);
  const runtime = new InferenceRuntime({
    repository, config: agentConfigSchema.parse({ runtime: { execution_providers: ['cpu'] } }).runtime, dataDir: join(work, 'data'), log: silentLogger(),
  });
  try {
    const target = new RuntimeDeploymentTarget(repository, runtime, new ActiveVersions(join(work, 'active-versions.json')));
    const bytes = randomFillSync(Buffer.allocUnsafe(Math.round(mb * 1024 * 1024)));
    const agent: InstallRun[] = [];
    const synchronous: InstallRun[] = [];
    for (let round = 0; round < rounds; round++) {
      log(`install: round ${round + 1} of ${rounds}`);
      const artifact = join(sourceDir, 'artifact.onnx');
      writeFileSync(artifact, bytes);
      agent.push(await watched(() => target.install('large', round + 1, artifact)));
      rmSync(join(repoRoot, 'large'), { recursive: true, force: true });

      writeFileSync(artifact, bytes);
      const dest = join(repoRoot, 'copy.onnx');
      synchronous.push(await watched(() => {
        copyFileSync(artifact, dest);
        fsyncPathSync(dest);
        fsyncPathSync(repoRoot);
      }));
      rmSync(dest, { force: true });
      rmSync(artifact, { force: true });
    }
    return { model_mb: round1(bytes.length / (1024 * 1024)), crossed_filesystems: sourceDir === shm, agent, synchronous };
  } finally {
    await runtime.close();
    rmSync(work, { recursive: true, force: true });
    if (shm) rmSync(shm, { recursive: true, force: true });
  }
}
