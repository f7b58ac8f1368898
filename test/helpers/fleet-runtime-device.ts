import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { RuntimeDeploymentTarget } from '../../agent/fleet/index.js';
import { ActiveVersions, ModelRepository } from '../../agent/models/index.js';
import type { InferenceRuntime, RuntimeObserver } from '../../agent/runtime/index.js';
import { buildClassifier } from '../../scripts/demo-models.js';
import { scratchDir, startDevice, startFleetHarness, type FleetHarness } from './fleet.js';
import { startRuntime } from './runtime.js';

export const SIZE = 32;
export const LIGHT = [{ channels: 8, stride: 2 }];
export const MEDIUM = [{ channels: 16, stride: 2 }];
/** ~1.2 GMAC per 32x32 frame (11 ms a run here against LIGHT's 0.2): far slower than LIGHT on the same input, by a
 * margin that survives LIGHT's p99 inflating to a few ms while a loaded CI machine runs other tests beside it. */
export const HEAVY = [{ channels: 128, stride: 1 }, { channels: 256, stride: 1 }, { channels: 384, stride: 1 }];

export function classifier(stages: readonly { channels: number; stride: number }[]): Buffer {
  return Buffer.from(buildClassifier({ size: SIZE, stages }));
}

/**
 * A fleet device over a real runtime and the agent's own RuntimeDeploymentTarget: model `cls` version 1
 * (LIGHT) in a fresh repository, a fleet harness (mosquitto, fleet manager) and the device started.
 */
export async function startRuntimeDevice(
  t: { teardown(fn: () => void | Promise<void>): void },
  health: Record<string, number>,
  extra: Record<string, unknown> = {},
  execution: 'worker' | 'inline' = 'worker',
): Promise<{ h: FleetHarness; runtime: InferenceRuntime; target: RuntimeDeploymentTarget }> {
  const h = await startFleetHarness(t);
  const dir = scratchDir(t);
  const root = join(dir, 'models');
  mkdirSync(join(root, 'cls', '1'), { recursive: true });
  writeFileSync(join(root, 'cls', '1', 'model.onnx'), classifier(LIGHT));
  writeFileSync(join(root, 'cls', 'config.yaml'), 'max_batch_size: 8\n');
  // The runtime needs the target's observer and the target needs the runtime: forward until both exist.
  let target: RuntimeDeploymentTarget | undefined;
  const observer: RuntimeObserver = { onRequest: (o) => target?.observer.onRequest?.(o) };
  const runtime = await startRuntime(t, root, { execution }, observer);
  target = new RuntimeDeploymentTarget(new ModelRepository(root), runtime, new ActiveVersions(join(dir, 'active-versions.json')));
  await startDevice(t, h, { target, config: { health: { poll_ms: 100, ...health }, ...extra } });
  return { h, runtime, target };
}
