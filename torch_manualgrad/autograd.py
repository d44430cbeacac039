"""torch.autograd.Function subclasses: how gradients flow through our ops.

forward runs the registered forward op; setup_context keeps what backward needs; backward runs the
registered backward op, asking only for the gradients autograd needs (ctx.needs_input_grad).
The backward passes are Functions too, so gradients of gradients (double backward, Hessian-vector
products) flow through our ops as well: conv's backward is made of convolutions, and max-pool's backward
is linear in the output gradient.
Call path: functional.py → here → _ops.py (torch.ops.manualgrad.*) → csrc kernels.
"""
import inspect

import torch

from ._ops import ops


class ConvFunction(torch.autograd.Function):
    """output = conv(input, weight) + bias; backward gives (grad_input, grad_weight, grad_bias)."""

    generate_vmap_rule = True  # under torch.func.vmap, the ops' own vmap rules apply (_ops.py)

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return ops.conv_forward(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = inputs
        # The weight gradient needs the input (the slices each placement saw); the input gradient
        # needs the weight (what each placement multiplied its slice by).
        ctx.save_for_backward(input, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        if torch.is_grad_enabled():  # create_graph=True: the backward pass is itself differentiable
            grads = ConvBackwardFunction.apply(grad_output, input, weight, ctx.geometry, wanted)
        else:
            grads = ops.conv_backward(grad_output, input, weight, *ctx.geometry, wanted)
        grad_input, grad_weight, grad_bias = grads
        return grad_input, grad_weight, grad_bias, None, None, None, None


class ConvBackwardFunction(torch.autograd.Function):
    """(grad_input, grad_weight, grad_bias) = conv_backward(grad_output, input, weight), itself differentiable.

    Each output is linear in grad_output and in one other argument, and is the adjoint of a convolution:
    grad_input = conv_w^T(grad_output), grad_weight = conv_x^T(grad_output), grad_bias = sum(grad_output).
    So for incoming gradients (gg_input, gg_weight, gg_bias):
      d/d grad_output = conv(gg_input, weight) + conv(input, gg_weight) + gg_bias (broadcast)
      d/d input       = the input gradient of conv(input, gg_weight) at grad_output
      d/d weight      = the weight gradient of conv(gg_input, weight) at grad_output
    """

    generate_vmap_rule = True  # under torch.func.vmap, the ops' own vmap rules apply (_ops.py)

    @staticmethod
    def forward(grad_output, input, weight, geometry, wanted):
        return ops.conv_backward(grad_output, input, weight, *geometry, wanted)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, weight, geometry, wanted = inputs
        ctx.save_for_backward(grad_output, input, weight)
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, gg_input, gg_weight, gg_bias):
        grad_output, input, weight = ctx.saved_tensors
        geometry = ctx.geometry
        need_grad_output, need_input, need_weight = ctx.needs_input_grad[:3]
        d_grad_output = d_input = d_weight = None
        if need_grad_output:
            terms = []
            if gg_input is not None:
                terms.append(ConvFunction.apply(gg_input, weight, None, *geometry))
            if gg_weight is not None:
                terms.append(ConvFunction.apply(input, gg_weight, None, *geometry))
            if gg_bias is not None:
                shape = [1, -1] + [1] * (grad_output.dim() - 2)
                terms.append(gg_bias.reshape(shape).expand_as(grad_output))
            d_grad_output = sum(terms[1:], terms[0]) if terms else None
        if need_input and gg_weight is not None:
            d_input = ConvBackwardFunction.apply(grad_output, input, gg_weight, geometry, [True, False, False])[0]
        if need_weight and gg_input is not None:
            d_weight = ConvBackwardFunction.apply(grad_output, gg_input, weight, geometry, [False, True, False])[1]
        return d_grad_output, d_input, d_weight, None, None


class MaxPoolFunction(torch.autograd.Function):
    """(output, indices) = max_pool(input); the gradient goes only to each window's argmax."""

    generate_vmap_rule = True  # under torch.func.vmap, the ops' own vmap rules apply (_ops.py)

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
        return ops.max_pool_forward(input, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kernel_size, stride, padding, dilation, _ceil_mode = inputs
        _, indices = output
        # Backward needs only where each maximum came from, the input's shape and the windows, not the input.
        ctx.save_for_backward(indices)
        ctx.input_size = list(input.shape)
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.mark_non_differentiable(indices)
        # The indices never receive a gradient: without this autograd would fill an int64 tensor of
        # zeros for them on every backward pass.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        if grad_output is None:  # only the indices were used
            return None, None, None, None, None, None
        (indices,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the backward pass is itself differentiable
            grad_input = MaxPoolBackwardFunction.apply(grad_output, indices, ctx.input_size, ctx.geometry)
        else:  # the forward's own indices: the CUDA kernel may skip checking them
            grad_input = ops.max_pool_backward(grad_output, indices, ctx.input_size, *ctx.geometry, check_indices=False)
        return grad_input, None, None, None, None, None


class MaxPoolBackwardFunction(torch.autograd.Function):
    """grad_input = max_pool_backward(grad_output, indices): linear in grad_output, so its own gradient
    is the incoming gradient read back at each output's argmax (zero for a window with no argmax)."""

    generate_vmap_rule = True  # under torch.func.vmap, the ops' own vmap rules apply (_ops.py)

    @staticmethod
    def forward(grad_output, indices, input_size, geometry):
        # The indices are the forward's own, saved by autograd (which refuses them if modified in place),
        # so the CUDA kernel may skip checking them.
        return ops.max_pool_backward(grad_output, indices, input_size, *geometry, check_indices=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, indices, _, _ = inputs
        ctx.save_for_backward(indices)

    @staticmethod
    def backward(ctx, gg_input):
        (indices,) = ctx.saved_tensors
        flat_indices = indices.flatten(2)
        picked = gg_input.flatten(2).gather(2, flat_indices.clamp(min=0))
        d_grad_output = torch.where(flat_indices >= 0, picked, torch.zeros_like(picked)).view_as(indices)
        return d_grad_output, None, None, None


# Function.apply binds its arguments to forward's signature on every call (for setup_context), and
# computing that signature took about 40 µs a call: more than a small GPU kernel. inspect.signature
# returns a function's __signature__ when it has one, so each is computed once, here.
for _function in (ConvFunction, ConvBackwardFunction, MaxPoolFunction, MaxPoolBackwardFunction):
    _function.forward.__signature__ = inspect.signature(_function.forward)
