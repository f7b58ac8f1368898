import { pino, type Logger as PinoLogger, type LevelWithSilent } from 'pino';

/** Structured JSON logs (one object a line) — what journald and log shippers on a fleet expect. */
export type Logger = PinoLogger;

export function createLogger(options: { level: LevelWithSilent; destination?: NodeJS.WritableStream }): Logger {
  return pino({ level: options.level, base: { service: 'edge-agent' } }, options.destination ?? process.stdout);
}

/** A logger that drops everything: for tests and tools that build parts alone. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
