import { join } from 'node:path';
import { agentConfigSchema, type AgentConfig } from '../../agent/config/index.js';
import { silentLogger } from '../../agent/logger.js';
import { Agent } from '../../agent/main.js';
import { EdgeAgentClient, type EdgeAgentClientOptions } from '../../agent/client/index.js';
import { copyDemoRepo, tempDir } from './runtime.js';

export interface TestAgent {
  readonly agent: Agent;
  readonly tcp: string;
  readonly unix: string;
  readonly dataDir: string;
  readonly repo: string;
  client(address?: string, options?: Omit<EdgeAgentClientOptions, 'address'>): EdgeAgentClient;
}

type DeepPartial<T> = { [K in keyof T]?: T[K] extends object ? (T[K] extends unknown[] ? T[K] : DeepPartial<T[K]>) : T[K] };

/** A whole agent in-process (CPU only) on a free loopback port and a unix socket in a temp dir. */
export async function startTestAgent(
  t: { teardown(fn: () => void | Promise<void>): void },
  options: { models?: readonly string[]; repo?: string; config?: DeepPartial<AgentConfig> } = {},
): Promise<TestAgent> {
  const repo = options.repo ?? copyDemoRepo(t, options.models ?? ['classifier', 'tiny', 'filter', 'types']);
  const dataDir = tempDir(t, 'edge-agent-');
  const sock = join(dataDir, 'agent.sock');
  const c = options.config ?? {};
  const config = agentConfigSchema.parse({
    ...c,
    model_repository: repo,
    data_dir: dataDir,
    server: { listen: ['127.0.0.1:0', `unix:${sock}`], ...c.server },
    runtime: { execution_providers: ['cpu'], ...c.runtime },
    // Port 0: tests run in parallel; Triton's 8002 belongs to a real agent.
    telemetry: { ...c.telemetry, http: { port: 0, ...c.telemetry?.http } },
  });
  const agent = new Agent({ config, configSource: '<test>', log: silentLogger() });
  const bound = await agent.start();
  const clients: EdgeAgentClient[] = [];
  t.teardown(async () => {
    for (const cl of clients) cl.close();
    await agent.stop();
  });
  const tcp = `127.0.0.1:${bound.find((b) => b.port > 0)?.port}`;
  return {
    agent, tcp, unix: `unix:${sock}`, dataDir, repo,
    client: (address = tcp, options = {}) => {
      const cl = new EdgeAgentClient({ ...options, address });
      clients.push(cl);
      return cl;
    },
  };
}
