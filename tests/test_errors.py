"""Bad input: every check raises RuntimeError/ValueError naming the argument and its value, in functional, nn and the raw ops."""
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_manualgrad as tmg

tf = tmg.functional
ops = torch.ops.manualgrad
ERRORS = (RuntimeError, ValueError)

# dtype names as torch prints them (torch.float32) or as ATen does (Float)
FLOAT32 = r"float32|\bFloat\b"
FLOAT64 = r"float64|\bDouble\b"
INT64 = r"int64|\bLong\b"
INT32 = r"int32|\bInt\b"


def expect_error(fn, *patterns, exc=ERRORS):
    """fn() must raise `exc`, and its message must match every regex in `patterns` (argument names, values)."""
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"message {message!r} does not match {pattern!r}"
    return message


def r(n, *shape, dtype=torch.float32):
    return torch.randn(n, *shape, dtype=dtype)  # on the test's device: see the on_device fixture


@pytest.fixture
def on_device(device):
    """Run the test with `device` as torch's default device, so every tensor the cases build lands there."""
    previous = torch.get_default_device()
    torch.set_default_device(device)
    yield device
    torch.set_default_device(previous)


X2, W2 = (lambda: r(1, 2, 5, 5)), (lambda: r(3, 2, 3, 3))
X1, W1 = (lambda: r(1, 2, 7)), (lambda: r(3, 2, 3))


# --------------------------------------------------------------------------------------------------
# functional convolution
# --------------------------------------------------------------------------------------------------

CONV_CASES = {
    "stride-zero-2d": (lambda: tf.conv2d(X2(), W2(), stride=(0, 1)), [r"stride", r"\[0, 1\]"]),
    "stride-zero-1d": (lambda: tf.conv1d(X1(), W1(), stride=0), [r"stride", r"\[0\]|=0\b"]),
    "stride-negative-2d": (lambda: tf.conv2d(X2(), W2(), stride=-2), [r"stride", r"\[-2, -2\]"]),
    "padding-negative-2d": (lambda: tf.conv2d(X2(), W2(), padding=(-1, 0)), [r"padding", r"\[-1, 0\]"]),
    "padding-negative-1d": (lambda: tf.conv1d(X1(), W1(), padding=-1), [r"padding", r"\[-1\]|=-1\b"]),
    "dilation-zero-2d": (lambda: tf.conv2d(X2(), W2(), dilation=(0, 1)), [r"dilation", r"\[0, 1\]"]),
    "dilation-zero-1d": (lambda: tf.conv1d(X1(), W1(), dilation=0), [r"dilation", r"\[0\]|=0\b"]),
    "groups-zero": (lambda: tf.conv2d(X2(), W2(), groups=0), [r"groups=0"]),
    "groups-negative": (lambda: tf.conv1d(X1(), W1(), groups=-1), [r"groups=-1"]),
    "padding-wrong-length": (lambda: tf.conv2d(X2(), W2(), padding=(1, 1, 1)), [r"padding", r"1, 1, 1"]),
    "stride-wrong-length": (lambda: tf.conv2d(X2(), W2(), stride=(1, 1, 1)), [r"stride", r"1, 1, 1"]),
    "input-2d-for-conv2d": (lambda: tf.conv2d(r(5, 5), W2()), [r"input", r"\[5, 5\]", r"3-D|3D"]),
    "input-5d-for-conv2d": (lambda: tf.conv2d(r(1, 2, 3, 5, 5), W2()), [r"input", r"\[1, 2, 3, 5, 5\]"]),
    "input-4d-for-conv1d": (lambda: tf.conv1d(r(1, 2, 7, 7), W1()), [r"input", r"\[1, 2, 7, 7\]"]),
    "weight-3d-for-conv2d": (lambda: tf.conv2d(X2(), r(3, 2, 3)), [r"weight", r"\[3, 2, 3\]"]),
    "channels-mismatch-groups": (
        lambda: tf.conv2d(r(1, 3, 5, 5), r(4, 2, 3, 3), groups=2),
        [r"input", r"\[1, 3, 5, 5\]", r"weight", r"\[4, 2, 3, 3\]", r"groups=2"],
    ),
    "channels-mismatch": (
        lambda: tf.conv1d(r(1, 3, 7), r(4, 2, 3)),
        [r"input", r"\[1, 3, 7\]", r"weight", r"\[4, 2, 3\]"],
    ),
    "out-channels-not-divisible": (
        lambda: tf.conv2d(r(1, 4, 5, 5), r(3, 2, 3, 3), groups=2),
        [r"out_channels", r"groups=2"],
    ),
    "kernel-larger-than-padded-input-2d": (
        lambda: tf.conv2d(r(1, 2, 2, 2), r(3, 2, 5, 5), padding=1),
        [r"[Kk]ernel", r"\b5\b", r"padded input", r"\b4\b"],
    ),
    "kernel-larger-than-padded-input-1d": (
        lambda: tf.conv1d(r(1, 2, 3), r(3, 2, 7), padding=1),
        [r"[Kk]ernel", r"\b7\b", r"\b5\b"],
    ),
    "dilated-kernel-larger-than-input": (
        lambda: tf.conv2d(r(1, 2, 6, 6), r(3, 2, 3, 3), dilation=(3, 1)),
        [r"[Kk]ernel", r"6, 6"],
    ),
    "same-with-stride": (
        lambda: tf.conv2d(X2(), W2(), padding="same", stride=2),
        [r"padding='same'|padding=\"same\"|padding=same", r"strided"],
    ),
    "weight-on-other-device": (lambda: tf.conv2d(X2(), torch.randn(3, 2, 3, 3, device="meta")), [r"weight", r"device", r"meta", r"cpu|cuda"]),
    "bias-on-other-device": (
        lambda: tf.conv1d(X1(), W1(), torch.randn(3, device="meta")),
        [r"bias", r"device", r"meta", r"cpu|cuda"],
    ),
    "dtype-mismatch": (
        lambda: tf.conv2d(X2(), W2().double()),
        [r"input", r"weight", r"dtype", FLOAT32, FLOAT64],
    ),
    "bias-dtype-mismatch": (
        lambda: tf.conv1d(X1(), W1(), torch.randn(3, dtype=torch.float64)),
        [r"bias", FLOAT64],
    ),
    "integer-tensors": (
        lambda: tf.conv2d(X2().long(), W2().long()),
        [r"floating", INT64],
    ),
    "integer-tensors-1d": (
        lambda: tf.conv1d(X1().to(torch.int32), W1().to(torch.int32)),
        [r"floating", INT32],
    ),
    "bias-wrong-length": (lambda: tf.conv2d(X2(), W2(), torch.randn(4)), [r"bias", r"\[4\]"]),
    "bias-wrong-dims": (lambda: tf.conv2d(X2(), W2(), torch.randn(3, 1)), [r"bias", r"\[3, 1\]"]),
}


