import t from 'tap';
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DeviceOutputError, type SpawnFn } from '../agent/telemetry/device-tool.js';
import { NVIDIA_SMI_ARGS, NvidiaSmiCollector, nvidiaSmiAssembler, parseNvidiaSmi, parseNvidiaSmiLine } from '../agent/telemetry/nvidia-smi.js';
import { TegrastatsCollector, parseTegrastats, tegrastatsGpu } from '../agent/telemetry/tegrastats.js';
import { ThermalZoneReader, parseThermalTemp } from '../agent/telemetry/thermal-zones.js';
import { DeviceMonitor } from '../agent/telemetry/device-monitor.js';

const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'telemetry');
const fixture = (name: string): string => join(FIXTURES, name);
const read = (name: string): string => readFileSync(fixture(name), 'utf8');

/**
 * A spawn that plays a recorded output through a real child process (`sh`), recording what the collector
 * asked for. `script` is a shell snippet; the tool's own arguments are only recorded.
 */
function playback(script: string): { spawn: SpawnFn; calls: { command: string; args: readonly string[] }[]; children: ChildProcess[] } {
  const calls: { command: string; args: readonly string[] }[] = [];
  const children: ChildProcess[] = [];
  return {
    calls,
    children,
    spawn: (command: string, args: readonly string[], options: SpawnOptions) => {
      calls.push({ command, args });
      const child = spawn('sh', ['-c', script], options);
      children.push(child);
      return child;
    },
  };
}

t.test('nvidia-smi: four GPUs, one with [N/A] fields', async (t) => {
  const gpus = parseNvidiaSmi(read('nvidia-smi-4gpu.txt'));
  t.equal(gpus.length, 4);
  t.same(gpus[0], { index: 0, source: 'nvidia-smi', utilization_percent: 37, memory_used_mib: 10240, memory_total_mib: 81559, temperature_c: 41 });
  t.same(gpus[2], { index: 2, source: 'nvidia-smi', utilization_percent: 100, memory_used_mib: 79321, memory_total_mib: 81559, temperature_c: 67 });
  t.same(gpus[3], { index: 3, source: 'nvidia-smi', memory_used_mib: 0, memory_total_mib: 81559 }, '[N/A] fields are absent, not zero');
  t.same(parseNvidiaSmi(read('nvidia-smi-1gpu.txt')), [{ index: 0, source: 'nvidia-smi', utilization_percent: 12, memory_used_mib: 1536, memory_total_mib: 24564, temperature_c: 45 }]);
  t.same(parseNvidiaSmi(''), [], 'no GPUs: no lines');
  t.same(parseNvidiaSmi('0, 1, 5, 100, 200, 30\r\n'), [{ index: 0, source: 'nvidia-smi', utilization_percent: 5, memory_used_mib: 100, memory_total_mib: 200, temperature_c: 30 }], 'CRLF tolerated');
});

t.test('nvidia-smi loop output: lines are grouped into one reading per interval by index and count', async (t) => {
  const assemble = nvidiaSmiAssembler();
  const lines = read('nvidia-smi-4gpu.txt').trim().split('\n');
  t.same(lines.slice(0, 3).map(assemble), [undefined, undefined, undefined], 'no reading before the last GPU');
  const block = assemble(lines[3]!);
  t.same(block?.map((g) => g.index), [0, 1, 2, 3], 'the block is complete at index count-1');
  t.same(lines.map(assemble).at(-1)?.length, 4, 'the next interval is a reading of its own');
  t.equal(assemble(lines[0]!), undefined);
  t.equal(assemble(lines[2]!), undefined, 'a block that skips a GPU is dropped');
  t.equal(assemble(lines[3]!), undefined, '…up to the next GPU 0');
  t.same(lines.map(assemble).at(-1)?.map((g) => g.index), [0, 1, 2, 3], 'then readings resume');
  t.throws(() => assemble('4, 4, 1, 2, 3, 4'), { message: /index and count are not a GPU index below the GPU count/ });
  t.same(parseNvidiaSmiLine('1, 2, 5, 100, 200, 30').count, 2);
});

t.test('nvidia-smi: output of another form is a clear error naming the line', async (t) => {
  t.throws(() => parseNvidiaSmi('utilization.gpu [%], memory.used [MiB]\n'), { name: 'DeviceOutputError', message: /expected 6 comma-separated fields.*got 2.*utilization\.gpu/ });
  t.throws(() => parseNvidiaSmi('0, 1, 37 %, 10240 MiB, 81559 MiB, 41\n'), { message: /'37 %' is not a number/ }, 'with units (nounits forgotten)');
  t.throws(() => parseNvidiaSmi(read('nvidia-smi-no-driver.txt')), DeviceOutputError);
});

