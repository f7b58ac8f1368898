#!/usr/bin/env node
import { Command, Option } from 'commander';
import { loadConfig } from './config/index.js';
import { EdgeAgentError, errorMessage } from './errors.js';
import { createLogger } from './logger.js';
import { Agent, AGENT_VERSION } from './main.js';

const collect = (value: string, previous: string[] = []): string[] => [...previous, value];

async function serve(opts: { config?: string; modelRepository?: string; listen?: string[]; dataDir?: string; logLevel?: string }): Promise<void> {
  const file = opts.config ?? process.env.EDGE_AGENT_CONFIG;
  const { config, source } = loadConfig({
    ...(file ? { file } : {}),
    overrides: {
      ...(opts.modelRepository ? { modelRepository: opts.modelRepository } : {}),
      ...(opts.listen ? { listen: opts.listen } : {}),
      ...(opts.dataDir ? { dataDir: opts.dataDir } : {}),
      ...(opts.logLevel ? { logLevel: opts.logLevel } : {}),
    },
    env: process.env,
  });
  const log = createLogger({ level: config.log.level });
  log.info({ config: source, model_repository: config.model_repository, data_dir: config.data_dir, version: AGENT_VERSION }, 'edge-agent starting');
  const agent = new Agent({ config, configSource: source, log });
  let signalled = false;
  const shutdown = (signal: string): void => {
    if (signalled) return;
    signalled = true;
    log.info({ signal }, 'shutting down: draining accepted frames');
    agent.stop().then(() => process.exit(0), (err: unknown) => {
      log.error({ err: errorMessage(err) }, 'error during shutdown');
      process.exit(1);
    });
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));
  try {
    await agent.start();
  } catch (err) {
    // Release the model workers before exiting, so the process ends with the error, not an abort.
    await agent.stop().catch(() => undefined);
    throw err;
  }
}

export function buildCli(): Command {
  const program = new Command('edge-agent')
    .description('Low-latency inference daemon for edge devices: gRPC sensor streams and KServe v2 over ONNX Runtime.')
    .version(AGENT_VERSION);
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
  return program;
}

buildCli().parseAsync(process.argv).catch((err: unknown) => {
  // Config and startup errors: one clear line, non-zero exit, before anything listens.
  process.stderr.write(`edge-agent: ${err instanceof EdgeAgentError ? err.message : errorMessage(err)}\n`);
  process.exit(2);
});
