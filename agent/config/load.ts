import { readFileSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { parseDocument } from 'yaml';
import type { z } from 'zod';
import { ConfigError } from '../errors.js';
import { agentConfigSchema, DEFAULT_SOCKET_NAME, type AgentConfig } from './schema.js';

/** Overrides from the command line; they win over the environment, which wins over the file. */
export interface ConfigOverrides {
  readonly modelRepository?: string;
  readonly listen?: readonly string[];
  readonly dataDir?: string;
  readonly logLevel?: string;
}

export interface LoadedConfig {
  readonly config: Readonly<AgentConfig>;
  /** The file it came from, or '<defaults>'. */
  readonly source: string;
}

/** `EDGE_AGENT_*` variables that map onto config keys (the systemd unit and containers set these). */
export const ENV_KEYS = {
  EDGE_AGENT_MODEL_REPOSITORY: 'model_repository',
  EDGE_AGENT_DATA_DIR: 'data_dir',
  EDGE_AGENT_LISTEN: 'server.listen',
  EDGE_AGENT_LOG_LEVEL: 'log.level',
} as const;

function formatPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const p of path) out += typeof p === 'number' ? `[${p}]` : out === '' ? String(p) : `.${String(p)}`;
  return out;
}

function describeIssue(issue: z.core.$ZodIssue, prefix: string): { key: string; problem: string } {
  let key = formatPath(issue.path);
  let problem = issue.message;
  if (issue.code === 'unrecognized_keys') {
    const keys = issue.keys;
    problem = `unknown key${keys.length > 1 ? 's' : ''} ${keys.map((k) => `'${k}'`).join(', ')}`;
    key = formatPath([...issue.path, ...(keys.length === 1 ? [keys[0] as string] : [])]);
  }
  return { key: prefix && key ? `${prefix}.${key}` : prefix || key, problem };
}

/**
 * Turns schema issues into one ConfigError that names the file and the first key; the other problems follow in
 * its message, so fixing a device's config takes one round instead of one per mistake.
 */
export function configErrorFrom(source: string, error: z.ZodError, prefix = ''): ConfigError {
  const [first, ...rest] = error.issues.map((issue) => describeIssue(issue, prefix));
  if (!first) return new ConfigError(source, prefix, 'invalid');
  const more = rest.map((r) => `; ${r.key === '' ? '' : `${r.key}: `}${r.problem}`).join('');
  return new ConfigError(source, first.key, first.problem + more);
}

/** Parses YAML text, reporting syntax errors with line and column. */
export function parseYaml(source: string, text: string): unknown {
  const doc = parseDocument(text, { prettyErrors: true, uniqueKeys: true });
  const err = doc.errors[0];
  if (err) {
    const pos = err.linePos?.[0];
    throw new ConfigError(source, '', `YAML syntax error${pos ? ` at line ${pos.line}, column ${pos.col}` : ''}: ${err.message.split('\n')[0]}`);
  }
  return doc.toJS() ?? {};
}

function setPath(target: Record<string, unknown>, dotted: string, value: unknown): void {
  const parts = dotted.split('.');
  let obj = target;
  for (const p of parts.slice(0, -1)) {
    const next = obj[p];
    if (typeof next !== 'object' || next === null || Array.isArray(next)) obj[p] = {};
    obj = obj[p] as Record<string, unknown>;
  }
  obj[parts[parts.length - 1] as string] = value;
}

