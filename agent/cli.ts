#!/usr/bin/env node
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { loadConfig } from './config/index.js';
import { EdgeAgentError, errorMessage } from './errors.js';
import { createLogger } from './logger.js';
import { Agent, AGENT_VERSION } from './main.js';
import { parseImageSize, runOptimize, type CalibrationMethod, type ImageSize, type Normalization } from './compress/index.js';
import { agentStatusLine, SystemdNotifier } from './systemd/index.js';
import { runStatusCommand } from './telemetry/index.js';
import { applyHeapGrowingPercent } from './v8-heap.js';

const collect = (value: string, previous: string[] = []): string[] => [...previous, value];

async function serve(opts: { config?: string; modelRepository?: string; listen?: string[]; dataDir?: string; logLevel?: string }): Promise<void> {
  const file = opts.config ?? process.env.EDGE_AGENT_CONFIG;
  // The same sources on every (re)load: file, environment, flags.
  const load = (): ReturnType<typeof loadConfig> => loadConfig({
    ...(file ? { file } : {}),
    overrides: {
      ...(opts.modelRepository ? { modelRepository: opts.modelRepository } : {}),
      ...(opts.listen ? { listen: opts.listen } : {}),
      ...(opts.dataDir ? { dataDir: opts.dataDir } : {}),
      ...(opts.logLevel ? { logLevel: opts.logLevel } : {}),
    },
    env: process.env,
  });
  const { config, source } = load();
  const log = createLogger({ level: config.log.level });
  const heapGrowingPercent = applyHeapGrowingPercent(config.v8.heap_growing_percent);
  // sd_notify: READY=1 only once models are warm, WATCHDOG=1 from the event loop, STATUS= one-line summaries.
  const notifier = new SystemdNotifier({ onError: (err) => log.warn({ err: err.message }, 'systemd notification not delivered') });
  notifier.start();
  void notifier.status(`starting: loading models from ${config.model_repository}`);
  log.info({ config: source, model_repository: config.model_repository, data_dir: config.data_dir, version: AGENT_VERSION, heap_growing_percent: heapGrowingPercent }, 'edge-agent starting');
  const agent = new Agent({ config, configSource: source, log });
  const statusLine = (note?: string): string => agentStatusLine(agent.runtime.listModels(), { streams: agent.sensorStreams.activeStreams(), ...(note ? { note } : {}) });
  let signalled = false;
  const shutdown = (signal: string): void => {
    if (signalled) return;
    signalled = true;
    log.info({ signal }, 'shutting down: draining accepted frames');
    void notifier.stopping(`stopping (${signal}): draining accepted frames`);
    agent.stop().then(async () => {
      await notifier.close();
      process.exit(0);
    }, async (err: unknown) => {
      log.error({ err: errorMessage(err) }, 'error during shutdown');
      await notifier.close();
      process.exit(1);
    });
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));
  process.on('SIGHUP', () => {
    if (signalled) return;
    void notifier.reloading(`reloading ${source}`);
    let note: string | undefined;
    try {
      const r = agent.reload(load().config);
      if (r.needsRestart.length > 0) note = `restart needed for ${r.needsRestart.join(', ')}`;
    } catch (err) {
      // A bad edit must not take a running agent down: keep the config in force and say what is wrong.
      log.error({ err: errorMessage(err) }, 'reload refused: keeping the running configuration');
      note = `reload refused: ${errorMessage(err)}`;
    }
    void notifier.ready(statusLine(note));
  });
  try {
    await agent.start();
  } catch (err) {
    // Release the model workers before exiting, so the process ends with the error, not an abort.
    await agent.stop().catch(() => undefined);
    await notifier.status(`failed: ${errorMessage(err)}`);
    await notifier.close();
    throw err;
  }
  await notifier.ready(statusLine());
  setInterval(() => void notifier.status(statusLine()), 30_000).unref();
}

