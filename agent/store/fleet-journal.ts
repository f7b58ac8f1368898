import type { Database, SqlValue } from './database.js';

export const DEPLOYMENT_STATES = [
  'accepted', 'downloading', 'verifying', 'loading', 'warming', 'validating', 'active', 'failed', 'rejected', 'rolled_back',
] as const;
export type DeploymentState = (typeof DEPLOYMENT_STATES)[number];

/** States a deployment never leaves (an `active` one may still be under its health window, see `health`). */
export const TERMINAL_DEPLOYMENT_STATES: ReadonlySet<DeploymentState> = new Set(['active', 'failed', 'rejected', 'rolled_back']);

export type HealthVerdict = 'watching' | 'passed' | 'breached' | 'skipped';

export interface DeploymentRecord {
  readonly deploymentId: string;
  readonly model: string;
  readonly version: number;
  /** The manifest exactly as received (JSON text), signature included. */
  readonly manifest: string;
  readonly sourceTopic: string;
  readonly state: DeploymentState;
  readonly reason?: string;
  readonly progress?: number;
  readonly previousVersion?: number;
  readonly previousP99Us?: number;
  readonly activationAttempts: number;
  readonly activatedAt?: number;
  readonly healthUntil?: number;
  readonly health?: HealthVerdict;
  readonly details?: Record<string, unknown>;
  readonly createdAt: number;
  readonly updatedAt: number;
}

export interface DeploymentPatch {
  readonly state?: DeploymentState;
  readonly reason?: string | null;
  readonly progress?: number | null;
  readonly previousVersion?: number | null;
  readonly previousP99Us?: number | null;
  readonly activationAttempts?: number;
  readonly activatedAt?: number | null;
  readonly healthUntil?: number | null;
  readonly health?: HealthVerdict | null;
  readonly details?: Record<string, unknown> | null;
}

export interface DeploymentEvent {
  readonly state: DeploymentState;
  readonly reason?: string;
  readonly ts: number;
}

interface DeploymentRow {
  deployment_id: string;
  model: string;
  version: number;
  manifest: string;
  source_topic: string;
  state: DeploymentState;
  reason: string | null;
  progress: number | null;
  previous_version: number | null;
  previous_p99_us: number | null;
  activation_attempts: number;
  activated_at: number | null;
  health_until: number | null;
  health: HealthVerdict | null;
  details: string | null;
  created_at: number;
  updated_at: number;
}

const PATCH_COLUMNS: Record<keyof DeploymentPatch, string> = {
  state: 'state',
  reason: 'reason',
  progress: 'progress',
  previousVersion: 'previous_version',
  previousP99Us: 'previous_p99_us',
  activationAttempts: 'activation_attempts',
  activatedAt: 'activated_at',
  healthUntil: 'health_until',
  health: 'health',
  details: 'details',
};

function fromRow(r: DeploymentRow): DeploymentRecord {
  return {
    deploymentId: r.deployment_id,
    model: r.model,
    version: r.version,
    manifest: r.manifest,
    sourceTopic: r.source_topic,
    state: r.state,
    ...(r.reason !== null ? { reason: r.reason } : {}),
    ...(r.progress !== null ? { progress: r.progress } : {}),
    ...(r.previous_version !== null ? { previousVersion: r.previous_version } : {}),
    ...(r.previous_p99_us !== null ? { previousP99Us: r.previous_p99_us } : {}),
    activationAttempts: r.activation_attempts,
    ...(r.activated_at !== null ? { activatedAt: r.activated_at } : {}),
    ...(r.health_until !== null ? { healthUntil: r.health_until } : {}),
    ...(r.health !== null ? { health: r.health } : {}),
    ...(r.details !== null ? { details: JSON.parse(r.details) as Record<string, unknown> } : {}),
    createdAt: r.created_at,
    updatedAt: r.updated_at,
  };
}

/**
 * The deployment journal: one row per deployment_id with the state it reached, plus an append-only event list.
 * Every state change is committed before it is reported, so a restart knows exactly where each one stopped.
 */
export class DeploymentJournal {
  constructor(private readonly db: Database) {}

  async get(deploymentId: string): Promise<DeploymentRecord | undefined> {
    const row = await this.db.get<DeploymentRow>('SELECT * FROM fleet_deployments WHERE deployment_id = ?', [deploymentId]);
    return row ? fromRow(row) : undefined;
  }

