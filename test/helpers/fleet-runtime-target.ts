import { closeSync, copyFileSync, existsSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import type { ActivationPhase, DeploymentTarget, ModelVersions, ValidationSpec, VersionHealth } from '../../agent/fleet/index.js';
import type { ModelRepository } from '../../agent/models/index.js';
import type { InferenceRuntime, RuntimeObserver } from '../../agent/runtime/index.js';

interface Health {
  requests: number;
  errors: number;
  latencies: number[];
}

/**
 * A DeploymentTarget over the real model repository and InferenceRuntime, for end-to-end tests of the fleet
 * (the agent's own target is the lead's; this one keeps the serving version in memory only). Version health
 * comes from the runtime's observer: every finished request of a version since its activation.
 */
export class RuntimeDeploymentTarget implements DeploymentTarget {
  private runtime: InferenceRuntime | undefined;
  private readonly health = new Map<string, Health>();
  readonly observer: RuntimeObserver = {
    onRequest: (o) => {
      const h = this.bucket(o.model, o.version);
      h.requests += 1;
      if (o.status === 'ERROR') h.errors += 1;
      if (o.timings) {
        h.latencies.push(o.timings.totalUs);
        if (h.latencies.length > 5000) h.latencies.splice(0, h.latencies.length - 5000);
      }
    },
  };

  constructor(private readonly repository: ModelRepository) {}

  attach(runtime: InferenceRuntime): void {
    this.runtime = runtime;
  }

  private rt(): InferenceRuntime {
    if (!this.runtime) throw new Error('runtime not attached');
    return this.runtime;
  }

  private bucket(model: string, version: number): Health {
    const key = `${model}@${version}`;
    let h = this.health.get(key);
    if (!h) {
      h = { requests: 0, errors: 0, latencies: [] };
      this.health.set(key, h);
    }
    return h;
  }

  listModels(): readonly string[] {
    return this.repository.scan().map((e) => e.name);
  }

  modelVersions(model: string): ModelVersions {
    const entry = this.repository.read(model);
    const onDisk = entry?.versions.map((v) => v.version) ?? [];
    try {
      const info = this.rt().modelInfo(model);
      return { ...(info.state === 'READY' ? { active: info.version } : {}), onDisk, provider: info.provider, variant: info.variant };
    } catch {
      return { onDisk };
    }
  }

  versionPath(model: string, version: number): string {
    return join(this.repository.root, model, String(version), 'model.onnx');
  }

  async install(model: string, version: number, artifactPath: string): Promise<void> {
    const dir = join(this.repository.root, model);
    mkdirSync(dir, { recursive: true });
    const final = join(dir, String(version));
    if (existsSync(final)) throw new Error(`version ${version} of '${model}' already exists`);
    const tmp = join(dir, `.tmp-${version}`);
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp);
    const file = join(tmp, 'model.onnx');
    try {
      renameSync(artifactPath, file);
    } catch {
      copyFileSync(artifactPath, file);
      unlinkSync(artifactPath);
    }
    for (const p of [file, tmp]) {
      const fd = openSync(p, 'r');
      fsyncSync(fd);
      closeSync(fd);
    }
    renameSync(tmp, final);
  }

  async activate(model: string, version: number, _validation?: ValidationSpec, onPhase?: (phase: ActivationPhase) => void): Promise<void> {
    onPhase?.('loading');
    this.health.set(`${model}@${version}`, { requests: 0, errors: 0, latencies: [] });
    // The runtime loads and warms in one step and switches only when both succeeded.
    await this.rt().activate(model, version);
    onPhase?.('warming');
    onPhase?.('validating');
  }

  async deleteVersion(model: string, version: number): Promise<void> {
    if (this.modelVersions(model).active === version) throw new Error(`version ${version} of '${model}' is serving`);
    rmSync(join(this.repository.root, model, String(version)), { recursive: true, force: true });
  }

  versionHealth(model: string, version: number): VersionHealth {
    const h = this.health.get(`${model}@${version}`);
    if (!h || h.latencies.length === 0) return { requests: h?.requests ?? 0, errors: h?.errors ?? 0, p99Us: 0 };
    const sorted = [...h.latencies].sort((a, b) => a - b);
    return { requests: h.requests, errors: h.errors, p99Us: sorted[Math.min(sorted.length - 1, Math.ceil(sorted.length * 0.99) - 1)] ?? 0 };
  }
}
