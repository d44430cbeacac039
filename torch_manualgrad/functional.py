"""The functional API: conv1d, conv2d, conv3d, conv_transpose1d, conv_transpose2d, conv_transpose3d,
max_pool1d, max_pool2d, max_pool3d with torch.nn.functional's signatures.

Here the Python-level arguments are normalised (ints to tuples, 'same'/'valid' padding, unbatched
input), complex convolutions are split into real ones (_complex.py), and outputs are laid out as torch
lays out its own (channels-last by torch's rule); everything else — shape checks, the arithmetic —
happens in the registered ops.
Call path: here → autograd.py → _ops.py → csrc kernels; calls that autograd need not record
(inference, torch.no_grad), and every call under torch.compile, go from here straight to _ops.py (the ops'
registered autograd runs autograd.py's formulas: see call_path there).

Like torch.nn.functional's, each function first offers the call to __torch_function__ overrides
(has_torch_function/handle_torch_function): so torch.fx's tracer records it as one call_function node
of ours (a converted model traces with symbolic_trace), and tensor subclasses and TorchFunctionModes
see our function by name.
"""
import math
import operator
import warnings

import torch
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_unary

from . import _exporting
from ._complex import complex_conv
from ._ops import ops
from .autograd import (BELOW, FUNCTION, OP, ConvBackwardFunction, ConvFunction, MaxPoolFunction,
                       _suggests_channels_last, below_autograd, call_path, channels_last_format,
                       add_channel_bias, conv_keeps_channels_last, inside_vmap, suggests_channels_last_as_2d,
                       with_contiguous_strides)

__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "max_pool1d",
           "max_pool2d", "max_pool3d"]

_TF = torch.nn.functional
# torch's own functions of each rank, which the exporters know (_exporting.py)
_TORCH_CONV = {1: _TF.conv1d, 2: _TF.conv2d, 3: _TF.conv3d}
_TORCH_CONV_TRANSPOSE = {1: _TF.conv_transpose1d, 2: _TF.conv_transpose2d, 3: _TF.conv_transpose3d}
_TORCH_MAX_POOL = {1: _TF.max_pool1d, 2: _TF.max_pool2d, 3: _TF.max_pool3d}


def _index(value):
    """value as a Python int where torch's argument parser takes it as one: an int, or anything with
    __index__ (numpy's integers, a 0-d integer tensor: sizes computed with numpy are passed so); bools,
    floats, and SymInts are left as they are, for the checks below to judge as before."""
    if isinstance(value, (int, float, torch.SymInt)) or not hasattr(type(value), "__index__"):
        return value
    try:
        return operator.index(value)
    except TypeError:  # numpy's bool_, a tensor of several elements or of floats
        return value


def _expand(value, dims, name, op):
    """An int or a 1-/dims-long sequence of ints → a dims-long list, as torch accepts them."""
    # the usual cases first, without the general checks' cost (these run on every call)
    kind = type(value)
    if kind is int:
        return [value] * dims
    if (kind is tuple or kind is list) and len(value) == dims:
        for v in value:
            if type(v) is not int:
                break
        else:
            return list(value)
    value = _index(value)
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list, torch.Size)):
        raise TypeError(f"{op}: expected {name} to be an int or a tuple of {dims} ints, but got {name}={value!r}")
    values = [value] if isinstance(value, int) else [_index(v) for v in value]
    if len(values) == 1:
        values = values * dims
    if len(values) != dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise RuntimeError(_length_message(op, name, dims, values, value))
    return values


def _length_message(op, name, dims, values, value):
    """torch's words for an argument with the wrong number of entries (its tests match them), then ours."""
    if op.startswith("conv"):
        return (f"{op}: expected {name} to be a single integer value or a list of {dims} values to match the "
                f"convolution dimensions, but got {name}={values}")
    if op == "max_pool1d":
        allowed = "None, an int, list of ints, or tuple of ints" if name == "stride" else "an int, list of ints or tuple of ints"
        return f"max_pool1d() {name} must be {allowed} of size 1 but got size {len(values)} ({name}={value!r})"
    allowed = {"stride": "either be omitted, a single int,", "dilation": "be either a single int,"}.get(name, "either be a single int,")
    count = {2: "two", 3: "three"}[dims]
    return f"{op}: {name} must {allowed} or a tuple of {count} ints (got {name}={value!r})"