function resolvePaths(config: AgentConfig, fileBase: string, envBase: string, overriddenByEnvOrFlag: Set<string>): AgentConfig {
  const base = (key: string): string => (overriddenByEnvOrFlag.has(key) ? envBase : fileBase);
  const abs = (p: string, key: string): string => (isAbsolute(p) ? p : resolve(base(key), p));
  const fleet = config.fleet;
  return {
    ...config,
    ...(fleet ? {
      fleet: {
        ...fleet,
        ...(fleet.tls ? {
          tls: {
            ...fleet.tls,
            ...(fleet.tls.ca ? { ca: abs(fleet.tls.ca, 'fleet.tls') } : {}),
            ...(fleet.tls.cert ? { cert: abs(fleet.tls.cert, 'fleet.tls') } : {}),
            ...(fleet.tls.key ? { key: abs(fleet.tls.key, 'fleet.tls') } : {}),
          },
        } : {}),
        artifacts: { ...fleet.artifacts, ...(fleet.artifacts.http_ca ? { http_ca: abs(fleet.artifacts.http_ca, 'fleet.artifacts') } : {}) },
      },
    } : {}),
    model_repository: abs(config.model_repository, 'model_repository'),
    data_dir: abs(config.data_dir, 'data_dir'),
    server: {
      ...config.server,
      listen: config.server.listen.map((a) => (a.startsWith('unix:') && !isAbsolute(a.slice(5)) ? `unix:${abs(a.slice(5), 'server.listen')}` : a)),
      ...(config.server.tls ? {
        tls: {
          ...config.server.tls,
          cert: abs(config.server.tls.cert, 'server.tls'),
          key: abs(config.server.tls.key, 'server.tls'),
          ...(config.server.tls.client_ca ? { client_ca: abs(config.server.tls.client_ca, 'server.tls') } : {}),
        },
      } : {}),
    },
  };
}

function deepFreeze<T>(o: T): T {
  if (o && typeof o === 'object') {
    for (const v of Object.values(o)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}

/**
 * Loads the agent config: schema defaults, then the YAML file, then `EDGE_AGENT_*` environment variables,
 * then command-line flags. Relative paths in the file are relative to the file's folder (so a config and its
 * model repository travel together); relative paths from the environment or flags are relative to the
 * working directory. The result is validated once and frozen.
 */
export function loadConfig(options: { file?: string; overrides?: ConfigOverrides; env?: NodeJS.ProcessEnv; cwd?: string } = {}): LoadedConfig {
  const cwd = options.cwd ?? process.cwd();
  const env = options.env ?? {};
  let raw: Record<string, unknown> = {};
  let source = '<defaults>';
  let fileBase = cwd;
  if (options.file) {
    source = resolve(cwd, options.file);
    fileBase = dirname(source);
    let text: string;
    try {
      text = readFileSync(source, 'utf8');
    } catch (err) {
      throw new ConfigError(source, '', `cannot read config file: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
    }
    const parsed = parseYaml(source, text);
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new ConfigError(source, '', 'the top level must be a mapping of keys');
    raw = parsed as Record<string, unknown>;
  }

  const fromOutside = new Set<string>();
  for (const [name, key] of Object.entries(ENV_KEYS)) {
    const value = env[name];
    if (value === undefined || value === '') continue;
    setPath(raw, key, key === 'server.listen' ? value.split(',').map((s) => s.trim()).filter(Boolean) : value);
    fromOutside.add(key);
  }
  const o = options.overrides ?? {};
  const flags: [string, string, unknown][] = [
    ['model_repository', '--model-repository', o.modelRepository],
    ['data_dir', '--data-dir', o.dataDir],
    ['server.listen', '--listen', o.listen && o.listen.length > 0 ? [...o.listen] : undefined],
    ['log.level', '--log-level', o.logLevel],
  ];
  /** Where a key set from outside the file came from, for errors: the variable or the flag, not the file. */
  const origin = new Map<string, string>();
  for (const [name, key] of Object.entries(ENV_KEYS)) if (fromOutside.has(key)) origin.set(key, `environment ${name}`);
  for (const [key, flag, value] of flags) {
    if (value === undefined) continue;
    setPath(raw, key, value);
    fromOutside.add(key);
    origin.set(key, `flag ${flag}`);
  }
  const listenGiven = (raw.server as { listen?: unknown } | undefined)?.listen !== undefined;

  const result = agentConfigSchema.safeParse(raw);
  if (!result.success) {
    const first = result.error.issues[0]?.path.map(String).join('.') ?? '';
    const from = [...origin].find(([key]) => first === key || first.startsWith(`${key}.`));
    throw configErrorFrom(from ? from[1] : source, result.error);
  }
  const config = resolvePaths(result.data, fileBase, cwd, fromOutside);
  // The default socket lives in the data dir, wherever that ends up (EDGE_AGENT_DATA_DIR pins it under systemd),
  // not beside the config file, which may be read-only (/etc).
  const listen = listenGiven ? config.server.listen
    : config.server.listen.map((a) => (a.startsWith('unix:') ? `unix:${resolve(config.data_dir, DEFAULT_SOCKET_NAME)}` : a));
  return { config: deepFreeze({ ...config, server: { ...config.server, listen } }), source };
}
