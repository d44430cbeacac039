"""Bad and extreme input through the raw ops, the fake kernels and the functional API: every case ends in a
clean RuntimeError/ValueError naming the argument and its value, or in the correct result — never a crash,
a hang, a huge allocation or uninitialised memory.

The cases run in a worker process (this file run as a script), one after another, so that a crash fails
the case that caused it instead of the whole session; each case's time and the growth of the worker's peak
memory during it are measured there too. `make sanitize` runs this file with the C++ under ASan and UBSan.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
from typing import Optional, Tuple

import pytest

HUGE = 2**62
INT64_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Case:
    """`code` runs with torch, F (torch.nn.functional), tf (ours), ops, cpu/meta helpers in scope.
    expect="error": it must raise one of `errors` with a message matching every pattern in `patterns`.
    expect="match": it must set `ours` and `theirs` (tensors or tuples of them), equal within `tol`
    (0: bit for bit; NaNs must sit in the same places)."""

    name: str
    code: str
    expect: str = "error"
    patterns: Tuple[str, ...] = ()
    errors: Tuple[str, ...] = ("RuntimeError", "ValueError")
    tol: float = 1e-5
    setup: str = ""  # run before the memory baseline is taken (large inputs)
    max_growth_mb: float = 64.0
    max_seconds: float = 5.0


def err(name, code, *patterns, errors=("RuntimeError", "ValueError"), max_seconds=5.0):
    return Case(name, code, "error", patterns, errors, max_seconds=max_seconds)


def match(name, code, tol=1e-5, setup="", max_growth_mb=64.0, max_seconds=5.0):
    return Case(name, code, "match", tol=tol, setup=setup, max_growth_mb=max_growth_mb, max_seconds=max_seconds)


# shorthand inside the cases: x4 is (1, 2, 5, 5), w4 (3, 2, 3, 3); x3/w3 their 1-d counterparts
PRELUDE = """
import torch
import torch.nn.functional as F
import torch_manualgrad as tmg
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():  # the first use of fake tensors sets up tens of MB, not what a case should be charged with
    torch.ops.manualgrad.conv_forward(torch.empty(1, 1, 3, 3), torch.empty(1, 1, 1, 1), None, [1, 1], [0, 0], [1, 1], 1)
tf = tmg.functional
ops = torch.ops.manualgrad
g = torch.Generator().manual_seed(0)
def rn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=dtype)
x4, w4, b4 = rn(1, 2, 5, 5), rn(3, 2, 3, 3), rn(3)
x3, w3 = rn(1, 2, 7), rn(3, 2, 3)
meta = lambda t: t.to("meta")
def conv2(x=None, w=None, b=None, s=(1, 1), p=(0, 0), d=(1, 1), groups=1):
    return ops.conv_forward(x4 if x is None else x, w4 if w is None else w, b, list(s), list(p), list(d), groups)
def conv2_back(go=None, x=None, w=None, s=(1, 1), p=(0, 0), d=(1, 1), groups=1, mask=(True, True, True)):
    go = rn(1, 3, 3, 3) if go is None else go
    return ops.conv_backward(go, x4 if x is None else x, w4 if w is None else w, list(s), list(p), list(d), groups, list(mask))
def pool_back(go, idx, size, k=(2, 2), s=(2, 2), p=(0, 0), d=(1, 1)):
    return ops.max_pool_backward(go, idx, list(size), list(k), list(s), list(p), list(d))
