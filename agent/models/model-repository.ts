import { readdirSync, statSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { ConfigError, errorMessage } from '../errors.js';
import type { ActiveVersions } from './active-versions.js';
import { readModelConfig, type ModelConfig } from './model-config.js';

export const MODEL_FILE = 'model.onnx';
const PLAIN_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

export function isPlainModelName(name: string): boolean {
  return PLAIN_NAME.test(name) && name !== '.' && name !== '..';
}

export interface ModelVersionEntry {
  readonly version: number;
  readonly dir: string;
  /** Files of this version present on disk: 'fp32' → model.onnx, 'int8' → model.int8.onnx, ... */
  readonly variants: Readonly<Partial<Record<'fp32' | 'int8' | 'fp16', string>>>;
}

export interface ModelEntry {
  readonly name: string;
  readonly dir: string;
  readonly versions: readonly ModelVersionEntry[];
  /** Undefined when config.yaml is invalid; `configError` says why. */
  readonly config?: ModelConfig;
  readonly configError?: string;
  /** The version to serve: the fleet's last activation, else pinned by config, else the highest. */
  readonly servedVersion?: number;
}

/**
 * Triton's model repository layout on disk: `<root>/<model>/<version>/model.onnx` with an optional
 * `<root>/<model>/config.yaml`. Reading the tree never throws for one bad model: its entry carries the problem,
 * so the other models still serve.
 */
export class ModelRepository {
  constructor(readonly root: string, private readonly active?: ActiveVersions) {}

  /** Throws only when the repository folder itself is unusable. */
  scan(): ModelEntry[] {
    let names: string[];
    try {
      names = readdirSync(this.root).sort();
    } catch (err) {
      throw new ConfigError(this.root, 'model_repository', `cannot read the model repository: ${errorMessage(err)}`);
    }
    const out: ModelEntry[] = [];
    for (const name of names) {
      if (!isPlainModelName(name)) continue;
      const dir = join(this.root, name);
      if (!isDir(dir)) continue;
      const entry = this.read(name);
      if (entry) out.push(entry);
    }
    return out;
  }

  /** One model's entry, or undefined when the folder does not exist. */
  read(name: string): ModelEntry | undefined {
    if (!isPlainModelName(name)) return undefined;
    const dir = join(this.root, name);
    if (!isDir(dir)) return undefined;
    const versions: ModelVersionEntry[] = [];
    for (const v of readdirSync(dir)) {
      // At most 15 digits: every such number is exact in a JS number, and KServe's version field takes it.
      if (!/^[1-9][0-9]{0,14}$/.test(v)) continue;
      const vdir = join(dir, v);
      if (!isDir(vdir)) continue;
      const variants: Partial<Record<'fp32' | 'int8' | 'fp16', string>> = {};
      for (const [variant, file] of [['fp32', MODEL_FILE], ['int8', 'model.int8.onnx'], ['fp16', 'model.fp16.onnx']] as const) {
        if (existsSync(join(vdir, file))) variants[variant] = join(vdir, file);
      }
      // model.onnx makes a version (Triton's layout); compressed variants beside it are options, not a model alone.
      if (variants.fp32) versions.push({ version: Number(v), dir: vdir, variants });
    }
    versions.sort((a, b) => a.version - b.version);
    let config: ModelConfig | undefined;
    let configError: string | undefined;
    try {
      config = readModelConfig(dir);
    } catch (err) {
      configError = errorMessage(err);
    }
    const onDisk = (v: number | undefined): number | undefined => (v !== undefined && versions.some((x) => x.version === v) ? v : undefined);
    const activated = onDisk(this.active?.get(name));
    const pinned = config?.version;
    const servedVersion = activated ?? (pinned !== undefined ? onDisk(pinned) : versions.at(-1)?.version);
    return { name, dir, versions, config, configError, servedVersion };
  }
}

function isDir(p: string): boolean {
  try {
    return statSync(p).isDirectory();
  } catch {
    return false;
  }
}
