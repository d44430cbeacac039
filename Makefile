# Set-up and entry points. `make test` and `make demo` work on a fresh machine: they create .venv,
# install pinned torch (the CPU build) and the package built in place, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo bench build clean sanitize

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/*.inc csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"  # the builds use this venv's setuptools (no build isolation)
	$(PY) -m pip install -q $(TORCH_PIN) pytest hypothesis ninja numpy scipy-openblas32  # OpenBLAS: the CPU kernels' BLAS
	$(PY) -m pip install -q onnx onnxscript onnxruntime  # the test extra: tests export to ONNX and run it
	$(PY) -m pip install -q scikit-learn tqdm matplotlib  # the demo/figures extra; tests cover those commands too
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

build: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

demo: $(STAMP)
	$(PY) -m torch_manualgrad demo

# The C++ under AddressSanitizer and UndefinedBehaviorSanitizer: a separate instrumented build, then the
# CPU suite against it (scripts/sanitize.sh; not part of `make test`, it takes several times longer).
sanitize: $(STAMP)
	PY=$(PY) scripts/sanitize.sh

bench: $(STAMP)
	$(PY) benchmarks/bench.py

clean:
	rm -rf build torch_manualgrad/_C*.so *.egg-info
