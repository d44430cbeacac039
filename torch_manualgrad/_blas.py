"""Which BLAS our CPU convolutions multiply with: OpenBLAS from the scipy-openblas32 wheel, or torch's own.

TORCH_MANUALGRAD_BLAS=auto (default) takes torch's BLAS where that is MKL on an Intel processor, else
OpenBLAS when that wheel is installed, else torch's BLAS; =openblas insists on OpenBLAS (an
ImportError/RuntimeError if it cannot be loaded); =torch uses torch's.
Why: torch's bundled MKL runs its AVX2 code on AMD processors, at half the speed of OpenBLAS's AVX-512
kernels, while on Intel Xeons MKL is the faster of the two (10-50% on our GEMM shapes; benchmarks/NOTES.md).
Our copy of OpenBLAS is private to us and runs one thread per call, so it changes nothing for torch, numpy or
the user's thread settings. `blas()` says which one is in use.
"""
import os

import torch

from . import _C

__all__ = ["blas", "use"]


def _openblas_path():
    """The scipy-openblas32 wheel's library, found without importing the package: its import loads the library
    at once, before we could choose the kernels it runs (which OpenBLAS fixes when it loads)."""
    import importlib.util

    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scipy-openblas32 is not installed")
    lib_dir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    names = sorted(n for n in os.listdir(lib_dir) if n.startswith("libscipy_openblas") and ".so" in n)
    if not names:
        raise ImportError(f"scipy-openblas32 has no library in {lib_dir}")
    return os.path.join(lib_dir, names[0])


def cpuinfo(field):
    """The first processor's `field` in /proc/cpuinfo ('vendor_id' gives GenuineIntel, AuthenticAMD, ...), or
    '' where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def auto_choice():
    """What TORCH_MANUALGRAD_BLAS=auto means on this machine: 'torch' where torch's BLAS is MKL and the
    processor is Intel's (MKL's own AVX-512 kernels), else 'openblas' (falling back to torch's BLAS when the
    wheel is missing)."""
    if torch.backends.mkl.is_available() and cpuinfo("vendor_id") == "GenuineIntel":
        return "torch"
    return "openblas"


def use(choice):
    """Switch the CPU kernels' BLAS: 'openblas', 'torch' or 'auto' (as TORCH_MANUALGRAD_BLAS). Not while
    kernels run on other threads. Returns blas()."""
    if choice not in ("auto", "openblas", "torch"):
        raise ValueError(f"TORCH_MANUALGRAD_BLAS must be auto, openblas or torch, but got {choice!r}")
    if choice == "torch" or (choice == "auto" and auto_choice() == "torch"):
        _C._use_torch_blas()
        return blas()
    try:
        path = _openblas_path()
    except ImportError:
        if choice == "openblas":
            raise ImportError("TORCH_MANUALGRAD_BLAS=openblas needs the scipy-openblas32 package") from None
        _C._use_torch_blas()
        return blas()
    problem = _C._use_openblas(path)
    if problem:
        if choice == "openblas":
            raise RuntimeError(f"TORCH_MANUALGRAD_BLAS=openblas: {problem}")
        _C._use_torch_blas()
    return blas()


def blas():
    """The CPU kernels' BLAS in words: e.g. 'OpenBLAS 0.3.34 (SkylakeX kernels)', "torch's MKL (sgemm_, dgemm_)"
    (the MKL inside libtorch_cpu, called directly) or "torch's BLAS (at::mm)"."""
    return _C._blas()


use(os.environ.get("TORCH_MANUALGRAD_BLAS", "auto").strip().lower() or "auto")
