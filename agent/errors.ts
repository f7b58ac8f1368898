/**
 * The agent's error catalogue. Every failure a client or operator can see is one of these classes, with a
 * stable `code` that the server maps to a gRPC status in one place (server/status-map.ts) and that logs and
 * telemetry can count by. `cause` keeps the underlying error (onnxruntime's message, an fs error) for logs.
 */
export type ErrorCode =
  | 'INVALID_ARGUMENT'
  | 'NOT_FOUND'
  | 'RESOURCE_EXHAUSTED'
  | 'UNAVAILABLE'
  | 'DEADLINE_EXCEEDED'
  | 'DROPPED'
  | 'FAILED_PRECONDITION'
  | 'CONFIG'
  | 'MODEL_LOAD'
  | 'INTERNAL';

export abstract class EdgeAgentError extends Error {
  abstract readonly code: ErrorCode;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** A request or frame that can never succeed as sent: wrong dtype, shape, byte length, unknown tensor. */
export class InvalidInputError extends EdgeAgentError {
  readonly code = 'INVALID_ARGUMENT' as const;
}

export class ModelNotFoundError extends EdgeAgentError {
  readonly code = 'NOT_FOUND' as const;
  constructor(readonly model: string, readonly version?: number) {
    super(version === undefined ? `model '${model}' is not loaded` : `model '${model}' version ${version} is not loaded`);
  }
}

/** A configured limit was hit; the message names the limit so an operator knows which knob to turn. */
export class ResourceExhaustedError extends EdgeAgentError {
  readonly code = 'RESOURCE_EXHAUSTED' as const;
  constructor(readonly limit: string, message: string) {
    super(message);
  }
}

/** The agent (or a model) is not accepting work right now: draining, unloading, not ready yet. */
export class UnavailableError extends EdgeAgentError {
  readonly code = 'UNAVAILABLE' as const;
}

/** A frame whose deadline passed before it could start; it was not run late. */
export class DeadlineExceededError extends EdgeAgentError {
  readonly code = 'DEADLINE_EXCEEDED' as const;
}

/** A LATEST_ONLY frame that a newer frame of the same stream overtook while it was still queued. */
export class FrameDroppedError extends EdgeAgentError {
  readonly code = 'DROPPED' as const;
  constructor() {
    super('dropped: a newer frame of this LATEST_ONLY stream superseded it before it started');
  }
}

/** The request is well-formed but the state does not allow it (e.g. a sequence that was never started). */
export class FailedPreconditionError extends EdgeAgentError {
  readonly code = 'FAILED_PRECONDITION' as const;
}

/** A configuration problem, always naming the file and the key. */
export class ConfigError extends EdgeAgentError {
  readonly code = 'CONFIG' as const;
  constructor(readonly file: string, readonly key: string, problem: string) {
    super(`${file}: ${key === '' ? '' : `${key}: `}${problem}`);
  }
}

/** A model that onnxruntime (or the repository) could not load; names the model, the path and the reason. */
export class ModelLoadError extends EdgeAgentError {
  readonly code = 'MODEL_LOAD' as const;
  constructor(readonly model: string, readonly path: string, reason: string, options?: { cause?: unknown }) {
    super(`model '${model}' (${path}) failed to load: ${reason}`, options);
  }
}

export class InternalError extends EdgeAgentError {
  readonly code = 'INTERNAL' as const;
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
