"""torch.autograd.Function subclasses: how gradients flow through our ops, backward (reverse mode) and
forward (jvp, forward mode).

forward runs the registered forward op; setup_context keeps what backward and jvp need; backward runs the
registered backward op, asking only for the gradients autograd needs (ctx.needs_input_grad); jvp pushes
input tangents through to the output. The backward passes are Functions too, so gradients of gradients
(double backward, Hessian-vector products in either order) flow through our ops as well: conv is bilinear
and its backward is made of convolutions; max-pool's backward is linear in the output gradient.

Each Function takes exactly its op's arguments, so the same setup_context and backward are also the ops'
own autograd formulas (torch.library.register_autograd, at the end of this file): the ops called
directly, torch.ops.manualgrad.*, are differentiable by this code too. torch.library has no way to register
a forward-mode rule on an op (torch 2.13), so jvp is reached through the Functions only.
Call path: functional.py → here → _ops.py (torch.ops.manualgrad.*) → csrc kernels.
"""
import inspect
import math

import torch
from torch.autograd import forward_ad

from ._ops import ops

# Private pieces of torch, looked up once; a torch without one of them gets the plain behaviour instead.
# The guard torch's own C++ uses to skip autograd kernels (at::AutoDispatchBelowAutograd): without it,
# below_autograd makes the plain call (correct, a few µs slower).
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
try:  # torch.func's stack of transforms: without it, inside_vmap and the nested-jvp refusal check nothing
    from torch._C._functorch import TransformType as _TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _functorch_interpreters

    _JVP, _VMAP = _TransformType.Jvp, _TransformType.Vmap
except ImportError:
    _functorch_interpreters = None


