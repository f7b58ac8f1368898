import type { Database } from './database.js';
import { ChunkMap } from './fleet-chunk-map.js';
import { DeploymentJournal } from './fleet-journal.js';
import { migrateFleetStore } from './fleet-migrations.js';
import { ModelRegistry } from './fleet-model-registry.js';

export { DEPLOYMENT_STATES, TERMINAL_DEPLOYMENT_STATES } from './fleet-journal.js';
export type { DeploymentRecord, DeploymentState, DeploymentPatch, DeploymentEvent, HealthVerdict } from './fleet-journal.js';
export type { DownloadRecord } from './fleet-chunk-map.js';
export type { RegistryEntry, RegistryState, ActivationRecord, ActivationCause } from './fleet-model-registry.js';
export { ChunkMap, DeploymentJournal, ModelRegistry };

/** The fleet's three tables on the agent's one database connection. */
export class FleetStore {
  private constructor(readonly journal: DeploymentJournal, readonly chunks: ChunkMap, readonly registry: ModelRegistry) {}

  static async open(db: Database): Promise<FleetStore> {
    await migrateFleetStore(db);
    return new FleetStore(new DeploymentJournal(db), new ChunkMap(db), new ModelRegistry(db));
  }
}
