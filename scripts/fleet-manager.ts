#!/usr/bin/env node
// A small fleet manager for edge-agent devices: makes signing keys, signs and publishes deployment manifests,
// serves artifacts (MQTT chunks and HTTP with Range), watches statuses, and sends signed commands.
// The topic contract it speaks is in the README ("Fleet topic contract"); any other manager can implement it.
import { readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Command, Option } from 'commander';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { parse as parseYaml } from 'yaml';
import {
  describeArtifact, generateSigningKey, HttpArtifactServer, MqttArtifactServer, parsePrivateKey, signCommand, signManifest,
} from '../agent/fleet/index.js';

interface BrokerOptions {
  broker: string;
  prefix: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  username?: string;
  password?: string;
}

function brokerOptions(cmd: Command): Command {
  return cmd
    .requiredOption('--broker <url>', 'broker URL (mqtt:// or mqtts://)')
    .option('--prefix <prefix>', 'topic prefix', 'edge')
    .option('--tls-ca <file>', 'CA bundle (PEM) that signed the broker certificate')
    .option('--tls-cert <file>', 'client certificate (PEM)')
    .option('--tls-key <file>', 'client key (PEM)')
    .option('--username <name>')
    .option('--password <secret>');
}

async function connect(o: BrokerOptions): Promise<MqttClient> {
  const options: IClientOptions = {
    protocolVersion: 5,
    clientId: `fleet-manager-${process.pid}-${Date.now().toString(36)}`,
    reconnectPeriod: 1000,
    connectTimeout: 10_000,
    ...(o.tlsCa ? { ca: readFileSync(o.tlsCa) } : {}),
    ...(o.tlsCert ? { cert: readFileSync(o.tlsCert) } : {}),
    ...(o.tlsKey ? { key: readFileSync(o.tlsKey) } : {}),
    ...(o.username ? { username: o.username } : {}),
    ...(o.password ? { password: o.password } : {}),
  };
  return mqtt.connectAsync(o.broker, options);
}

function positiveInt(name: string): (v: string) => number {
  return (v: string) => {
    const n = Number(v);
    if (!Number.isSafeInteger(n) || n < 1) throw new Error(`${name} must be a positive integer, got '${v}'`);
    return n;
  };
}

function print(o: unknown): void {
  process.stdout.write(`${JSON.stringify(o)}\n`);
}

const program = new Command('fleet-manager').description('Drive edge-agent fleet deployments over MQTT').showHelpAfterError();

program.command('keygen')
  .description('make an Ed25519 signing key; prints the public key for fleet.trusted_keys')
  .requiredOption('--out <file>', 'where to write the private key (PEM, mode 0600)')
  .option('--key-id <id>', 'key_id devices will know this key by', 'fleet-1')
  .action((o: { out: string; keyId: string }) => {
    const k = generateSigningKey();
    writeFileSync(o.out, k.privateKeyPem, { mode: 0o600 });
    print({ key_id: o.keyId, public_key: k.publicKey, private_key_file: resolve(o.out), trusted_keys_yaml: `trusted_keys:\n  ${o.keyId}: ${k.publicKey}` });
  });

