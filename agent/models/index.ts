export { ModelRepository, MODEL_FILE, isPlainModelName } from './model-repository.js';
export type { ModelEntry, ModelVersionEntry } from './model-repository.js';
export { modelConfigSchema, readModelConfig, MODEL_CONFIG_FILE } from './model-config.js';
export type { ModelConfig, StateConfig } from './model-config.js';
export { ActiveVersions } from './active-versions.js';
