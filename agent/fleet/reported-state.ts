import type { DeploymentRecord } from '../store/index.js';
import type { DeploymentTarget } from './deployment-target.js';

export interface ReportedModel {
  readonly name: string;
  readonly active_version: number | null;
  readonly versions_on_disk: readonly number[];
  readonly provider: string | null;
  readonly variant: string | null;
}

export interface ReportedDeployment {
  readonly deployment_id: string;
  readonly model: string;
  readonly version: number;
  readonly state: string;
  readonly progress?: number;
  readonly health?: string;
}

/** Payload of the retained `{prefix}/devices/{id}/state` topic. */
export interface ReportedState {
  readonly device_id: string;
  readonly agent_version: string;
  readonly ts: string;
  readonly uptime_s: number;
  readonly models: readonly ReportedModel[];
  /** Deployments not finished yet (including an active one still under its health window). */
  readonly pending: readonly ReportedDeployment[];
}

export function buildReportedState(deviceId: string, agentVersion: string, target: DeploymentTarget, unfinished: readonly DeploymentRecord[]): ReportedState {
  const models = target.listModels().map((name): ReportedModel => {
    const v = target.modelVersions(name);
    return {
      name,
      active_version: v.active ?? null,
      versions_on_disk: [...v.onDisk],
      provider: v.provider ?? null,
      variant: v.variant ?? null,
    };
  });
  return {
    device_id: deviceId,
    agent_version: agentVersion,
    ts: new Date().toISOString(),
    uptime_s: Math.round(process.uptime()),
    models,
    pending: unfinished.map((d) => ({
      deployment_id: d.deploymentId,
      model: d.model,
      version: d.version,
      state: d.state,
      ...(d.progress !== undefined ? { progress: d.progress } : {}),
      ...(d.health !== undefined ? { health: d.health } : {}),
    })),
  };
}

/** Payload of `{prefix}/devices/{id}/deployments/{deployment_id}/status`. */
export function deploymentStatusPayload(d: DeploymentRecord): Record<string, unknown> {
  return {
    deployment_id: d.deploymentId,
    model: d.model,
    version: d.version,
    state: d.state,
    ...(d.progress !== undefined ? { progress: d.progress } : {}),
    ...(d.reason !== undefined ? { reason: d.reason } : {}),
    ...(d.health !== undefined ? { health: d.health } : {}),
    ...(d.details !== undefined ? { details: d.details } : {}),
    ts: new Date(d.updatedAt).toISOString(),
  };
}
