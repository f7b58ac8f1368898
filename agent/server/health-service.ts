import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { join } from 'node:path';
import type { InferenceRuntimeApi } from '../runtime/index.js';
import { PROTO_DIR } from './proto-path.js';
import { capStatusDetails } from './status-map.js';

type ServingStatus = 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN';

/**
 * grpc.health.v1.Health: '' (the agent) is SERVING once the runtime has loaded its models and until shutdown
 * begins; each model name is a service of its own, SERVING while that model is READY. Watchers are told of
 * every change (`refresh()` is called on model events and on shutdown).
 */
export class HealthService {
  readonly definition: grpc.ServiceDefinition;
  readonly implementation: grpc.UntypedServiceImplementation;
  private shuttingDown = false;
  private readonly watchers = new Set<{ service: string; last: ServingStatus; call: grpc.ServerWritableStream<{ service: string }, { status: ServingStatus }> }>();

  constructor(private readonly runtime: InferenceRuntimeApi) {
    const pkg = grpc.loadPackageDefinition(protoLoader.loadSync(join(PROTO_DIR, 'grpc', 'health', 'v1', 'health.proto'), { keepCase: true, enums: String, defaults: true })) as unknown as {
      grpc: { health: { v1: { Health: grpc.ServiceClientConstructor } } };
    };
    this.definition = pkg.grpc.health.v1.Health.service;
    this.implementation = {
      Check: (call: grpc.ServerUnaryCall<{ service: string }, unknown>, cb: grpc.sendUnaryData<{ status: ServingStatus }>) => {
        const status = this.status(call.request.service);
        if (status === 'SERVICE_UNKNOWN') cb({ code: grpc.status.NOT_FOUND, details: capStatusDetails(`unknown service '${call.request.service}'`) });
        else cb(null, { status });
      },
      List: (_call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<{ statuses: Record<string, { status: ServingStatus }> }>) => {
        const statuses: Record<string, { status: ServingStatus }> = { '': { status: this.status('') } };
        for (const m of this.runtime.listModels()) statuses[m.name] = { status: this.status(m.name) };
        cb(null, { statuses });
      },
      Watch: (call: grpc.ServerWritableStream<{ service: string }, { status: ServingStatus }>) => {
        const w = { service: call.request.service, last: this.status(call.request.service), call };
        this.watchers.add(w);
        call.write({ status: w.last });
        call.on('cancelled', () => this.watchers.delete(w));
        call.on('error', () => this.watchers.delete(w));
      },
    };
  }

  status(service: string): ServingStatus {
    if (service === '') return !this.shuttingDown && this.runtime.isReady() ? 'SERVING' : 'NOT_SERVING';
    // modelInfo, not listModels: a health check must not rescan the repository on disk each time.
    let model;
    try {
      model = this.runtime.modelInfo(service);
    } catch {
      return 'SERVICE_UNKNOWN';
    }
    return !this.shuttingDown && model.state === 'READY' ? 'SERVING' : 'NOT_SERVING';
  }

  /** Re-evaluates every watched service and tells watchers whose status changed. */
  refresh(): void {
    for (const w of this.watchers) {
      const now = this.status(w.service);
      if (now !== w.last) {
        w.last = now;
        w.call.write({ status: now });
      }
    }
  }

  setShuttingDown(): void {
    this.shuttingDown = true;
    this.refresh();
  }

  close(): void {
    for (const w of this.watchers) w.call.end();
    this.watchers.clear();
  }
}
