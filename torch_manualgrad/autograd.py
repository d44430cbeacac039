"""torch.autograd.Function subclasses: how gradients flow through our ops.

forward runs the registered forward op; setup_context keeps what backward needs; backward runs the
registered backward op, asking only for the gradients autograd needs (ctx.needs_input_grad).
Call path: functional.py → here → _ops.py (torch.ops.manualgrad.*) → csrc kernels.
"""
import torch
from torch.autograd.function import once_differentiable

from ._ops import ops


class ConvFunction(torch.autograd.Function):
    """output = conv(input, weight) + bias; backward gives (grad_input, grad_weight, grad_bias)."""

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
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = ops.conv_backward(grad_output, input, weight, *ctx.geometry, wanted)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class MaxPoolFunction(torch.autograd.Function):
    """(output, indices) = max_pool(input); the gradient goes only to each window's argmax."""

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

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_indices):
        (indices,) = ctx.saved_tensors
        grad_input = ops.max_pool_backward(grad_output, indices, ctx.input_size, *ctx.geometry)
        return grad_input, None, None, None, None, None
