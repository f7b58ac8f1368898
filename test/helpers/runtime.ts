import { mkdtempSync, rmSync, cpSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runtimeSchema, type RuntimeConfig } from '../../agent/config/schema.js';
import { silentLogger } from '../../agent/logger.js';
import { ModelRepository } from '../../agent/models/index.js';
import { InferenceRuntime, type RuntimeObserver } from '../../agent/runtime/index.js';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
/** The bundled demo model repository (built by `npm run prepare`). */
export const DEMO_REPO = join(ROOT, 'edge-config', 'models');

/** A scratch folder removed when the test ends. */
export function tempDir(t: { teardown(fn: () => void): void }, prefix = 'edge-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Copies the named demo models into a fresh repository folder the test may modify. */
export function copyDemoRepo(t: { teardown(fn: () => void): void }, models: readonly string[]): string {
  const repo = join(tempDir(t, 'edge-repo-'), 'models');
  for (const m of models) cpSync(join(DEMO_REPO, m), join(repo, m), { recursive: true });
  return repo;
}

/** A started runtime over `repo` with CPU only (this machine has no GPU) and a temp data dir. */
export async function startRuntime(
  t: { teardown(fn: () => void | Promise<void>): void },
  repo: string,
  overrides: Partial<RuntimeConfig> = {},
  observer?: RuntimeObserver,
): Promise<InferenceRuntime> {
  const config = runtimeSchema.parse({ execution_providers: ['cpu'], ...overrides });
  const runtime = new InferenceRuntime({ repository: new ModelRepository(repo), config, dataDir: tempDir(t, 'edge-data-'), log: silentLogger(), ...(observer ? { observer } : {}) });
  await runtime.start();
  t.teardown(() => runtime.close());
  return runtime;
}
