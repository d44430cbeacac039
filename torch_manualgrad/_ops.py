"""The registered ops, torch.ops.manualgrad.*: loads the C++/CUDA kernels and gives each op a fake
kernel, so that shapes propagate (meta tensors, torch.compile, torch.export) without running it.

Call path: functional.py → autograd.py → here (torch.ops.manualgrad.*) → csrc/cpu, csrc/cuda kernels.
"""
import torch

from . import _C  # noqa: F401  importing the library runs its TORCH_LIBRARY registrations
from . import _blas  # noqa: F401  importing it chooses the CPU kernels' BLAS

ops = torch.ops.manualgrad


# --- fake kernels ---------------------------------------------------------------------------------
# A fake kernel runs where no data exists: meta tensors, FakeTensorMode under torch.compile and
# torch.export. It raises exactly the errors the real kernels raise, by running their C++ checks (the
# ops.*_shape ops, csrc/shape_ops.cpp) on stand-ins with the arguments' shapes, dtypes and devices, and
# returns tensors of the shape those checks compute. Only where a size is symbolic (dynamic shapes) is the
# output size written out here as well, as SymInt arithmetic; tests/test_bad_input.py checks the two agree.


def _hint(size):
    """A concrete value for a size: itself, or a symbolic size's example value (None if it has none)."""
    if isinstance(size, int):
        return size
    return getattr(getattr(size, "node", None), "hint", None)


def _stand_in(t):
    """A real tensor with t's shape, dtype and device whose elements all share one storage element, so that
    even an enormous shape costs nothing; None where a size has no concrete value. A device this process
    cannot allocate on (tracing for CUDA without a GPU) is stood in for by the meta device."""
    if t is None:
        return None
    shape = [_hint(size) for size in t.shape]
    if any(size is None for size in shape):
        return None
    device = t.device
    if device.type not in ("cpu", "meta") and not (device.type == "cuda" and torch.cuda.is_available()):
        device = torch.device("meta")
    return torch.empty_strided(shape, [0] * len(shape), dtype=t.dtype, device=device)


def _checked_shape(check, tensors, *args):
    """Runs `check` (one of the ops.*_shape ops) on stand-ins for `tensors` and returns the shape it computes,
    or None where a stand-in cannot be made (a size with no example value)."""
    with _no_fake_mode():
        stand_ins = [_stand_in(t) for t in tensors]
        if any(s is None for s, t in zip(stand_ins, tensors) if t is not None):
            return None
        return check(*stand_ins, *args)


def _symbolic(*tensors):
    return any(not isinstance(size, int) for t in tensors if t is not None for size in t.shape)


def _no_fake_mode():
    """Leaves FakeTensorMode (if it is on) for the stand-ins, which must be real tensors to reach C++."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # a torch without it has no fake mode to leave
        import contextlib

        return contextlib.nullcontext()
    return unset_fake_temporarily()


def conv_output_size(size, kernel, stride, padding, dilation):
    """csrc/shape_checks.h's conv_output_size, for symbolic sizes."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size, kernel, stride, padding, dilation, ceil_mode):
    """csrc/shape_checks.h's pool_output_size, for symbolic sizes."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1  # // rounds towards -inf, as torch's
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


@torch.library.register_fake("manualgrad::conv_forward")
def _conv_forward_fake(input, weight, bias, stride, padding, dilation, groups):
    shape = _checked_shape(ops.conv_forward_shape, (input, weight, bias), stride, padding, dilation, groups)
    if _symbolic(input, weight) or shape is None:
        spatial = [
            conv_output_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
            for i in range(len(stride))
        ]
        shape = (input.shape[0], weight.shape[0], *spatial)
    return _empty_like_result(shape, input, len(stride))


def _channels_last_result(input, spatial_dims):
    """The CPU kernels' layout rule (csrc/shape_checks.h, channels_last_result): results are channels-last
    when the tensor a conv or max-pool starts from (a max-pool backward: grad_output) is a 4-d one of a 2-d op
    that suggests channels_last, or a 5-d one of a 3-d op that suggests channels_last_3d, as torch's are."""
    from .autograd import _suggests_channels_last

    return (input.device.type == "cpu" and spatial_dims in (2, 3) and input.dim() == spatial_dims + 2
            and _suggests_channels_last(input))