@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_functional_errors(name, on_device):
    fn, patterns = CONV_CASES[name]
    expect_error(fn, *patterns)


def test_invalid_padding_string_is_value_error(on_device):
    # torch.nn.functional raises RuntimeError here and torch.nn.Conv2d ValueError; we ask for ValueError
    # from the constructor like torch and accept either from functional, always naming the bad string.
    expect_error(lambda: tf.conv2d(X2(), W2(), padding="foo"), r"padding", r"foo")
    expect_error(lambda: tf.conv1d(X1(), W1(), padding="full"), r"padding", r"full")
    expect_error(lambda: tmg.nn.Conv2d(2, 3, 3, padding="foo"), r"foo", exc=ValueError)


def test_same_with_stride_in_constructor_is_value_error(on_device):
    expect_error(lambda: tmg.nn.Conv2d(2, 3, 3, padding="same", stride=2), r"same", r"strided", exc=ValueError)
    expect_error(lambda: tmg.nn.Conv1d(2, 3, 3, padding="same", stride=(2,)), r"same", r"strided", exc=ValueError)
    # and the functional form is a RuntimeError, as in torch
    expect_error(lambda: tf.conv1d(X1(), W1(), padding="same", stride=3), r"same", r"strided", exc=RuntimeError)


def test_module_forward_errors(on_device):
    conv = tmg.nn.Conv2d(2, 3, 3)  # created on the default device
    expect_error(lambda: conv(r(1, 4, 5, 5)), r"\[1, 4, 5, 5\]", r"weight")
    expect_error(lambda: conv(r(5, 5)), r"input", r"\[5, 5\]")
    pool = tmg.nn.MaxPool2d(2)
    expect_error(lambda: pool(r(5, 5)), r"input", r"\[5, 5\]")


# --------------------------------------------------------------------------------------------------
# functional max-pool
# --------------------------------------------------------------------------------------------------