def _groups(op, groups):
    groups = _index(groups)
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)):
        # torch's parser refuses these with a TypeError; the op would take True for 1
        raise TypeError(f"{op}: expected groups to be an int, but got groups={groups!r}")
    return groups


def _check_tensors(op, input, weight, bias):
    # Everything else about the tensors (devices, dtypes, shapes) is checked by the ops themselves, in
    # csrc/shape_checks.h, whichever kernel the dispatcher picks (the fake kernel included).
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if name == "bias" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: expected {name} to be a Tensor, but got {name} of type {type(t).__name__}")


def _batched(op, input, dims):
    if input.dim() not in (dims + 1, dims + 2):
        # torch's words first (its tests match them), then ours
        if op.startswith("conv"):
            torch_words = (f"Expected {dims + 1}D (unbatched) or {dims + 2}D (batched) input to {op}, "
                           f"but got input of size: {list(input.shape)}")
        elif dims == 1:
            torch_words = ("max_pool1d: Expected 2D or 3D (batch mode) tensor with optional 0 dim batch size for input, "
                           f"but got:{list(input.shape)}")
        else:
            torch_words = f"non-empty {dims + 1}D or {dims + 2}D (batch mode) tensor expected for input"
        raise RuntimeError(
            f"{torch_words} ({op}: expected input to be {dims + 1}-D (unbatched) or {dims + 2}-D (batched), "
            f"but got input of shape {list(input.shape)})"
        )
    unbatched = input.dim() == dims + 1
    return (input.unsqueeze(0) if unbatched else input), unbatched


def _as_channels_last(t, dims):
    """t laid out channels-last with torch's exact strides: a 4-d tensor as torch.channels_last, a 5-d one as
    torch.channels_last_3d, a 3-d one as the 4-d one of height 1. Where a dimension of size 1 makes t
    channels-last already, contiguous() keeps its strides; they are then rewritten (the same memory order, no
    copy) to those torch gives its outputs."""
    if (dims != 1 and t.dim() == dims + 2 and 1 not in t.shape and 0 not in t.shape
            and t.is_contiguous(memory_format=channels_last_format(t.dim()))):
        return t  # dense channels-last with no sizes of 1: torch's strides already (the usual case, on every call)
    t4 = t.unsqueeze(2) if dims == 1 else t
    t4 = t4.contiguous(memory_format=channels_last_format(t4.dim()))
    strides, span = [1] * t4.dim(), t4.shape[1]  # C's stride is 1; each dimension's from W back to N, the span
    for d in range(t4.dim() - 1, -1, -1):        # of those after it in memory
        if d != 1:
            strides[d], span = span, span * t4.shape[d]
    if t4.stride() != tuple(strides) and t4.numel() > 0:
        t4 = t4.as_strided(t4.shape, strides)
    return t4.squeeze(2) if dims == 1 else t4


def _conv_channels_last(input, weight, dims, stride, dilation, groups, output_padding=None):
    """Whether torch lays out this convolution's output channels-last: when the input or the weight
    suggests it, unless the input is empty or (3-d) torch's kernel for it returns contiguous results
    (autograd.conv_keeps_channels_last). A 1-d input is made contiguous first, which keeps the strides of one
    that counts as contiguous already through a size of 1 (a length-1 or 1-channel input may then suggest
    channels-last as a 4-d one of height 1)."""
    if input.numel() == 0 or inside_vmap():
        return False
    if dims == 1:
        # the strides torch's contiguous() leaves, without a copy: the input's own, or a fresh tensor's
        as_made = input if input.is_contiguous() else torch.empty(input.shape, dtype=input.dtype, device="meta")
        return (weight.dim() == 3 and suggests_channels_last_as_2d(weight)) or suggests_channels_last_as_2d(as_made)
    return ((_suggests_channels_last(input) or _suggests_channels_last(weight))
            and conv_keeps_channels_last(input, weight, stride, dilation, groups, output_padding))


def _in_torchs_layout(output, channels_last, dims):
    """The output laid out as torch lays out its own: channels-last (_as_channels_last), or contiguous where
    the CPU kernels computed a channels-last 3-d input in its layout but torch's float64 kernel does not."""
    if channels_last:
        return _as_channels_last(output, dims)
    if dims == 3 and not inside_vmap():
        return output.contiguous()
    return output