def _result_format(input, spatial_dims):
    """The memory format of the kernels' results for this input (see _channels_last_result)."""
    if not _channels_last_result(input, spatial_dims):
        return torch.contiguous_format
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def _empty_like_result(shape, input, spatial_dims, like=None):
    like = input if like is None else like
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=_result_format(input, spatial_dims))


@torch.library.register_fake("manualgrad::conv_backward")
def _conv_backward_fake(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    _checked_shape(ops.conv_backward_shape, (grad_output, input, weight), stride, padding, dilation, groups, output_mask)
    return (
        _empty_like_result(input.shape, input, len(stride)) if output_mask[0] else None,
        _empty_like_result(weight.shape, input, len(stride), like=weight) if output_mask[1] else None,
        grad_output.new_empty((weight.shape[0],)) if output_mask[2] else None,
    )


@torch.library.register_fake("manualgrad::max_pool_forward")
def _max_pool_forward_fake(input, kernel_size, stride, padding, dilation, ceil_mode, compute_indices=True):
    shape = _checked_shape(ops.max_pool_forward_shape, (input,), kernel_size, stride, padding, dilation, ceil_mode)
    if _symbolic(input) or shape is None:
        spatial = [
            pool_output_size(input.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
            for i in range(len(stride))
        ]
        shape = (input.shape[0], input.shape[1], *spatial)
    indices_shape = shape if compute_indices else (0,)
    layout = _result_format(input, len(stride))
    return (torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=layout),
            torch.empty(indices_shape, dtype=torch.long, device=input.device,
                        memory_format=layout if compute_indices else torch.contiguous_format))


@torch.library.register_fake("manualgrad::max_pool_backward")
def _max_pool_backward_fake(grad_output, indices, input_size, kernel_size, stride, padding, dilation, check_indices=True):
    _checked_shape(ops.max_pool_backward_shape, (grad_output, indices), input_size, kernel_size, stride, padding, dilation)
    return _empty_like_result(input_size, grad_output, len(stride))


# --- vmap rules (torch.func.vmap) -----------------------------------------------------------------
# A vmapped batch dimension is folded into the ops' own batch dimension N where the arithmetic allows
# (conv with a shared weight, max-pool); a batched weight becomes groups; everything else runs one
# slice at a time.


def _front(t, dim, size):
    """t with its vmapped dimension first (broadcast to `size` if it has none)."""
    if dim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(dim, 0)


def _fold(t):
    """(B, N, ...) → (B*N, ...)."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _unfold(t, size, inner):
    """(B*N, ...) → (B, N, ...), N given: with B = 0 it cannot be read off t (a vmap over an empty dimension, as
    jacrev and jacfwd make for an empty output or input)."""
    return t.reshape(size, inner, *t.shape[1:])


@torch.library.register_vmap("manualgrad::conv_forward")
def _conv_forward_vmap(info, in_dims, input, weight, bias, stride, padding, dilation, groups):
    size = info.batch_size
    input_dim, weight_dim, bias_dim = in_dims[:3]
    x = _front(input, input_dim, size)  # (B, N, C, *spatial)
    if (weight_dim is None and bias_dim is None) or size == 0:
        # a shared weight: the vmapped images are just more images (with no slices, any weight's shape will do)
        w = weight if weight_dim is None else weight.new_zeros(_front(weight, weight_dim, size).shape[1:])
        b = bias if bias is None or bias_dim is None else bias.new_zeros(_front(bias, bias_dim, size).shape[1:])
        out = ops.conv_forward(_fold(x), w, b, stride, padding, dilation, groups)
        return _unfold(out, size, x.shape[1]), 0
    # a weight per vmapped slice: put the slices side by side as groups of one convolution
    x = x.transpose(0, 1).reshape(x.shape[1], size * x.shape[2], *x.shape[3:])  # (N, B*C, *spatial)
    w = _front(weight, weight_dim, size)
    out_channels = w.shape[1]
    w = _fold(w)  # (B*C_out, C/g, *kernel)
    b = None if bias is None else _fold(_front(bias, bias_dim, size).unsqueeze(-1)).squeeze(-1)
    out = ops.conv_forward(x, w, b, stride, padding, dilation, groups * size)  # (N, B*C_out, *spatial)
    return out.reshape(out.shape[0], size, out_channels, *out.shape[2:]), 1


@torch.library.register_vmap("manualgrad::max_pool_forward")
def _max_pool_forward_vmap(info, in_dims, input, kernel_size, stride, padding, dilation, ceil_mode, compute_indices=True):
    size = info.batch_size
    x = _front(input, in_dims[0], size)
    out, idx = ops.max_pool_forward(_fold(x), kernel_size, stride, padding, dilation, ceil_mode, compute_indices)
    if not compute_indices:  # the empty placeholder has no batch dimension
        return (_unfold(out, size, x.shape[1]), idx), (0, None)
    return (_unfold(out, size, x.shape[1]), _unfold(idx, size, x.shape[1])), (0, 0)


@torch.library.register_vmap("manualgrad::max_pool_backward")
def _max_pool_backward_vmap(
    info, in_dims, grad_output, indices, input_size, kernel_size, stride, padding, dilation, check_indices=True
):
    size = info.batch_size
    go = _fold(_front(grad_output, in_dims[0], size))
    idx = _fold(_front(indices, in_dims[1], size))
    grad = ops.max_pool_backward(
        go, idx, [size * input_size[0], *input_size[1:]], kernel_size, stride, padding, dilation, check_indices
    )
    return _unfold(grad, size, input_size[0]), 0


@torch.library.register_vmap("manualgrad::conv_backward")
def _conv_backward_vmap(info, in_dims, grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    # Several arguments may carry their own slice, so this one goes slice by slice.
    size = info.batch_size
    tensors = [_front(t, d, size) for t, d in zip((grad_output, input, weight), in_dims[:3])]
    if size == 0:  # no slices: empty gradients of one slice's shapes (the bias's is C_out long)
        go, x, w = (t.new_empty(t.shape[1:]) for t in tensors)
        outs = tuple(t.new_empty((0, *t.shape)) if want else None
                     for want, t in zip(output_mask, (x, w, go.new_empty(w.shape[:1]))))
        return outs, tuple(None if o is None else 0 for o in outs)
    slices = [ops.conv_backward(*(t[b] for t in tensors), stride, padding, dilation, groups, output_mask) for b in range(size)]
    outs = tuple(None if slices[0][k] is None else torch.stack([s[k] for s in slices]) for k in range(3))
    return outs, tuple(None if o is None else 0 for o in outs)


# --- FLOP counts (torch.utils.flop_counter.FlopCounterMode) ---------------------------------------
# torch's own formulas for its convolution ops, so that a converted model counts what the original did: 2 ×
# batch × C_out × C_in/groups × the kernel's taps × the output positions for a forward (bias not counted), and
# for a backward that of each gradient asked for (the input gradient a transposed convolution's forward).
# Max-pool counts nothing, as torch's does. (torch.profiler's with_flops knows only aten's op names.)
try:
    from torch.utils.flop_counter import conv_flop_count, register_flop_formula
except ImportError:  # a torch without them: nothing to count for
    register_flop_formula = None

if register_flop_formula is not None:

    @register_flop_formula(ops.conv_forward)
    def _conv_forward_flops(input_shape, weight_shape, *_args, out_shape=None, **_kwargs):
        return conv_flop_count(input_shape, weight_shape, out_shape)

    @register_flop_formula(ops.conv_backward)
    def _conv_backward_flops(grad_output_shape, input_shape, weight_shape, _stride, _padding, _dilation, _groups,
                             output_mask, out_shape=None, **_kwargs):
        def swapped(shape):  # (N, C, ...) → (C, N, ...): the weight gradient as a convolution over the batch
            return [shape[1], shape[0], *shape[2:]]

        flops = 0
        if output_mask[0]:
            flops += conv_flop_count(grad_output_shape, weight_shape, out_shape[0], transposed=True)
        if output_mask[1]:
            flops += conv_flop_count(swapped(input_shape), swapped(grad_output_shape), swapped(out_shape[1]))
        return flops
