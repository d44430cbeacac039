"""A slow, readable, loop-level reference of every forward and backward in torch_manualgrad.

Each function here is written to read like the math rather than to run fast:
it visits every sample, channel and window placement with plain Python loops
and touches the tensors only element by element or through small slices.
The tests use it as a second oracle beside torch (on tiny shapes, because it
is slow), and the teaching material uses it to show what the C++ kernels
compute before any of their tricks (parallel loops, contiguous inner loops,
im2col) get in the way.

Conventions shared by all four functions:

* Tensors are batched: ``(N, C, *spatial)`` with one spatial dimension for the
  1-d ops and two for the 2-d ops.
* ``stride``, ``padding``, ``dilation`` and ``kernel_size`` are tuples with one
  entry per spatial dimension; the number of spatial dimensions ``D`` is read
  from their length, so one function serves both conv1d and conv2d (and
  max_pool1d and max_pool2d).
* Nothing here uses ``torch.nn.functional`` convolutions or pools, ``unfold``
  or autograd: the point is to spell the computation out.  The four public
  functions run under ``torch.no_grad()``, so passing tensors that require
  grad records nothing; the backward functions *are* the gradients.
"""

import itertools
import math

import torch

__all__ = [
    "conv_output_size",
    "pool_output_size",
    "conv_forward",
    "conv_backward",
    "max_pool_forward",
    "max_pool_backward",
]


# ---------------------------------------------------------------------------
# Output sizes
# ---------------------------------------------------------------------------

