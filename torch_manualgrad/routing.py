"""everywhere(): a context manager under which torch's own conv1d/2d/3d, conv_transpose1d/2d/3d and
max_pool1d/2d/3d compute with our kernels, whoever calls them: torch.nn layers, subclasses with their own forward
(timm's Conv2dSame, ScaledStdConv2d), and F.conv2d / F.max_pool2d calls written in a model's forward.

convert() swaps layers; it cannot reach a function call. everywhere() intercepts the calls instead, with
a torch.overrides.TorchFunctionMode, so it covers what convert() leaves on torch's kernels, for as long as
the block runs, on this thread only (the mode stack is per thread, as every TorchFunctionMode's).
"""
import collections
import warnings

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import functional
from ._ops import ops

__all__ = ["everywhere", "Everywhere"]


def _pool(ours, with_indices):
    """torch's max-pool entry points share our functions' leading arguments; what they return (the output,
    or output and indices) is fixed by the entry point, not by return_indices."""
    def call(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        return ours(input, kernel_size, stride, padding, dilation, ceil_mode, with_indices)
    return call


# torch's functions → (the name reported, ours with torch's signature). F.conv1d/2d/3d are torch.conv1d/2d/3d.
# F.max_pool2d (and 3d) dispatches on return_indices to two functions, which hand a TorchFunctionMode
# F.max_pool2d (with return_indices=False) and F.max_pool2d_with_indices. The torch.* and torch._C._nn entry
# points are reached by code that calls them directly.
_ROUTES = {
    torch.conv1d: ("F.conv1d", functional.conv1d),
    torch.conv2d: ("F.conv2d", functional.conv2d),
    torch.conv3d: ("F.conv3d", functional.conv3d),
    torch.conv_transpose1d: ("F.conv_transpose1d", functional.conv_transpose1d),
    torch.conv_transpose2d: ("F.conv_transpose2d", functional.conv_transpose2d),
    torch.conv_transpose3d: ("F.conv_transpose3d", functional.conv_transpose3d),
    F.max_pool1d: ("F.max_pool1d", functional.max_pool1d),
    F.max_pool2d: ("F.max_pool2d", functional.max_pool2d),
    F.max_pool1d_with_indices: ("F.max_pool1d", _pool(functional.max_pool1d, True)),
    torch.max_pool1d: ("torch.max_pool1d", _pool(functional.max_pool1d, False)),
    torch.max_pool1d_with_indices: ("torch.max_pool1d_with_indices", _pool(functional.max_pool1d, True)),
    F.max_pool2d_with_indices: ("F.max_pool2d", _pool(functional.max_pool2d, True)),
    torch.max_pool2d: ("torch.max_pool2d", _pool(functional.max_pool2d, False)),
    torch._C._nn.max_pool2d_with_indices: ("torch.max_pool2d_with_indices", _pool(functional.max_pool2d, True)),
    F.max_pool3d: ("F.max_pool3d", functional.max_pool3d),
    F.max_pool3d_with_indices: ("F.max_pool3d", _pool(functional.max_pool3d, True)),
    torch.max_pool3d: ("torch.max_pool3d", _pool(functional.max_pool3d, False)),
    torch._C._nn.max_pool3d_with_indices: ("torch.max_pool3d_with_indices", _pool(functional.max_pool3d, True)),
}


def _dtypes_taken():
    """The dtypes our conv and max-pool kernels take, asked once of the ops' own argument checks (the *_shape
    ops, csrc/shape_ops.cpp) on one-element stand-ins."""
    candidates = [t for t in vars(torch).values() if isinstance(t, torch.dtype)]

    def taken(check, dtype):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
                check(torch.empty_strided((1, 1, 1, 1), (0, 0, 0, 0), dtype=dtype))
        except RuntimeError:  # refused by our checks, or a dtype no plain tensor can have (quantized ones)
            return False
        return True

    def conv(t):
        return ops.conv_forward_shape(t, t, None, [1, 1], [0, 0], [1, 1], 1)

    def pool(t):
        return ops.max_pool_forward_shape(t, [1, 1], [1, 1], [0, 0], [1, 1], False)

    return (frozenset(d for d in candidates if taken(conv, d)), frozenset(d for d in candidates if taken(pool, d)))


_CONV_DTYPES, _POOL_DTYPES = _dtypes_taken()


def _refused_when_compiling(name, args, kwargs):
    """Under torch.compile a call ours refuses cannot be handed to torch afterwards (dynamo stops at the
    failing call), so there the mode decides beforehand, by the input's device and dtype; None: serve it."""
    input = args[0] if args else kwargs.get("input")
    if not isinstance(input, torch.Tensor):
        return None
    dtypes = _CONV_DTYPES if "conv" in name else _POOL_DTYPES
    if input.device.type not in ("cpu", "cuda") or input.dtype not in dtypes:
        return (f"no kernel of ours for {input.dtype} on {input.device.type} (decided before the call, under "
                f"torch.compile)")
    return None


# What ours raises where it cannot serve a call that torch may serve (a dtype or device without our kernel,
# forward-mode AD, an argument type we do not take): the call then goes to torch's function.
_NOT_SERVED = (RuntimeError, TypeError, ValueError, NotImplementedError)


class Everywhere(TorchFunctionMode):
    """The TorchFunctionMode behind everywhere(); counts what it did.

    served: Counter of the calls ours computed, by torch's function name ("F.conv2d", "F.max_pool2d", ...).
    left: Counter of the calls left to torch, by (name, the first line of what ours raised).
    on_call: if given, called as on_call(name, served, reason) for each intercepted call (reason is None
    when ours served it).
    """

    def __init__(self, on_call=None):
        super().__init__()
        self.served = collections.Counter()
        self.left = collections.Counter()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is None:
            return func(*args, **kwargs)
        name, ours = route
        if torch.compiler.is_compiling():
            reason = _refused_when_compiling(name, args, kwargs)
            if reason is not None:
                self._count(name, reason)
                return func(*args, **kwargs)
        # While this runs the mode is off (torch pops it for the call), so the torch functions ours uses
        # inside (padding, reshapes) are torch's, and ours is not intercepted again.
        try:
            result = ours(*args, **kwargs)
        except _NOT_SERVED as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        else:
            self._count(name, None)
            return result
        self._count(name, reason)
        # outside the except block: where torch refuses the call too, its error is raised on its own
        return func(*args, **kwargs)

    def _count(self, name, reason):
        if reason is None:
            self.served[name] += 1
        else:
            self.left[(name, reason)] += 1
        if self.on_call is not None:
            self.on_call(name, reason is None, reason)


def everywhere(on_call=None):
    """A context manager: inside it, every call of torch's conv1d/2d/3d, conv_transpose1d/2d/3d and max_pool1d/2d/3d
    functions (torch.nn.functional's, torch.*'s, and so torch.nn's layers and any subclass or model code
    that calls them) computes with our kernels, with our gradients.

        with torch_manualgrad.everywhere() as mode:
            loss = model(x).sum()          # an unconverted model: its conv and pool layers run on ours
        loss.backward()                    # gradients flow through our backward
        mode.served                        # Counter({'F.conv2d': 12, 'F.max_pool2d': 3}); mode.left: refused

    When to use it rather than convert(): convert() swaps layers once, for good, and costs nothing per call;
    prefer it. everywhere() reaches what convert() cannot: F.conv2d / F.max_pool2d calls inside a forward
    (Inception's pools, torchvision's FPN LastLevelMaxPool) and nn.Conv2d subclasses with their own forward
    (timm's Conv2dSame, nf_resnet's ScaledStdConv2d), which tmg.unconverted(model) lists; it changes no
    module, and ends with the block. Use both for full coverage: convert(model), then run it under
    everywhere(). verify(model, x, everywhere=True) checks a model that way.

    Left to torch: a call ours refuses (ours raising RuntimeError, TypeError, ValueError or
    NotImplementedError: a dtype or device we have no kernel for, forward-mode AD, an argument of a type we
    do not take) is computed by torch's function instead, and counted in `left`; where torch refuses it
    too, torch's error is raised, as without the mode. Under torch.compile, where a refusal cannot be
    caught, calls whose input has a dtype or device we have no kernel for go to torch beforehand; any other
    refusal there is ours, raised by the compiled call. Functions not listed above (torch.convolution, adaptive
    and fractional max-pools) are never intercepted.

    The mode covers the thread that enters it (TorchFunctionModes are per thread), nests (the innermost
    serves; an outer one sees ours and lets it pass), composes with other TorchFunctionModes (a mode
    entered inside it sees torch's functions first; ours calls torch functions only with this mode off, so
    it never recurses into itself), and works under torch.compile (dynamo traces the mode when the compiled
    call runs inside it). Under torch.fx.symbolic_trace it records our functions in the graph.

    on_call: optional, called as on_call(name, served, reason) for each intercepted call.
    """
    return Everywhere(on_call)


def active():
    """Whether an everywhere() mode is on this thread's TorchFunctionMode stack."""
    # torch has no public reader of the mode stack; this one has been there since modes were added
    return any(isinstance(mode, Everywhere) for mode in torch.overrides._get_current_function_mode_stack())
