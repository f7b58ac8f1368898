// A FleetAgent in its own process, so a test can kill it with SIGKILL. Argument: JSON of ChildOptions.
// Prints one JSON object per line: {"event":"started"}, {"event":"chunks","n":..}, {"event":"phase",...}.
import { join } from 'node:path';
import { fleetSchema } from '../../agent/config/fleet-schema.js';
import { DirectStatusPublisher, FleetAgent, MqttLink } from '../../agent/fleet/index.js';
import { Database } from '../../agent/store/index.js';
import { FileDeploymentTarget } from './fleet-file-target.js';

export interface ChildOptions {
  readonly brokerUrl: string;
  readonly keyId: string;
  readonly publicKey: string;
  readonly dataDir: string;
  readonly deviceId: string;
  readonly activationDelayMs?: number;
  readonly installDelayMs?: { before?: number; after?: number };
}

const opts = JSON.parse(process.argv[2] ?? '{}') as ChildOptions;
const say = (o: object): void => {
  process.stdout.write(`${JSON.stringify(o)}\n`);
};
const logger = {
  debug: () => undefined,
  info: (obj: object, msg: string) => say({ event: 'log', level: 'info', msg, obj }),
  warn: (obj: object, msg: string) => say({ event: 'log', level: 'warn', msg, obj }),
  error: (obj: object, msg: string) => say({ event: 'log', level: 'error', msg, obj }),
};
const config = fleetSchema.parse({
  broker_url: opts.brokerUrl,
  device_id: opts.deviceId,
  trusted_keys: { [opts.keyId]: opts.publicKey },
  settle_ms: 50,
  state_interval_s: 0,
  reconnect: { min_ms: 200, max_ms: 1000 },
  artifacts: { chunk_timeout_ms: 1500, window: 8 },
  health: { duration_s: 0 },
});
const target = new FileDeploymentTarget(join(opts.dataDir, 'models'), {
  ...(opts.activationDelayMs ? { activationDelayMs: opts.activationDelayMs } : {}),
  ...(opts.installDelayMs ? { installDelayMs: opts.installDelayMs } : {}),
  onInstall: (model, version, step) => say({ event: 'install', model, version, step }),
  onPhase: (model, version, phase) => say({ event: 'phase', model, version, phase }),
});
const db = await Database.open(join(opts.dataDir, 'agent.db'));
const link = new MqttLink({ config, agentVersion: 'child', logger });
const agent = new FleetAgent({ config, agentVersion: 'child', dataDir: opts.dataDir, db, target, link, logger, statusSink: new DirectStatusPublisher(() => link.client) });
await agent.start();
link.start();
say({ event: 'started', pid: process.pid });
let last = -1;
setInterval(() => {
  void db.get<{ n: number }>('SELECT COUNT(*) AS n FROM fleet_chunks').then((r) => {
    if (r && r.n !== last) {
      last = r.n;
      say({ event: 'chunks', n: r.n });
    }
  });
}, 20);
process.on('SIGTERM', () => {
  void agent.stop().then(() => link.stop()).then(() => db.close()).then(() => process.exit(0));
});
