import { status as GrpcStatus, Metadata, type ServiceError } from '@grpc/grpc-js';
import { EdgeAgentError, type ErrorCode } from '../errors.js';

const CODE_TO_STATUS: Record<ErrorCode, GrpcStatus> = {
  INVALID_ARGUMENT: GrpcStatus.INVALID_ARGUMENT,
  NOT_FOUND: GrpcStatus.NOT_FOUND,
  RESOURCE_EXHAUSTED: GrpcStatus.RESOURCE_EXHAUSTED,
  UNAVAILABLE: GrpcStatus.UNAVAILABLE,
  DEADLINE_EXCEEDED: GrpcStatus.DEADLINE_EXCEEDED,
  // A dropped frame is not a transport failure; unary callers (KServe) see it as UNAVAILABLE: retryable.
  DROPPED: GrpcStatus.UNAVAILABLE,
  FAILED_PRECONDITION: GrpcStatus.FAILED_PRECONDITION,
  CONFIG: GrpcStatus.INTERNAL,
  MODEL_LOAD: GrpcStatus.UNAVAILABLE,
  INTERNAL: GrpcStatus.INTERNAL,
};

/**
 * The one place where agent errors become gRPC statuses. Unknown errors become INTERNAL with a safe message
 * (their text can leak paths or onnxruntime internals; it goes to the log instead).
 */
export function toGrpcStatus(err: unknown): { code: GrpcStatus; details: string } {
  if (err instanceof EdgeAgentError) return { code: CODE_TO_STATUS[err.code], details: err.message };
  return { code: GrpcStatus.INTERNAL, details: 'internal error (see the agent log)' };
}

export function toServiceError(err: unknown): Partial<ServiceError> {
  const { code, details } = toGrpcStatus(err);
  return { code, details, message: details, metadata: new Metadata() };
}
