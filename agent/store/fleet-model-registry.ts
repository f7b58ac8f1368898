import type { Database } from './database.js';

/**
 * `installed`: on disk, verified, not serving; `active`: the version serving; `rolled_back`: activated, judged
 * unhealthy and removed; `deleted`: removed by retention or a command. Rows stay for history.
 */
export type RegistryState = 'installed' | 'active' | 'rolled_back' | 'deleted';

export interface RegistryEntry {
  readonly model: string;
  readonly version: number;
  readonly sha256: string;
  readonly path?: string;
  readonly state: RegistryState;
  readonly deploymentId?: string;
  readonly installedAt: number;
  readonly updatedAt: number;
}

export type ActivationCause = 'deployment' | 'rollback' | 'command' | 'rebuild';

export interface ActivationRecord {
  readonly model: string;
  readonly version: number;
  readonly previousVersion?: number;
  readonly deploymentId?: string;
  readonly cause: ActivationCause;
  readonly ts: number;
}

interface RegistryRow {
  model: string;
  version: number;
  sha256: string;
  path: string | null;
  state: RegistryState;
  deployment_id: string | null;
  installed_at: number;
  updated_at: number;
}

function fromRow(r: RegistryRow): RegistryEntry {
  return {
    model: r.model,
    version: r.version,
    sha256: r.sha256,
    ...(r.path !== null ? { path: r.path } : {}),
    state: r.state,
    ...(r.deployment_id !== null ? { deploymentId: r.deployment_id } : {}),
    installedAt: r.installed_at,
    updatedAt: r.updated_at,
  };
}

/** What versions of which models the fleet put on disk, their hashes, and the history of activations. */
export class ModelRegistry {
  constructor(private readonly db: Database) {}

  async entry(model: string, version: number): Promise<RegistryEntry | undefined> {
    const r = await this.db.get<RegistryRow>('SELECT * FROM fleet_models WHERE model = ? AND version = ?', [model, version]);
    return r ? fromRow(r) : undefined;
  }

  async entries(model?: string): Promise<RegistryEntry[]> {
    const rows = model === undefined
      ? await this.db.all<RegistryRow>('SELECT * FROM fleet_models ORDER BY model, version')
      : await this.db.all<RegistryRow>('SELECT * FROM fleet_models WHERE model = ? ORDER BY version', [model]);
    return rows.map(fromRow);
  }

  async isEmpty(): Promise<boolean> {
    const row = await this.db.get<{ n: number }>('SELECT COUNT(*) AS n FROM fleet_models');
    return (row?.n ?? 0) === 0;
  }

  async upsert(e: { model: string; version: number; sha256: string; path?: string; state: RegistryState; deploymentId?: string }): Promise<void> {
    const now = Date.now();
    await this.db.run(
      `INSERT INTO fleet_models (model, version, sha256, path, state, deployment_id, installed_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (model, version) DO UPDATE SET sha256 = excluded.sha256, path = excluded.path, state = excluded.state,
         deployment_id = COALESCE(excluded.deployment_id, fleet_models.deployment_id), updated_at = excluded.updated_at`,
      [e.model, e.version, e.sha256, e.path ?? null, e.state, e.deploymentId ?? null, now, now],
    );
  }

  async setState(model: string, version: number, state: RegistryState): Promise<void> {
    await this.db.run('UPDATE fleet_models SET state = ?, updated_at = ? WHERE model = ? AND version = ?', [state, Date.now(), model, version]);
  }

  /** Records a switch: the new version becomes `active`, whatever was active before becomes `installed`. */
  async recordActivation(a: { model: string; version: number; previousVersion?: number; deploymentId?: string; cause: ActivationCause }): Promise<void> {
    const now = Date.now();
    await this.db.transaction(async () => {
      await this.db.run("UPDATE fleet_models SET state = 'installed', updated_at = ? WHERE model = ? AND state = 'active' AND version <> ?", [now, a.model, a.version]);
      await this.db.run("UPDATE fleet_models SET state = 'active', updated_at = ? WHERE model = ? AND version = ?", [now, a.model, a.version]);
      await this.db.run('INSERT INTO fleet_activations (model, version, previous_version, deployment_id, cause, ts) VALUES (?, ?, ?, ?, ?, ?)',
        [a.model, a.version, a.previousVersion ?? null, a.deploymentId ?? null, a.cause, now]);
    });
  }

  async activations(model: string): Promise<ActivationRecord[]> {
    const rows = await this.db.all<{ model: string; version: number; previous_version: number | null; deployment_id: string | null; cause: ActivationCause; ts: number }>(
      'SELECT * FROM fleet_activations WHERE model = ? ORDER BY id', [model]);
    return rows.map((r) => ({
      model: r.model,
      version: r.version,
      ...(r.previous_version !== null ? { previousVersion: r.previous_version } : {}),
      ...(r.deployment_id !== null ? { deploymentId: r.deployment_id } : {}),
      cause: r.cause,
      ts: r.ts,
    }));
  }

  /** Versions of a model ranked by their last activation (higher = more recent); never-activated ones absent. */
  async activationRank(model: string): Promise<Map<number, number>> {
    const rows = await this.db.all<{ version: number; rank: number }>('SELECT version, MAX(id) AS rank FROM fleet_activations WHERE model = ? GROUP BY version', [model]);
    return new Map(rows.map((r) => [r.version, r.rank]));
  }
}
