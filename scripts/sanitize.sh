#!/usr/bin/env bash
# `make sanitize`: builds a copy of the tree with the C++ instrumented by AddressSanitizer and
# UndefinedBehaviorSanitizer (-fsanitize=address,undefined -fno-wrapv, every report fatal) under
# build/sanitize/tree, apart from the normal in-place build, and runs the CPU test suite there (or the
# pytest arguments given, e.g. `scripts/sanitize.sh tests/test_bad_input.py`). Python and torch are not
# instrumented: the ASan runtime is preloaded so that it sees every allocation, leak checking is off
# (the interpreter never frees everything), and a failed huge allocation returns null so that torch
# raises its own error, as it does without ASan.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, but still the venv's (no symlinks resolved)
OUT=$PWD/build/sanitize
TREE=$OUT/tree
rm -rf "$TREE"
mkdir -p "$TREE"
git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$TREE"
cd "$TREE"
echo "sanitize: building an instrumented copy in $TREE (a few minutes the first time)"
TORCH_MANUALGRAD_SANITIZE=1 TORCH_MANUALGRAD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace \
  --build-temp "$OUT/objects" > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
# libstdc++ is preloaded beside the ASan runtime so that ASan finds the real __cxa_throw when it starts
# (Python itself does not link it; without it the first C++ exception aborts the process).
PRELOAD="$(${CXX:-g++} -print-file-name=libasan.so) $(${CXX:-g++} -print-file-name=libstdc++.so.6)"
export LD_PRELOAD="$PRELOAD${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# The copy comes first on sys.path in the tests' own subprocesses too (before the editable install's hook).
export PYTHONPATH="$TREE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch_manualgrad as t, sys; f = t._C.__file__; assert f.startswith('$TREE'), f; print('sanitize: testing', f)"
# tests/test_cuda_logic.py compiles the CUDA kernels' index logic for the host with $TMG_HOST_CXX:
# instrumented too. ($CXX stays as it is: torch.compile's C++ backend builds with it.)
export TMG_HOST_CXX="${CXX:-g++} -fsanitize=address,undefined -fno-sanitize-recover=all -fno-wrapv"
"$PY" -m pytest -q -p no:cacheprovider "${@:-tests}"