def centre_tap(x, w, groups):
    # a convolution where only each kernel's centre tap lands in the input: a 1x1 convolution by it
    c = w[:, :, w.shape[2] // 2 : w.shape[2] // 2 + 1, w.shape[3] // 2 : w.shape[3] // 2 + 1]
    return F.conv2d(x, c, groups=groups)
"""

DEVICE_CASES = [
    err("conv-raw-weight-on-meta", "conv2(w=meta(w4))", r"input and weight", r"same device", r"cpu", r"meta"),
    err("conv-raw-input-on-meta", "conv2(x=meta(x4))", r"input and weight", r"same device", r"meta", r"cpu"),
    err("conv-raw-bias-on-meta", "conv2(b=meta(b4))", r"input and bias", r"meta"),
    err("conv-raw-backward-grad-output-on-meta", "conv2_back(go=meta(rn(1, 3, 3, 3)))", r"grad_output", r"meta"),
    err("conv-raw-backward-input-on-meta", "conv2_back(x=meta(x4))", r"weight|grad_output", r"meta"),
    err("conv-raw-backward-weight-on-meta", "conv2_back(w=meta(w4))", r"weight", r"meta"),
    err(
        "pool-raw-backward-indices-on-meta",
        "pool_back(rn(1, 2, 2, 2), meta(torch.zeros(1, 2, 2, 2, dtype=torch.long)), [1, 2, 5, 5])",
        r"grad_output and indices", r"meta",
    ),
    err(
        "pool-raw-backward-grad-output-on-meta",
        "pool_back(meta(rn(1, 2, 2, 2)), torch.zeros(1, 2, 2, 2, dtype=torch.long), [1, 2, 5, 5])",
        r"grad_output and indices", r"meta",
    ),
    err("conv-functional-weight-on-meta", "tf.conv2d(x4, meta(w4))", r"weight", r"meta", r"cpu"),
    err("conv-functional-bias-on-meta-with-grad", "tf.conv2d(x4.clone().requires_grad_(), w4, meta(b4))", r"bias", r"meta"),
]

# The fake kernels (meta tensors, FakeTensorMode) raise what the C++ kernels raise.
FAKE_CASES = [
    err("fake-conv-stride-zero-on-meta", "conv2(meta(x4), meta(w4), s=(0, 1))", r"stride", r"\[0, 1\]"),
    err("fake-conv-groups-zero-on-meta", "conv2(meta(x4), meta(w4), groups=0)", r"groups=0"),
    err("fake-conv-groups-negative-on-meta", "conv2(meta(x4), meta(w4), groups=-3)", r"groups=-3"),
    err(
        "fake-conv-kernel-larger-than-input-on-meta",
        "conv2(meta(rn(1, 2, 2, 2)), meta(w4))", r"Calculated padded input size per channel: \(2 x 2\)", r"Kernel size: \(3 x 3\)",
    ),
    err("fake-conv-channels-mismatch-on-meta", "conv2(meta(rn(1, 5, 5, 5)), meta(w4))", r"\[1, 5, 5, 5\]", r"\[3, 2, 3, 3\]"),
    err("fake-conv-dilation-zero-on-meta", "conv2(meta(x4), meta(w4), d=(1, 0))", r"dilation", r"\[1, 0\]"),
    err("fake-conv-backward-grad-output-shape-on-meta", "conv2_back(meta(rn(1, 3, 4, 4)), meta(x4), meta(w4))", r"grad_output", r"\[1, 3, 4, 4\]"),
    err("fake-pool-stride-zero-on-meta", "ops.max_pool_forward(meta(x4), [2, 2], [0, 2], [0, 0], [1, 1], False)", r"stride", r"\[0, 2\]"),
    err("fake-pool-output-too-small-on-meta", "ops.max_pool_forward(meta(rn(1, 1, 2, 2)), [3, 3], [1, 1], [0, 0], [1, 1], False)", r"too small"),
    err(
        "fake-pool-backward-grad-output-shape-on-meta",
        "pool_back(meta(rn(1, 2, 4, 4)), meta(torch.zeros(1, 2, 4, 4, dtype=torch.long)), [1, 2, 5, 5])",
        r"expected grad_output of shape \[1, 2, 2, 2\]", r"\[1, 2, 4, 4\]",
    ),
    err(
        "fake-mode-conv-stride-zero",
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "with FakeTensorMode():\n    conv2(torch.empty(1, 2, 5, 5), torch.empty(3, 2, 3, 3), s=(0, 1))",
        r"stride", r"\[0, 1\]",
    ),
    err(
        "fake-mode-pool-kernel-zero",
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "with FakeTensorMode():\n    ops.max_pool_forward(torch.empty(1, 2, 5, 5), [0, 2], [1, 1], [0, 0], [1, 1], False)",
        r"kernel_size", r"\[0, 2\]",
    ),
    err(
        "export-conv-kernel-larger-than-input",
        "m = tmg.nn.Conv2d(2, 3, 7)\ntorch.export.export(m, (rn(1, 2, 5, 5),))",
        r"Kernel size: \(7 x 7\)", r"padded input size per channel: \(5 x 5\)",
        max_seconds=60.0,  # the first export in a process imports and sets up a great deal
    ),
    match(
        "meta-conv-shape-from-the-c++-checks",
        "ours = torch.tensor(conv2(meta(rn(2, 2, 9, 8)), meta(w4), s=(2, 3), p=(1, 2), d=(2, 1)).shape)\n"
        "theirs = torch.tensor(F.conv2d(rn(2, 2, 9, 8), w4, stride=(2, 3), padding=(1, 2), dilation=(2, 1)).shape)",
        tol=0,
    ),
]

CONV_CASES = [
    # the depthwise segfault: padding and dilation 2**31 - 2 leave only the centre tap inside the input
    match(
        "depthwise-padding-and-dilation-2**31-2",
        "x, w = rn(1, 3, 4, 4), rn(3, 1, 3, 3)\n"
        "ours = tf.conv2d(x, w, None, 1, 2**31 - 2, 2**31 - 2, 3)\ntheirs = centre_tap(x, w, 3)",
    ),
    match(
        "depthwise-padding-and-dilation-2**12",
        "x, w = rn(2, 4, 4, 4), rn(4, 1, 3, 3)\nours = tf.conv2d(x, w, None, 1, 2**12, 2**12, 4)\ntheirs = centre_tap(x, w, 4)",
    ),
    match(
        "depthwise-padding-and-dilation-2**14-backward",
        "x, w = rn(1, 2, 4, 4).requires_grad_(), rn(2, 1, 3, 3).requires_grad_()\n"
        "y = tf.conv2d(x, w, None, 1, 2**14, 2**14, 2)\n"
        "ours = torch.autograd.grad(y.sum(), [x, w])\n"
        "x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()\n"
        "theirs = torch.autograd.grad(centre_tap(x2, w2, 2).sum(), [x2, w2])",
    ),
    match(
        "conv-padding-and-dilation-2**31-2",
        "x, w = rn(1, 3, 4, 4), rn(2, 3, 3, 3)\nours = tf.conv2d(x, w, None, 1, 2**31 - 2, 2**31 - 2)\ntheirs = centre_tap(x, w, 1)",
    ),
    match(
        "conv-padding-and-dilation-2**61",  # offsets of 2**63 bytes: no address may be formed from them
        "x, w = rn(2, 3, 4, 5), rn(2, 3, 3, 3)\nours = tf.conv2d(x, w, None, 1, 2**61, 2**61)\ntheirs = centre_tap(x, w, 1)",
    ),
    match(
        "depthwise-padding-and-dilation-2**61",
        "x, w = rn(2, 3, 4, 5), rn(6, 1, 3, 3)\nours = tf.conv2d(x, w, None, 1, 2**61, 2**61, 3)\ntheirs = centre_tap(x, w, 3)",
    ),
    match(
        "conv-padding-and-dilation-2**61-backward",
        "x, w = rn(1, 3, 4, 4).requires_grad_(), rn(2, 3, 3, 3).requires_grad_()\n"
        "ours = torch.autograd.grad(tf.conv2d(x, w, None, 1, 2**61, 2**61).sum(), [x, w])\n"
        "x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()\n"
        "theirs = torch.autograd.grad(centre_tap(x2, w2, 1).sum(), [x2, w2])",
    ),
    match(
        "conv1d-same-padding-huge-dilation",
        "x, w = rn(2, 3, 6), rn(4, 3, 3)\nours = tf.conv1d(x, w, padding='same', dilation=2**30)\n"
        "theirs = F.conv1d(x, w[:, :, 1:2])",
    ),
    match("conv-stride-2**62", "ours = conv2(s=(HUGE, HUGE))\ntheirs = F.conv2d(x4, w4)[..., :1, :1]"),
    match("conv-stride-int64-max", "ours = conv2(s=(INT64_MAX, 2**62))\ntheirs = F.conv2d(x4, w4)[..., :1, :1]"),
    match("conv-dilation-huge-with-kernel-1", "w = rn(3, 2, 1, 1)\nours = conv2(w=w, d=(HUGE, HUGE))\ntheirs = F.conv2d(x4, w)"),
    err("conv-dilation-huge-kernel-3", "conv2(d=(2**40, 1))", r"[Kk]ernel", r"padded input"),
    err("conv-dilation-overflows-int64", "conv2(d=(HUGE, 1))", r"kernel size 3 with dilation 4611686018427387904", r"overflows"),
    err("conv-padding-overflows-int64", "conv2(p=(HUGE, 0))", r"padding 4611686018427387904", r"overflows"),
    err("conv-padding-2**31-output-too-large", "tf.conv2d(rn(1, 1, 1, 1), rn(1, 1, 1, 1), padding=2**31)", r"output of shape \[1, 1, 4294967297, 4294967297\]", r"int64"),
    err(
        "conv-padding-2**31-empty-batch",
        "tf.conv2d(rn(0, 1, 1, 1), rn(1, 1, 1, 1), padding=2**31)", r"output of shape \[0, 1, 4294967297, 4294967297\]",
    ),
    err("conv-output-too-large-to-allocate", "tf.conv2d(rn(1, 1, 1, 1), rn(1, 1, 1, 1), padding=2**20)", r"alloc"),
    err("conv-groups-2**62", "conv2(groups=HUGE)", r"groups=4611686018427387904"),
    err("conv-groups-more-than-channels", "conv2(rn(1, 2, 5, 5), rn(4, 1, 3, 3), groups=4)", r"groups=4"),
    err("conv-weight-no-out-channels", "conv2(w=rn(0, 2, 3, 3))", r"weight", r"\[0, 2, 3, 3\]"),
    err("conv-input-zero-width", "conv2(x=rn(1, 2, 5, 0))", r"input", r"\[1, 2, 5, 0\]"),
    err("conv-stride-list-empty", "ops.conv_forward(x4, w4, None, [], [], [], 1)", r"stride"),
    err("conv-stride-four-entries", "ops.conv_forward(x4, w4, None, [1, 1, 1, 1], [0] * 4, [1] * 4, 1)", r"stride", r"\[1, 1, 1, 1\]"),
    err("conv-stride-three-entries-4d-input", "ops.conv_forward(x4, w4, None, [1, 1, 1], [0, 0, 0], [1, 1, 1], 1)", r"conv3d", r"input", r"5-D"),
    err("conv-bool-tensors", "tf.conv2d(x4 > 0, w4 > 0)", r"floating", r"Bool"),
    err("conv-raw-complex-tensors", "conv2(x4.to(torch.complex64), w4.to(torch.complex64))", r"floating", r"ComplexFloat", r"torch_manualgrad.functional"),
    match("conv-complex-tensors", "ours = tf.conv2d(x4.to(torch.complex64), w4.to(torch.complex64))\ntheirs = F.conv2d(x4.to(torch.complex64), w4.to(torch.complex64))"),
    err("conv-float-stride", "tf.conv2d(x4, w4, stride=1.5)", r"stride", r"1\.5", errors=("TypeError", "RuntimeError")),
    err("conv-padding-string", "tf.conv2d(x4, w4, padding='full')", r"padding", r"full"),
    err("conv1d-weight-2d", "tf.conv1d(x3, rn(3, 2))", r"weight", r"\[3, 2\]"),
    err("conv-backward-grad-output-dtype", "conv2_back(go=rn(1, 3, 3, 3, dtype=torch.float64))", r"grad_output", r"Double|float64"),
    err("conv-backward-grad-output-unbatched", "conv2_back(go=rn(3, 3, 3))", r"grad_output", r"\[3, 3, 3\]"),
    match("conv-backward-nothing-asked", "ours = torch.tensor([t is None for t in conv2_back(mask=(False, False, False))])\ntheirs = torch.tensor([True] * 3)", tol=0),
    match(
        "conv-nan-and-inf-input",
        "x = x4.clone(); x[0, 0, 1, 1] = float('nan'); x[0, 1, 3, 4] = float('inf')\nours = conv2(x, b=b4, p=(1, 1))\ntheirs = F.conv2d(x, w4, b4, padding=1)",
    ),
    match("conv-expanded-input", "x = rn(1, 2, 1, 5).expand(3, 2, 6, 5)\nours = tf.conv2d(x, w4, b4)\ntheirs = F.conv2d(x, w4, b4)"),
    match(
        "conv-overlapping-strided-input",
        "base = rn(200)\nx = base.as_strided((2, 2, 6, 6), (3, 1, 5, 2))\nours = tf.conv2d(x, w4, padding=1)\ntheirs = F.conv2d(x, w4, padding=1)",
    ),
    match(
        "conv-empty-batch-backward",
        "x, w = rn(0, 2, 5, 5).requires_grad_(), w4.clone().requires_grad_()\n"
        "ours = torch.autograd.grad(tf.conv2d(x, w).sum(), [x, w])\ntheirs = (torch.zeros(0, 2, 5, 5), torch.zeros(3, 2, 3, 3))",
        tol=0,
    ),
    match(
        "conv-huge-stride-backward",
        "x, w = x4.clone().requires_grad_(), w4.clone().requires_grad_()\n"
        "ours = torch.autograd.grad(tf.conv2d(x, w, stride=HUGE).sum(), [x, w])\n"
        "x2, w2 = x4.clone().requires_grad_(), w4.clone().requires_grad_()\n"
        "theirs = torch.autograd.grad(F.conv2d(x2, w2)[..., :1, :1].sum(), [x2, w2])",
    ),
]

POOL_CASES = [
    match(
        "pool-stride-2**26",
        "x = rn(1, 1, 8, 8)\nours = tf.max_pool2d(x, 2, [1, 2**26], return_indices=True)\ntheirs = F.max_pool2d(x, 2, [1, 2**26], return_indices=True)",
        tol=0,
    ),
    match(
        "pool-stride-2**40",
        "x = rn(1, 3, 8, 8)\nours = tf.max_pool2d(x, 2, [1, 2**40], return_indices=True)\ntheirs = F.max_pool2d(x, 2, [1, 8], return_indices=True)",
        tol=0,
    ),
    match(
        "pool-stride-int64-max",
        "x = rn(2, 1, 8, 8)\nours = ops.max_pool_forward(x, [2, 2], [INT64_MAX, 2**62], [0, 0], [1, 1], False)\n"
        "theirs = F.max_pool2d(x, 2, 8, return_indices=True)",
        tol=0,
    ),
    match(
        "pool-stride-int64-max-ceil-mode",
        "x = rn(2, 1, 9, 9)\nours = ops.max_pool_forward(x, [3, 3], [INT64_MAX, 2**62], [1, 1], [1, 1], True)\n"
        "theirs = F.max_pool2d(x, 3, 100, 1, ceil_mode=True, return_indices=True)",
        tol=0,
    ),
    match(
        "pool1d-stride-2**40-without-indices",
        "x = rn(2, 3, 50)\nours = tf.max_pool1d(x, 3, 2**40)\ntheirs = F.max_pool1d(x, 3, 50)",
        tol=0,
    ),
    err("pool-dilation-2**40", "tf.max_pool2d(rn(1, 1, 8, 8), 2, 1, 0, 2**40)", r"too small"),
    match(
        "pool-kernel-2**40-covers-everything",
        "x = rn(2, 3, 8, 8)\nout, idx = tf.max_pool2d(x, 2**40, 1, 2**39, return_indices=True)\n"
        "best, where = x.flatten(2).max(2)\nours = (out, idx)\n"
        "theirs = (best[..., None, None].expand(2, 3, 9, 9), where[..., None, None].expand(2, 3, 9, 9))",
        tol=0,
    ),
    match(
        "pool1d-kernel-10**8-covers-everything",
        "x = rn(1, 2, 1000)\nours = tf.max_pool1d(x, 10**8, 1, 5 * 10**7)\ntheirs = x.max(2, keepdim=True).values.expand(1, 2, 1001)",
        tol=0,
    ),
    match(
        "pool-dilated-taps-on-both-sides-of-the-input",
        "x = rn(1, 2, 6, 6)\nours = tf.max_pool2d(x, 2, 1, 1, 5, ceil_mode=True, return_indices=True)\n"
        "theirs = F.max_pool2d(x, 2, 1, 1, 5, ceil_mode=True, return_indices=True)",
        tol=0,
    ),
    match(
        "pool-kernel-2**62-covers-everything",
        "out, idx = tf.max_pool2d(x4, HUGE, 1, HUGE // 2, return_indices=True)\nbest, where = x4.flatten(2).max(2)\n"
        "ours = (out, idx)\ntheirs = (best[..., None, None].expand(1, 2, 6, 6), where[..., None, None].expand(1, 2, 6, 6))",
        tol=0,
    ),
    err("pool-backward-grad-output-too-large", "pool_back(rn(1, 2, 4, 4), torch.zeros(1, 2, 4, 4, dtype=torch.long), [1, 2, 5, 5])", r"expected grad_output of shape \[1, 2, 2, 2\]", r"ceil_mode=True, \[1, 2, 3, 3\]", r"\[1, 2, 4, 4\]"),
    err("pool-backward-grad-output-too-small", "pool_back(rn(1, 2, 1, 2), torch.zeros(1, 2, 1, 2, dtype=torch.long), [1, 2, 4, 4])", r"expected grad_output of shape \[1, 2, 2, 2\]", r"\[1, 2, 1, 2\]"),
    err("pool-backward-grad-output-channels", "pool_back(rn(1, 3, 2, 2), torch.zeros(1, 3, 2, 2, dtype=torch.long), [1, 2, 4, 4])", r"grad_output", r"\[1, 3, 2, 2\]"),
    match(
        "pool-backward-ceil-mode-grid",
        "x = rn(1, 2, 5, 5)\nout, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)\ngo = rn(*out.shape)\n"
        "ours = pool_back(go, idx, [1, 2, 5, 5])\n"
        "theirs = torch.ops.aten.max_pool2d_with_indices_backward(go, x, [2, 2], [2, 2], [0, 0], [1, 1], True, idx)",
        tol=0,
    ),
    err("pool-backward-input-size-overflows", "pool_back(rn(1, 1, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.long), [1, 1, 2**40, 2**40], k=(2**40, 2**40), s=(2**40, 2**40))", r"input_size", r"int64"),
    err("pool-backward-input-size-negative-batch", "pool_back(rn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), [-1, 1, 4, 4])", r"input_size=\[-1, 1, 4, 4\]"),
    err("pool-backward-padding-over-half-kernel", "pool_back(rn(1, 1, 3, 3), torch.zeros(1, 1, 3, 3, dtype=torch.long), [1, 1, 4, 4], p=(2, 2))", r"half", r"padding=\[2, 2\]"),
    err("pool-backward-stride-zero", "pool_back(rn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), [1, 1, 4, 4], s=(0, 2))", r"stride", r"\[0, 2\]"),
    err("pool-backward-kernel-overflows", "pool_back(rn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), [1, 1, 4, 4], k=(2, HUGE), d=(1, 4))", r"kernel size 4611686018427387904 with dilation 4", r"overflows"),
    match(
        "pool-backward-non-contiguous-indices",
        "x = rn(1, 2, 6, 6)\nout, idx = F.max_pool2d(x, 2, return_indices=True)\ngo = rn(1, 2, 3, 3)\n"
        "ours = pool_back(go.transpose(2, 3).contiguous().transpose(2, 3), idx.transpose(2, 3).contiguous().transpose(2, 3), [1, 2, 6, 6], k=(2, 2), s=(2, 2))\n"
        "theirs = torch.ops.aten.max_pool2d_with_indices_backward(go, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)",
        tol=0,
    ),
    match(
        "pool-nan-input",
        "x = rn(2, 3, 7, 7); x[x > 1.0] = float('nan')\nours = tf.max_pool2d(x, 3, 2, 1, return_indices=True)\ntheirs = F.max_pool2d(x, 3, 2, 1, return_indices=True)",
        tol=0,
    ),
    match(
        "pool-all-minus-inf",
        "x = torch.full((1, 2, 5, 5), float('-inf'))\nours = tf.max_pool2d(x, 3, 2, 1, return_indices=True)\ntheirs = F.max_pool2d(x, 3, 2, 1, return_indices=True)",
        tol=0,
    ),
    match("pool-empty-batch", "x = rn(0, 2, 5, 5)\nours = tf.max_pool2d(x, 2, return_indices=True)\ntheirs = F.max_pool2d(x, 2, return_indices=True)", tol=0),
    match(
        "pool-compute-indices-false",
        "out, idx = ops.max_pool_forward(x4, [2, 2], [1, 1], [1, 1], [1, 1], True, compute_indices=False)\n"
        "ours = (out, torch.tensor(idx.shape))\ntheirs = (F.max_pool2d(x4, 2, 1, 1, ceil_mode=True), torch.tensor([0]))",
        tol=0,
    ),
    match("pool-integer-input", "ours = tf.max_pool2d((x4 * 9).long(), 2)\ntheirs = F.max_pool2d((x4 * 9).long(), 2)", tol=0),
    err("pool-bool-input", "tf.max_pool2d(x4 > 0, 2)", r"floating", r"Bool", errors=("NotImplementedError",)),
    err("pool-raw-kernel-wrong-length", "ops.max_pool_forward(x4, [2], [2, 2], [0, 0], [1, 1], False)", r"kernel_size", r"\[2\]"),
    err("pool-raw-stride-wrong-length", "ops.max_pool_forward(x4, [2, 2], [2, 2, 2, 2], [0, 0], [1, 1], False)", r"stride", r"\[2, 2, 2, 2\]"),
    err("pool-raw-stride-3d-kernel-2d", "ops.max_pool_forward(x4, [2, 2], [2, 2, 2], [0, 0], [1, 1], False)", r"max_pool3d", r"kernel_size", r"\[2, 2\]"),
    err("pool-kernel-overflows-int64", "tf.max_pool2d(x4, [2, HUGE], 1, 0, [1, 4])", r"kernel size 4611686018427387904 with dilation 4", r"overflows"),
    err("pool-input-zero-height", "tf.max_pool2d(rn(1, 2, 0, 5), 2)", r"input", r"\[1, 2, 0, 5\]"),
    err("pool-unbatched-raw", "ops.max_pool_forward(rn(2, 5, 5), [2, 2], [2, 2], [0, 0], [1, 1], False)", r"input", r"\[2, 5, 5\]"),
]

MEMORY_CASES = [
    # A large 1-d plane: the forward may not keep another copy of it per task.
    match(
        "pool1d-plane-of-2**24-with-indices",
        "ours = tf.max_pool1d(x, 3, 2, 1, return_indices=True)\ntheirs = F.max_pool1d(x, 3, 2, 1, return_indices=True)",
        tol=0,
        setup="x = rn(1, 1, 2**24)",
        max_growth_mb=2 * (32 + 64) + 32,  # each side's values (32 MB) and int64 indices (64 MB), plus 32 MB
        max_seconds=10.0,
    ),
    match(
        "pool2d-plane-of-2**24-with-indices",
        "ours = tf.max_pool2d(x, 3, 2, 1, return_indices=True)\ntheirs = F.max_pool2d(x, 3, 2, 1, return_indices=True)",
        tol=0,
        setup="x = rn(1, 1, 4096, 4096)",
        max_growth_mb=2 * (16 + 32) + 32,
        max_seconds=10.0,
    ),
]

CASES = {c.name: c for c in DEVICE_CASES + FAKE_CASES + CONV_CASES + POOL_CASES + MEMORY_CASES}
assert len(CASES) == len(DEVICE_CASES + FAKE_CASES + CONV_CASES + POOL_CASES + MEMORY_CASES), "case names must be unique"


# --- the worker ------------------------------------------------------------------------------------


def _memory_mb(field):
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _reset_peak():
    """Restarts the peak (VmHWM) from the current size, so each case's own peak is measured, whatever
    earlier cases used (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _equal(a, b, tol):
    import torch

    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_equal(x, y, tol) for x, y in zip(a, b))
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        return False
    inexact = a.is_floating_point() or a.is_complex()  # complex values come from sums in some order too
    if tol == 0 or not inexact:
        return bool(torch.equal(a, b) or (inexact and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))
    return bool(torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))