export function buildCli(): Command {
  const program = new Command('edge-agent')
    .description('Low-latency inference daemon for edge devices: gRPC sensor streams and KServe v2 over ONNX Runtime.')
    .version(AGENT_VERSION)
    // Usage errors exit 2 like config errors (systemd and scripts tell them from runtime failures), not commander's 1.
    .exitOverride();
  program
    .command('serve')
    .description('load the model repository and serve gRPC (native streams, KServe v2, health)')
    .option('-c, --config <file>', 'YAML config file (env EDGE_AGENT_CONFIG)')
    .option('-m, --model-repository <dir>', 'model repository: <dir>/<model>/<version>/model.onnx (env EDGE_AGENT_MODEL_REPOSITORY)')
    .option('-l, --listen <addr>', "listen address, repeatable: 'host:port' or 'unix:/path' (env EDGE_AGENT_LISTEN, comma-separated)", collect)
    .option('-d, --data-dir <dir>', 'state, caches and sockets (env EDGE_AGENT_DATA_DIR)')
    .addOption(new Option('--log-level <level>', 'log level (env EDGE_AGENT_LOG_LEVEL)').choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']))
    .addHelpText('after', '\nPrecedence: flags > EDGE_AGENT_* environment > config file > defaults.\nRelative paths in the config file are relative to the file; on the command line, to the working directory.')
    .action(serve);
  program
    .command('status')
    .description("summary of a running agent: models, provider, variant, latency percentiles, throughput, outbox, fleet link")
    .option('-u, --url <url>', "the agent's local HTTP endpoint (telemetry.http)", 'http://127.0.0.1:8002')
    .option('--json', 'machine-readable JSON')
    .action(async (opts: { url: string; json?: boolean }) => {
      process.exitCode = await runStatusCommand({ url: opts.url, json: opts.json === true });
    });
  program
    .command('optimize')
    .description('make int8 and fp16 variants of an fp32 ONNX model, measured on held-out calibration inputs')
    .argument('<model>', 'the fp32 model.onnx')
    .requiredOption('--calibration <path>', 'a folder of images (.png .jpg .ppm .pgm) or .npy files, or one .npy file')
    .option('--out <dir>', 'where variants and model.report.json go (default: beside the model)')
    .option('--formats <list>', 'comma-separated: int8,fp16', 'int8,fp16')
    .option('--exclude <nodes>', 'comma-separated node names kept in fp32 in the int8 variant')
    .option('--auto-exclude', 'keep the layers that hurt accuracy most in fp32 until the bound holds')
    .addOption(new Option('--method <method>', 'activation range calibration').choices(['percentile', 'minmax', 'mse']).default('percentile'))
    .option('--min-cosine <x>', 'accuracy bound in (0, 1] (output cosine vs fp32, held-out inputs)', (value: string): number => {
      const x = Number(value);
      if (value.trim() === '' || !(x > 0 && x <= 1)) throw new InvalidArgumentError('expected a number in (0, 1], e.g. 0.99');
      return x;
    }, 0.99)
    .addOption(new Option('--normalize <how>', 'image normalisation').choices(['unit', 'symmetric', 'imagenet', 'raw']).default('unit'))
    .option('--size <HxW>', 'image tensor size where the model\'s height/width are dynamic, e.g. 48x320 (default 320x320)', (value: string) => {
      try {
        return parseImageSize(value);
      } catch (err) {
        throw new InvalidArgumentError(errorMessage(err));
      }
    })
    .action(async (model: string, opts: { calibration: string; out?: string; formats: string; exclude?: string; autoExclude?: boolean; method: string; minCosine: number; normalize: Normalization; size?: ImageSize }) => {
      const list = (s: string | undefined): string[] => (s ? s.split(',').map((x) => x.trim()).filter(Boolean) : []);
      const result = await runOptimize({
        model,
        calibration: opts.calibration,
        ...(opts.out ? { out: opts.out } : {}),
        formats: list(opts.formats) as ('int8' | 'fp16')[],
        exclude: list(opts.exclude),
        autoExclude: opts.autoExclude === true,
        method: opts.method as CalibrationMethod,
        minCosine: opts.minCosine,
        image: { normalize: opts.normalize, ...(opts.size ? { size: opts.size } : {}) },
        log: (line) => process.stderr.write(`${line}\n`),
      });
      process.stdout.write(`${result.table}\nreport: ${result.reportFile}\n`);
    });
  return program;
}

buildCli().parseAsync(process.argv).catch((err: unknown) => {
  // commander has printed its own line (usage errors) or the help/version text already.
  if (err instanceof CommanderError) process.exit(err.exitCode === 0 ? 0 : 2);
  // Config and startup errors: one clear line, non-zero exit, before anything listens.
  process.stderr.write(`edge-agent: ${err instanceof EdgeAgentError ? err.message : errorMessage(err)}\n`);
  process.exit(2);
});