def _ceil_div(a, b):
    """Ceiling of a / b for integers (b > 0)."""
    return -(-a // b)


def conv_output_size(length, kernel, stride, padding, dilation):
    """Number of placements of a dilated kernel along one padded dimension.

    A kernel of ``kernel`` taps spaced ``dilation`` apart spans
    ``dilation * (kernel - 1) + 1`` positions.  On a dimension of ``length``
    padded by ``padding`` on both sides it fits at the starts
    ``0, stride, 2*stride, ...`` as long as it does not run off the end, which
    gives ``floor((length + 2*padding - span) / stride) + 1`` placements.
    """
    span = dilation * (kernel - 1) + 1
    return (length + 2 * padding - span) // stride + 1


def pool_output_size(length, kernel, stride, padding, dilation, ceil_mode):
    """Number of pooling windows along one dimension, with torch's ceil_mode rule.

    Without ``ceil_mode`` this is the convolution count.  With ``ceil_mode``
    the division rounds up, so a last, partial window may hang over the right
    edge; but torch only keeps it if it *starts* inside the input or the left
    padding, i.e. if ``(out - 1) * stride < length + padding``.  A window that
    would start in the right padding would contain no input at all.
    """
    span = dilation * (kernel - 1) + 1
    room = length + 2 * padding - span
    if ceil_mode:
        out = _ceil_div(room, stride) + 1
        if (out - 1) * stride >= length + padding:
            out -= 1
    else:
        out = room // stride + 1
    return out


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def _placements(out_size):
    """Every output position as a tuple, in row-major order."""
    return itertools.product(*(range(n) for n in out_size))


def _window(position, kernel, stride, dilation):
    """The slices that pick one kernel placement out of the *padded* input.

    On the padded input the placement at output position ``o`` starts at
    ``o * stride`` and takes every ``dilation``-th element, ``kernel`` of them.
    """
    return tuple(
        slice(o * s, o * s + d * (k - 1) + 1, d)
        for o, k, s, d in zip(position, kernel, stride, dilation)
    )


def _zero_pad(x, padding):
    """Copy ``x`` into the middle of a zero tensor padded on both sides of each spatial dim.

    Padding once up front keeps the loops free of bounds checks: zeros simply
    contribute nothing to a convolution sum.
    """
    n, c, *spatial = x.shape
    padded = x.new_zeros((n, c, *(l + 2 * p for l, p in zip(spatial, padding))))
    padded[_interior(spatial, padding)] = x
    return padded


def _interior(spatial, padding):
    """Index of the unpadded region inside a padded (N, C, *spatial) tensor."""
    return (slice(None), slice(None)) + tuple(
        slice(p, p + l) for l, p in zip(spatial, padding)
    )


def _check_conv_args(input, weight, stride, padding, dilation, groups):
    dims = len(stride)
    if not (len(padding) == len(dilation) == dims and input.dim() == weight.dim() == dims + 2):
        raise ValueError("stride, padding, dilation and the tensors must agree on the number of spatial dims")
    c_in, c_out = input.shape[1], weight.shape[0]
    if c_in % groups or c_out % groups or weight.shape[1] != c_in // groups:
        raise ValueError("channels must split evenly into groups, and weight must be (C_out, C_in/groups, *kernel)")


# ---------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------

@torch.no_grad()
def conv_forward(input, weight, bias, stride, padding, dilation, groups):
    """Cross-correlation, as torch's conv1d/conv2d compute it.

    For every sample ``n`` and output channel ``co`` (which belongs to group
    ``g``), and every placement ``o`` of the kernel::

        out[n, co, o] = bias[co] + sum over ci in group g, taps t of
                        padded_input[n, ci, o*stride + t*dilation] * weight[co, ci - g*C_in/groups, t]

    The channel sum runs only over the ``C_in / groups`` input channels of the
    output channel's own group; that is all ``groups`` changes.
    """
    _check_conv_args(input, weight, stride, padding, dilation, groups)
    n_batch, c_in = input.shape[:2]
    c_out, c_in_per_group, *kernel = weight.shape
    c_out_per_group = c_out // groups
    out_size = [
        conv_output_size(l, k, s, p, d)
        for l, k, s, p, d in zip(input.shape[2:], kernel, stride, padding, dilation)
    ]

    if min(out_size) < 1:
        raise ValueError(f"the kernel does not fit the padded input: output size {out_size}")
    padded = _zero_pad(input, padding)
    output = input.new_zeros((n_batch, c_out, *out_size))
    for n in range(n_batch):
        for g in range(groups):
            # The input channels this group reads; weight[co] already has
            # exactly this many channels, so the two slices line up.
            group_channels = slice(g * c_in_per_group, (g + 1) * c_in_per_group)
            for co in range(g * c_out_per_group, (g + 1) * c_out_per_group):
                for o in _placements(out_size):
                    patch = padded[(n, group_channels) + _window(o, kernel, stride, dilation)]
                    value = (patch * weight[co]).sum()
                    if bias is not None:
                        value = value + bias[co]
                    output[(n, co) + o] = value
    return output


@torch.no_grad()
def conv_backward(grad_output, input, weight, stride, padding, dilation, groups):
    """Gradients of ``conv_forward`` with respect to input, weight and bias.

    Each output element ``out[n, co, o]`` was ``patch · weight[co] + bias[co]``
    where ``patch`` is the input slice under placement ``o``.  Its incoming
    gradient ``delta = grad_output[n, co, o]`` therefore flows back as:

    * into the weight: ``delta * patch``   (d out / d weight[co] = patch);
    * into the input:  ``delta * weight[co]``, added into that same slice
      (d out / d patch = weight[co]).  Overlapping placements add up, which
      is the "col2im" scatter-add;
    * into the bias:   ``delta``.

    Summing these contributions over every sample, channel and placement is
    the whole backward pass.  The input gradient is accumulated on a padded
    buffer and the padding is cut off at the end: gradient that lands on a
    padding zero has nowhere to go.  ``grad_bias`` is always returned; ignore
    it when the convolution had no bias.
    """
    _check_conv_args(input, weight, stride, padding, dilation, groups)
    n_batch, c_in, *spatial = input.shape
    c_out, c_in_per_group, *kernel = weight.shape
    c_out_per_group = c_out // groups
    out_size = grad_output.shape[2:]

    padded = _zero_pad(input, padding)
    grad_padded = torch.zeros_like(padded)
    grad_weight = torch.zeros_like(weight)
    grad_bias = grad_output.new_zeros(c_out)
    for n in range(n_batch):
        for g in range(groups):
            group_channels = slice(g * c_in_per_group, (g + 1) * c_in_per_group)
            for co in range(g * c_out_per_group, (g + 1) * c_out_per_group):
                for o in _placements(out_size):
                    delta = grad_output[(n, co) + o]
                    where = (n, group_channels) + _window(o, kernel, stride, dilation)
                    grad_weight[co] += delta * padded[where]
                    grad_padded[where] += delta * weight[co]
                    grad_bias[co] += delta
    grad_input = grad_padded[_interior(spatial, padding)].clone()
    return grad_input, grad_weight, grad_bias


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------

def _flat_index(coord, spatial):
    """Row-major position of ``coord`` inside one (n, c) plane: h*W + w in 2-d, l in 1-d."""
    index = 0
    for x, length in zip(coord, spatial):
        index = index * length + x
    return index


@torch.no_grad()
def max_pool_forward(input, kernel_size, stride, padding, dilation, ceil_mode):
    """Max pooling with the indices of the winners, matching torch exactly.

    Returns ``(output, indices)``; ``indices`` are int64 flat positions inside
    each ``(n, c)`` plane, the form ``return_indices=True`` gives in torch.

    Padding here is *not* zeros: padded positions are simply never
    candidates, so a window's maximum always comes from real input.  The
    window is scanned in row-major order and the running winner is replaced
    when ``value > best or isnan(value)``.  That rule decides the corner cases
    the way torch does:

    * ties keep the *first* maximum (a later equal value is not ``>``);
    * any NaN wins, and the *last* NaN in scan order is the one reported,
      because every NaN replaces the current winner;
    * a window of nothing but -inf still reports a real position: the winner
      starts as the first in-bounds position, not as "none".

    One degenerate case needs a word.  With dilation, a window can straddle
    the input without any of its taps landing on it (kernel 2, dilation 3,
    padding 1 on a length-2 input: taps at -1 and 2).  Such a window has no
    candidate at all: its value is -inf (as in torch) and its index is -1,
    "none", and ``max_pool_backward`` sends its gradient nowhere.  (torch
    reports a position derived from the window's start there instead: outside
    the plane, where its backward writes outside the gradient, or inside it, at
    an element the window never covered.)
    """
    dims = len(kernel_size)
    if not (len(stride) == len(padding) == len(dilation) == dims and input.dim() == dims + 2):
        raise ValueError("kernel_size, stride, padding, dilation and input must agree on the number of spatial dims")
    if any(2 * p > k for p, k in zip(padding, kernel_size)):
        # torch refuses this too: with more padding than half a kernel an
        # undilated window could lie entirely in the padding and have no
        # candidate.  (Dilation can still leave a window empty; see above.)
        raise ValueError("padding must be at most half the kernel size")
    n_batch, channels, *spatial = input.shape
    out_size = [
        pool_output_size(l, k, s, p, d, ceil_mode)
        for l, k, s, p, d in zip(spatial, kernel_size, stride, padding, dilation)
    ]

    if min(out_size) < 1:
        raise ValueError(f"the window does not fit the padded input: output size {out_size}")
    output = input.new_empty((n_batch, channels, *out_size))
    indices = torch.empty((n_batch, channels, *out_size), dtype=torch.int64, device=input.device)
    for n in range(n_batch):
        for c in range(channels):
            for o in _placements(out_size):
                # Where this window starts in unpadded coordinates (may be negative).
                start = [oi * s - p for oi, s, p in zip(o, stride, padding)]
                # The default winner, before any value is looked at: in each
                # dimension, the first tap that is past the left padding -- the
                # window's first in-bounds position in scan order, if it has one.
                first = [st + d * _ceil_div(-st, d) if st < 0 else st
                         for st, d in zip(start, dilation)]
                empty = any(f >= length for f, length in zip(first, spatial))
                best_value = -math.inf
                best_index = -1 if empty else _flat_index(first, spatial)
                for taps in _placements(kernel_size):
                    coord = tuple(st + t * d for st, t, d in zip(start, taps, dilation))
                    if not all(0 <= x < length for x, length in zip(coord, spatial)):
                        continue  # a padding position: never a candidate
                    index = _flat_index(coord, spatial)
                    value = input[(n, c) + coord].item()
                    if value > best_value or math.isnan(value):
                        best_value, best_index = value, index
                output[(n, c) + o] = best_value
                indices[(n, c) + o] = best_index
    return output, indices


@torch.no_grad()
def max_pool_backward(grad_output, indices, input_shape):
    """Gradient of max pooling: route each output's gradient to its winner.

    The maximum depends on its winning input alone (with slope 1), so each
    output gradient goes to the position recorded in ``indices`` and nowhere
    else.  When windows overlap the same input can win several of them; its
    gradient is then the *sum* of theirs, hence ``+=`` rather than ``=``.

    Index -1 marks a window that held no input (see ``max_pool_forward``): its
    gradient goes nowhere.  Any other index outside the plane is malformed, and
    we raise ``IndexError`` instead of guessing.
    """
    n_batch, channels, *spatial = input_shape
    grad_input = grad_output.new_zeros(tuple(input_shape))
    # View each (n, c) plane as a flat row so the flat indices address it directly.
    plane = math.prod(spatial)
    grad_flat = grad_input.view(n_batch, channels, plane)
    out_size = grad_output.shape[2:]
    for n in range(n_batch):
        for c in range(channels):
            for o in _placements(out_size):
                index = int(indices[(n, c) + o])
                if index == -1:
                    continue
                if not 0 <= index < plane:
                    raise IndexError(f"max-pool index {index} lies outside a plane of {plane} elements")
                grad_flat[n, c, index] += grad_output[(n, c) + o]
    return grad_input
