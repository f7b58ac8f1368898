import { isPlainModelName } from '../models/index.js';
import { errorMessage } from '../errors.js';
import type { DeploymentRecord, FleetStore } from '../store/index.js';
import type { DeploymentTarget } from './deployment-target.js';
import type { FleetLogger } from './fleet-logger.js';
import { ManifestRejection, verifyCommand, type FleetCommand } from './manifest.js';
import type { ReportedState } from './reported-state.js';
import type { TrustedKeys } from './signing.js';
import type { StatusSink } from './status-sink.js';
import type { FleetTopics } from './topics.js';

export interface CommandContext {
  readonly keys: TrustedKeys;
  readonly deviceId: string;
  readonly store: FleetStore;
  readonly target: DeploymentTarget;
  readonly logger: FleetLogger;
  readonly topics: FleetTopics;
  readonly sink: StatusSink;
  readonly withModelLock: <T>(model: string, fn: () => Promise<T>) => Promise<T>;
  /** Ends the health window of the model's running deployment (a manual switch overrides it). */
  readonly stopHealthWatch: (model: string, by: string) => Promise<void>;
  readonly report: (rec: DeploymentRecord) => Promise<void>;
  readonly reportedState: () => Promise<ReportedState>;
  readonly publishState: () => Promise<void>;
}

class CommandError extends Error {}

const TOPIC_SAFE = /^[A-Za-z0-9_.:-]{1,128}$/;

function modelArg(args: Record<string, unknown>): string {
  const model = args.model;
  if (typeof model !== 'string' || !isPlainModelName(model)) throw new CommandError(`args.model must be a plain model name, got ${JSON.stringify(model)}`);
  return model;
}

function versionArg(args: Record<string, unknown>, required: boolean): number | undefined {
  const v = args.version;
  if (v === undefined && !required) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) throw new CommandError(`args.version must be a positive integer, got ${JSON.stringify(v)}`);
  return v;
}

/**
 * Signed commands on `{prefix}/devices/{id}/commands/{command_id}`; the result goes to `.../{command_id}/result`.
 * A command_id runs at most once: a repeat delivery gets the stored result again.
 */
export class CommandHandler {
  constructor(private readonly ctx: CommandContext) {}

  async handle(topic: string, payload: Buffer): Promise<void> {
    const commandId = topic.slice(topic.lastIndexOf('/') + 1);
    if (!TOPIC_SAFE.test(commandId)) {
      this.ctx.logger.warn({ topic }, 'fleet: command topic with an unusable command_id, ignored');
      return;
    }
    if (payload.length === 0) return;
    let command: FleetCommand;
    try {
      command = verifyCommand(payload, commandId, this.ctx.deviceId, this.ctx.keys);
    } catch (err) {
      const message = err instanceof ManifestRejection ? err.message : errorMessage(err);
      this.ctx.logger.warn({ command_id: commandId, reason: message }, 'fleet: command rejected');
      await this.publish(commandId, { command_id: commandId, ok: false, error: `rejected: ${message}`, ts: new Date().toISOString() });
      return;
    }
    const stored = await this.ctx.store.journal.commandResult(commandId);
    if (stored) {
      await this.publish(commandId, stored);
      return;
    }
    let result: Record<string, unknown>;
    try {
      const value = await this.execute(command);
      result = { command_id: commandId, command: command.command, ok: true, result: value, ts: new Date().toISOString() };
      this.ctx.logger.info({ command_id: commandId, command: command.command, args: command.args }, 'fleet: command done');
    } catch (err) {
      result = { command_id: commandId, command: command.command, ok: false, error: errorMessage(err), ts: new Date().toISOString() };
      this.ctx.logger.warn({ command_id: commandId, command: command.command, err: errorMessage(err) }, 'fleet: command failed');
    }
    await this.ctx.store.journal.recordCommand(commandId, command.command, result);
    await this.publish(commandId, result);
    if (command.command !== 'get_state') await this.ctx.publishState();
  }