brokerOptions(program.command('publish'))
  .description('sign a deployment manifest and publish it (retained, QoS 1) to a device or a group')
  .requiredOption('--signing-key <file>', 'private key from keygen')
  .requiredOption('--key-id <id>')
  .option('--device <id>', 'publish to edge/devices/{id}/deployments')
  .option('--group <name>', 'publish to edge/groups/{name}/deployments')
  .requiredOption('--model <name>')
  .requiredOption('--model-version <n>', 'version number', positiveInt('--model-version'))
  .requiredOption('--artifact <file>', 'the model file (its sha256 and size go into the manifest)')
  .option('--source <source>', "'mqtt' (served by `serve`) or an https:// URL", 'mqtt')
  .option('--chunk-size <bytes>', 'chunk size for MQTT transfer', positiveInt('--chunk-size'), 256 * 1024)
  .option('--config <file>', 'model config (YAML) to install with the version')
  .option('--validation <file>', 'validation inputs / expected outputs (JSON)')
  .option('--allow-downgrade', 'allow a version lower than the active one')
  .option('--deployment-id <id>')
  .action(async (o: BrokerOptions & { signingKey: string; keyId: string; device?: string; group?: string; model: string; modelVersion: number; artifact: string; source: string; chunkSize: number; config?: string; validation?: string; allowDowngrade?: boolean; deploymentId?: string }) => {
    if ((o.device === undefined) === (o.group === undefined)) throw new Error('give exactly one of --device or --group');
    const a = await describeArtifact(o.artifact);
    const manifest = signManifest({
      ...(o.deploymentId ? { deploymentId: o.deploymentId } : {}),
      model: o.model,
      version: o.modelVersion,
      sha256: a.sha256,
      size: a.size,
      source: o.source,
      ...(o.source === 'mqtt' ? { chunkSize: o.chunkSize } : {}),
      ...(o.config ? { config: parseYaml(readFileSync(o.config, 'utf8')) as Record<string, unknown> } : {}),
      ...(o.validation ? { validation: JSON.parse(readFileSync(o.validation, 'utf8')) as Record<string, never> } : {}),
      ...(o.allowDowngrade ? { allowDowngrade: true } : {}),
    }, o.keyId, parsePrivateKey(readFileSync(o.signingKey, 'utf8')));
    const topic = o.device ? `${o.prefix}/devices/${o.device}/deployments` : `${o.prefix}/groups/${o.group}/deployments`;
    const client = await connect(o);
    await client.publishAsync(topic, JSON.stringify(manifest), { qos: 1, retain: true });
    await client.endAsync();
    print({ topic, manifest });
  });

brokerOptions(program.command('clear'))
  .description('remove the retained deployment of a device or a group')
  .option('--device <id>')
  .option('--group <name>')
  .action(async (o: BrokerOptions & { device?: string; group?: string }) => {
    if ((o.device === undefined) === (o.group === undefined)) throw new Error('give exactly one of --device or --group');
    const topic = o.device ? `${o.prefix}/devices/${o.device}/deployments` : `${o.prefix}/groups/${o.group}/deployments`;
    const client = await connect(o);
    await client.publishAsync(topic, '', { qos: 1, retain: true });
    await client.endAsync();
    print({ cleared: topic });
  });

brokerOptions(program.command('serve'))
  .description('answer chunk requests for artifacts over MQTT, and serve them over HTTP with Range')
  .requiredOption('--artifact <file...>', 'model files to serve')
  .option('--chunk-size <bytes>', 'chunk size when a request does not say', positiveInt('--chunk-size'), 256 * 1024)
  .option('--http-port <port>', 'also serve http://host:port/artifacts/{sha256}', (v) => Number(v))
  .option('--http-host <host>', 'HTTP listen address', '127.0.0.1')
  .addOption(new Option('--rate <bytes-per-second>', 'throttle (simulates a thin link)').argParser(positiveInt('--rate')))
  .action(async (o: BrokerOptions & { artifact: string[]; chunkSize: number; httpPort?: number; httpHost: string; rate?: number }) => {
    const client = await connect(o);
    const server = new MqttArtifactServer({ client, topicPrefix: o.prefix, ...(o.rate ? { bytesPerSecond: o.rate } : {}) });
    const http = o.httpPort !== undefined ? new HttpArtifactServer({ port: o.httpPort, host: o.httpHost, ...(o.rate ? { bytesPerSecond: o.rate } : {}) }) : undefined;
    const served = [];
    for (const file of o.artifact) {
      const a = await describeArtifact(file, o.chunkSize);
      server.add(a);
      http?.add(a);
      served.push(a);
    }
    await server.start();
    await http?.start();
    for (const a of served) print({ serving: a.path, sha256: a.sha256, size: a.size, ...(http ? { url: http.urlFor(a.sha256) } : {}) });
    const stop = async (): Promise<void> => {
      server.close();
      await http?.close();
      await client.endAsync();
      print({ stopped: true, chunks_sent: server.chunksSent, chunk_requests: server.requests.length, rerequested_chunks: server.rerequests, http_bytes_sent: http?.bytesSent ?? 0 });
      process.exit(0);
    };
    process.once('SIGINT', () => void stop());
    process.once('SIGTERM', () => void stop());
  });