P2, P1 = (lambda: r(1, 2, 6, 6)), (lambda: r(1, 2, 8))

POOL_CASES = {
    "kernel-zero-2d": (lambda: tf.max_pool2d(P2(), 0), [r"kernel_size", r"\[0, 0\]|=0\b"]),
    "kernel-zero-1d": (lambda: tf.max_pool1d(P1(), 0), [r"kernel_size", r"\[0\]|=0\b"]),
    "kernel-negative": (lambda: tf.max_pool2d(P2(), (2, -1)), [r"kernel_size", r"\[2, -1\]"]),
    "stride-zero-2d": (lambda: tf.max_pool2d(P2(), 2, stride=(1, 0)), [r"stride", r"\[1, 0\]"]),
    "stride-zero-1d": (lambda: tf.max_pool1d(P1(), 2, stride=0), [r"stride", r"\[0\]|=0\b"]),
    "padding-negative": (lambda: tf.max_pool2d(P2(), 2, padding=(-1, 0)), [r"padding", r"\[-1, 0\]"]),
    "dilation-zero": (lambda: tf.max_pool2d(P2(), 2, dilation=(0, 1)), [r"dilation", r"\[0, 1\]"]),
    "pad-more-than-half-kernel-2d": (
        lambda: tf.max_pool2d(P2(), 3, padding=2),
        [r"half", r"padding=\[2, 2\]|padding=2\b", r"kernel_size=\[3, 3\]|kernel_size=3\b"],
    ),
    "pad-more-than-half-kernel-1d": (
        lambda: tf.max_pool1d(P1(), 2, padding=2),
        [r"half", r"padding=\[2\]|padding=2\b", r"kernel_size=\[2\]|kernel_size=2\b"],
    ),
    "pad-more-than-half-one-dim": (
        lambda: tf.max_pool2d(P2(), (4, 2), padding=(2, 2)),
        [r"half", r"padding=\[2, 2\]", r"kernel_size=\[4, 2\]"],
    ),
    "input-2d-for-pool2d": (lambda: tf.max_pool2d(r(6, 6), 2), [r"input", r"\[6, 6\]"]),
    "input-4d-for-pool1d": (lambda: tf.max_pool1d(r(1, 2, 6, 6), 2), [r"input", r"\[1, 2, 6, 6\]"]),
    "input-1d-for-pool1d": (lambda: tf.max_pool1d(torch.randn(6), 2), [r"input", r"\[6\]"]),
    "complex-input": (lambda: tf.max_pool2d(P2().to(torch.complex64), 2), [r"not implemented for 'ComplexFloat'", r"integer"]),
    "output-too-small": (lambda: tf.max_pool2d(r(1, 1, 2, 2), 3), [r"input|output", r"2, 2|\b0\b"]),
    "kernel-wrong-length": (lambda: tf.max_pool2d(P2(), (2, 2, 2)), [r"kernel_size", r"2, 2, 2"]),
}


@pytest.mark.parametrize("name", POOL_CASES)
def test_max_pool_functional_errors(name, on_device):
    fn, patterns = POOL_CASES[name]
    expect_error(fn, *patterns)


# --------------------------------------------------------------------------------------------------
# the registered ops, called directly (the C++ checks are the last line of defence)
# --------------------------------------------------------------------------------------------------