t.test('nvidia-smi collector: runs the query in loop mode, parses, and treats a missing tool as absent', async (t) => {
  const ok = playback(`cat '${fixture('nvidia-smi-4gpu.txt')}'`);
  const collector = new NvidiaSmiCollector({ spawn: ok.spawn });
  t.teardown(() => collector.close());
  const res = await collector.read();
  t.ok(res.ok);
  if (res.ok) t.equal(res.value.length, 4);
  t.same(ok.calls, [{ command: 'nvidia-smi', args: [...NVIDIA_SMI_ARGS, '-lms', '1000'] }]);
  t.same(NVIDIA_SMI_ARGS, ['--query-gpu=index,count,utilization.gpu,memory.used,memory.total,temperature.gpu', '--format=csv,noheader,nounits']);

  const noDriver = playback(`cat '${fixture('nvidia-smi-no-driver.txt')}' >&2; exit 9`);
  const brokenCollector = new NvidiaSmiCollector({ spawn: noDriver.spawn });
  t.teardown(() => brokenCollector.close());
  const broken = await brokenCollector.read();
  t.notOk(broken.ok);
  if (!broken.ok) {
    t.equal(broken.missing, false, 'installed but failing is an error, not absence');
    t.match(broken.reason, /exited with 9: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.*; restarting in 1000 ms/);
  }

  // A real spawn of a tool that is not installed (this machine has no GPU).
  let spawned = 0;
  const counting: SpawnFn = (c, a, o) => { spawned += 1; return spawn(c, [...a], o); };
  const missing = new NvidiaSmiCollector({ spawn: counting, command: '/nonexistent/bin/nvidia-smi', restartMinMs: 10 });
  const first = await missing.read();
  t.notOk(first.ok);
  if (!first.ok) t.equal(first.missing, true);
  t.equal(missing.absent, true);
  await new Promise((r) => setTimeout(r, 50));
  await missing.read();
  t.equal(spawned, 1, 'a missing tool is not spawned again, neither by a reading nor by a restart');

  const slowCollector = new NvidiaSmiCollector({ spawn: playback('sleep 5').spawn, timeoutMs: 100 });
  t.teardown(() => slowCollector.close());
  const slow = await slowCollector.read();
  t.notOk(slow.ok);
  if (!slow.ok) t.match(slow.reason, /no output within 100 ms of its start/);
});

t.test('tegrastats: AGX Orin line (JetPack 5, idle, GPU powered down)', async (t) => {
  const r = parseTegrastats(read('tegrastats-orin-agx.txt'));
  t.equal(r.ram_used_mib, 2448);
  t.equal(r.ram_total_mib, 30536);
  t.equal(r.swap_used_mib, 0);
  t.equal(r.swap_total_mib, 15268);
  t.equal(r.cpus.length, 12);
  t.same(r.cpus[2], { index: 2, online: true, load_percent: 3, freq_mhz: 729 });
  t.same(r.cpus[11], { index: 11, online: false });
  t.equal(r.cpus.filter((c) => !c.online).length, 4);
  t.equal(r.gpu_load_percent, 0);
  t.same(r.gpu_freq_mhz, [305, 305], 'one clock per GPC');
  t.equal(r.emc_load_percent, 0);
  t.same(r.temperatures_c, { CPU: 43.375, Tboard: 31, SOC2: 40.062, Tdiode: 33.25, SOC0: 40.187, tj: 43.375, SOC1: 39.75 }, 'sensors at -256 (off) left out');
  t.same(r.power_mw, {
    VDD_GPU_SOC: { current: 2787, average: 2787 },
    VDD_CPU_CV: { current: 398, average: 398 },
    VIN_SYS_5V0: { current: 2818, average: 2818 },
    VDDQ_VDD2_1V8AO: { current: 302, average: 302 },
  }, 'NC (unconnected) rails left out');
  t.same(tegrastatsGpu(r), { index: 0, source: 'tegrastats', memory_used_mib: 2448, memory_total_mib: 30536, utilization_percent: 0 }, 'GPU temperature absent while powered down');
});

t.test('tegrastats: Orin Nano line (JetPack 6, timestamp, lower-case sensors, GR3D without clock)', async (t) => {
  const r = parseTegrastats(read('tegrastats-orin-nano-jp6.txt'));
  t.equal(r.ram_used_mib, 3012);
  t.equal(r.ram_total_mib, 7620);
  t.equal(r.cpus.length, 6);
  t.equal(r.gpu_load_percent, 61);
  t.equal(r.gpu_freq_mhz, undefined);
  t.equal(r.emc_load_percent, 21);
  t.equal(r.temperatures_c['gpu'], 52.468);
  t.equal(r.power_mw['VDD_IN']?.current, 7134);
  t.equal(r.power_mw['VDD_IN']?.average, 6821);
  t.same(tegrastatsGpu(r), { index: 0, source: 'tegrastats', memory_used_mib: 3012, memory_total_mib: 7620, utilization_percent: 61, temperature_c: 52.468 });
});

