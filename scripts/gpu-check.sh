#!/usr/bin/env bash
# GPU check (issue 4): the benchmark with onnxruntime's webgpu provider against cpu, on a conv net of realistic
# size (conv224: 224×224 RGB, 3.9 M parameters, 2.1 GMAC) and the demo classifier. Reports, per provider,
# bare and agent batch-1 latency and what batching gains at 8 streams; fails when outputs differ by more than
# 1e-4 relative from cpu's, when the agent did not serve on the GPU, or when webgpu is unavailable.
#
# On a bare NVIDIA host, prepare it first (from the dev machine: ../shared/device/prepare-carry.sh; carry
# .device-carry/ and dist/ there), then, from the project root:
#   source .device-carry/on-device.sh && scripts/gpu-check.sh
# Environment: GPU_CHECK_OUT (reports folder, default var/gpu-check), GPU_CHECK_QUICK=1 (CI-sized windows),
# GPU_CHECK_PROVIDER (default webgpu; cuda where onnxruntime-node has its CUDA binaries).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${GPU_CHECK_OUT:-var/gpu-check}
provider=${GPU_CHECK_PROVIDER:-webgpu}
mkdir -p "$out"

fail() { echo "gpu-check: $*" >&2; exit 2; }

if [ ! -f dist/scripts/bench.js ] || [ ! -f dist/agent/cli.js ]; then
  if [ -x node_modules/.bin/tsc ]; then npm run build --silent; else fail "dist/ is not built and TypeScript is not installed here: build on the dev machine (npm run build) and carry dist/"; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
else
  echo "gpu-check: nvidia-smi not found (no NVIDIA driver here); trying $provider anyway" >&2
fi

# Fails at once, naming onnxruntime's reason (e.g. "Failed to get a WebGPU adapter"), when the provider cannot run.
node --input-type=module -e "
import * as ort from 'onnxruntime-node';
import { buildConv224 } from './dist/scripts/bench/models.js';
try {
  const s = await ort.InferenceSession.create(buildConv224(), { executionProviders: [{ name: '$provider' }], logSeverityLevel: 3 });
  const x = new ort.Tensor('float32', new Float32Array(3 * 224 * 224), [1, 3, 224, 224]);
  await s.run({ image: x });
  console.log('$provider execution provider: session created and ran conv224');
} catch (err) {
  console.error('gpu-check: the $provider execution provider is unavailable: ' + String(err.message).split('\n')[0]);
  process.exit(3);
}" || exit 3

args=(--workloads conv224,classifier --sections bare,latency,throughput --streams 1,8 --reference-outputs --json)
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && args+=(--quick)

echo "bench on $provider ..."
node dist/scripts/bench.js "${args[@]}" --providers "$provider" --out "$out/$provider.json" > /dev/null
echo "bench on cpu ..."
node dist/scripts/bench.js "${args[@]}" --providers cpu --out "$out/cpu.json" > /dev/null

node dist/scripts/bench/gpu-compare.js "$out/cpu.json" "$out/$provider.json" | tee "$out/summary.txt"
