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
  /** Monotonic clock in ms for the rejection limits (default `performance.now`); tests move it. */
  readonly monotonicNow?: () => number;
  /** How often rejected payloads are answered (default REJECTION_LIMITS; config `fleet.rejected_commands`). */
  readonly replyLimits?: { readonly replyBurst: number; readonly replyIntervalMs: number };
}

/**
 * Payloads on the command topic that fail verification (bad or missing signature, unknown key, not JSON, not a
 * command) come from someone who is not the fleet, or from a fleet signing with the wrong key. Both get the
 * same treatment: counted, logged at most once per `logIntervalMs` (with how many were not logged), and
 * answered on `.../{command_id}/result` only while a token bucket allows (`replyBurst` answers at once, then
 * one per `replyIntervalMs`). A fleet with a misconfigured key thus sees its first commands answered with the
 * reason, while a flood from anyone who can publish on the topic costs at most a few outbox rows a minute
 * (answers are `command-result`s, which the outbox never drops, so they must stay few) and never holds up
 * telemetry. A rejected payload never claims its command_id: a verified command with that id still runs.
 */
export interface RejectionLimits {
  readonly replyBurst: number;
  readonly replyIntervalMs: number;
  readonly logIntervalMs: number;
}

export const REJECTION_LIMITS: RejectionLimits = { replyBurst: 5, replyIntervalMs: 10_000, logIntervalMs: 10_000 };

/** Rejected command payloads since the agent started (operators: a rising count means a wrong key or a flood). */
export interface CommandRejectionStats {
  readonly total: number;
  /** Rejections answered on the result topic (the rest were over the rate limit or named a verified command's id). */
  readonly answered: number;
  readonly lastReason: string | undefined;
  readonly lastCommandId: string | undefined;
}

interface CommandOutcome {
  readonly result: Record<string, unknown>;
  /** False when the result was already stored (this delivery ran nothing). */
  readonly ran: boolean;
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
 * A command_id runs at most once: a delivery while it runs waits for that run and gets its result, a later one
 * (also after a restart) gets the stored result again.
 */
export class CommandHandler {
  /** Runs in progress by command_id: set before the first await, so a redelivery can never start a second run. */
  private readonly running = new Map<string, Promise<CommandOutcome>>();
  private readonly limits: RejectionLimits;
  private readonly clock: () => number;
  private replyTokens: number;
  private tokensAt: number;
  private readonly rejected = { total: 0, answered: 0, lastReason: undefined as string | undefined, lastCommandId: undefined as string | undefined };
  private lastLogAt: number | undefined;
  private unlogged = 0;
  private summaryTimer: NodeJS.Timeout | undefined;

  constructor(private readonly ctx: CommandContext) {
    this.limits = { ...REJECTION_LIMITS, ...ctx.replyLimits };
    this.clock = ctx.monotonicNow ?? (() => performance.now());
    this.replyTokens = this.limits.replyBurst;
    this.tokensAt = this.clock();
  }

  rejections(): CommandRejectionStats {
    return { ...this.rejected };
  }

  /** Never rejects: the link calls it fire-and-forget. */
  async handle(topic: string, payload: Buffer): Promise<void> {
    const commandId = topic.slice(topic.lastIndexOf('/') + 1);
    try {
      await this.handleDelivery(topic, commandId, payload);
    } catch (err) {
      this.ctx.logger.error({ command_id: commandId, err: errorMessage(err) }, 'fleet: command not handled');
    }
  }

  /** Stops the pending rejection summary line (the agent is stopping). */
  close(): void {
    clearTimeout(this.summaryTimer);
    this.summaryTimer = undefined;
  }

  private async handleDelivery(topic: string, commandId: string, payload: Buffer): Promise<void> {
    if (!TOPIC_SAFE.test(commandId)) {
      this.ctx.logger.warn({ topic }, 'fleet: command topic with an unusable command_id, ignored');
      return;
    }
    if (payload.length === 0) return;
    let command: FleetCommand;
    try {
      command = verifyCommand(payload, commandId, this.ctx.deviceId, this.ctx.keys);
    } catch (err) {
      await this.onRejected(commandId, err instanceof ManifestRejection ? err.message : errorMessage(err));
      return;
    }
    const inProgress = this.running.get(commandId);
    if (inProgress) {
      await this.publish(commandId, (await inProgress).result);
      return;
    }
    const run = this.runOnce(commandId, command);
    this.running.set(commandId, run);
    const forget = (): void => void this.running.delete(commandId);
    run.then(forget, forget);
    const { result, ran } = await run;
    await this.publish(commandId, result);
    if (ran && command.command !== 'get_state') await this.ctx.publishState();
  }

