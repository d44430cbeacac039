"""The registered ops, torch.ops.manualgrad.*: loads the C++/CUDA kernels and gives each op a fake
kernel, so that shapes propagate (meta tensors, torch.compile, torch.export) without running it.

Call path: functional.py → autograd.py → here (torch.ops.manualgrad.*) → csrc/cpu, csrc/cuda kernels.
"""
import torch

from . import _C  # noqa: F401  importing the library runs its TORCH_LIBRARY registrations

ops = torch.ops.manualgrad


# The same output-size formulas as csrc/shape_checks.h, for the fake kernels.
def conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size, kernel, stride, padding, dilation, ceil_mode):
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1  # // rounds towards -inf, as torch's
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


@torch.library.register_fake("manualgrad::conv_forward")
def _conv_forward_fake(input, weight, bias, stride, padding, dilation, groups):
    spatial = [
        conv_output_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
        for i in range(len(stride))
    ]
    return input.new_empty((input.shape[0], weight.shape[0], *spatial))


@torch.library.register_fake("manualgrad::conv_backward")
def _conv_backward_fake(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    return (
        input.new_empty(input.shape) if output_mask[0] else None,
        weight.new_empty(weight.shape) if output_mask[1] else None,
        grad_output.new_empty((weight.shape[0],)) if output_mask[2] else None,
    )


@torch.library.register_fake("manualgrad::max_pool_forward")
def _max_pool_forward_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    spatial = [
        pool_output_size(input.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
        for i in range(len(stride))
    ]
    shape = (input.shape[0], input.shape[1], *spatial)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.long)


@torch.library.register_fake("manualgrad::max_pool_backward")
def _max_pool_backward_fake(grad_output, indices, input_size, kernel_size, stride, padding, dilation):
    return grad_output.new_empty(input_size)
