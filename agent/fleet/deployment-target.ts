import type { JsonTensor } from './manifest.js';

export type { JsonTensor };

/** What a manifest can ask activation to check before the switch. */
export interface ValidationSpec {
  /** Inputs to run; when absent the model's own warm-up inputs are used. */
  readonly inputs?: Readonly<Record<string, JsonTensor>>;
  /** Outputs the inputs must produce (within `tolerance`); validation fails naming the first mismatch. */
  readonly expectedOutputs?: Readonly<Record<string, JsonTensor>>;
  readonly tolerance?: number;
}

export type ActivationPhase = 'loading' | 'warming' | 'validating';

export interface ModelVersions {
  /** The version serving now (undefined when none is). Must survive a restart: a kill mid-activation serves this. */
  readonly active?: number;
  /** Versions present and complete in the repository, ascending. */
  readonly onDisk: readonly number[];
  readonly provider?: string;
  readonly variant?: string;
}

export interface VersionHealth {
  /** Since this version's activation. */
  readonly requests: number;
  readonly errors: number;
  /** 0 when there were no requests. */
  readonly p99Us: number;
}

/**
 * The model repository and runtime as the fleet sees them. The fleet decides what to install and when to switch;
 * the target does the file work and the serving. All methods reject with an Error whose message is the reason
 * reported to the fleet.
 */
export interface DeploymentTarget {
  /** Models in the repository (plain names). */
  listModels(): readonly string[];
  modelVersions(model: string): ModelVersions;
  /** Path of the version's model file, for hashing (registry rebuild, resume after a crash mid-install). */
  versionPath(model: string, version: number): string;
  /**
   * Moves a verified, fsynced file into `<repo>/<model>/<version>/model.onnx` atomically (temp dir, fsync,
   * rename), keeping `config` (the model's config.yaml for this version) with the version: it must not reach
   * what the serving version reads before this version's activation succeeds. The file at `artifactPath` is
   * consumed. A copy onto another filesystem is refused when that filesystem has too little free space for it,
   * and a full disk while the version is written leaves nothing of the version behind: either way the rejection
   * names the repository, and the repository is as it was.
   */
  install(model: string, version: number, artifactPath: string, config?: Readonly<Record<string, unknown>>): Promise<void>;
  /**
   * Loads, warms and validates the version while the current one keeps serving, then switches in one step.
   * On rejection the current version is still serving, with its own config. `onPhase` reports progress for the
   * status topic.
   */
  activate(model: string, version: number, validation?: ValidationSpec, onPhase?: (phase: ActivationPhase) => void): Promise<void>;
  /** Removes a version that is not serving from disk. */
  deleteVersion(model: string, version: number): Promise<void>;
  versionHealth(model: string, version: number): VersionHealth;
}