  /** The stored result, or runs the command and stores its result (the first stored result for the id wins). */
  private async runOnce(commandId: string, command: FleetCommand): Promise<CommandOutcome> {
    const stored = await this.ctx.store.journal.commandResult(commandId);
    if (stored) return { result: stored, ran: false };
    let result: Record<string, unknown>;
    try {
      const value = await this.execute(command);
      result = { command_id: commandId, command: command.command, ok: true, result: value, ts: new Date().toISOString() };
      this.ctx.logger.info({ command_id: commandId, command: command.command, args: command.args }, 'fleet: command done');
    } catch (err) {
      result = { command_id: commandId, command: command.command, ok: false, error: errorMessage(err), ts: new Date().toISOString() };
      this.ctx.logger.warn({ command_id: commandId, command: command.command, err: errorMessage(err) }, 'fleet: command failed');
    }
    try {
      return { result: await this.ctx.store.journal.recordCommand(commandId, command.command, result), ran: true };
    } catch (err) {
      // It ran: answer with what it did. Without a stored result a redelivery after this run ends would run it again.
      this.ctx.logger.error({ command_id: commandId, err: errorMessage(err) }, 'fleet: command result could not be stored');
      return { result, ran: true };
    }
  }

  private async onRejected(commandId: string, reason: string): Promise<void> {
    const r = this.rejected;
    r.total += 1;
    r.lastReason = reason;
    r.lastCommandId = commandId;
    this.logRejection(commandId, reason);
    if (!this.takeReplyToken()) return;
    // The id of a verified command (running or done) answers with that command's result only: a forged
    // payload must not put a rejection on a result topic the fleet reads for a command that ran.
    if (this.running.has(commandId) || (await this.ctx.store.journal.commandResult(commandId))) {
      this.replyTokens += 1;
      return;
    }
    r.answered += 1;
    await this.publish(commandId, { command_id: commandId, ok: false, error: `rejected: ${reason}`, ts: new Date().toISOString() });
  }

  private takeReplyToken(): boolean {
    const now = this.clock();
    const { replyBurst, replyIntervalMs } = this.limits;
    this.replyTokens = Math.min(replyBurst, this.replyTokens + Math.max(0, now - this.tokensAt) / replyIntervalMs);
    this.tokensAt = now;
    if (this.replyTokens < 1) return false;
    this.replyTokens -= 1;
    return true;
  }

  /** One line per `logIntervalMs` at most; what it left out is counted in the next line (or a summary line). */
  private logRejection(commandId: string, reason: string): void {
    const now = this.clock();
    if (this.lastLogAt === undefined || now - this.lastLogAt >= this.limits.logIntervalMs) {
      this.ctx.logger.warn({ command_id: commandId, reason, not_logged: this.unlogged, rejected_total: this.rejected.total }, 'fleet: command rejected');
      this.lastLogAt = now;
      this.unlogged = 0;
      clearTimeout(this.summaryTimer);
      this.summaryTimer = undefined;
      return;
    }
    this.unlogged += 1;
    if (this.summaryTimer) return;
    this.summaryTimer = setTimeout(() => {
      this.summaryTimer = undefined;
      if (this.unlogged === 0) return;
      const r = this.rejected;
      this.ctx.logger.warn(
        { not_logged: this.unlogged, rejected_total: r.total, answered_total: r.answered, last_command_id: r.lastCommandId, last_reason: r.lastReason },
        'fleet: more commands rejected (log rate-limited)',
      );
      this.lastLogAt = this.clock();
      this.unlogged = 0;
    }, Math.max(0, this.limits.logIntervalMs - (now - this.lastLogAt)));
    this.summaryTimer.unref();
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
