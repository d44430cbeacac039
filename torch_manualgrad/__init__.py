"""torch_manualgrad: hand-written convolution and max-pooling, forward and backward, for PyTorch.

    import torch_manualgrad as tmg
    y = tmg.functional.conv2d(x, w, b, stride=2, padding=1)   # same signature as torch.nn.functional
    model = tmg.convert(model)                                 # swap nn.Conv*/MaxPool* layers for ours

Call path: functional → autograd (torch.autograd.Function) → _ops (torch.ops.manualgrad.*) → csrc kernels.
"""
from . import _ops, functional, nn, reference  # noqa: F401
from .convert import convert, revert
from .verify import VerifyResult, verify

__version__ = "0.1.0"
__all__ = ["functional", "nn", "reference", "convert", "revert", "verify", "VerifyResult"]