  /** Inserts a new deployment (or replaces a `rejected` one that arrived again and is now judged anew). */
  async create(entry: { deploymentId: string; model: string; version: number; manifest: string; sourceTopic: string; state: DeploymentState; reason?: string }): Promise<DeploymentRecord> {
    const now = Date.now();
    await this.db.transaction(async () => {
      await this.db.run('DELETE FROM fleet_deployments WHERE deployment_id = ?', [entry.deploymentId]);
      await this.db.run(
        `INSERT INTO fleet_deployments (deployment_id, model, version, manifest, source_topic, state, reason, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
        [entry.deploymentId, entry.model, entry.version, entry.manifest, entry.sourceTopic, entry.state, entry.reason ?? null, now, now],
      );
      await this.db.run('INSERT INTO fleet_deployment_events (deployment_id, state, reason, ts) VALUES (?, ?, ?, ?)', [entry.deploymentId, entry.state, entry.reason ?? null, now]);
    });
    const rec = await this.get(entry.deploymentId);
    if (!rec) throw new Error(`deployment ${entry.deploymentId} vanished after insert`);
    return rec;
  }

  async update(deploymentId: string, patch: DeploymentPatch): Promise<DeploymentRecord> {
    const sets: string[] = [];
    const params: SqlValue[] = [];
    for (const [key, column] of Object.entries(PATCH_COLUMNS) as [keyof DeploymentPatch, string][]) {
      if (!(key in patch)) continue;
      const value = patch[key];
      sets.push(`${column} = ?`);
      params.push(value === undefined || value === null ? null : key === 'details' ? JSON.stringify(value) : (value as SqlValue));
    }
    const now = Date.now();
    sets.push('updated_at = ?');
    params.push(now, deploymentId);
    await this.db.transaction(async () => {
      await this.db.run(`UPDATE fleet_deployments SET ${sets.join(', ')} WHERE deployment_id = ?`, params);
      if (patch.state !== undefined) {
        await this.db.run('INSERT INTO fleet_deployment_events (deployment_id, state, reason, ts) VALUES (?, ?, ?, ?)', [deploymentId, patch.state, patch.reason ?? null, now]);
      }
    });
    const rec = await this.get(deploymentId);
    if (!rec) throw new Error(`deployment ${deploymentId} is not in the journal`);
    return rec;
  }

  /** Deployments a restart must pick up: not finished, or active with the health window still open. */
  async unfinished(): Promise<DeploymentRecord[]> {
    const rows = await this.db.all<DeploymentRow>(
      `SELECT * FROM fleet_deployments
       WHERE state NOT IN ('active', 'failed', 'rejected', 'rolled_back') OR (state = 'active' AND health = 'watching')
       ORDER BY created_at`,
    );
    return rows.map(fromRow);
  }

  async latestForModel(model: string): Promise<DeploymentRecord | undefined> {
    const row = await this.db.get<DeploymentRow>('SELECT * FROM fleet_deployments WHERE model = ? ORDER BY created_at DESC, rowid DESC LIMIT 1', [model]);
    return row ? fromRow(row) : undefined;
  }

  async list(limit = 100): Promise<DeploymentRecord[]> {
    const rows = await this.db.all<DeploymentRow>('SELECT * FROM fleet_deployments ORDER BY created_at DESC, rowid DESC LIMIT ?', [limit]);
    return rows.map(fromRow);
  }

  async events(deploymentId: string): Promise<DeploymentEvent[]> {
    const rows = await this.db.all<{ state: DeploymentState; reason: string | null; ts: number }>(
      'SELECT state, reason, ts FROM fleet_deployment_events WHERE deployment_id = ? ORDER BY id', [deploymentId]);
    return rows.map((r) => ({ state: r.state, ts: r.ts, ...(r.reason !== null ? { reason: r.reason } : {}) }));
  }

  /** A command's stored result, so a command delivered twice runs once. */
  async commandResult(commandId: string): Promise<Record<string, unknown> | undefined> {
    const row = await this.db.get<{ result: string }>('SELECT result FROM fleet_commands WHERE command_id = ?', [commandId]);
    return row ? (JSON.parse(row.result) as Record<string, unknown>) : undefined;
  }

  /**
   * Stores a command's result unless the command_id already has one: the first result stays, and is what this
   * resolves to (so a caller that raced another run of the same id answers with the result that was kept).
   */
  async recordCommand(commandId: string, command: string, result: Record<string, unknown>): Promise<Record<string, unknown>> {
    const { changes } = await this.db.run(
      'INSERT INTO fleet_commands (command_id, command, result, ts) VALUES (?, ?, ?, ?) ON CONFLICT (command_id) DO NOTHING',
      [commandId, command, JSON.stringify(result), Date.now()],
    );
    if (changes === 1) return result;
    const stored = await this.commandResult(commandId);
    if (!stored) throw new Error(`command ${commandId} has neither a new nor a stored result`);
    return stored;
  }
}