brokerOptions(program.command('watch'))
  .description('print device presence, deployment statuses, reported state and command results as JSON lines')
  .option('--device <id>', "one device, or '+' for all", '+')
  .option('--until-state <state>', 'exit once a deployment status reaches this state')
  .option('--deployment-id <id>', 'with --until-state: the deployment to wait for')
  .action(async (o: BrokerOptions & { device: string; untilState?: string; deploymentId?: string }) => {
    const client = await connect(o);
    const base = `${o.prefix}/devices/${o.device}`;
    client.on('message', (topic, payload, packet) => {
      let body: unknown;
      try {
        body = JSON.parse(payload.toString('utf8'));
      } catch {
        body = payload.toString('utf8');
      }
      print({ topic, retained: packet.retain, payload: body });
      const state = (body as { state?: unknown; deployment_id?: unknown } | null);
      if (o.untilState && topic.endsWith('/status') && topic.includes('/deployments/') && state?.state === o.untilState
        && (o.deploymentId === undefined || state.deployment_id === o.deploymentId)) {
        void client.endAsync().then(() => process.exit(0));
      }
    });
    await client.subscribeAsync([`${base}/status`, `${base}/state`, `${base}/deployments/+/status`, `${base}/commands/+/result`], { qos: 1 });
  });

brokerOptions(program.command('command'))
  .description('send a signed command to a device and print its result')
  .argument('<command>', 'rollback | activate | delete_version | get_state')
  .requiredOption('--signing-key <file>')
  .requiredOption('--key-id <id>')
  .requiredOption('--device <id>')
  .option('--model <name>')
  .option('--model-version <n>', 'version for activate / delete_version (or the rollback target)', positiveInt('--model-version'))
  .option('--wait <seconds>', 'how long to wait for the result', (v) => Number(v), 30)
  .action(async (command: string, o: BrokerOptions & { signingKey: string; keyId: string; device: string; model?: string; modelVersion?: number; wait: number }) => {
    if (!['rollback', 'activate', 'delete_version', 'get_state'].includes(command)) throw new Error(`unknown command '${command}'`);
    const args: Record<string, unknown> = {
      ...(o.model !== undefined ? { model: o.model } : {}),
      ...(o.modelVersion !== undefined ? { version: o.modelVersion } : {}),
    };
    const signed = signCommand({ command: command as 'rollback', args, deviceId: o.device }, o.keyId, parsePrivateKey(readFileSync(o.signingKey, 'utf8')));
    const client = await connect(o);
    const resultTopic = `${o.prefix}/devices/${o.device}/commands/${signed.command_id}/result`;
    const result = new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no result on ${resultTopic} within ${o.wait} s`)), o.wait * 1000);
      client.on('message', (topic, payload) => {
        if (topic !== resultTopic) return;
        clearTimeout(timer);
        resolve(JSON.parse(payload.toString('utf8')) as Record<string, unknown>);
      });
    });
    await client.subscribeAsync(resultTopic, { qos: 1 });
    await client.publishAsync(`${o.prefix}/devices/${o.device}/commands/${signed.command_id}`, JSON.stringify(signed), { qos: 1 });
    try {
      const r = await result;
      print(r);
      process.exitCode = r.ok === true ? 0 : 1;
    } finally {
      await client.endAsync();
    }
  });

program.parseAsync(process.argv).catch((err: unknown) => {
  process.stderr.write(`fleet-manager: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(2);
});
