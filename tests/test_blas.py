"""The CPU kernels' BLAS (torch_manualgrad/_blas.py, csrc/cpu/blas.cpp): which one runs, that both backends
compute what torch computes, bit for bit the same across thread counts, and that choosing ours leaves the
user's OpenBLAS settings alone."""
import ctypes
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad
from torch_manualgrad import _blas
from common import ConvCase

BACKENDS = ("openblas", "torch")


@pytest.fixture(params=BACKENDS)
def backend(request):
    before = _blas.blas()
    _blas.use(request.param)
    yield request.param
    _blas.use("auto")
    assert _blas.blas() == before


def _cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _torchs_blas_name():
    """What blas() says for torch's BLAS: its MKL called directly where libtorch_cpu itself exports MKL's
    sgemm_ and MKL_Set_Num_Threads_Local (pip's torch, MKL linked in), else at::mm."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    if all(hasattr(lib, name) for name in ("MKL_Set_Num_Threads_Local", "sgemm_", "dgemm_")):
        return "torch's MKL (sgemm_, dgemm_)"
    return "torch's BLAS (at::mm)"


def test_auto_takes_mkl_on_intel_and_openblas_elsewhere():
    """The Makefile installs scipy-openblas32; auto runs it except where torch's BLAS is MKL on an Intel CPU
    (MKL is faster there, and slower on AMD). Without the wheel the kernels would quietly run torch's BLAS."""
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    if intel and torch.backends.mkl.is_available():
        assert _blas.auto_choice() == "torch"
        assert _blas.blas() == _torchs_blas_name(), _blas.blas()
    else:
        assert _blas.auto_choice() == "openblas"
        assert _blas.blas().startswith("OpenBLAS"), _blas.blas()


def test_openblas_runs_the_kernels_for_this_cpu():
    _blas.use("openblas")
    try:
        name = _blas.blas()
    finally:
        _blas.use("auto")
    assert name.startswith("OpenBLAS"), name
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        assert "SkylakeX" in name
    elif {"avx2", "fma"} <= flags:
        assert "Haswell" in name


def test_the_users_openblas_settings_are_left_alone():
    """We set OPENBLAS_CORETYPE and OPENBLAS_NUM_THREADS only while our private copy loads."""
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None); libc.getenv.restype = ctypes.c_char_p\n"
        "before = (libc.getenv(b'OPENBLAS_CORETYPE'), libc.getenv(b'OPENBLAS_NUM_THREADS'))\n"
        "import torch_manualgrad\n"
        "after = (libc.getenv(b'OPENBLAS_CORETYPE'), libc.getenv(b'OPENBLAS_NUM_THREADS'))\n"
        "assert before == after, (before, after)\n"
        "assert os.environ.get('OPENBLAS_CORETYPE') == 'Haswell'\n"
        "print(torch_manualgrad._blas.blas())\n"
    )
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell", TORCH_MANUALGRAD_BLAS="openblas")
    env.pop("OPENBLAS_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _cpu_flags():
        assert "SkylakeX" in out.stdout  # the environment's Haswell was meant for numpy's OpenBLAS, not ours


def test_choice_by_environment_variable():
    code = "import torch_manualgrad; print(torch_manualgrad._blas.blas())"
    for choice, expected in (("torch", _torchs_blas_name()), ("openblas", "OpenBLAS")):
        env = dict(os.environ, TORCH_MANUALGRAD_BLAS=choice)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith(expected), (choice, out.stdout, out.stderr)
    env = dict(os.environ, TORCH_MANUALGRAD_BLAS="mkl")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "TORCH_MANUALGRAD_BLAS must be auto, openblas or torch" in out.stderr


def test_bad_choice():
    with pytest.raises(ValueError, match="must be auto, openblas or torch, but got 'mkl'"):
        _blas.use("mkl")


# Shapes that reach every matrix the kernels hand to BLAS, including one-row and one-column matrices
# (a single output channel, a single input channel, a single position) whose row strides BLAS checks.
CASES = [
    ConvCase(2, 3, 1, 1, (1, 1), (1, 1)),
    ConvCase(2, 2, 1, 5, (3, 3), (5, 4), padding=1),
    ConvCase(2, 2, 5, 1, (1, 1), (6, 7)),
    ConvCase(2, 9, 4, 6, (2, 2), (2, 2)),  # one position per image: multi-image blocks
    ConvCase(2, 2, 6, 4, (3, 3), (9, 9), groups=2, stride=2),
    ConvCase(2, 1, 16, 32, (3, 3), (64, 64), padding=1),  # cache tiles of one image
    ConvCase(2, 8, 64, 64, (3, 3), (7, 7), padding=1),  # the small-input backward
    ConvCase(1, 4, 8, 8, (1,), (33,)),  # pointwise
    ConvCase(2, 2, 8, 12, (1, 1), (30, 30)),  # pointwise, images cut into tiles of positions
    ConvCase(2, 8, 12, 20, (1, 1), (14, 14)),  # pointwise, each image multiplied where it lies
    ConvCase(2, 8, 12, 20, (1, 1), (7, 7)),  # pointwise, images gathered into blocks
    ConvCase(1, 1, 6, 5, (1,), (2000,), bias=False),
]


def _normwise_error(t, truth):
    return ((t.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_both_backends_compute_torchs_convolution(case, dtype, backend):
    """Output and gradients against torch's float64 results on the same values: within a small multiple of
    the error torch's own kernels make in this dtype (elementwise tolerances break down on long sums whose
    terms cancel)."""
    x, w, b = case.make_tensors("cpu", dtype, requires_grad=True, seed=3)
    go = case.make_grad_output("cpu", dtype, seed=4)
    leaves = [x, w, b]

    def run(fn, tensors, grad):
        out = fn(*tensors, **case.kwargs())
        return [out, *torch.autograd.grad(out, [t for t in tensors if t is not None], grad)]

    ours = run(case.tmg_fn(), leaves, go)
    theirs = run(case.torch_fn(), leaves, go)
    wide = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    truth = run(case.torch_fn(), wide, go.double())
    # In float64 the truth is torch's own result, so its error reads 0: allow a few rounding steps.
    floor = (64 if dtype == torch.float64 else 8) * torch.finfo(dtype).eps
    for name, o, t, exact in zip(("output", "grad_input", "grad_weight", "grad_bias"), ours, theirs, truth):
        err_ours, err_torch = _normwise_error(o, exact), _normwise_error(t, exact)
        assert err_ours <= 4 * err_torch + floor, (name, err_ours, err_torch)


@pytest.mark.parametrize("case", CASES[4:], ids=str)
def test_each_backend_bit_identical_across_thread_counts(case, backend, restore_num_threads):
    results = []
    for threads in (1, 2, 3, 8, 2):
        torch.set_num_threads(threads)
        x, w, b = case.make_tensors("cpu", torch.float32, requires_grad=True, seed=5)
        out = case.tmg_fn()(x, w, b, **case.kwargs())
        grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None],
                                    case.make_grad_output("cpu", torch.float32, seed=6))
        results.append([out.detach(), *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
