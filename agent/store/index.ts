export { Database } from './database.js';
export type { DatabaseOptions, Migration, SqlParams, SqlValue } from './database.js';
export { FleetStore, DEPLOYMENT_STATES, TERMINAL_DEPLOYMENT_STATES } from './fleet-store.js';
export type { DeploymentRecord, DeploymentState, DeploymentPatch, DeploymentEvent, HealthVerdict, DownloadRecord, RegistryEntry, RegistryState, ActivationRecord, ActivationCause } from './fleet-store.js';
