#!/usr/bin/env bash
# Runs the test suite against another torch than the pinned one (`make test` stays on torch==2.13.0).
#   scripts/test_torch_version.sh 2.14.1 [pytest args]   venv build/torch-2.14.1 (made if missing: pip
#                                                         install torch==2.14.1 plus the test and demo extras)
#   VENV=/path/to/venv scripts/test_torch_version.sh [pytest args]   a venv that already has a torch
# The extension is built CPU-only (TORCH_MANUALGRAD_CUDA=0, even against a CUDA build of torch: building
# the kernels for a GPU is scripts/cuda_compile_check.sh's job) in a scratch copy of the tree, so the
# normal in-place build is left alone, and the suite runs there. README "Torch versions" lists the results.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${VENV:-}" ]; then
  VERSION=${1:?usage: scripts/test_torch_version.sh VERSION [pytest args]  (or VENV=... scripts/test_torch_version.sh)}
  shift
  VENV=$ROOT/build/torch-$VERSION
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "torch==$VERSION" ninja numpy
  fi
fi
PY=$VENV/bin/python
# The package's own dependencies but torch (OpenBLAS) and the test and demo extras, as pyproject.toml lists them
# (one list for every set-up).
EXTRAS=$("$PY" -c "import tomllib; p = tomllib.load(open('$ROOT/pyproject.toml', 'rb'))['project']; d = p['optional-dependencies']; print(' '.join([r for r in p['dependencies'] if not r.startswith('torch')] + d['test'] + d['demo']))")
# shellcheck disable=SC2086
"$PY" -m pip install -q $EXTRAS ninja numpy "setuptools>=77"  # the build uses this venv's setuptools
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$SCRATCH"
cd "$SCRATCH"
echo "torch $("$PY" -c 'import torch; print(torch.__version__)'): building in $SCRATCH"
TORCH_MANUALGRAD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace > build.log 2>&1 || { tail -40 build.log; exit 1; }
PYTHONPATH=$SCRATCH "$PY" -m pytest -q -p no:cacheprovider "${@:-tests}"
