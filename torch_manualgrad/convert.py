"""convert(model) / revert(model): swap torch.nn conv and max-pool layers for ours, in place, and back.

Our modules are subclasses of torch.nn's that add no state, so a swap only changes each module's
class: parameters, buffers, device, hooks and optimizer references all stay as they are.
"""
import torch

from . import nn

_OURS = {
    torch.nn.Conv1d: nn.Conv1d,
    torch.nn.Conv2d: nn.Conv2d,
    torch.nn.MaxPool1d: nn.MaxPool1d,
    torch.nn.MaxPool2d: nn.MaxPool2d,
}
_TORCHS = {ours: theirs for theirs, ours in _OURS.items()}


def _swap(model, table):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module, but got model of type {type(model).__name__}")
    for module in model.modules():
        # Exact types only: a user's own subclass of nn.Conv2d may override forward on purpose.
        new_class = table.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
    return model


def convert(model):
    """Swap every torch.nn.Conv1d/Conv2d/MaxPool1d/MaxPool2d in `model` for ours, in place; returns model."""
    return _swap(model, _OURS)


def revert(model):
    """Undo convert(): swap our layers back to torch.nn's, in place; returns model."""
    return _swap(model, _TORCHS)
