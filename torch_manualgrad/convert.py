"""convert(model) / revert(model): swap torch.nn conv and max-pool layers for ours, in place, and back;
unconverted(model): the conv and max-pool layers that convert() leaves on torch's implementation, and why.

Our modules are subclasses of torch.nn's that add no state, so a swap only changes each module's
class: parameters, buffers, device, hooks and optimizer references all stay as they are. A layer
parametrized with torch.nn.utils.parametrize (parametrizations.weight_norm, spectral_norm, ...) has a
generated class, Parametrized<Layer>, that holds the parametrized tensors as properties over the
layer's class; it is swapped by building the same class over the other base.
"""
from typing import NamedTuple

import torch
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from . import nn

__all__ = ["convert", "revert", "unconverted", "Unconverted"]

_OURS = {
    torch.nn.Conv1d: nn.Conv1d,
    torch.nn.Conv2d: nn.Conv2d,
    torch.nn.Conv3d: nn.Conv3d,
    torch.nn.ConvTranspose1d: nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d: nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d: nn.ConvTranspose3d,
    torch.nn.MaxPool1d: nn.MaxPool1d,
    torch.nn.MaxPool2d: nn.MaxPool2d,
    torch.nn.MaxPool3d: nn.MaxPool3d,
}
_TORCHS = {ours: theirs for theirs, ours in _OURS.items()}

# Conv and max-pool layers of torch.nn that we have no kernel for (their Lazy* forms are subclasses).
_NO_EQUIVALENT = (
    torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d,
    torch.nn.FractionalMaxPool2d, torch.nn.FractionalMaxPool3d,
)


class Unconverted(NamedTuple):
    """A layer that runs on torch's kernels after convert(): its qualified name in the model (as
    named_modules() gives it; "" is the model itself), its class name, and why it was left alone."""

    name: str
    type: str
    reason: str


def _parametrized_base(module):
    """The class a parametrized module had before torch.nn.utils.parametrize wrapped it, else None."""
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else None


def _swap(model, table):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module, but got model of type {type(model).__name__}")
    for module in model.modules():
        # Exact types only: a user's own subclass of nn.Conv2d may override forward on purpose.
        new_class = table.get(type(module))
        base = _parametrized_base(module)
        if new_class is None and base in table:
            # the generated class's own dict holds only the properties and copy/pickle hooks parametrize
            # added, so the same dict over the other base is the same parametrization of the other layer
            cls = type(module)
            own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            new_class = type(cls.__name__, (table[base],), own)
        if new_class is not None:
            module.__class__ = new_class
    return model


def _why_not(module):
    """Why convert() leaves this conv/max-pool layer alone, or None when it is converted or no such layer."""
    cls = type(module)
    if cls in _OURS or _parametrized_base(module) in _OURS or isinstance(module, tuple(_TORCHS)):
        return None
    if isinstance(module, _NO_EQUIVALENT):
        base = next(c for c in cls.__mro__ if c in _NO_EQUIVALENT)
        return f"torch_manualgrad has no {base.__name__}"
    base = next((c for c in cls.__mro__ if c in _OURS), None)
    if base is None:
        return None
    if isinstance(module, LazyModuleMixin):
        return f"lazy: it becomes a torch.nn.{base.__name__} at its first forward; convert after that"
    if _parametrized_base(module) is not None:
        cls = _parametrized_base(module)  # judge the layer under the parametrization
    own = [name for name in ("forward", "_conv_forward") if getattr(cls, name, None) is not getattr(base, name, None)]
    if own:
        return (f"a torch.nn.{base.__name__} subclass with its own {' and '.join(own)}, which runs as written "
                f"(it may compute something else)")
    return (f"a subclass of torch.nn.{base.__name__}; convert() swaps the exact torch.nn types only, since a "
            f"subclass may change what the layer computes")


def unconverted(model):
    """The conv and max-pool layers of `model` that convert() leaves on torch's kernels, as a list of
    Unconverted(name, type, reason) records in named_modules() order; empty when every one is converted.

    Listed: subclasses of torch.nn.Conv1d/2d/3d, ConvTranspose1d/2d/3d and MaxPool1d/2d/3d (e.g. timm's
    Conv2dSame or ScaledStdConv2d, which override forward), lazy layers not yet run, and max-pool layers we
    have no kernel for (adaptive and fractional max-pools). Layers
    parametrized with torch.nn.utils.parametrize are converted like the layer under the parametrization. Works before or after convert(). Calls of
    torch.nn.functional.conv2d/max_pool2d inside a forward are not layers and cannot be seen here;
    verify() finds those by running the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module, but got model of type {type(model).__name__}")
    found = []
    for name, module in model.named_modules():
        reason = _why_not(module)
        if reason is not None:
            found.append(Unconverted(name, type(module).__name__, reason))
    return found


def convert(model, *, strict=False):
    """Swap every torch.nn.Conv1d/2d/3d, ConvTranspose1d/2d/3d and MaxPool1d/2d/3d in `model` for ours, in place;
    returns model.

    Only those exact types are swapped; unconverted(model) lists the conv and max-pool layers left on
    torch's kernels, and why. strict=True raises ValueError (before changing anything) if there are any.
    What convert() cannot reach (subclasses with their own forward, F.conv2d/F.max_pool2d calls in a
    forward) runs on our kernels inside torch_manualgrad.everywhere().
    """
    if strict:
        left = unconverted(model)
        if left:
            lines = "\n".join(f"  {r.name or '(model)'} ({r.type}): {r.reason}" for r in left)
            raise ValueError(f"convert(strict=True): {len(left)} layers cannot be converted:\n{lines}")
    return _swap(model, _OURS)


def revert(model):
    """Undo convert(): swap our layers back to torch.nn's, in place; returns model."""
    return _swap(model, _TORCHS)
