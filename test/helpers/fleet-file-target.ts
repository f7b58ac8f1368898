import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync, copyFileSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { fsyncPathSync } from '../../agent/store/index.js';
import type { ActivationPhase, DeploymentTarget, ModelVersions, ValidationSpec, VersionHealth } from '../../agent/fleet/index.js';

/**
 * A DeploymentTarget that does the real file work of one (atomic install into `<root>/<model>/<version>/`, an
 * atomically replaced `active` pointer that survives a restart) but "serves" by reading the model file:
 * content starting with `FAIL-LOAD` fails to load, `WRONG-OUTPUT` fails validation when expected outputs are
 * given, `ERRORS` fails every request, `SLOW` answers with 10x the latency. Used until, and beside, the
 * runtime-backed target.
 */
export class FileDeploymentTarget implements DeploymentTarget {
  readonly activations: { model: string; version: number }[] = [];
  private readonly health = new Map<string, { requests: number; errors: number; latencies: number[] }>();

  constructor(readonly root: string, private readonly opts: { activationDelayMs?: number; installDelayMs?: { before?: number; after?: number }; onInstall?: (model: string, version: number, step: 'before' | 'after') => void; onPhase?: (model: string, version: number, phase: ActivationPhase) => void } = {}) {
    mkdirSync(root, { recursive: true });
  }

  listModels(): readonly string[] {
    return readdirSync(this.root, { withFileTypes: true }).filter((d) => d.isDirectory() && !d.name.startsWith('.')).map((d) => d.name).sort();
  }

  modelVersions(model: string): ModelVersions {
    const dir = join(this.root, model);
    if (!existsSync(dir)) return { onDisk: [] };
    const onDisk = readdirSync(dir).filter((v) => /^[1-9][0-9]*$/.test(v) && existsSync(join(dir, v, 'model.onnx'))).map(Number).sort((a, b) => a - b);
    const pointer = join(dir, 'active');
    const active = existsSync(pointer) ? Number(readFileSync(pointer, 'utf8')) : undefined;
    return { ...(active !== undefined && onDisk.includes(active) ? { active } : {}), onDisk, provider: 'file', variant: 'fp32' };
  }

  versionPath(model: string, version: number): string {
    return join(this.root, model, String(version), 'model.onnx');
  }

  async install(model: string, version: number, artifactPath: string, config?: Readonly<Record<string, unknown>>): Promise<void> {
    this.opts.onInstall?.(model, version, 'before');
    if (this.opts.installDelayMs?.before) await new Promise((r) => setTimeout(r, this.opts.installDelayMs?.before));
    const dir = join(this.root, model);
    mkdirSync(dir, { recursive: true });
    const final = join(dir, String(version));
    if (existsSync(final)) throw new Error(`version ${version} of '${model}' already exists`);
    const tmp = join(dir, `.tmp-${version}-${process.pid}`);
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp);
    const file = join(tmp, 'model.onnx');
    try {
      renameSync(artifactPath, file);
    } catch {
      copyFileSync(artifactPath, file);
      unlinkSync(artifactPath);
    }
    fsyncPathSync(file);
    if (config) writeFileSync(join(dir, 'config.json'), JSON.stringify(config));
    fsyncPathSync(tmp);
    renameSync(tmp, final);
    fsyncPathSync(dir);
    this.opts.onInstall?.(model, version, 'after');
    if (this.opts.installDelayMs?.after) await new Promise((r) => setTimeout(r, this.opts.installDelayMs?.after));
  }

  async activate(model: string, version: number, validation?: ValidationSpec, onPhase?: (phase: ActivationPhase) => void): Promise<void> {
    const phase = (p: ActivationPhase): void => {
      onPhase?.(p);
      this.opts.onPhase?.(model, version, p);
    };
    phase('loading');
    const path = this.versionPath(model, version);
    if (!existsSync(path)) throw new Error(`version ${version} of '${model}' is not on disk`);
    const content = readFileSync(path);
    if (content.subarray(0, 9).toString() === 'FAIL-LOAD') throw new Error(`model '${model}' (${path}) failed to load: not an ONNX model`);
    phase('warming');
    if (this.opts.activationDelayMs) await new Promise((r) => setTimeout(r, this.opts.activationDelayMs));
    phase('validating');
    if (validation?.expectedOutputs && content.subarray(0, 12).toString() === 'WRONG-OUTPUT') {
      throw new Error(`validation failed: output '${Object.keys(validation.expectedOutputs)[0]}' differs from the expected value`);
    }
    const pointer = join(this.root, model, 'active');
    writeFileSync(`${pointer}.tmp`, String(version));
    fsyncPathSync(`${pointer}.tmp`);
    renameSync(`${pointer}.tmp`, pointer);
    this.health.set(`${model}@${version}`, { requests: 0, errors: 0, latencies: [] });
    this.activations.push({ model, version });
  }

  async deleteVersion(model: string, version: number): Promise<void> {
    if (this.modelVersions(model).active === version) throw new Error(`version ${version} of '${model}' is serving`);
    rmSync(join(this.root, model, String(version)), { recursive: true, force: true });
  }

  versionHealth(model: string, version: number): VersionHealth {
    const h = this.health.get(`${model}@${version}`);
    if (!h || h.latencies.length === 0) return { requests: h?.requests ?? 0, errors: h?.errors ?? 0, p99Us: 0 };
    const sorted = [...h.latencies].sort((a, b) => a - b);
    return { requests: h.requests, errors: h.errors, p99Us: sorted[Math.min(sorted.length - 1, Math.ceil(sorted.length * 0.99) - 1)] ?? 0 };
  }

  /** Serves one simulated frame on the active version; returns the version that served it and whether it failed. */
  serve(model: string): { version: number; ok: boolean } {
    const active = this.modelVersions(model).active;
    if (active === undefined) throw new Error(`model '${model}' has no active version`);
    const key = `${model}@${active}`;
    const h = this.health.get(key) ?? { requests: 0, errors: 0, latencies: [] };
    this.health.set(key, h);
    const head = readFileSync(this.versionPath(model, active)).subarray(0, 6).toString();
    const ok = head !== 'ERRORS';
    h.requests += 1;
    if (!ok) h.errors += 1;
    h.latencies.push(head.startsWith('SLOW') ? 10_000 : 1000);
    return { version: active, ok };
  }

  /** Seeds a model version directly (as if it shipped with the device) and makes it active. */
  seed(model: string, version: number, content: string | Buffer): void {
    const dir = join(this.root, model, String(version));
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'model.onnx'), content);
    writeFileSync(join(this.root, model, 'active'), String(version));
    this.health.set(`${model}@${version}`, { requests: 0, errors: 0, latencies: [] });
  }
}