def _unbatched_channels_last_3d(t):
    """Whether torch's max_pool3d lays out the result of an unbatched (C, D, H, W) input channels-last, as the
    slice of a channels_last_3d batch: when its memory runs C, W, H, D (sizes of 1 anywhere), unless it is
    contiguous as well."""
    return not t.is_contiguous() and t.unsqueeze(0).is_contiguous(memory_format=torch.channels_last_3d)


def _pool_channels_last(input, dims, unbatched, with_indices):
    """Whether torch lays out this max-pool's output (and indices) channels-last: as the input suggests; an
    unbatched input never (one image of a channels_last_3d batch aside, which _max_pool sees to). A 1-d input is
    seen as height 1 where torch's max_pool1d goes through its 2-d kernel (indices wanted, a gradient to come, or
    not the CPU), an unbatched one as an unbatched 2-d input; its CPU-only path returns contiguous."""
    if inside_vmap():
        return False
    if dims == 1:
        return not unbatched and (with_indices or input.device.type != "cpu") and suggests_channels_last_as_2d(input)
    return not unbatched and _suggests_channels_last(input)


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast(input, weight, bias):
    """Inside torch.autocast, a convolution runs in the autocast dtype, as torch's does: float32 tensors
    are cast (float64 ones are left alone, as autocast leaves them); the casts are differentiable, so
    gradients reach float32 parameters as float32."""
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():  # (one cheap check on every call outside autocast)
        return input, weight, bias
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or t.dtype == torch.float64 or not t.is_floating_point() else t.to(dtype)

    return cast(input), cast(weight), cast(bias)


def _conv(dims, op, input, weight, bias, stride, padding, dilation, groups):
    if _exporting.exporting_to_onnx():
        return _TORCH_CONV[dims](input, weight, bias, stride, padding, dilation, groups)
    _check_tensors(op, input, weight, bias)
    input, weight, bias = _autocast(input, weight, bias)
    stride = _expand(stride, dims, "stride", op)
    dilation = _expand(dilation, dims, "dilation", op)
    groups = _groups(op, groups)
    input, unbatched = _batched(op, input, dims)
    if isinstance(padding, str):
        input, padding = _string_padding(op, padding, input, weight, stride, dilation, dims)
    else:
        padding = _expand(padding, dims, "padding", op)

    geometry = (stride, padding, dilation, groups)
    if input.is_complex() and weight.dtype == input.dtype and (bias is None or bias.dtype == input.dtype):
        output = complex_conv(lambda x, w, b=None: _real_conv(x, w, b, geometry), input, weight, bias)
    else:  # real, or dtypes that differ: the op's checks report those
        output = _real_conv(input, weight, bias, geometry)
    output = _in_torchs_layout(output, _conv_channels_last(input, weight, dims, stride, dilation, groups), dims)
    return output.squeeze(0) if unbatched else output


def _real_conv(x, w, b, geometry):
    path = call_path(x, w, b)
    if path == FUNCTION:
        return ConvFunction.apply(x, w, b, *geometry)
    if path == OP:  # the op's autograd is ConvFunction's formulas
        return ops.conv_forward(x, w, b, *geometry)
    return below_autograd(ops.conv_forward, x, w, b, *geometry)


def _string_padding(op, padding, input, weight, stride, dilation, dims):
    """'valid' is no padding; 'same' pads so that output size = input size (stride 1 only). An even
    kernel needs one more zero on the right than on the left: like torch, that extra column is padded
    onto the input and the rest is passed to the kernel as symmetric padding."""
    if padding == "valid":
        return input, [0] * dims
    if padding != "same":
        raise ValueError(f"{op}: Invalid padding string: {padding!r} (padding should be one of {{'valid', 'same'}})")
    if any(s != 1 for s in stride):
        raise RuntimeError(f"{op}: padding='same' is not supported for strided convolutions (got stride={stride})")
    if weight.dim() != dims + 2:
        raise RuntimeError(f"{op}: expected weight to be {dims + 2}-D, but got weight of shape {list(weight.shape)}")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    left = [t // 2 for t in total]
    extra = [t - 2 * l for t, l in zip(total, left)]
    if any(extra):
        _warn_same_padding_copy()
        input = torch.nn.functional.pad(input, [v for e in reversed(extra) for v in (0, e)])
    return input, left


_warned_same_padding_copy = False


def _warn_same_padding_copy():
    """torch's own warning for the padded copy an uneven 'same' needs, and like torch's once a process (not
    while torch.compile traces: a warning there would break the graph)."""
    global _warned_same_padding_copy
    if not _warned_same_padding_copy and not torch.compiler.is_compiling():
        _warned_same_padding_copy = True
        warnings.warn("Using padding='same' with even kernel lengths and odd dilation may require a zero-padded "
                      "copy of the input be created", UserWarning, stacklevel=5)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv1d computed by our kernels."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(conv1d, (input, weight, bias), input, weight, bias, stride, padding, dilation,
                                     groups)
    return _conv(1, "conv1d", input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d computed by our kernels."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(conv2d, (input, weight, bias), input, weight, bias, stride, padding, dilation,
                                     groups)
    return _conv(2, "conv2d", input, weight, bias, stride, padding, dilation, groups)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv3d computed by our kernels."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(conv3d, (input, weight, bias), input, weight, bias, stride, padding, dilation,
                                     groups)
    return _conv(3, "conv3d", input, weight, bias, stride, padding, dilation, groups)


