export { GrpcListeners } from './grpc-server.js';
export type { BoundAddress, ListenerOptions } from './grpc-server.js';
export { HealthService } from './health-service.js';
export { createSensorStreamService, SENSOR_STREAM_PROTO, NATIVE_LOADER_OPTIONS } from './sensor-stream-service.js';
export type { SensorStreamService, SensorStreamOptions } from './sensor-stream-service.js';
export { StreamAdmission } from './stream-admission.js';
export { createKServeService } from './kserve-service.js';
export { toGrpcStatus, toServiceError } from './status-map.js';
export { PROTO_DIR } from './proto-path.js';
