"""torch_manualgrad: hand-written convolution and max-pooling, forward and backward, for PyTorch.

    import torch_manualgrad as tmg
    y = tmg.functional.conv2d(x, w, b, stride=2, padding=1)   # same signature as torch.nn.functional
    model = tmg.convert(model)                                 # swap nn.Conv*/MaxPool* layers for ours
    tmg.unconverted(model)                                     # the conv/pool layers left on torch's, and why
    with tmg.everywhere(): model(x)                            # torch's conv/pool functions run on ours
    print(tmg.verify(model, x).report())                       # ours against torch.nn's, layer by layer

Call path: functional → autograd (torch.autograd.Function) → _ops (torch.ops.manualgrad.*) → csrc kernels.
"""
from . import _ops, functional, nn, reference  # noqa: F401
from .convert import Unconverted, convert, revert, unconverted
from .routing import Everywhere, everywhere
from .verify import VerifyResult, verify

__version__ = "0.1.0"
__all__ = ["functional", "nn", "reference", "convert", "revert", "unconverted", "Unconverted", "everywhere",
           "Everywhere", "verify", "VerifyResult"]