# --- transposed convolution ------------------------------------------------------------------------------
# A transposed convolution is no new arithmetic: it is a convolution's input gradient. Each input value of
# the transposed convolution plays the part of an output delta, and is spread through the weight into the
# slice of the (larger) output its placement covers: col2im. So its forward is our conv_backward op asked
# for the input gradient only; its input gradient is a convolution forward; its weight gradient is the
# convolution's weight gradient with the two roles swapped (the transposed convolution's output gradient
# as the convolution's input, its input as the output delta). ConvBackwardFunction already has exactly
# those formulas (autograd.py), so gradients, double backward and tangents all come from there.


def _transposed_output_sizes(input, weight, stride, padding, output_padding, dilation):
    return [(i - 1) * s - 2 * p + d * (k - 1) + op + 1
            for i, k, s, p, op, d in zip(input.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)]


# ATen's names of dtypes, as the C++ checks print them (csrc/shape_checks.h)
_ATEN_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
               torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble", torch.int64: "Long",
               torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}


def _aten_name(dtype):
    return _ATEN_NAMES.get(dtype, str(dtype))


def _check_transposed_tensors(op, input, weight, bias):
    """The device and dtype checks conv_backward would make, worded as csrc/shape_checks.h words them for a
    convolution, but named after the transposed convolution the caller called."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{op}: expected input and {name} to be on the same device, but got input on "
                               f"{input.device} and {name} on {t.device}")
    a, w = _aten_name(input.dtype), _aten_name(weight.dtype)
    if weight.dtype != input.dtype:
        raise RuntimeError(f"{op}: expected scalar type {a} but found {w} (expected input and weight to have the "
                           f"same dtype, but got input {a} and weight {w})")
    if bias is not None and bias.dtype != input.dtype:
        b = _aten_name(bias.dtype)
        raise RuntimeError(f"{op}: Input type ({a.lower()}) and bias type ({b.lower()}) should be the same (expected "
                           f"input and bias to have the same dtype, but got input {a} and bias {b})")
    if not (input.is_floating_point() or input.is_complex()):
        raise RuntimeError(f"{op}: expected a floating-point input of dtype float32, float64, float16 or bfloat16, "
                           f"but got input of dtype {a}")


def _as_torch_shows(values, dims):
    """Per-dimension values as torch's transposed-convolution messages show them: a 1-d one's as those of the 2-d
    convolution of height 1 it computes."""
    return list(values) if dims > 1 else [1, *values]


def _check_transposed(op, dims, input, weight, bias, stride, padding, output_padding, dilation, groups):
    """torch's checks of a transposed convolution's arguments, in torch's words (its tests match them)."""
    _check_transposed_tensors(op, input, weight, bias)
    if weight.dim() != dims + 2:
        raise RuntimeError(f"{op}: expected weight to be {dims + 2}-D (in_channels, out_channels/groups, kernel), "
                           f"but got weight of shape {list(weight.shape)}")
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"non-positive stride is not supported ({op}: got stride={stride})")
    if any(p < 0 for p in padding):
        raise RuntimeError(f"negative padding is not supported ({op}: got padding={padding})")
    if any(p < 0 for p in output_padding):
        raise RuntimeError(f"negative output_padding is not supported ({op}: got output_padding={output_padding})")
    if any(d <= 0 for d in dilation):
        # torch's words, with its names of the entries (a 1-d one as 2-d, of height 1)
        shown = _as_torch_shows(dilation, dims)
        names = ("depth", "height", "width")[3 - len(shown):]
        got = ", ".join(f"dilation_{name}: {d}" for name, d in zip(names, shown))
        raise RuntimeError(f"dilation should be greater than zero, but got {got} ({op}: got dilation={dilation})")
    if groups <= 0:
        raise RuntimeError(f"non-positive groups is not supported ({op}: got groups={groups})")
    if weight.shape[0] < groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be at least {groups} at dimension 0, but got "
                           f"weight of size {list(weight.shape)} instead ({op})")
    if weight.numel() == 0:
        what = ("5D (n_output_plane x n_input_plane x kernel_depth x kernel_height x kernel_width) tensor expected for "
                "weight" if dims == 3 else f"{dims + 2}D weight tensor expected")
        raise RuntimeError(f"non-empty {what}, but got: {list(weight.shape)} ({op})")
    if weight.shape[0] % groups != 0:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, but "
                           f"got weight of size [{list(weight.shape)}] instead")
    if input.shape[1] != weight.shape[0]:
        raise RuntimeError(f"Given transposed=1, weight of size {list(weight.shape)}, expected input{list(input.shape)} "
                           f"to have {weight.shape[0]} channels, but got {input.shape[1]} channels instead")
    out_channels = weight.shape[1] * groups
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise RuntimeError(f"Given transposed=1, weight of size {list(weight.shape)}, expected bias to be "
                           f"1-dimensional with {out_channels} elements, but got bias of size {list(bias.shape)} instead")
    if any(op_ >= max(s, d) for op_, s, d in zip(output_padding, stride, dilation)):
        names = ("height", "width")[2 - dims:] if dims <= 2 else ("depth", "height", "width")
        got = " ".join(f"output_padding_{n}: {v}" for n, v in zip(names, output_padding))
        got += " " + " ".join(f"stride_{n}: {v}" for n, v in zip(names, stride))
        got += " " + " ".join(f"dilation_{n}: {v}" for n, v in zip(names, dilation))
        raise RuntimeError(f"output padding must be smaller than either stride or dilation, but got {got}")
    if input.shape[0] != 0 and input.shape[1] != 0 and any(i == 0 for i in input.shape[2:]):
        raise RuntimeError(f"Only zero batch or zero channel inputs are supported, but got input shape: {list(input.shape)}")
    sizes = _transposed_output_sizes(input, weight, stride, padding, output_padding, dilation)
    # torch refuses an output without positions, except for an empty input (its float32 CPU path, oneDNN's,
    # returns an empty tensor instead: we refuse it in every dtype, as torch's own check does)
    if any(o < 0 for o in sizes) or (input.numel() > 0 and 0 in sizes):
        shown_in, shown_out = _as_torch_shows(input.shape[2:], dims), _as_torch_shows(sizes, dims)
        raise RuntimeError(f"Given input size per channel: ({' x '.join(map(str, shown_in))}). Calculated "
                           f"output size per channel: ({' x '.join(map(str, shown_out))}). Output size is too small")
    shape = [input.shape[0], weight.shape[1] * groups, *sizes]
    if all(isinstance(v, int) for v in shape) and math.prod(shape[1:]) * max(shape[0], 1) >= 2 ** 63:
        # (a stand-in of that shape could not even be made: torch's words would be "numel: integer multiplication
        # overflow")
        raise RuntimeError(f"{op}: the output of shape {shape} would have more elements than int64 can count "
                           f"(input of shape {list(input.shape)}, weight of shape {list(weight.shape)}, stride={stride}, "
                           f"padding={padding}, output_padding={output_padding}, dilation={dilation})")
    return sizes