def _run_case(case, namespace):
    import time

    scope = dict(namespace)
    exec(case.setup, scope)
    _reset_peak()
    before = _memory_mb("VmRSS")
    start = time.perf_counter()
    record = {"name": case.name}
    try:
        exec(case.code, scope)
        record["outcome"] = "returned"
        if case.expect == "match":
            record["equal"] = _equal(scope["ours"], scope["theirs"], case.tol)
            if not record["equal"]:
                record["detail"] = f"ours={scope['ours']!r:.600}\ntheirs={scope['theirs']!r:.600}"
    except Exception as exc:  # noqa: BLE001 - the type is what is being tested
        record["outcome"] = "raised"
        record["type"] = type(exc).__name__
        record["message"] = str(exc)
    record["seconds"] = time.perf_counter() - start
    record["growth_mb"] = _memory_mb("VmHWM") - before
    return record


def _worker(names):
    namespace = {"HUGE": HUGE, "INT64_MAX": INT64_MAX}
    exec(PRELUDE, namespace)
    for name in names:
        print("START " + name, flush=True)
        print("RESULT " + json.dumps(_run_case(CASES[name], namespace)), flush=True)


# --- the tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outcomes():
    """Runs every case in worker processes; a worker that dies is replaced and goes on after that case."""
    results, pending = {}, list(CASES)
    while pending:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *pending], capture_output=True, text=True, timeout=900
        )
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = line[6:]
            elif line.startswith("RESULT "):
                record = json.loads(line[7:])
                results[record["name"]] = record
                started = None
        if started is not None:  # the worker died inside this case
            results[started] = {"name": started, "outcome": "crashed", "returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
        elif proc.returncode != 0:
            raise AssertionError(f"worker failed outside any case ({proc.returncode}): {proc.stderr[-3000:]}")
        pending = [n for n in pending if n not in results]
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, outcomes):
    case, record = CASES[name], outcomes[name]
    assert record["outcome"] != "crashed", f"the process died (exit {record['returncode']}):\n{record['stderr']}"
    if case.expect == "error":
        assert record["outcome"] == "raised", f"expected an error, but the call returned ({record})"
        assert record["type"] in case.errors, f"raised {record['type']}, expected one of {case.errors}: {record['message']}"
        for pattern in case.patterns:
            assert re.search(pattern, record["message"]), f"message {record['message']!r} does not match {pattern!r}"
    else:
        assert record["outcome"] == "returned", f"expected a result, got {record.get('type')}: {record.get('message')}"
        assert record["equal"], f"wrong result:\n{record.get('detail')}"
    limit = case.max_seconds * (4 if os.environ.get("LD_PRELOAD") else 1)  # ASan (make sanitize) is slower
    assert record["seconds"] < limit, f"took {record['seconds']:.1f} s"
    assert record["growth_mb"] < case.max_growth_mb, f"peak memory grew by {record['growth_mb']:.0f} MB"


