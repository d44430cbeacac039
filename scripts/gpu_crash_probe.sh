#!/usr/bin/env bash
# Diagnoses a crash when our C++ checks throw on the GPU machine: runs one bad call in fresh processes
# under several conditions and prints how each ended; with cuda-gdb present, a native backtrace too.
PY=${1:-python3}
bad='import torch, torch_manualgrad
try:
    torch.ops.manualgrad.conv_forward(torch.randn(1,2,5,5), torch.randn(3,2,3,3), None, [1,1], [0,0], [1,1], 0)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])'
torch_bad='import torch
try:
    torch.nn.functional.conv2d(torch.randn(1,2,5,5), torch.randn(3,2,3,3), groups=0)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])'
cuda_first="import torch; torch.ones(1, device='cuda')"
g++ --version | head -1
ldd torch_manualgrad/_C*.so | grep -E "gomp|stdc|c10|torch" 
for label in "ours cpu:$bad" "torch cpu:$torch_bad" "ours cpu after cuda init:$cuda_first
$bad"; do
  echo "== ${label%%:*}"; "$PY" -c "${label#*:}" 2>&1 | tail -3; echo "exit $?"
done
echo "== ours cpu, TORCH_SHOW_CPP_STACKTRACES=1"; TORCH_SHOW_CPP_STACKTRACES=1 "$PY" -c "$bad" 2>&1 | tail -3
echo "== ours cpu, OMP_NUM_THREADS=1"; OMP_NUM_THREADS=1 "$PY" -c "$bad" 2>&1 | tail -3
if command -v cuda-gdb > /dev/null; then
  echo "== backtrace"
  timeout 120 cuda-gdb -q -batch -ex run -ex bt --args "$PY" -c "$bad" 2>&1 | grep -E "^#|signal|SIG" | head -30
fi
