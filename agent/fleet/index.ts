// Agent side: construct an MqttLink (shared with telemetry) and a FleetAgent in agent/main.ts.
export { FleetAgent } from './fleet-agent.js';
export type { FleetAgentOptions } from './fleet-agent.js';
export { MqttLink } from './mqtt-link.js';
export type { MqttLinkOptions, MessageHandler } from './mqtt-link.js';
export type { DeploymentTarget, ModelVersions, VersionHealth, ValidationSpec, ActivationPhase, JsonTensor } from './deployment-target.js';
export { DirectStatusPublisher } from './status-sink.js';
export type { StatusSink, StatusKind } from './status-sink.js';
export type { FleetLogger } from './fleet-logger.js';
export { silentLogger } from './fleet-logger.js';
export { FleetTopics, topicMatches } from './topics.js';
export type { ReportedState, ReportedModel, ReportedDeployment } from './reported-state.js';
export type { HealthFigures } from './health-watch.js';
export { MAX_ACTIVATION_ATTEMPTS } from './deployment-runner.js';
export { sha256File } from './file-io.js';

// Contract shared by both sides.
export { canonicalJson, signedBytes } from './canonical-json.js';
export { TrustedKeys, parsePublicKey, parsePrivateKey, publicKeyBase64, generateSigningKey, signPayload } from './signing.js';
export { manifestSchema, commandSchema, verifyManifest, verifyCommand, ManifestRejection } from './manifest.js';
export type { DeploymentManifest, FleetCommand, RejectionProblem } from './manifest.js';

// Fleet-manager side (scripts/fleet-manager.ts, tests).
export { signManifest, signCommand } from './manifest-signer.js';
export type { ManifestInput, CommandInput } from './manifest-signer.js';
export { MqttArtifactServer, HttpArtifactServer, describeArtifact } from './artifact-server.js';
export type { ServedArtifact, MqttArtifactServerOptions, HttpArtifactServerOptions, ChunkRequestLog } from './artifact-server.js';
export { RuntimeDeploymentTarget, tensorFromJson } from './runtime-deployment-target.js';
