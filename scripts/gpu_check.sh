#!/usr/bin/env bash
# On a machine with a GPU, torch already installed and no network: build the package in place with its
# CUDA kernels, run the whole test suite (CUDA variants included), then the GPU benchmark in float32,
# TF32 and bfloat16, a kernel-by-kernel profile and the host time per call; a short summary last.
# Usage: scripts/gpu_check.sh [python]   (default python3; logs land in $OUT, or /tmp/gpu_check)
# Environment: STAGES (default "build tests bench profile", run in that order; "sanitize" and "ncu"
# on request), TEST_TIMEOUT (s, for the CUDA tests, default 400), CPU_TEST_TIMEOUT (s, for the CPU-only
# rest, default 300; 0 skips it), TEST_WORKERS (pytest-xdist workers, default 12), PRECISIONS (default
# "float32 tf32 bfloat16"), BENCH_BUDGET (s per measurement, default 1.0), TORCH_CUDA_ARCH_LIST
# (default 9.0), MAX_JOBS, SANITIZE_TIMEOUT (s per compute-sanitizer tool, default 240), SANITIZE_TOOLS
# (default "memcheck racecheck"), SANITIZE_SELECT (pytest -k for memcheck's tests of test_cuda.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
OUT=${OUT:-/tmp/gpu_check}
STAGES=${STAGES:-build tests bench profile}
PRECISIONS=${PRECISIONS:-float32 tf32 bfloat16}
mkdir -p "$OUT"
build=skipped tests=skipped bench=skipped sanitize=skipped

build() {
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  local start=$(date +%s)
  TORCH_MANUALGRAD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  build=$?
  echo "build exit $build in $(( $(date +%s) - start )) s"
  [ $build = 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
  # The C++ runtime must be the shared one (see setup.py), or the first error message crashes.
  ldd torch_manualgrad/_C*.so | grep -E "libstdc\+\+" || echo "WARNING: libstdc++ is not linked dynamically"
  "$PY" -c "
import torch, torch_manualgrad
try:
    torch.ops.manualgrad.conv_forward(torch.randn(1, 2, 5, 5, device='cuda'), torch.randn(3, 2, 3, 3, device='cuda'), None, [1, 1], [0, 0], [1, 1], 0)
except RuntimeError as e:
    print('an error from our C++ checks raises:', str(e).splitlines()[0])
"
}

run_tests() {
  # pytest-xdist spreads the suite over the CPU cores when it is installed; the GPU is shared by the workers.
  rm -f "$OUT/tests.log" "$OUT/tests_cpu.log"  # a log left by an earlier call is not this call's
  local workers=$("$PY" -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-12}" || echo "")
  local start=$(date +%s)
  # One thread per worker: 16 workers each running 16 OpenMP threads made CPU gradchecks take minutes.
  [ -n "$workers" ] && export OMP_NUM_THREADS=1
  # The CUDA tests first (the CUDA variants of every test, test_cuda.py, and the host-built CUDA logic),
  # then the CPU-only rest, which CI runs anyway: a time limit cuts the less useful half.
  # SIGINT at the limit makes pytest stop and still print its summary of failures.
  timeout -s INT -k 30 ${TEST_TIMEOUT:-400} "$PY" -m pytest tests -q -rfE --durations=15 -p no:cacheprovider \
    -p no:benchmark $workers -k cuda > "$OUT/tests.log" 2>&1
  tests=$?
  echo "CUDA tests exit $tests in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/tests.log")"
  # CPU_TEST_TIMEOUT=0 leaves the CPU-only rest to CI, for a call that needs its minutes for the bench.
  [ "${CPU_TEST_TIMEOUT:-300}" = 0 ] && return
  start=$(date +%s)
  timeout -s INT -k 30 ${CPU_TEST_TIMEOUT:-300} "$PY" -m pytest tests -q -rfE -p no:cacheprovider \
    -p no:benchmark $workers -k "not cuda" > "$OUT/tests_cpu.log" 2>&1
  local cpu=$?
  echo "CPU tests exit $cpu in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/tests_cpu.log")"
  [ $tests = 0 ] && tests=$cpu
}

run_bench() {
  bench=0
  for precision in $PRECISIONS; do
    "$PY" benchmarks/bench.py --device cuda --batch 32 --precision $precision --budget ${BENCH_BUDGET:-1.0} \
      > "$OUT/bench_cuda_$precision.txt" 2>&1 || bench=1
  done
}