def _conv_input_gradient(delta, weight, output_shape, stride, padding, dilation, groups, channels_last=False):
    """The input gradient of a convolution whose input has `output_shape`, at output deltas `delta`: what a
    transposed convolution computes. Through ConvBackwardFunction, so that it is differentiable in delta and
    weight. The op takes the convolution's input for its shape (and, on the CPU, its layout) alone, and reads
    its values only for the weight gradient, which is never asked for here: a zero-strided view stands in for
    it, or, for a channels-last result on the CPU, an unfilled channels-last tensor, so that the kernels
    compute in channels-last (csrc/shape_checks.h, channels_last_result) with no copies either way."""
    if channels_last and delta.device.type == "cpu" and len(output_shape) in (4, 5):
        shape_of_input = torch.empty(output_shape, dtype=delta.dtype, device=delta.device,
                                     memory_format=channels_last_format(len(output_shape)))
    else:
        shape_of_input = delta.new_zeros(()).expand(output_shape)
    # The convolution of an input this size has as many outputs as delta has, except where output_padding
    # reaches past a stride (it may when the dilation is larger): delta gets zero deltas for those outputs.
    conv_sizes = [(o + 2 * p - d * (k - 1) - 1) // s + 1
                  for o, k, s, p, d in zip(output_shape[2:], weight.shape[2:], stride, padding, dilation)]
    extra = [c - i for c, i in zip(conv_sizes, delta.shape[2:])]
    if any(extra):
        delta = torch.nn.functional.pad(delta, [v for e in reversed(extra) for v in (0, e)])
    geometry = (stride, padding, dilation, groups)
    mask = [True, False, False]
    path = call_path(delta, weight)
    if path == FUNCTION:
        return ConvBackwardFunction.apply(delta, shape_of_input, weight, *geometry, mask)[0]
    if path == OP:  # the op's autograd is ConvBackwardFunction's formulas
        return ops.conv_backward(delta, shape_of_input, weight, *geometry, mask)[0]
    return below_autograd(ops.conv_backward, delta, shape_of_input, weight, *geometry, mask)[0]


