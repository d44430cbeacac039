"""Builds torch_manualgrad._C: the C++ (and, when available, CUDA) kernels behind torch.ops.manualgrad.

TORCH_MANUALGRAD_CUDA=auto|1|0 chooses the CUDA build: auto (default) builds it when torch is a CUDA
build and nvcc is found (no GPU needs to be visible); 1 insists on it; 0 builds the CPU-only extension.
TORCH_MANUALGRAD_SANITIZE=1 instruments the C++ with AddressSanitizer and UndefinedBehaviorSanitizer
(signed overflow included: -fno-wrapv undoes Python's -fwrapv); scripts/sanitize.sh (`make sanitize`)
builds such a copy apart from the normal one and runs the tests under it.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def use_cuda() -> bool:
    choice = os.environ.get("TORCH_MANUALGRAD_CUDA", "auto").strip().lower()
    if choice not in ("auto", "1", "0", "on", "off", "true", "false"):
        raise ValueError(f"TORCH_MANUALGRAD_CUDA must be auto, 1 or 0, but got TORCH_MANUALGRAD_CUDA={choice!r}")
    usable = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if choice in ("1", "on", "true"):
        if not usable:
            raise RuntimeError(
                "TORCH_MANUALGRAD_CUDA=1 but CUDA cannot be built here: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}"
            )
        return True
    return usable and choice == "auto"


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-wrapv", "-fno-omit-frame-pointer", "-g"]


def sanitize() -> bool:
    return os.environ.get("TORCH_MANUALGRAD_SANITIZE", "0").strip().lower() in ("1", "on", "true")


def extension():
    cxx_flags = ["-O1", "-fopenmp", *SANITIZE_FLAGS] if sanitize() else ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp", *(SANITIZE_FLAGS if sanitize() else []), *shared_libstdcxx()]
    cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    cuda_sources = sources("csrc/cuda/*.cu")
    if use_cuda() and cuda_sources:
        return cpp_extension.CUDAExtension(
            "torch_manualgrad._C",
            cpp_sources + cuda_sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension(
        "torch_manualgrad._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


def shared_libstdcxx() -> list[str]:
    """The libstdc++ shared library this process (torch) has loaded, as a link input, on Linux.

    On one GPU machine's image the link took a static libstdc++ instead (the extension listed no
    libstdc++ among its needed libraries), and that private copy, its locale never set up, crashed the
    process at the first error message our checks formatted. Naming torch's own libstdc++.so.6 makes
    the extension share it; the driver's later -lstdc++ then finds nothing left to pull in.
    """
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return [path]
    except OSError:
        pass
    return []


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
