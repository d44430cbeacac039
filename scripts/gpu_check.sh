#!/usr/bin/env bash
# On a machine with a GPU, torch already installed and no network: build the package in place with its
# CUDA kernels, run the whole test suite (CUDA variants included), then the GPU benchmark; summary last.
# Usage: scripts/gpu_check.sh [python]   (default python3; results also land in $OUT when it is set)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0))"
start=$(date +%s)
TORCH_MANUALGRAD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
build=$?
echo "build exit $build in $(( $(date +%s) - start )) s"
[ $build = 0 ] || { tail -40 "$OUT/build.log"; exit 1; }

"$PY" -m pytest tests -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
tests=$?
bench=0
for precision in float32 tf32 bfloat16; do
  "$PY" benchmarks/bench.py --device cuda --batch 32 --precision $precision > "$OUT/bench_cuda_$precision.txt" 2>&1 || bench=1
done

echo "== failures (if any)"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
for precision in float32 tf32 bfloat16; do
  echo "== benchmark (cuda, batch 32, $precision)"
  grep "^|" "$OUT/bench_cuda_$precision.txt" || tail -5 "$OUT/bench_cuda_$precision.txt"
done
echo "== summary"
echo "build: exit $build; tests: exit $tests: $(tail -1 "$OUT/tests.log"); bench: exit $bench"
[ $tests = 0 ] && [ $bench = 0 ]