def conv_fwd(x=None, w=None, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    x = X2() if x is None else x
    w = W2() if w is None else w
    return ops.conv_forward(x, w, b, list(stride), list(padding), list(dilation), groups)


def conv_bwd(go=None, x=None, w=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, mask=(True, True, True)):
    x = X2() if x is None else x
    w = W2() if w is None else w
    go = r(1, 3, 3, 3) if go is None else go
    return ops.conv_backward(go, x, w, list(stride), list(padding), list(dilation), groups, list(mask))


OP_CASES = {
    "conv-forward-stride-zero": (lambda: conv_fwd(stride=(0, 1)), [r"stride", r"\[0, 1\]"]),
    "conv-forward-padding-negative": (lambda: conv_fwd(padding=(-1, 0)), [r"padding", r"\[-1, 0\]"]),
    "conv-forward-dilation-zero": (lambda: conv_fwd(dilation=(0, 1)), [r"dilation", r"\[0, 1\]"]),
    "conv-forward-groups-zero": (lambda: conv_fwd(groups=0), [r"groups=0"]),
    "conv-forward-unbatched-input": (lambda: conv_fwd(x=r(2, 5, 5)), [r"input", r"\[2, 5, 5\]"]),
    "conv-forward-args-wrong-length": (lambda: conv_fwd(stride=(1,), padding=(0,), dilation=(1,)), [r"stride|input|weight"]),
    "conv-forward-channels-mismatch": (lambda: conv_fwd(x=r(1, 3, 5, 5)), [r"\[1, 3, 5, 5\]", r"\[3, 2, 3, 3\]"]),
    "conv-forward-out-channels-not-divisible": (lambda: conv_fwd(x=r(1, 4, 5, 5), groups=2), [r"out_channels", r"groups=2"]),
    "conv-forward-kernel-too-large": (lambda: conv_fwd(x=r(1, 2, 2, 2)), [r"[Kk]ernel", r"3, 3", r"2, 2"]),
    "conv-forward-dtype-mismatch": (lambda: conv_fwd(w=W2().double()), [r"dtype", FLOAT64]),
    "conv-forward-integer": (lambda: conv_fwd(x=X2().long(), w=W2().long()), [r"floating", INT64]),
    "conv-forward-bias-shape": (lambda: conv_fwd(b=torch.randn(2)), [r"bias", r"\[2\]"]),
    "conv-backward-grad-output-shape": (lambda: conv_bwd(go=r(1, 3, 4, 4)), [r"grad_output", r"\[1, 3, 4, 4\]"]),
    "conv-backward-grad-output-channels": (lambda: conv_bwd(go=r(1, 2, 3, 3)), [r"grad_output", r"\[1, 2, 3, 3\]"]),
    "conv-backward-grad-output-dtype": (lambda: conv_bwd(go=r(1, 3, 3, 3).double()), [r"dtype", FLOAT64]),
    "conv-backward-stride-zero": (lambda: conv_bwd(stride=(0, 1)), [r"stride", r"\[0, 1\]"]),
    "conv-backward-groups-zero": (lambda: conv_bwd(groups=0), [r"groups=0"]),
    "conv-backward-output-mask-length": (lambda: conv_bwd(mask=(True, True)), []),
    "conv-backward-channels-mismatch": (lambda: conv_bwd(x=r(1, 3, 5, 5)), [r"\[1, 3, 5, 5\]", r"\[3, 2, 3, 3\]"]),
    "conv-backward-integer": (
        lambda: conv_bwd(go=r(1, 3, 3, 3).long(), x=X2().long(), w=W2().long()),
        [r"floating", INT64],
    ),
    "pool-forward-kernel-zero": (
        lambda: ops.max_pool_forward(P2(), [0, 2], [1, 1], [0, 0], [1, 1], False),
        [r"kernel_size", r"\[0, 2\]"],
    ),
    "pool-forward-stride-zero": (
        lambda: ops.max_pool_forward(P2(), [2, 2], [0, 1], [0, 0], [1, 1], False),
        [r"stride", r"\[0, 1\]"],
    ),
    "pool-forward-pad-too-big": (
        lambda: ops.max_pool_forward(P2(), [2, 2], [1, 1], [2, 0], [1, 1], False),
        [r"padding", r"kernel_size"],
    ),
    "pool-forward-dilation-zero": (
        lambda: ops.max_pool_forward(P2(), [2, 2], [1, 1], [0, 0], [1, 0], False),
        [r"dilation", r"\[1, 0\]"],
    ),
    "pool-forward-unbatched-input": (
        lambda: ops.max_pool_forward(r(2, 6, 6), [2, 2], [2, 2], [0, 0], [1, 1], False),
        [r"input", r"\[2, 6, 6\]"],
    ),
    "pool-forward-args-wrong-length": (lambda: ops.max_pool_forward(P2(), [2], [2, 2], [0, 0], [1, 1], False), [r"kernel_size"]),
    "pool-forward-bool": (
        lambda: ops.max_pool_forward(P2() > 0, [2, 2], [2, 2], [0, 0], [1, 1], False),
        [r"not implemented for 'Bool'", r"floating-point dtype"],
    ),
    "pool-backward-integer-grad-output": (
        lambda: ops.max_pool_backward(r(1, 2, 3, 3).long(), torch.zeros(1, 2, 3, 3, dtype=torch.long), [1, 2, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1]),
        [r"grad_output", INT64, r"cannot require grad"],
    ),
    "pool-backward-indices-dtype": (
        lambda: ops.max_pool_backward(r(1, 2, 3, 3), torch.zeros(1, 2, 3, 3, dtype=torch.int32), [1, 2, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1]),
        [r"indices", INT32],
    ),
    "pool-backward-indices-shape": (
        lambda: ops.max_pool_backward(r(1, 2, 3, 3), torch.zeros(1, 2, 3, 2, dtype=torch.long), [1, 2, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1]),
        [r"indices", r"\[1, 2, 3, 2\]"],
    ),
    "pool-backward-input-size-wrong-length": (
        lambda: ops.max_pool_backward(r(1, 2, 3, 3), torch.zeros(1, 2, 3, 3, dtype=torch.long), [1, 2, 36], [2, 2], [2, 2], [0, 0], [1, 1]),
        [r"input_size", r"\[1, 2, 36\]"],
    ),
    "pool-backward-integer-grad": (
        lambda: ops.max_pool_backward(r(1, 2, 3, 3).long(), torch.zeros(1, 2, 3, 3, dtype=torch.long), [1, 2, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1]),
        [r"floating|dtype", INT64],
    ),
    "pool-backward-input-size-batch-mismatch": (
        lambda: ops.max_pool_backward(r(1, 2, 3, 3), torch.zeros(1, 2, 3, 3, dtype=torch.long), [2, 2, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1]),
        [r"input_size|grad_output", r"\[2, 2, 6, 6\]|\[1, 2, 3, 3\]"],
    ),
}


@pytest.mark.parametrize("name", OP_CASES)
def test_op_errors(name, on_device):
    fn, patterns = OP_CASES[name]
    expect_error(fn, *patterns)


@pytest.mark.parametrize("name", OP_CASES)
def test_op_errors_are_the_same_on_meta_tensors(name):
    """On meta tensors (and so under FakeTensorMode, torch.compile, torch.export) the fake kernels run: they
    must raise the very message the CPU kernels raise, since both come from csrc/shape_checks.h."""
    fn, _ = OP_CASES[name]
    messages = {}
    previous = torch.get_default_device()
    try:
        for device in ("cpu", "meta"):
            torch.set_default_device(device)
            messages[device] = expect_error(fn)
    finally:
        torch.set_default_device(previous)
    assert messages["meta"] == messages["cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second real device (CUDA)")
def test_op_errors_mixed_devices():
    # (meta tensors cannot stand in here: the dispatcher itself lets meta mix with cpu at op level)
    expect_error(lambda: conv_fwd(w=W2().cuda()), r"device", r"cuda", r"cpu")
    expect_error(lambda: conv_bwd(go=r(1, 3, 3, 3).cuda()), r"device", r"cuda", r"cpu")
    expect_error(lambda: tf.conv2d(X2(), W2().cuda()), r"device", r"cuda", r"cpu")
    expect_error(
        lambda: ops.max_pool_backward(r(1, 2, 3, 3).cuda(), torch.zeros(1, 2, 3, 3, dtype=torch.long), [1, 2, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1]),
        r"device", r"cuda", r"cpu",
    )


# Malformed indices could make an unchecked kernel write out of bounds, so each runs in its own process:
# the test fails (instead of taking the whole session down) if the process crashes.
MALFORMED_INDICES = {
    "index-too-large": "idx = torch.zeros(1, 2, 3, 3, dtype=torch.long); idx[0, 1, 2, 2] = 36",
    "index-huge": "idx = torch.zeros(1, 2, 3, 3, dtype=torch.long); idx[0, 0, 0, 0] = 10**12",
    # -1 is the "window selected nothing" sentinel (as in ATen); anything below it is malformed
    "index-negative": "idx = torch.zeros(1, 2, 3, 3, dtype=torch.long); idx[0, 0, 1, 1] = -2",
    "index-very-negative": "idx = torch.zeros(1, 2, 3, 3, dtype=torch.long); idx[0, 1, 0, 2] = -(10**12)",
    "index-1d-too-large": "idx = torch.zeros(1, 2, 3, 3, dtype=torch.long); idx[0, 0, 0, 0] = 6 * 6 + 6",
}


@pytest.mark.parametrize("name", MALFORMED_INDICES)
def test_max_pool_backward_rejects_out_of_range_indices(name, device):
    script = textwrap.dedent(
        f"""
        import torch, torch_manualgrad
        torch.set_default_device("{device}")
        {MALFORMED_INDICES[name]}
        try:
            torch.ops.manualgrad.max_pool_backward(torch.randn(1, 2, 3, 3), idx, [1, 2, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1])
            torch.cuda.synchronize() if "{device}" == "cuda" else None
        except RuntimeError as exc:
            print("RAISED", "indices" in str(exc) or "index" in str(exc), str(exc).replace(chr(10), " "))
        else:
            print("NO ERROR")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"process died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("RAISED"), proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.startswith("RAISED True"), f"message should name the indices: {proc.stdout}"


def test_errors_leave_no_state_behind(on_device):
    """After a rejected call the same functions still work (no half-initialised state)."""
    with pytest.raises(ERRORS):
        tf.conv2d(X2(), W2(), stride=0)
    x, w = X2(), W2()
    torch.testing.assert_close(tf.conv2d(x, w), torch.nn.functional.conv2d(x, w), rtol=1e-4, atol=1e-5)


def test_max_pool_backward_rejects_an_index_outside_its_window(device):
    """An index inside the plane but outside its own output's window (which no forward gives) is refused
    on every device: the CPU's scatter would send its gradient there, CUDA's gather would drop it."""
    x = torch.randn(1, 2, 4, 4, device=device, dtype=torch.float64)
    geometry = ([3, 3], [2, 2], [1, 1], [1, 1])
    _, idx = ops.max_pool_forward(x, *geometry, False)
    go = torch.arange(1.0, 9.0, device=device, dtype=torch.float64).reshape(1, 2, 2, 2)
    own = ops.max_pool_backward(go, idx, [1, 2, 4, 4], *geometry)  # the forward's own indices pass
    bad = idx.clone()
    bad[0, 1, 0, 0] = 10  # pixel (2, 2): in the plane, but window (0, 0) spans rows and columns -1..1
    expect_error(
        lambda: ops.max_pool_backward(go, bad, [1, 2, 4, 4], *geometry),
        r"max_pool2d backward: indices\[0, 1, 0, 0\] = 10 is not a position in that output's window",
        r"input_size=\[1, 2, 4, 4\]",
        r"kernel_size=\[3, 3\], stride=\[2, 2\], padding=\[1, 1\], dilation=\[1, 1\]",
    )
    # -1 marks "no argmax": that output's gradient goes nowhere
    dropped = idx.clone()
    dropped[0, 0, 1, 1] = -1
    got = ops.max_pool_backward(go, dropped, [1, 2, 4, 4], *geometry)
    expected = own.clone()
    expected.view(1, 2, 16)[0, 0, idx[0, 0, 1, 1]] -= go[0, 0, 1, 1]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_max_pool1d_backward_names_the_foreign_index(device):
    x = torch.randn(2, 3, 9, device=device)
    _, idx = ops.max_pool_forward(x, [2], [2], [0], [2], False)  # dilated: taps 0 and 2 of each window
    bad = idx.clone()
    bad[1, 2, 1] = 3  # window 1 taps 2 and 4; 3 falls between them
    expect_error(
        lambda: ops.max_pool_backward(torch.ones_like(x[..., :4]), bad, [2, 3, 9], [2], [2], [0], [2]),
        r"max_pool1d backward: indices\[1, 2, 1\] = 3 is not a position in that output's window",
        r"kernel_size=\[2\], stride=\[2\], padding=\[0\], dilation=\[2\]",
    )


def test_max_pool_backward_accepts_every_tap_of_a_window(device):
    """The window check refuses nothing a forward could give: here each output's index is the last tap of
    its window that lies in the input (the far corner; in the last row and column, where ceil_mode lets
    the window hang over the edge, one short of it)."""
    from torch_manualgrad import reference

    size, kernel, stride, padding = 7, 3, 2, 1
    out = -(-(size + 2 * padding - kernel) // stride) + 1  # ceil_mode: 4, the last window over the edge
    last = [min(o * stride - padding + kernel - 1, size - 1) for o in range(out)]
    idx = torch.tensor([[h * size + w for w in last] for h in last]).view(1, 1, out, out).to(device)
    go = torch.arange(1.0, 1.0 + out * out, dtype=torch.float64).view(1, 1, out, out).to(device)
    got = ops.max_pool_backward(go, idx, [1, 1, size, size], [kernel] * 2, [stride] * 2, [padding] * 2, [1, 1])
    expected = reference.max_pool_backward(go.cpu(), idx.cpu(), (1, 1, size, size))
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
