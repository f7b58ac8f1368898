export { loadConfig, parseYaml, configErrorFrom, ENV_KEYS } from './load.js';
export type { ConfigOverrides, LoadedConfig } from './load.js';
export { agentConfigSchema, EXECUTION_PROVIDERS, DEFAULT_LISTEN } from './schema.js';
export type { AgentConfig, RuntimeConfig, ServerConfig, ProviderOptions, ExecutionProviderName } from './schema.js';
export type { FleetConfig } from './fleet-schema.js';
export type { TelemetryConfig } from './telemetry-schema.js';