t.test('tegrastats: Jetson Nano line (JetPack 4, POM rails without units)', async (t) => {
  const r = parseTegrastats(read('tegrastats-nano-jp4.txt'));
  t.equal(r.ram_total_mib, 3964);
  t.same(r.cpus.map((c) => c.load_percent), [9, 4, 3, 3]);
  t.same(r.gpu_freq_mhz, [76]);
  t.equal(r.temperatures_c['GPU'], 32.5);
  t.equal(r.temperatures_c['thermal'], 32.75);
  t.same(r.power_mw, { POM_5V_IN: { current: 2033, average: 2033 }, POM_5V_GPU: { current: 40, average: 40 }, POM_5V_CPU: { current: 406, average: 406 } }, 'IRAM kB figures are not power');
});

t.test('tegrastats: a line of another form is a clear error', async (t) => {
  t.throws(() => parseTegrastats('Error: tegrastats must be run as root'), { name: 'DeviceOutputError', message: /no 'RAM used\/totalMB' field.*must be run as root/ });
  t.throws(() => parseTegrastats('RAM 1/2MB CPU [abc]'), { message: /CPU entry 'abc'/ });
});

t.test('tegrastats collector: runs the tool on, one line per interval, and stops it on close', async (t) => {
  const p = playback(`while true; do cat '${fixture('tegrastats-orin-nano-jp6.txt')}'; sleep 0.05; done`);
  const collector = new TegrastatsCollector({ spawn: p.spawn });
  const res = await collector.read();
  t.ok(res.ok);
  if (res.ok) t.equal(res.value.gpu_load_percent, 61);
  t.same(p.calls[0]!.args, ['--interval', '1000']);
  const child = p.children[0]!;
  t.equal(child.exitCode, null, 'the tool runs on after the reading');
  await collector.close();
  t.ok(child.signalCode === 'SIGTERM' || child.exitCode !== null, 'close stops it');
  t.match(await collector.read(), { ok: false, reason: /stopped/ }, 'and no reading starts it again');
  t.equal(p.children.length, 1);
  const missing = new TegrastatsCollector({ command: '/nonexistent/tegrastats' });
  const m = await missing.read();
  t.notOk(m.ok);
  if (!m.ok) t.equal(m.missing, true);
});

t.test('thermal zones: recorded /sys/class/thermal tree', async (t) => {
  const res = await new ThermalZoneReader(fixture('thermal')).read();
  t.ok(res.ok);
  if (res.ok) {
    t.same(res.value, [
      { zone: 'thermal_zone0', type: 'cpu-thermal', temperature_c: 47.25 },
      { zone: 'thermal_zone1', type: 'gpu-thermal', temperature_c: 45.5 },
      { zone: 'thermal_zone10', type: 'thermal_zone10', temperature_c: -5 },
    ], 'unreadable zone skipped, numeric order, zone name when there is no type file');
  }
  const none = await new ThermalZoneReader('/nonexistent/thermal').read();
  t.notOk(none.ok);
  if (!none.ok) t.equal(none.missing, true);
  t.equal(parseThermalTemp('47250\n'), 47.25);
  t.equal(parseThermalTemp('garbage'), undefined);
});

t.test('device monitor: sources the device lacks are absent, failures are reported, GPU from tegrastats on Jetson', async (t) => {
  const jetson = new DeviceMonitor({
    nvidiaSmiCommand: '/nonexistent/nvidia-smi',
    spawn: (command, args, options) => (command === 'tegrastats'
      ? spawn('sh', ['-c', `cat '${fixture('tegrastats-orin-agx.txt')}'`], options)
      : spawn(command, [...args], options)),
    thermalRoot: fixture('thermal'),
    now: () => 1_700_000_000_000,
  });
  t.teardown(() => jetson.close());
  const r = await jetson.read();
  t.same(r.sources, ['tegrastats', 'thermal']);
  t.equal(r.errors, undefined, 'a tool that is not installed is not an error');
  t.equal(r.gpus.length, 1);
  t.equal(r.gpus[0]!.source, 'tegrastats');
  t.equal(r.jetson?.ram_total_mib, 30536);
  t.equal(r.thermal.length, 3);
  t.equal(r.read_at, 1_700_000_000_000);
  t.equal(jetson.latest, r);

  const gpuHost = new DeviceMonitor({
    tegrastatsCommand: '/nonexistent/tegrastats',
    spawn: (command, args, options) => (command === 'nvidia-smi'
      ? spawn('sh', ['-c', `cat '${fixture('nvidia-smi-4gpu.txt')}'`], options)
      : spawn(command, [...args], options)),
    thermal: false,
  });
  t.teardown(() => gpuHost.close());
  const g = await gpuHost.read();
  t.same(g.sources, ['nvidia-smi']);
  t.equal(g.gpus.length, 4);
  t.equal(g.jetson, undefined);
  t.same(g.thermal, []);

  const failing = new DeviceMonitor({
    tegrastats: false,
    thermal: false,
    spawn: (_c, _a, options) => spawn('sh', ['-c', 'echo "garbage output"'], options),
  });
  t.teardown(() => failing.close());
  const f = await failing.read();
  t.same(f.sources, []);
  t.match(f.errors?.['nvidia-smi'], /nvidia-smi: expected 6 comma-separated fields/);
  t.same(f.gpus, []);
});
