import { closeSync, copyFileSync, existsSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { InvalidInputError } from '../errors.js';
import { MODEL_CONFIG_FILE, MODEL_FILE, type ActiveVersions, type ModelRepository } from '../models/index.js';
import {
  allocate, elementCount, isDType, viewBytes, type InferenceRequest, type InferenceResult, type InferenceRuntime, type LoadedModel, type RuntimeObserver, type Tensor, type TensorData,
} from '../runtime/index.js';
import type { ActivationPhase, DeploymentTarget, JsonTensor, ModelVersions, ValidationSpec, VersionHealth } from './deployment-target.js';

/** Recent latencies kept per version for the health window's p99 (a window, not the whole history). */
const HEALTH_WINDOW = 4096;

interface Health {
  requests: number;
  errors: number;
  latencies: Float64Array;
  next: number;
  filled: number;
}

function freshHealth(): Health {
  return { requests: 0, errors: 0, latencies: new Float64Array(HEALTH_WINDOW), next: 0, filled: 0 };
}

function fsyncPath(path: string): void {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** A manifest's JSON tensor (numbers, or base64 of the raw little-endian bytes) as a runtime tensor. */
export function tensorFromJson(name: string, t: JsonTensor): Tensor {
  if (!isDType(t.dtype)) throw new InvalidInputError(`validation tensor '${name}': dtype ${t.dtype} is not supported`);
  const n = elementCount(t.shape);
  let data: TensorData;
  if (typeof t.data === 'string') {
    data = viewBytes(t.dtype, Buffer.from(t.data, 'base64'));
  } else {
    data = allocate(t.dtype, t.data.length);
    t.data.forEach((v, i) => {
      (data as unknown as Record<number, number | bigint>)[i] = data instanceof BigInt64Array || data instanceof BigUint64Array ? BigInt(Number(v)) : Number(v);
    });
  }
  if (data.length !== n) throw new InvalidInputError(`validation tensor '${name}': ${data.length} values for shape [${t.shape.join(',')}]`);
  return { dtype: t.dtype, shape: t.shape, data };
}

/**
 * The model repository and runtime as the fleet sees them. Installs move verified files into the repository
 * atomically; activation loads, warms and validates the new version while the old one serves, switches, and
 * records the active version durably so a restart serves it (and a kill mid-activation serves the old one).
 */
export class RuntimeDeploymentTarget implements DeploymentTarget {
  private readonly health = new Map<string, Health>();
  /** Feeds the health window; add it to the runtime's observers. */
  readonly observer: RuntimeObserver = {
    onRequest: (o) => {
      // Every serving version is watched, not only those this target activated: the version loaded at start is
      // the baseline the first deployment's p99 is compared with.
      const key = `${o.model}@${o.version}`;
      let h = this.health.get(key);
      if (!h) {
        h = freshHealth();
        this.health.set(key, h);
      }
      h.requests++;
      if (o.status === 'ERROR') h.errors++;
      if (o.timings) {
        h.latencies[h.next] = o.timings.totalUs;
        h.next = (h.next + 1) % HEALTH_WINDOW;
        h.filled = Math.min(HEALTH_WINDOW, h.filled + 1);
      }
    },
  };

  constructor(
    private readonly repository: ModelRepository,
    private readonly runtime: InferenceRuntime,
    private readonly active: ActiveVersions,
  ) {}

  listModels(): readonly string[] {
    return this.repository.scan().map((e) => e.name);
  }

  modelVersions(model: string): ModelVersions {
    const onDisk = this.repository.read(model)?.versions.map((v) => v.version) ?? [];
    try {
      const info = this.runtime.modelInfo(model);
      return { ...(info.state === 'READY' ? { active: info.version } : {}), onDisk, provider: info.provider, variant: info.variant };
    } catch {
      return { onDisk };
    }
  }

  versionPath(model: string, version: number): string {
    return join(this.repository.root, model, String(version), MODEL_FILE);
  }

  async install(model: string, version: number, artifactPath: string, config?: Readonly<Record<string, unknown>>): Promise<void> {
    const dir = join(this.repository.root, model);
    mkdirSync(dir, { recursive: true });
    const final = join(dir, String(version));
    if (existsSync(final)) throw new Error(`version ${version} of '${model}' already exists in the repository`);
    // A dot-folder is invisible to the repository scan until the rename makes the version appear whole.
    const tmp = join(dir, `.installing-${version}`);
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp);
    const file = join(tmp, MODEL_FILE);
    try {
      renameSync(artifactPath, file);
    } catch {
      copyFileSync(artifactPath, file);
      unlinkSync(artifactPath);
    }
    fsyncPath(file);
    fsyncPath(tmp);
    // Until now the repository served the highest version unless a fleet activation was recorded. Record the
    // serving one before the new version appears, or a restart before its activation finishes (kill -9 while
    // loading) would serve the new, unvalidated version instead of the old one.
    const serving = this.modelVersions(model).active;
    if (serving !== undefined && this.active.get(model) !== serving) this.active.set(model, serving);
    renameSync(tmp, final);
    fsyncPath(dir);
    if (config) {
      const cfgFile = join(dir, MODEL_CONFIG_FILE);
      const cfgTmp = `${cfgFile}.tmp`;
      writeFileSync(cfgTmp, stringify(config));
      fsyncPath(cfgTmp);
      renameSync(cfgTmp, cfgFile);
      fsyncPath(dir);
    }
  }

  async activate(model: string, version: number, validation?: ValidationSpec, onPhase?: (phase: ActivationPhase) => void): Promise<void> {
    this.health.set(`${model}@${version}`, freshHealth());
    await this.runtime.activate(model, version, {
      onPhase: (p) => {
        if (p === 'loading') onPhase?.('loading');
        else {
          onPhase?.('warming'); // warm-up ran inside loading; report it before validation as the contract lists it
          onPhase?.('validating');
        }
      },
      ...(validation?.inputs ? { validate: (submit, loaded) => this.validate(model, loaded, validation, submit) } : {}),
    });
    this.active.set(model, version);
  }

  private async validate(model: string, loaded: LoadedModel, spec: ValidationSpec, submit: (request: InferenceRequest) => Promise<InferenceResult>): Promise<void> {
    const inputs: Record<string, Tensor> = {};
    for (const [name, t] of Object.entries(spec.inputs ?? {})) inputs[name] = tensorFromJson(name, t);
    const stateful = loaded.state.length > 0;
    const result = await submit({ inputs, ...(stateful ? { sequence: { id: `validation:${model}:${loaded.version}`, start: true, end: true } } : {}) });
    const tolerance = spec.tolerance ?? 1e-4;
    for (const [name, want] of Object.entries(spec.expectedOutputs ?? {})) {
      const got = result.outputs[name];
      if (!got) throw new Error(`validation: output '${name}' was not produced by version ${loaded.version}`);
      const expected = tensorFromJson(name, want);
      if (got.data.length !== expected.data.length) throw new Error(`validation: output '${name}' has ${got.data.length} values, expected ${expected.data.length}`);
      for (let i = 0; i < got.data.length; i++) {
        const diff = Math.abs(Number(got.data[i]) - Number(expected.data[i]));
        if (!(diff <= tolerance)) throw new Error(`validation: output '${name}'[${i}] = ${Number(got.data[i])}, expected ${Number(expected.data[i])} (tolerance ${tolerance})`);
      }
    }
  }

  async deleteVersion(model: string, version: number): Promise<void> {
    if (this.modelVersions(model).active === version) throw new Error(`version ${version} of '${model}' is serving; activate another first`);
    rmSync(join(this.repository.root, model, String(version)), { recursive: true, force: true });
    this.health.delete(`${model}@${version}`);
    if (this.active.get(model) === version) this.active.set(model, undefined);
  }

  versionHealth(model: string, version: number): VersionHealth {
    const h = this.health.get(`${model}@${version}`);
    if (!h || h.filled === 0) return { requests: h?.requests ?? 0, errors: h?.errors ?? 0, p99Us: 0 };
    const sorted = Float64Array.from(h.latencies.subarray(0, h.filled)).sort();
    return { requests: h.requests, errors: h.errors, p99Us: sorted[Math.min(h.filled - 1, Math.ceil(h.filled * 0.99) - 1)] ?? 0 };
  }
}