def test_there_are_many_kinds_of_bad_input():
    assert len(CASES) >= 70


def test_fake_kernel_formulas_agree_with_the_c_plus_plus_checks():
    """Where sizes are symbolic the fake kernels compute output sizes in Python; those formulas must give
    what the C++ checks give (the ops.*_shape ops) on every geometry, ceil_mode included."""
    import random

    import torch

    import torch_manualgrad._ops as mops

    rng = random.Random(5)
    checked = 0
    for _ in range(3000):
        size, kernel = rng.randint(1, 40), rng.randint(1, 9)
        stride, dilation, padding = rng.randint(1, 7), rng.randint(1, 4), rng.randint(0, kernel // 2)
        ceil_mode = rng.random() < 0.5
        x = torch.empty(1, 1, size, device="meta")
        try:
            shape = mops.ops.max_pool_forward_shape(x, [kernel], [stride], [padding], [dilation], ceil_mode)
        except RuntimeError:
            assert mops.pool_output_size(size, kernel, stride, padding, dilation, ceil_mode) < 1
            continue
        assert shape[-1] == mops.pool_output_size(size, kernel, stride, padding, dilation, ceil_mode)
        conv_padding = rng.randint(0, 5)
        if dilation * (kernel - 1) + 1 <= size + 2 * conv_padding:
            w = torch.empty(1, 1, kernel, device="meta")
            shape = mops.ops.conv_forward_shape(x, w, None, [stride], [conv_padding], [dilation], 1)
            assert shape[-1] == mops.conv_output_size(size, kernel, stride, conv_padding, dilation)
        checked += 1
    assert checked > 2000


if __name__ == "__main__":
    _worker(sys.argv[1:])
