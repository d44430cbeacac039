"""Bit-identical outputs and gradients across repeated runs and across intra-op thread counts."""
import pytest
import torch

from common import ConvCase, PoolCase

pytestmark = pytest.mark.threads

CONV_CASES = [
    ConvCase(2, 1, 8, 16, (3, 3), (20, 19), padding=1),
    ConvCase(2, 6, 8, 16, (3, 2), (17, 16), stride=(2, 1), padding=1, dilation=(1, 2)),
    ConvCase(2, 5, 8, 8, (3, 3), (16, 16), padding="same", groups=4),
    ConvCase(2, 4, 8, 8, (5, 5), (15, 15), padding=2, groups=8),  # depthwise
    ConvCase(1, 7, 6, 9, (4,), (50,), padding="same", groups=3),
    ConvCase(1, 1, 4, 4, (3,), (64,), stride=2, padding=1),
]
POOL_CASES = [
    PoolCase(2, 6, 5, (19, 18), 3, stride=1, padding=1),  # overlapping windows: backward accumulates
    PoolCase(2, 1, 3, (20, 20), (3, 2), stride=2, dilation=(1, 2), ceil_mode=True),
    PoolCase(1, 7, 4, (60,), 4, stride=1, padding=2),
]


def run_conv(case, dtype, threads):
    torch.set_num_threads(threads)
    x, w, b = case.make_tensors("cpu", dtype, requires_grad=True, seed=11)
    out = case.tmg_fn()(x, w, b, **case.kwargs())
    grads = torch.autograd.grad(out, [x, w, b], case.make_grad_output("cpu", dtype, seed=12))
    return [out.detach(), *grads]


def run_pool(case, dtype, threads):
    torch.set_num_threads(threads)
    x = case.make_input("cpu", dtype, values="ties", requires_grad=True, seed=13)
    out, idx = case.tmg_fn()(x, **case.kwargs(return_indices=True))
    (grad,) = torch.autograd.grad(out, x, case.make_grad_output("cpu", dtype, seed=14))
    return [out.detach(), idx, grad]


def assert_bitwise_equal(first, second):
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs (max abs diff {(a.double() - b.double()).abs().max().item()})"


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_deterministic(case, dtype, restore_num_threads):
    baseline = run_conv(case, dtype, threads=2)
    assert_bitwise_equal(baseline, run_conv(case, dtype, threads=2))
    assert_bitwise_equal(baseline, run_conv(case, dtype, threads=1))
    assert_bitwise_equal(baseline, run_conv(case, dtype, threads=2))


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_deterministic(case, dtype, restore_num_threads):
    baseline = run_pool(case, dtype, threads=2)
    assert_bitwise_equal(baseline, run_pool(case, dtype, threads=2))
    assert_bitwise_equal(baseline, run_pool(case, dtype, threads=1))


@pytest.mark.parametrize("case", CONV_CASES[:2] + POOL_CASES[:1], ids=str)
def test_deterministic_on_device(case, device, dtype):
    """Repeated runs on the test device (a GPU backward must not depend on atomics' ordering either)."""
    def once():
        if isinstance(case, ConvCase):
            x, w, b = case.make_tensors(device, dtype, requires_grad=True, seed=21)
            out = case.tmg_fn()(x, w, b, **case.kwargs())
            return [out.detach(), *torch.autograd.grad(out, [x, w, b], case.make_grad_output(device, dtype, seed=22))]
        x = case.make_input(device, dtype, values="ties", requires_grad=True, seed=23)
        out, idx = case.tmg_fn()(x, **case.kwargs(return_indices=True))
        return [out.detach(), idx, *torch.autograd.grad(out, x, case.make_grad_output(device, dtype, seed=24))]

    baseline = once()
    for _ in range(3):
        assert_bitwise_equal(baseline, once())
