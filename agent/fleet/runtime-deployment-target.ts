import { existsSync, readFileSync } from 'node:fs';
import { copyFile, mkdir, readFile, rename, rm, rmdir, stat, statfs, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { errorMessage, InvalidInputError } from '../errors.js';
import { MODEL_CONFIG_FILE, MODEL_FILE, type ActiveVersions, type ModelRepository } from '../models/index.js';
import {
  allocate, elementCount, isDType, viewBytes, type InferenceRequest, type InferenceResult, type InferenceRuntime, type LoadedModel, type RuntimeObserver, type Tensor, type TensorData,
} from '../runtime/index.js';
import { fsyncPath, writeFileDurably, writeFileDurablySync } from '../store/index.js';
import type { ActivationPhase, DeploymentTarget, JsonTensor, ModelVersions, ValidationSpec, VersionHealth } from './deployment-target.js';
import { isDiskFull } from './file-io.js';

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

/**
 * Beside each version's model file: the model's config.yaml as that version serves with it (the manifest's
 * `config` for a fleet-installed version; the file as it was when a version stopped serving).
 */
export const VERSION_CONFIG_FILE = 'fleet-config.yaml';

/**
 * In a model's folder while an activation has replaced config.yaml: which version it is for and the text it
 * replaced (null: there was none). A restart finding it with another version serving puts that text back.
 */
const ACTIVATING_FILE = '.activating.json';

interface ActivatingRecord {
  readonly version: number;
  readonly previous: string | null;
}

function readTextSync(path: string): string | null {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

async function readText(path: string): Promise<string | null> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/**
 * The model repository's filesystem cannot take a version: refused before copying (too little space), or full
 * while the version was written. Either way nothing of the version is left in the repository.
 */
export class RepositoryFullError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RepositoryFullError';
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

  /**
   * Construct before the runtime loads the repository: an activation that a kill interrupted after it put its
   * version's config.yaml in place gets the serving version's config back here, so the restart loads with it.
   */
  constructor(
    private readonly repository: ModelRepository,
    private readonly runtime: InferenceRuntime,
    private readonly active: ActiveVersions,
  ) {
    this.finishInterruptedActivations();
  }

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
    const final = join(dir, String(version));
    if (existsSync(final)) throw new Error(`version ${version} of '${model}' already exists in the repository`);
    const newModel = !existsSync(dir);
    // A dot-folder is invisible to the repository scan until the rename makes the version appear whole.
    const tmp = join(dir, `.installing-${version}`);
    try {
      try {
        await mkdir(dir, { recursive: true });
        await rm(tmp, { recursive: true, force: true });
        await mkdir(tmp);
        await this.writeVersion(tmp, model, version, artifactPath, config ? stringify(config) : undefined);
      } catch (err) {
        if (!isDiskFull(err)) throw err;
        throw new RepositoryFullError(`disk full while installing version ${version} of '${model}' in the model repository at ${this.repository.root} (${errorMessage(err)}); the partial version was removed, free space there and deploy again`);
      }
      // Until now the repository served the highest version unless a fleet activation was recorded. Record the
      // serving one before the new version appears, or a restart before its activation finishes (kill -9 while
      // loading) would serve the new, unvalidated version instead of the old one.
      const serving = this.modelVersions(model).active;
      if (serving !== undefined && this.active.get(model) !== serving) await this.active.set(model, serving);
      await rename(tmp, final);
    } catch (err) {
      // A partial version would keep the repository's disk full (the serving version's config writes share it).
      // Only this install's own folders go: the temp folder, and the model's folder if this install created it.
      try {
        await rm(tmp, { recursive: true, force: true });
        if (newModel) await rmdir(dir);
      } catch {
        // Left for the next install of this version, which clears its temp folder first.
      }
      throw err;
    }
    await fsyncPath(dir);
  }

  /**
   * Fills the (temp) version folder: the model file, moved or copied, and the version's config; all fsynced. The
   * copy and the fsyncs run on libuv's thread pool: done on the event loop, a 256 MB copy across filesystems
   * held every stream for 200-580 ms on the development VM, and longer on a device's eMMC.
   */
  private async writeVersion(tmp: string, model: string, version: number, artifactPath: string, configText: string | undefined): Promise<void> {
    const file = join(tmp, MODEL_FILE);
    try {
      await rename(artifactPath, file);
    } catch {
      // EXDEV: on a device the repository usually has a partition of its own, apart from the data dir.
      await this.checkFreeSpace(tmp, model, version, (await stat(artifactPath)).size, configText);
      await copyFile(artifactPath, file);
      await unlink(artifactPath);
    }
    await fsyncPath(file);
    // The config travels inside the version's folder, so it appears (and is deleted) with the version and never
    // touches the config.yaml the serving version reads; activation puts it in place.
    if (configText !== undefined) {
      const cfgFile = join(tmp, VERSION_CONFIG_FILE);
      await writeFile(cfgFile, configText);
      await fsyncPath(cfgFile);
    }
    await fsyncPath(tmp);
  }

  /** Refuses a copy that cannot fit on the repository's filesystem, before a byte of it is written. */
  private async checkFreeSpace(tmp: string, model: string, version: number, modelBytes: number, configText: string | undefined): Promise<void> {
    const fs = await statfs(tmp);
    const free = fs.bavail * fs.bsize;
    const configBytes = configText === undefined ? 0 : Buffer.byteLength(configText);
    // Files take whole blocks; a filesystem's own metadata (indirect or extent blocks) is not counted, so a copy
    // that only just fits may still run out of space, which install handles.
    const blocks = (n: number): number => Math.ceil(n / fs.bsize) * fs.bsize;
    const needed = blocks(modelBytes) + blocks(configBytes);
    if (needed > free) {
      throw new RepositoryFullError(`disk space: version ${version} of '${model}' needs ${needed} bytes (${MODEL_FILE} ${modelBytes}, ${VERSION_CONFIG_FILE} ${configBytes}) but the model repository at ${this.repository.root} has ${free} bytes free; free space there and deploy again`);
    }
  }

  /**
   * The runtime reads `<model>/config.yaml` as it loads a version, and that file is shared by every version: so
   * the config of the version being activated is put there only for its activation, and whatever happens the file
   * ends up holding the config of the version that serves. Before the switch the serving version's config is
   * kept beside it (VERSION_CONFIG_FILE, including an operator's edits), so a later rollback or activation of it
   * brings its own config back; a failed activation restores the file at once, and a kill during one is undone
   * at the next start (finishInterruptedActivations).
   */
  async activate(model: string, version: number, validation?: ValidationSpec, onPhase?: (phase: ActivationPhase) => void): Promise<void> {
    const dir = join(this.repository.root, model);
    const cfgFile = join(dir, MODEL_CONFIG_FILE);
    const serving = this.modelVersions(model).active;
    const current = await readText(cfgFile);
    let wanted = current;
    if (serving !== version) {
      if (serving !== undefined && existsSync(join(dir, String(serving)))) await writeFileDurably(join(dir, String(serving), VERSION_CONFIG_FILE), current ?? '');
      // A version without a config of its own (installed without one, or on disk before the fleet) keeps the file.
      wanted = (await readText(join(dir, String(version), VERSION_CONFIG_FILE))) ?? current;
    }
    const swapped = wanted !== current && !(wanted === '' && current === null);
    if (swapped) {
      await writeFileDurably(join(dir, ACTIVATING_FILE), JSON.stringify({ version, previous: current } satisfies ActivatingRecord));
      await writeFileDurably(cfgFile, wanted);
    }
    try {
      await this.switchTo(model, version, validation, onPhase);
    } catch (err) {
      if (swapped) {
        await writeFileDurably(cfgFile, current);
        await writeFileDurably(join(dir, ACTIVATING_FILE), null);
      }
      throw err;
    }
    if (swapped) await writeFileDurably(join(dir, ACTIVATING_FILE), null);
  }

  private async switchTo(model: string, version: number, validation?: ValidationSpec, onPhase?: (phase: ActivationPhase) => void): Promise<void> {
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
    await this.active.set(model, version);
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

  /** A kill between an activation's config swap and its recorded switch leaves the swapped config: undo it. */
  private finishInterruptedActivations(): void {
    let models: string[];
    try {
      models = this.repository.scan().map((e) => e.name);
    } catch {
      return; // An unusable repository is reported by the runtime as it starts.
    }
    for (const model of models) {
      const dir = join(this.repository.root, model);
      const marker = join(dir, ACTIVATING_FILE);
      const text = readTextSync(marker);
      if (text === null) continue;
      let rec: ActivatingRecord | undefined;
      try {
        const parsed = JSON.parse(text) as Partial<ActivatingRecord>;
        if (Number.isSafeInteger(parsed.version) && (typeof parsed.previous === 'string' || parsed.previous === null)) rec = parsed as ActivatingRecord;
      } catch {
        rec = undefined;
      }
      const serving = this.active.get(model) ?? this.repository.read(model)?.servedVersion;
      try {
        if (rec && serving !== rec.version) writeFileDurablySync(join(dir, MODEL_CONFIG_FILE), rec.previous);
        writeFileDurablySync(marker, null);
      } catch {
        // Never keeps the agent from starting: the model then fails to load with the reason, the others serve.
      }
    }
  }

  async deleteVersion(model: string, version: number): Promise<void> {
    if (this.modelVersions(model).active === version) throw new Error(`version ${version} of '${model}' is serving; activate another first`);
    await rm(join(this.repository.root, model, String(version)), { recursive: true, force: true });
    this.health.delete(`${model}@${version}`);
    if (this.active.get(model) === version) await this.active.set(model, undefined);
  }

  versionHealth(model: string, version: number): VersionHealth {
    const h = this.health.get(`${model}@${version}`);
    if (!h || h.filled === 0) return { requests: h?.requests ?? 0, errors: h?.errors ?? 0, p99Us: 0 };
    const sorted = Float64Array.from(h.latencies.subarray(0, h.filled)).sort();
    return { requests: h.requests, errors: h.errors, p99Us: sorted[Math.min(h.filled - 1, Math.ceil(h.filled * 0.99) - 1)] ?? 0 };
  }
}