def _conv_transpose(dims, op, input, weight, bias, stride, padding, output_padding, groups, dilation):
    if _exporting.exporting_to_onnx() or torch.jit.is_tracing():  # torch's, which the exporters know (_exporting.py)
        return _TORCH_CONV_TRANSPOSE[dims](input, weight, bias, stride, padding, output_padding, groups, dilation)
    _check_tensors(op, input, weight, bias)
    input, weight, bias = _autocast(input, weight, bias)
    if isinstance(padding, str):  # torch's parser refuses 'same' and 'valid' here
        raise TypeError(f"{op}(): argument 'padding' must be tuple of ints, not str")
    stride = _expand(stride, dims, "stride", op)
    padding = _expand(padding, dims, "padding", op)
    output_padding = _expand(output_padding, dims, "output_padding", op)
    dilation = _expand(dilation, dims, "dilation", op)
    groups = _groups(op, groups)
    input, unbatched = _batched(op, input, dims)
    sizes = _check_transposed(op, dims, input, weight, bias, stride, padding, output_padding, dilation, groups)
    output_shape = [input.shape[0], weight.shape[1] * groups, *sizes]
    channels_last = _conv_channels_last(input, weight, dims, stride, dilation, groups, output_padding)
    if dims == 3 and input.device.type == "cpu" and any(o >= s for o, s in zip(output_padding, stride)):
        # torch computes this one with its own slow kernel, whose output and gradients are contiguous whatever
        # the layouts: computed from contiguous copies, ours are too (autograd.conv_keeps_channels_last)
        input, weight = input.contiguous(), weight.contiguous()

    def real_transposed(x, w, b=None):
        if 0 in sizes or 0 in x.shape[2:]:
            # An output without positions, or an input without (both only for an empty batch, which torch
            # accepts; the convolution the op would run has no valid shape then): nothing to compute. Tied to
            # the arguments so that their gradients come back as zeros, as torch's do, with torch's contiguous
            # strides.
            tie = sum(t.sum() for t in (x, w, b) if t is not None).mul(0)
            return tie.expand(output_shape).clone(memory_format=torch.contiguous_format)
        out = _conv_input_gradient(x, w, output_shape, stride, padding, dilation, groups, channels_last)
        return out if b is None else add_channel_bias(out, b)

    if input.is_complex() and weight.dtype == input.dtype and (bias is None or bias.dtype == input.dtype):
        output = complex_conv(real_transposed, input, weight, bias)
    elif bias is not None and input.device.type == "cpu" and input.dtype in (torch.float16, torch.bfloat16):
        # The CPU op computes these in float32 and rounds once (README): the bias is added before that rounding,
        # not to the rounded result
        output = real_transposed(input.float(), weight.float(), bias.float()).to(input.dtype)
    else:
        output = real_transposed(input, weight, bias)
    output = _in_torchs_layout(output, channels_last, dims)
    return output.squeeze(0) if unbatched else output


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """torch.nn.functional.conv_transpose1d computed by our kernels (as a convolution's input gradient)."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(conv_transpose1d, (input, weight, bias), input, weight, bias, stride, padding,
                                     output_padding, groups, dilation)
    return _conv_transpose(1, "conv_transpose1d", input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """torch.nn.functional.conv_transpose2d computed by our kernels (as a convolution's input gradient)."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(conv_transpose2d, (input, weight, bias), input, weight, bias, stride, padding,
                                     output_padding, groups, dilation)
    return _conv_transpose(2, "conv_transpose2d", input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """torch.nn.functional.conv_transpose3d computed by our kernels (as a convolution's input gradient)."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(conv_transpose3d, (input, weight, bias), input, weight, bias, stride, padding,
                                     output_padding, groups, dilation)
    return _conv_transpose(3, "conv_transpose3d", input, weight, bias, stride, padding, output_padding, groups, dilation)


def _max_pool(dims, op, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    if _exporting.exporting_to_onnx():
        return _TORCH_MAX_POOL[dims](input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                                     return_indices=return_indices)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: expected input to be a Tensor, but got input of type {type(input).__name__}")
    kernel_size = _expand(kernel_size, dims, "kernel_size", op)
    if stride is None or (isinstance(stride, (tuple, list, torch.Size)) and len(stride) == 0):
        stride = kernel_size  # torch's default: windows side by side
    else:
        stride = _expand(stride, dims, "stride", op)
    padding = _expand(padding, dims, "padding", op)
    dilation = _expand(dilation, dims, "dilation", op)
    input, unbatched = _batched(op, input, dims)
    slice_of_channels_last = unbatched and dims == 3 and not inside_vmap() and _unbatched_channels_last_3d(input[0])
    if slice_of_channels_last:
        # torch pools the slice of a channels_last_3d batch in that layout, and so does ours, given a batch of one
        # whose strides say so (unsqueeze(0)'s N stride is C's span, which reads as contiguous): the same memory
        input = _as_channels_last(input, 3)
    path = call_path(input)
    if path == FUNCTION:
        output, indices = MaxPoolFunction.apply(input, kernel_size, stride, padding, dilation, bool(ceil_mode), True)
    elif path == OP:  # the op's autograd is MaxPoolFunction's formulas
        output, indices = ops.max_pool_forward(input, kernel_size, stride, padding, dilation, bool(ceil_mode))
    else:  # nothing will go backward: the indices are computed only if the caller wants them
        output, indices = below_autograd(
            ops.max_pool_forward, input, kernel_size, stride, padding, dilation, bool(ceil_mode),
            compute_indices=bool(return_indices),
        )
    # (a jit trace takes OP on both of its runs, so it asks the same question on both: they must record the
    # same calls, and they name values by what the Python frames hold when a tensor is first read)
    with_indices = bool(return_indices) or path != BELOW
    channels_last = slice_of_channels_last or _pool_channels_last(input, dims, unbatched, with_indices)
    # (an unbatched input's batch of one may suggest channels-last through its sizes of 1 where torch's 4-d or
    # 3-d input counts as contiguous: its results then get torch's contiguous strides)
    strides_of_one = unbatched and not channels_last and not inside_vmap()
    if channels_last:
        output = _as_channels_last(output, dims)
    output = output.squeeze(0) if unbatched else output
    output = with_contiguous_strides(output) if strides_of_one else output
    if not return_indices:
        return output
    if channels_last:
        indices = _as_channels_last(indices, dims)
    indices = indices.squeeze(0) if unbatched else indices
    return output, (with_contiguous_strides(indices) if strides_of_one else indices)


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """torch.nn.functional.max_pool1d computed by our kernels."""
    if has_torch_function_unary(input):
        return handle_torch_function(max_pool1d, (input,), input, kernel_size, stride, padding, dilation, ceil_mode,
                                     return_indices)
    return _max_pool(1, "max_pool1d", input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """torch.nn.functional.max_pool2d computed by our kernels."""
    if has_torch_function_unary(input):
        return handle_torch_function(max_pool2d, (input,), input, kernel_size, stride, padding, dilation, ceil_mode,
                                     return_indices)
    return _max_pool(2, "max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """torch.nn.functional.max_pool3d computed by our kernels."""
    if has_torch_function_unary(input):
        return handle_torch_function(max_pool3d, (input,), input, kernel_size, stride, padding, dilation, ceil_mode,
                                     return_indices)
    return _max_pool(3, "max_pool3d", input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