def _recorded(tensors):
    """Whether reverse-mode autograd may record a call on these tensors: grad mode is on and one requires
    grad, or a torch.func transform is active. Inside vmap a tensor's requires_grad is False even when a
    torch.func.grad outside it is tracking the tensor underneath (grad(lambda x: vmap(f)(x).sum())), so a
    call there that skipped autograd would give that grad zeros; under any transform the call is recorded."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors) or torch._C._functorch.maybe_current_level() is not None


def needs_autograd(*tensors):
    """Whether autograd must see a call on these tensors: reverse mode may record it (_recorded), or
    forward-mode AD is on (torch.func.jvp, forward_ad.dual_level). A dual tensor need not require grad,
    and an op called without its Function would drop its tangent. Under forward mode every call counts,
    without asking which tensors carry tangents: forward_ad.unpack_dual has no vmap rule, and a tangent
    may be vmapped (torch.func.jacfwd, gradcheck's batched forward check)."""
    return _recorded(tensors) or forward_ad._current_level >= 0


def needs_function(*tensors):
    """Whether a call on these tensors must go through its Function rather than the op. Both compute
    the same gradients (the op's autograd is the Function's formulas), but in eager mode only the Function
    works under torch.func (grad, vmap of grad, jacrev: the Function torch.library generates for an op has
    no setup_context, which torch.func requires; pytorch/pytorch#168393) and only the Function has jvp.
    Under torch.compile it is the other way round: Dynamo refuses a Function that defines jvp, and the op's
    registered autograd is traced instead. Forward mode under torch.compile takes the Function, as only it
    carries tangents (Dynamo then runs it outside the graph, or refuses it under fullgraph=True)."""
    if forward_ad._current_level >= 0:
        return True
    if torch.compiler.is_compiling():
        return False
    return _recorded(tensors)


FUNCTION, OP, BELOW = "function", "op", "below"


def call_path(*tensors):
    """How functional.py sends a call on these tensors: FUNCTION, through its autograd.Function
    (needs_function); OP, the op called plainly so that autograd records its registered formulas
    (torch.compile; and torch.jit.trace, which must record the op itself, the same call from the same
    frame with autograd and without: it names values by the caller's locals, see _exporting.py); BELOW,
    nothing to record (below_autograd)."""
    tracing = torch.jit.is_tracing()
    if not tracing and needs_function(*tensors):
        return FUNCTION
    return OP if tracing or needs_autograd(*tensors) else BELOW


def below_autograd(op, *args, **kwargs):
    """op(*args, **kwargs) for a call that autograd need not record, skipping the op's autograd kernel:
    the Python kernel that register_autograd installs costs about 4 µs a call (measured on the CPU) even
    when all it does is pass the call on, which would have added that to every forward (inside its
    Function), every backward and every inference call. Under torch.compile the plain call is traced
    instead (Dynamo does not know the guard, and compiled code has no such overhead to save)."""
    if torch.compiler.is_compiling() or _BELOW_AUTOGRAD is None:
        return op(*args, **kwargs)
    with _BELOW_AUTOGRAD():
        return op(*args, **kwargs)



# --- the pieces every formula below is made of ------------------------------------------------------
# Each goes through a Function when its result must itself be differentiable (create_graph=True, or
# tangents to carry), and straight to the op otherwise, saving the Function's Python overhead.


def _conv(input, weight, bias, geometry):
    if needs_function(input, weight, bias):
        return ConvFunction.apply(input, weight, bias, *geometry)
    return below_autograd(ops.conv_forward, input, weight, bias, *geometry)


# ATen's channels-last order of each rank: the dimensions from the smallest stride up (C, then the spatial
# dimensions last to first, then N).
_CHANNELS_LAST_ORDER = {4: (1, 3, 2, 0), 5: (1, 4, 3, 2, 0)}


def _suggests_channels_last(t):
    """ATen's TensorBase::suggest_memory_format(t) for a 4-d tensor (channels_last) or a 5-d one
    (channels_last_3d): its strides are ordered C, W, H, N (C, W, H, D, N) from smallest, each no smaller than
    the span of the dimensions before it, with torch's tie-breaks for sizes of 1 (an N111 tensor, or one whose C
    stride equals N's, counts as contiguous). torch lays out a convolution's and a max-pool's results by this
    rule."""
    order = _CHANNELS_LAST_ORDER.get(t.dim())
    if order is None or t.layout != torch.strided:
        return False
    try:
        sizes, strides = t.shape, t.stride()
    except RuntimeError:  # inside torch.func.vmap layouts cannot be queried; keep the ops' contiguous output
        return False
    # Without sizes of 0 or 1 no tie-break applies, and a dense tensor answers at once (this runs on every call).
    # (Outside the try above: a size that has no value yet, under torch.compile, must raise, not answer False.)
    if 1 not in sizes and 0 not in sizes:
        try:
            dense = t.is_contiguous()
            dense_channels_last = not dense and t.is_contiguous(memory_format=channels_last_format(t.dim()))
        except RuntimeError:  # inside vmap only the contiguous format can be asked: the rule below answers
            dense = dense_channels_last = False
        if dense:
            return False
        if dense_channels_last:
            return True
    if strides[1] == 0:
        return False
    floor = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < floor or (d == 0 and floor == strides[1]):
            return False
        floor = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def suggests_channels_last_as_2d(t):
    """_suggests_channels_last, a 3-d (1-d) tensor taken as torch's 1-d convolutions and max-pools take it: the
    4-d one of height 1; any other as it is."""
    return _suggests_channels_last(t.unsqueeze(2) if t.dim() == 3 else t)


def channels_last_format(dims):
    """The channels-last memory format of tensors with `dims` dimensions (4 or 5)."""
    return torch.channels_last_3d if dims == 5 else torch.channels_last


def _is_batched(t):
    """Whether t is a batched tensor of a vmap (torch.func's, or the one autograd.grad(is_grads_batched=True) and
    gradcheck(check_batched_grad=True) run the backward under): its layout can be neither queried nor set."""
    functorch = torch._C._functorch
    return functorch.is_batchedtensor(t) or (hasattr(functorch, "is_legacy_batchedtensor")
                                             and functorch.is_legacy_batchedtensor(t))


def _to_channels_last(t):
    """t laid out channels-last: a 4-d or 5-d tensor in torch's format, a 3-d one as the 4-d one of height 1 (torch
    computes 1-d convolutions and max-pools with gradients on such views). A batched tensor stays as it is."""
    if _is_batched(t):
        return t
    if t.dim() == 3:
        return t.unsqueeze(2).contiguous(memory_format=torch.channels_last).squeeze(2)
    return t.contiguous(memory_format=channels_last_format(t.dim()))


def _onednn_supports(dtype_check):
    check = getattr(torch.ops.mkldnn, dtype_check, None)
    return torch.backends.mkldnn.is_available() and check is not None and bool(check())


# What this build and CPU offer, asked once: torch.compile cannot trace the calls that ask.
_ONEDNN_BFLOAT16 = _onednn_supports("_is_mkldnn_bf16_supported")
_ONEDNN_FLOAT16 = _onednn_supports("_is_mkldnn_fp16_supported")


@torch.compiler.assume_constant_result
def _onednn_settings():
    """(oneDNN available and enabled, the intra-op thread count): settings read at each call, or under
    torch.compile when the graph is traced."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled, torch.get_num_threads()


def conv_keeps_channels_last(input, weight, stride, dilation, groups, output_padding=None):
    """Whether torch lays out this convolution's results (output and gradients) channels-last when its input or
    weight suggests it. Always for 1-d and 2-d, and on a GPU; a 3-d one on the CPU only when torch computes it
    with oneDNN, as its own kernel (slow_conv3d) returns contiguous results. torch picks oneDNN by dtype
    (bfloat16 and float16 where the CPU has oneDNN kernels for them; float32 by a speed rule: not where a
    single-threaded 1x1x1 kernel over fewer than 16 images moves one step at a time, nor where one image of
    one group meets a kernel narrower than 4 along H or W, unless its first four dimensions hold more than
    20480 values), never for float64 or a transposed convolution whose output_padding reaches a stride.
    (A complex convolution is computed from real ones of its real dtype.)"""
    if input.dim() != 5 or input.device.type != "cpu":
        return True
    if output_padding is not None and any(o >= s for o, s in zip(output_padding, stride)):
        return False
    enabled, threads = _onednn_settings()
    if not enabled:
        return False
    real = input.real.dtype if input.is_complex() else input.dtype
    if real == torch.bfloat16:
        return _ONEDNN_BFLOAT16
    if real == torch.float16:
        return _ONEDNN_FLOAT16
    if real != torch.float32:
        return False
    batch, kernel_h, kernel_w = input.shape[0], weight.shape[-2], weight.shape[-1]
    steps_of_one = all(s == 1 for s in stride) and all(d == 1 for d in dilation)
    if steps_of_one and batch < 16 and kernel_h == 1 and kernel_w == 1 and threads == 1:
        return False
    return groups > 1 or (kernel_h > 3 and kernel_w > 3) or batch > 1 or math.prod(input.shape[:4]) > 20480


def _in_layout_of(grads, input, weight, geometry):
    """A convolution's gradients laid out as torch's: channels-last when its input or weight suggests it,
    unless torch's kernel for it returns them contiguous (conv_keeps_channels_last). The kernels return
    gradients contiguous, or channels-last for a channels-last input on the CPU; handed on as they are, a
    channels-last network's batch norm and activation backward would meet mixed layouts and take their slow
    paths (MobileNetV2 in channels_last: batch-norm backward 3.5 ms a call instead of 0.3)."""
    if inside_vmap():
        return grads
    if input.dim() > 2 and input.shape[0] == 0:
        # an empty batch: torch's gradients are laid out like the tensors they belong to (the input's is empty;
        # the weight's is zeros), whatever their strides; copied, not made anew, so that a graph built for a
        # higher derivative (create_graph=True) still runs through them
        grad_input, grad_weight = grads
        return (None if grad_input is None else torch.empty_like(input).copy_(grad_input),
                None if grad_weight is None else torch.empty_like(weight).copy_(grad_weight))
    # Neither suggesting channels-last, torch's gradients are contiguous whatever grad_output's layout; the
    # kernels' follow the tensor they start from, which for a transposed convolution's (ConvBackwardFunction)
    # is its channels-last output gradient, say.
    if input.dim() == 3:  # 1-d: torch computes it on views of height 1, and as for its output only the weight counts
        if weight.dim() != 3 or not suggests_channels_last_as_2d(weight):
            return _contiguous(grads)
        return tuple(_to_channels_last(g) if g is not None else g for g in grads)
    if not (_suggests_channels_last(input) or _suggests_channels_last(weight)):
        return _contiguous(grads)
    stride, _padding, dilation, groups = geometry
    if not conv_keeps_channels_last(input, weight, stride, dilation, groups):
        return _contiguous(grads)
    return tuple(_to_channels_last(g) if g is not None and g.dim() in (4, 5) else g for g in grads)


def _contiguous_strides(t):
    """Whether t has torch's contiguous strides, those of sizes of 1 included: is_contiguous() ignores those, and a
    gradient of (N, C, 1, 1) with strides (C, 1, C, C) would pass it while still suggesting channels-last."""
    if not t.is_contiguous():
        return False
    if 1 not in t.shape and 0 not in t.shape:
        return True
    span = 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        if stride != span:
            return False
        span *= max(size, 1)
    return True


def with_contiguous_strides(t):
    """t, or a copy of it with torch's contiguous strides where it has others (_contiguous_strides)."""
    return t if t is None or _contiguous_strides(t) else t.clone(memory_format=torch.contiguous_format)


def _contiguous(grads):
    return tuple(with_contiguous_strides(g) for g in grads)


def _conv_grads(grad_output, input, weight, geometry, output_mask):
    if needs_function(grad_output, input, weight):
        return ConvBackwardFunction.apply(grad_output, input, weight, *geometry, output_mask)
    return below_autograd(ops.conv_backward, grad_output, input, weight, *geometry, output_mask)


def _route_to_argmax(grad_output, indices, input_size, geometry):
    """max_pool_backward on indices autograd saved from our own forward (autograd refuses them if they
    were modified in place), so the CUDA kernel may skip checking them."""
    if needs_function(grad_output):
        return MaxPoolBackwardFunction.apply(grad_output, indices, input_size, *geometry, False)
    return below_autograd(ops.max_pool_backward, grad_output, indices, input_size, *geometry, check_indices=False)


def _read_at_argmax(t, indices):
    """t (shaped like the pool's input) read at each output's argmax, 0 where a window has none (-1)."""
    # reshape, not flatten: gradcheck's batched checks run this under the legacy vmap, which lacks flatten;
    # sizes spelled out, as -1 is ambiguous for an empty batch
    planes = indices.shape[:2]
    flat_indices = indices.reshape(*planes, math.prod(indices.shape[2:]))
    picked = t.reshape(*planes, math.prod(t.shape[2:])).gather(2, flat_indices.clamp(min=0))
    return torch.where(flat_indices >= 0, picked, torch.zeros_like(picked)).reshape(indices.shape)


def _conv_tangent(input, weight, d_input, d_weight, d_bias, geometry, output_shape):
    """How conv(input, weight) + bias moves when its arguments move by (d_input, d_weight, d_bias): conv
    is linear in each argument, so the change is conv(d_input, weight) + conv(input, d_weight) + d_bias.
    None for no change; None overall if nothing moves."""
    terms = []
    if d_input is not None:
        terms.append(_conv(d_input, weight, None, geometry))
    if d_weight is not None:
        terms.append(_conv(input, d_weight, None, geometry))
    if d_bias is not None:
        shape = [1, -1] + [1] * (len(output_shape) - 2)
        terms.append(d_bias.reshape(shape).expand(output_shape))
    return sum(terms[1:], terms[0]) if terms else None


def _refuse_nested_forward_mode():
    """Raises inside a Function's jvp when forward mode is nested in forward mode (torch.func.jvp of a jvp,
    jacfwd of jacfwd). autograd runs a Function's jvp with forward mode off, so the outer level never
    sees how the inner tangent moves: the answer would be silently wrong (zeros, for a max-pool), for any
    torch.autograd.Function with a jvp (torch 2.13), not only ours. torch.autograd.forward_ad refuses to
    nest on its own; torch.func's levels are counted here."""
    if _functorch_interpreters is not None:
        if sum(1 for i in _functorch_interpreters() if i.key() == _JVP) > 1:
            raise RuntimeError(
                "torch_manualgrad: forward-mode AD nested inside forward-mode AD (torch.func.jvp of jvp, "
                "jacfwd of jacfwd) is not supported: torch runs a torch.autograd.Function's jvp with the outer "
                "level's forward mode off, so the result would be wrong. Take the outer derivative in reverse "
                "mode: jvp(grad(f)), jacfwd(jacrev(f)) or torch.func.hessian(f), jacrev(jacfwd(f))."
            )


def inside_vmap():
    """Whether a torch.func.vmap is active (jacfwd, jacrev and hessian use one): there a batched tensor's
    layout can be neither queried nor set (torch raises 'NYI'), nor observed; functional.py then leaves
    outputs in the ops' contiguous layout."""
    if _functorch_interpreters is None or torch._C._functorch.maybe_current_level() is None:
        return False
    return any(i.key() == _VMAP for i in _functorch_interpreters())


class _Whole(tuple):
    """A list argument (stride, padding, a size, output_mask) as a Function receives it: one value. Under
    torch.func.vmap a Function's generated vmap rule pairs each argument's tangent with that argument's
    in_dims, flattened as a pytree, in which a list counts once per element; with a list among the
    arguments they no longer line up, and forward mode over vmap (jvp of vmap, jacfwd of jacrev, hessian)
    crashed in torch's get_tangents_in_dims (torch 2.13). A tuple subclass is a pytree leaf, and the ops
    take it wherever they take a list."""

    __slots__ = ()


# torch.autograd.Function.apply first binds the arguments to forward's signature (inspect.signature, about 30 µs a
# call, a third of a small convolution's whole forward under autograd) to fill in defaults. Our callers pass every
# argument, so outside torch.func transforms and torch.compile that binding changes nothing, and _Function.apply
# goes straight on to what follows it there: dropping dead functorch wrappers, then the C++ apply. Only where
# Function.apply reads exactly the names it reads in the torch versions we know (else it may do more now).
_APPLY_NAMES = {"_is_setup_context_defined", "setup_context", "forward", "torch", "_C", "_are_functorch_transforms_active",
                "_functorch", "utils", "unwrap_dead_wrappers", "super", "apply", "RuntimeError", "custom_function_call"}


def _fast_apply_usable():
    """unwrap_dead_wrappers where _Function.apply may skip the binding (see above), else None."""
    try:
        names = set(torch.autograd.Function.apply.__func__.__code__.co_names)
        from torch._functorch.utils import unwrap_dead_wrappers
    except (AttributeError, ImportError):
        return None
    usable = names <= _APPLY_NAMES and hasattr(torch._C, "_are_functorch_transforms_active")
    return unwrap_dead_wrappers if usable else None


_UNWRAP_DEAD = _fast_apply_usable()


class _Function(torch.autograd.Function):
    """Our Functions' apply: list arguments are passed as _Whole values (see there)."""

    @classmethod
    def apply(cls, *args):
        args = tuple(_Whole(a) if type(a) is list else a for a in args)
        if (_UNWRAP_DEAD is not None and len(args) == cls._arity and not torch._C._are_functorch_transforms_active()
                and not torch.compiler.is_compiling()):
            return super(torch.autograd.Function, cls).apply(*_UNWRAP_DEAD(args))
        return super().apply(*args)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._arity = cls.forward.__code__.co_argcount  # forward is a staticmethod: its parameters, all positional


class ConvFunction(_Function):
    """output = conv(input, weight) + bias; backward gives (grad_input, grad_weight, grad_bias)."""

    generate_vmap_rule = True  # under torch.func.vmap, the ops' own vmap rules apply (_ops.py)

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return below_autograd(ops.conv_forward, input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = inputs
        # The weight gradient needs the input (the slices each placement saw); the input gradient
        # needs the weight (what each placement multiplied its slice by). The tangent needs both.
        ctx.save_for_backward(input, weight)
        ctx.save_for_forward(input, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.output_shape = output.shape

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = _conv_grads(grad_output, input, weight, ctx.geometry, wanted)
        grad_input, grad_weight = _in_layout_of((grad_input, grad_weight), input, weight, ctx.geometry)
        return grad_input, grad_weight, grad_bias, None, None, None, None

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, *_geometry):
        _refuse_nested_forward_mode()
        input, weight = ctx.saved_tensors
        return _conv_tangent(input, weight, d_input, d_weight, d_bias, ctx.geometry, ctx.output_shape)


class ConvBackwardFunction(_Function):
    """(grad_input, grad_weight, grad_bias) = conv_backward(grad_output, input, weight), itself differentiable.

    Each output is linear in grad_output and in one other argument, and is the adjoint of a convolution:
    grad_input = conv_w^T(grad_output), grad_weight = conv_x^T(grad_output), grad_bias = sum(grad_output).
    So for incoming gradients (gg_input, gg_weight, gg_bias):
      d/d grad_output = conv(gg_input, weight) + conv(input, gg_weight) + gg_bias (broadcast),
                        which is conv's own tangent in the direction (gg_input, gg_weight, gg_bias)
      d/d input       = the input gradient of conv(input, gg_weight) at grad_output
      d/d weight      = the weight gradient of conv(gg_input, weight) at grad_output
    and for tangents (d_grad_output, d_input, d_weight), each output moves along both of its arguments:
      grad_input  by conv_w^T(d_grad_output) + conv_{d_weight}^T(grad_output)
      grad_weight by conv_x^T(d_grad_output) + conv_{d_input}^T(grad_output)
      grad_bias   by sum(d_grad_output)
    """

    generate_vmap_rule = True  # under torch.func.vmap, the ops' own vmap rules apply (_ops.py)

    @staticmethod
    def forward(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
        return below_autograd(ops.conv_backward, grad_output, input, weight, stride, padding, dilation, groups, output_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, weight, stride, padding, dilation, groups, output_mask = inputs
        ctx.save_for_backward(grad_output, input, weight)
        ctx.save_for_forward(grad_output, input, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.output_mask = list(output_mask)

    @staticmethod
    def backward(ctx, gg_input, gg_weight, gg_bias):
        grad_output, input, weight = ctx.saved_tensors
        geometry = ctx.geometry
        need_grad_output, need_input, need_weight = ctx.needs_input_grad[:3]
        d_grad_output = d_input = d_weight = None
        if need_grad_output:
            d_grad_output = _conv_tangent(input, weight, gg_input, gg_weight, gg_bias, geometry, grad_output.shape)
        if need_input and gg_weight is not None:
            d_input = _conv_grads(grad_output, input, gg_weight, geometry, [True, False, False])[0]
        if need_weight and gg_input is not None:
            d_weight = _conv_grads(grad_output, gg_input, weight, geometry, [False, True, False])[1]
        # As a transposed convolution (functional.py), grad_output is that convolution's input: its gradients
        # are laid out as torch lays out a transposed convolution's, by the same rule as a convolution's.
        d_grad_output, d_weight = _in_layout_of((d_grad_output, d_weight), grad_output, weight, geometry)
        return d_grad_output, d_input, d_weight, None, None, None, None, None

    @staticmethod
    def jvp(ctx, d_grad_output, d_input, d_weight, *_geometry):
        _refuse_nested_forward_mode()
        grad_output, input, weight = ctx.saved_tensors
        geometry, mask = ctx.geometry, ctx.output_mask
        tangents = [None, None, None]
        if d_grad_output is not None:
            tangents = list(_conv_grads(d_grad_output, input, weight, geometry, mask))
        if mask[0] and d_weight is not None:
            term = _conv_grads(grad_output, input, d_weight, geometry, [True, False, False])[0]
            tangents[0] = term if tangents[0] is None else tangents[0] + term
        if mask[1] and d_input is not None:
            term = _conv_grads(grad_output, d_input, weight, geometry, [False, True, False])[1]
            tangents[1] = term if tangents[1] is None else tangents[1] + term
        return tuple(tangents)


def add_channel_bias(output, bias):
    """output + bias along dim 1: a transposed convolution's bias, which functional.py adds after the op.
    Through ChannelBiasFunction where autograd records the call, so that the bias gradient is conv_backward's
    (_channel_sums); under torch.compile (which traces the plain add) and where nothing is recorded, plainly."""
    if needs_function(output, bias):
        return ChannelBiasFunction.apply(output, bias)
    return ChannelBiasFunction.forward(output, bias)


def _channel_sums(grad_output):
    """grad_output summed over every dimension but 1: the bias gradient of any convolution with these output
    deltas, so conv_backward's, asked for nothing else, of a 1×1 convolution from one channel, whose input and
    weight (never read) are zero-strided stand-ins. Its order is fixed by the shapes; torch's gradient of a
    broadcast add is not: it reduced a complex gradient's real part (a strided view) in an order that depended
    on the thread count."""
    batch, channels, *spatial = grad_output.shape
    ones, zeros = [1] * len(spatial), [0] * len(spatial)
    input = grad_output.new_zeros(()).expand(batch, 1, *spatial)
    weight = grad_output.new_zeros(()).expand(channels, 1, *ones)
    return _conv_grads(grad_output, input, weight, (ones, zeros, ones, 1), [False, False, True])[2]


class ChannelBiasFunction(_Function):
    """output + bias, the bias along dim 1; backward gives (grad_output, its channel sums)."""

    generate_vmap_rule = True  # under torch.func.vmap, the ops' own vmap rules apply (_ops.py)

    @staticmethod
    def forward(output, bias):
        return output + bias.reshape(1, -1, *[1] * (output.dim() - 2))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.output_shape = output.shape

    @staticmethod
    def backward(ctx, grad_output):
        grad_bias = _channel_sums(grad_output) if ctx.needs_input_grad[1] else None
        return grad_output, grad_bias

    @staticmethod
    def jvp(ctx, d_output, d_bias):
        _refuse_nested_forward_mode()
        if d_bias is None:
            return d_output
        d_bias = d_bias.reshape(1, -1, *[1] * (len(ctx.output_shape) - 2)).expand(ctx.output_shape)
        return d_bias if d_output is None else d_output + d_bias


class MaxPoolFunction(_Function):
    """(output, indices) = max_pool(input); the gradient goes only to each window's argmax, and the
    output's tangent is the input's tangent read at each argmax."""

    generate_vmap_rule = True  # under torch.func.vmap, the ops' own vmap rules apply (_ops.py)

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode, compute_indices):
        return below_autograd(ops.max_pool_forward, input, kernel_size, stride, padding, dilation, ceil_mode, compute_indices)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kernel_size, stride, padding, dilation, ceil_mode, compute_indices = inputs
        _, indices = output
        # Backward and jvp need only where each maximum came from, the input's shape and the windows, not
        # the input. A caller that asked for no indices (the op called directly) leaves the input instead,
        # and the indices are found again from it if a gradient or tangent is wanted after all.
        kept = indices if compute_indices else input
        ctx.save_for_backward(kept)
        ctx.save_for_forward(kept)
        ctx.indices_from_input = not compute_indices
        ctx.input_size = list(input.shape)
        # of its rank, 4-d or 5-d; 1-d as torch's backward sees it, of height 1
        ctx.channels_last_input = suggests_channels_last_as_2d(input)
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.ceil_mode = ceil_mode
        ctx.mark_non_differentiable(indices)
        # The indices never receive a gradient: without this autograd would fill an int64 tensor of
        # zeros for them on every backward pass.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        if grad_output is None:  # only the indices were used
            return None, None, None, None, None, None, None
        if not ctx.channels_last_input and grad_output.dim() > 3 and suggests_channels_last_as_2d(grad_output):
            # torch lays the input's gradient out as the input, where the kernels follow grad_output's layout: a
            # contiguous input's is computed from grad_output made contiguous, as torch's own backward does
            grad_output = with_contiguous_strides(grad_output)
        grad_input = _route_to_argmax(grad_output, _saved_indices(ctx), ctx.input_size, ctx.geometry)
        if ctx.channels_last_input and not inside_vmap():
            grad_input = _to_channels_last(grad_input)
        return grad_input, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, d_input, *_geometry):
        _refuse_nested_forward_mode()
        return _read_at_argmax(d_input, _saved_indices(ctx)), None


def _saved_indices(ctx):
    (kept,) = ctx.saved_tensors
    if not ctx.indices_from_input:
        return kept
    return below_autograd(ops.max_pool_forward, kept.detach(), *ctx.geometry, ctx.ceil_mode)[1]


class MaxPoolBackwardFunction(_Function):
    """grad_input = max_pool_backward(grad_output, indices): linear in grad_output, so its tangent is the
    same map applied to grad_output's tangent, and its gradient is the incoming gradient read back at each
    output's argmax (zero for a window with no argmax), the forward's own tangent rule."""

    generate_vmap_rule = True  # under torch.func.vmap, the ops' own vmap rules apply (_ops.py)

    @staticmethod
    def forward(grad_output, indices, input_size, kernel_size, stride, padding, dilation, check_indices):
        return below_autograd(
            ops.max_pool_backward, grad_output, indices, input_size, kernel_size, stride, padding, dilation, check_indices
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, indices, input_size, kernel_size, stride, padding, dilation, _check = inputs
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)
        ctx.input_size = list(input_size)
        ctx.geometry = (kernel_size, stride, padding, dilation)

    @staticmethod
    def backward(ctx, gg_input):
        (indices,) = ctx.saved_tensors
        return _read_at_argmax(gg_input, indices), None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, d_grad_output, *_geometry):
        _refuse_nested_forward_mode()
        (indices,) = ctx.saved_tensors
        return _route_to_argmax(d_grad_output, indices, ctx.input_size, ctx.geometry)


_FUNCTIONS = {
    "manualgrad::conv_forward": ConvFunction,
    "manualgrad::conv_backward": ConvBackwardFunction,
    "manualgrad::max_pool_forward": MaxPoolFunction,
    "manualgrad::max_pool_backward": MaxPoolBackwardFunction,
}

for _op, _function in _FUNCTIONS.items():
    # Function.apply binds its arguments to forward's signature on every call (for setup_context), and
    # computing that signature took about 40 µs a call: more than a small GPU kernel. inspect.signature
    # returns a function's __signature__ when it has one, so each is computed once, here. (For the same
    # reason the forwards have no defaults, where their ops have: filling them in cost a few µs a call.)
    _function.forward.__signature__ = inspect.signature(_function.forward)
    # The op's own autograd: the Function's formulas, which take the op's arguments as they are.
    torch.library.register_autograd(_op, _function.backward, setup_context=_function.setup_context)