  private async publish(commandId: string, result: Record<string, unknown>): Promise<void> {
    try {
      await this.ctx.sink.enqueue('command-result', this.ctx.topics.commandResult(commandId), result, false);
    } catch (err) {
      this.ctx.logger.error({ command_id: commandId, err: errorMessage(err) }, 'fleet: could not enqueue command result');
    }
  }

  private async execute(c: FleetCommand): Promise<unknown> {
    const { target, store } = this.ctx;
    switch (c.command) {
      case 'get_state': {
        const state = await this.ctx.reportedState();
        await this.ctx.publishState();
        return state;
      }
      case 'rollback': {
        const model = modelArg(c.args);
        const explicit = versionArg(c.args, false);
        await this.ctx.stopHealthWatch(model, `command ${c.command_id}`);
        return this.ctx.withModelLock(model, async () => {
          const v = target.modelVersions(model);
          if (v.active === undefined) throw new CommandError(`model '${model}' has no active version to roll back from`);
          const to = explicit ?? (await this.previousVersion(model, v.active, v.onDisk));
          if (to === undefined) throw new CommandError(`model '${model}' has no earlier version on disk to roll back to`);
          if (!v.onDisk.includes(to)) throw new CommandError(`version ${to} of '${model}' is not on disk (on disk: ${v.onDisk.join(', ') || 'none'})`);
          if (to === v.active) throw new CommandError(`version ${to} of '${model}' is already active`);
          const from = v.active;
          await target.activate(model, to);
          await store.registry.recordActivation({ model, version: to, previousVersion: from, cause: 'rollback' });
          await this.markRolledBack(model, from, to, c.command_id);
          return { model, from, to };
        });
      }
      case 'activate': {
        const model = modelArg(c.args);
        const version = versionArg(c.args, true) as number;
        await this.ctx.stopHealthWatch(model, `command ${c.command_id}`);
        return this.ctx.withModelLock(model, async () => {
          const v = target.modelVersions(model);
          if (!v.onDisk.includes(version)) throw new CommandError(`version ${version} of '${model}' is not on disk (on disk: ${v.onDisk.join(', ') || 'none'})`);
          if (v.active === version) return { model, version, changed: false };
          await target.activate(model, version);
          await store.registry.recordActivation({ model, version, ...(v.active !== undefined ? { previousVersion: v.active } : {}), cause: 'command' });
          return { model, version, previous: v.active ?? null, changed: true };
        });
      }
      case 'delete_version': {
        const model = modelArg(c.args);
        const version = versionArg(c.args, true) as number;
        return this.ctx.withModelLock(model, async () => {
          const v = target.modelVersions(model);
          if (v.active === version) throw new CommandError(`version ${version} of '${model}' is serving; activate another version first`);
          if (!v.onDisk.includes(version)) throw new CommandError(`version ${version} of '${model}' is not on disk`);
          await target.deleteVersion(model, version);
          await store.registry.setState(model, version, 'deleted');
          return { model, version, deleted: true };
        });
      }
    }
  }

  /** The version that served before the active one (activation history), else the highest older one on disk. */
  private async previousVersion(model: string, active: number, onDisk: readonly number[]): Promise<number | undefined> {
    const history = await this.ctx.store.registry.activations(model);
    for (let i = history.length - 1; i >= 0; i--) {
      const a = history[i];
      if (a && a.version === active && a.previousVersion !== undefined && a.previousVersion !== active && onDisk.includes(a.previousVersion)) return a.previousVersion;
    }
    const older = onDisk.filter((v) => v < active);
    return older.length > 0 ? older[older.length - 1] : undefined;
  }

  /** The deployment that brought the version we just left is reported as rolled back. */
  private async markRolledBack(model: string, from: number, to: number, commandId: string): Promise<void> {
    const latest = await this.ctx.store.journal.latestForModel(model);
    if (latest && latest.version === from && latest.state === 'active') {
      const rec = await this.ctx.store.journal.update(latest.deploymentId, {
        state: 'rolled_back',
        reason: `rolled back to version ${to} by command ${commandId}`,
        ...(latest.health === 'watching' ? { health: 'skipped' as const } : {}),
      });
      await this.ctx.report(rec);
    }
  }
}