# compute-sanitizer: memcheck over the CUDA-only tests (out-of-bounds and misaligned accesses in every
# kernel they launch, ours and torch's), and racecheck over the one kernel of ours with shared memory,
# the depthwise weight gradient (racecheck over the whole file took longer than its limit). The test
# that reads kernel names from torch.profiler is left out: under the sanitizer CUPTI has no room for it.
run_sanitize() {
  sanitize=0
  local tools=${SANITIZE_TOOLS:-memcheck racecheck}
  [[ " $tools " == *" memcheck "* ]] && { timeout -s INT -k 30 ${SANITIZE_TIMEOUT:-240} \
    compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
    -k "${SANITIZE_SELECT:-not columns_match_one_output}" > "$OUT/sanitize_memcheck.log" 2>&1 || sanitize=1; }
  [[ " $tools " == *" racecheck "* ]] && { timeout -s INT -k 30 ${SANITIZE_TIMEOUT:-240} \
    compute-sanitizer --tool racecheck --error-exitcode 99 "$PY" -c "
import torch, torch_manualgrad as tmg
for k, n, c, size, stride in ((3, 2, 8, 20, 1), (5, 3, 4, 17, 2), (7, 1, 6, 12, 1)):
    x = torch.randn(n, c, size, size, device='cuda', requires_grad=True)
    w = torch.randn(2 * c, 1, k, k, device='cuda', requires_grad=True)
    tmg.functional.conv2d(x, w, None, stride, k // 2, 1, c).sum().backward()
torch.cuda.synchronize()
print('racecheck ran the depthwise weight gradient')
" > "$OUT/sanitize_racecheck.log" 2>&1 || sanitize=1; }
  local tool
  for tool in $tools; do
    echo "compute-sanitizer $tool: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|ran the" "$OUT/sanitize_$tool.log" | tail -2 | tr '\n' ' ')"
  done
}

# Nsight Compute's view of the memory-bound kernels at the benchmark's shapes (clocks left as they are).
run_ncu() {
  # Each of the three kernels launches once in this script, so the first three matching launches are one each.
  ncu --clock-control none --kernel-name regex:"depthwise_forward|max_pool_forward|max_pool_backward_cells" \
    --launch-count 3 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section WarpStateStats "$PY" -c "
import torch, torch_manualgrad as tmg
x = torch.randn(32, 144, 56, 56, device='cuda')
tmg.functional.conv2d(x, torch.randn(144, 1, 3, 3, device='cuda'), None, 1, 1, 1, 144)
p = torch.randn(32, 64, 56, 56, device='cuda', requires_grad=True)
out = tmg.functional.max_pool2d(p, 3, 1, 1)
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
" > "$OUT/ncu.txt" 2>&1
  echo "ncu exit $?: $(grep -c "Duration" "$OUT/ncu.txt") kernels profiled"
}

for stage in $STAGES; do
  case $stage in
    build) build ;;
    tests) run_tests ;;
    bench) run_bench ;;
    profile)
      "$PY" benchmarks/profile_gpu.py --precision float32 > "$OUT/profile_float32.txt" 2>&1 || bench=1
      "$PY" benchmarks/host_overhead.py > "$OUT/host_overhead.txt" 2>&1 || bench=1 ;;
    sanitize) run_sanitize ;;
    ncu) run_ncu ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done

if [ -f "$OUT/tests.log" ]; then
  echo "== failures (if any)"
  cat "$OUT/tests.log" "$OUT/tests_cpu.log" 2>/dev/null | grep -E "^(FAILED|ERROR)" | cut -c1-200 | head -40
fi
for precision in $PRECISIONS; do
  [ -f "$OUT/bench_cuda_$precision.txt" ] || continue
  echo "== benchmark (cuda, batch 32, $precision)"
  grep "^|" "$OUT/bench_cuda_$precision.txt" | cut -d'|' -f2,5-12 || tail -5 "$OUT/bench_cuda_$precision.txt"
done
echo "== summary"
echo "build: $build; tests: $tests: CUDA $( [ -f "$OUT/tests.log" ] && tail -1 "$OUT/tests.log"), CPU $( [ -f "$OUT/tests_cpu.log" ] && tail -1 "$OUT/tests_cpu.log"); bench: $bench; sanitize: $sanitize"
[ "$tests" != 0 ] && [ "$tests" != skipped ] && exit 1
[ "$bench" != 0 ] && [ "$bench" != skipped ] && exit 1
[ "$sanitize" != 0 ] && [ "$sanitize" != skipped ] && exit 1
exit 0
