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

/** Longest status message sent, in UTF-16 units (percent-encoded, at most 9 bytes each on the wire). */
export const MAX_STATUS_DETAILS = 1024;

/**
 * A status message cut to MAX_STATUS_DETAILS, its length appended. The message travels in the trailers, and
 * one that echoes a client's 100 000-character model or tensor name would exceed the peer's header list
 * limit: the trailers are never delivered and the client waits for its deadline instead of reading the error.
 * The result is never longer than the limit, so capping twice changes nothing.
 */
export function capStatusDetails(details: string): string {
  if (details.length <= MAX_STATUS_DETAILS) return details;
  const suffix = `… (${details.length} chars)`;
  let head = details.slice(0, MAX_STATUS_DETAILS - suffix.length);
  // Never end on half a surrogate pair: it would not survive UTF-8 encoding.
  if (/[\uD800-\uDBFF]$/.test(head)) head = head.slice(0, -1);
  return head + suffix;
}

/**
 * The one place where agent errors become gRPC statuses. Unknown errors become INTERNAL with a safe message
 * (their text can leak paths or onnxruntime internals; it goes to the log instead).
 */
export function toGrpcStatus(err: unknown): { code: GrpcStatus; details: string } {
  if (err instanceof EdgeAgentError) return { code: CODE_TO_STATUS[err.code], details: capStatusDetails(err.message) };
  return { code: GrpcStatus.INTERNAL, details: 'internal error (see the agent log)' };
}

export function toServiceError(err: unknown): Partial<ServiceError> {
  const { code, details } = toGrpcStatus(err);
  return { code, details, message: details, metadata: new Metadata() };
}
