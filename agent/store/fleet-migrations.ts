import type { Database, Migration } from './database.js';

export const FLEET_NAMESPACE = 'fleet';

/**
 * Tables of the fleet concern. The journal row of a deployment is the source of truth for where it stands after
 * a restart; the chunk map says which byte ranges of a partial download are durable in its temp file; the model
 * registry and activation history say what is on disk and what served when.
 */
export const FLEET_MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    sql: `
      CREATE TABLE fleet_deployments (
        deployment_id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        manifest TEXT NOT NULL,
        source_topic TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        progress REAL,
        previous_version INTEGER,
        previous_p99_us REAL,
        activation_attempts INTEGER NOT NULL DEFAULT 0,
        activated_at INTEGER,
        health_until INTEGER,
        health TEXT,
        details TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
      );
      CREATE INDEX fleet_deployments_model ON fleet_deployments (model, created_at);
      CREATE TABLE fleet_deployment_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment_id TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        ts INTEGER NOT NULL
      );
      CREATE INDEX fleet_deployment_events_id ON fleet_deployment_events (deployment_id, id);
      CREATE TABLE fleet_downloads (
        sha256 TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        chunk_size INTEGER NOT NULL,
        source TEXT NOT NULL,
        temp_path TEXT NOT NULL,
        bytes_done INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
      );
      CREATE TABLE fleet_chunks (
        sha256 TEXT NOT NULL,
        idx INTEGER NOT NULL,
        PRIMARY KEY (sha256, idx)
      ) WITHOUT ROWID;
      CREATE TABLE fleet_models (
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        path TEXT,
        state TEXT NOT NULL,
        deployment_id TEXT,
        installed_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (model, version)
      );
      CREATE TABLE fleet_activations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        previous_version INTEGER,
        deployment_id TEXT,
        cause TEXT NOT NULL,
        ts INTEGER NOT NULL
      );
      CREATE INDEX fleet_activations_model ON fleet_activations (model, id);
      CREATE TABLE fleet_commands (
        command_id TEXT PRIMARY KEY,
        command TEXT NOT NULL,
        result TEXT NOT NULL,
        ts INTEGER NOT NULL
      );
    `,
  },
];

export async function migrateFleetStore(db: Database): Promise<void> {
  await db.migrate(FLEET_NAMESPACE, FLEET_MIGRATIONS);
}
