export { EdgeAgentClient, SensorStreamHandle, encodeFrame, syntheticInputs } from './sensor-stream-client.js';
export type { EdgeAgentClientOptions, FrameResult, FrameToSend, OpenedInfo, Qos, ResultStatus, StreamOpenOptions } from './sensor-stream-client.js';
export { ResultPoller } from './result-poller.js';
