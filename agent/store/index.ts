export { Database } from './database.js';
export type { DatabaseOptions, Migration, SqlParams, SqlValue } from './database.js';
export { FleetStore, DEPLOYMENT_STATES, TERMINAL_DEPLOYMENT_STATES } from './fleet-store.js';
export type { ChunkMap, DeploymentJournal, ModelRegistry, DeploymentRecord, DeploymentState, DeploymentPatch, DeploymentEvent, HealthVerdict, DownloadRecord, RegistryEntry, RegistryState, ActivationRecord, ActivationCause } from './fleet-store.js';
export { MemoryOutbox } from './outbox-memory.js';
export { SqliteOutbox, OUTBOX_MIGRATIONS } from './outbox-sqlite.js';
export { DEFAULT_OUTBOX_BOUNDS, DEFAULT_PROTECTED_KINDS } from './outbox.js';
export type { Outbox, OutboxBounds, OutboxClass, OutboxEntry, OutboxKind, OutboxMessage, OutboxOptions, OutboxStamp, OutboxStats } from './outbox.js';
export { fsyncPath, fsyncPathSync, readJsonObjectFile, SerialWrites, writeFileDurably, writeFileDurablySync } from './durable-file.js';
