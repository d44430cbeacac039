#!/usr/bin/env bash
# Compile-checks the CUDA kernels on a machine without a GPU: builds the extension against a CUDA build
# of torch in a separate venv (not CI's), in a scratch copy of the tree, and checks the ops register a
# CUDA kernel. Usage: scripts/cuda_compile_check.sh [venv]   (default /work/cudavenv; created with
# `python3 -m venv V && V/bin/pip install torch==2.14.1 ninja numpy` if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/work/cudavenv}
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q torch==2.14.1 ninja numpy; }
SCRATCH=$(mktemp -d)
git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$SCRATCH"
cd "$SCRATCH"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  CPATH="$VENV/lib/python3.11/site-packages/nvidia/cu13/include" TORCH_MANUALGRAD_CUDA=1 MAX_JOBS=2 \
  "$VENV/bin/python" setup.py build_ext --inplace > build.log 2>&1 || { grep -E "error" -A3 build.log | head -60; exit 1; }
"$VENV/bin/python" -c "
import torch, torch_manualgrad
ops = ['conv_forward', 'conv_backward', 'max_pool_forward', 'max_pool_backward']
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key('manualgrad::' + op, 'CUDA')]
assert not missing, missing
print('CUDA kernels compiled and registered for', ', '.join(ops))
"
rm -rf "$SCRATCH"
