"""Edge cases found in review: ceil_mode windows hanging past a tiny input, int64-overflowing arguments,
huge pool kernels over small inputs, unsupported dtypes, thread-count determinism at batch 1, and the CPU
convolution's cache-sized tiles (forward and weight gradient)."""
import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg

ops = torch.ops.manualgrad


@pytest.mark.parametrize("length,kernel,stride,dilation", [(3, 3, 3, 2), (4, 3, 4, 2), (2, 2, 3, 2)])
def test_ceil_mode_window_hanging_past_a_small_input_matches_torch(length, kernel, stride, dilation):
    x = torch.randn(2, 3, length, dtype=torch.float64)
    out, idx = tmg.functional.max_pool1d(x, kernel, stride, 0, dilation, ceil_mode=True, return_indices=True)
    ref, ref_idx = F.max_pool1d(x, kernel, stride, 0, dilation, ceil_mode=True, return_indices=True)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)
    fake = ops.max_pool_forward(x.to("meta"), [kernel], [stride], [0], [dilation], True)[0]
    assert fake.shape == out.shape


@pytest.mark.parametrize(
    "call",
    [
        lambda: ops.conv_forward(torch.randn(1, 4, 32), torch.randn(4, 1, 9), None, [1], [0], [2**61 + 1], 4),
        lambda: ops.conv_forward(torch.randn(1, 4, 32), torch.randn(4, 4, 9), None, [1], [0], [2**61 + 1], 1),
        lambda: ops.conv_forward(torch.randn(1, 4, 32), torch.randn(4, 4, 3), None, [1], [2**63 - 1], [1], 1),
        lambda: ops.max_pool_forward(torch.randn(1, 4, 32), [9], [1], [0], [2**61 + 1], False),
    ],
)
def test_arguments_that_overflow_int64_are_rejected(call):
    with pytest.raises(RuntimeError, match=r"overflows int64"):
        call()


def test_huge_pool_kernel_over_a_small_input_is_one_global_window_per_output():
    x = torch.randn(2, 3, 16)
    out, idx = ops.max_pool_forward(x, [2**62], [1], [2**61], [1], False)
    assert out.shape == (2, 3, 17)
    torch.testing.assert_close(out, x.amax(-1, keepdim=True).expand_as(out), rtol=0, atol=0)
    assert torch.equal(idx, x.argmax(-1, keepdim=True).expand_as(idx))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn])
def test_unsupported_floating_types_get_a_clear_error(dtype):
    # complex convolutions are computed by the functional API (test_complex.py); the op refuses them
    conv = ops.conv_forward if dtype.is_complex else tmg.functional.conv2d
    with pytest.raises(RuntimeError, match=r"float32, float64, float16 or bfloat16.*input of dtype"):
        conv(torch.randn(1, 1, 4, 4).to(dtype), torch.randn(1, 1, 2, 2).to(dtype), None, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"float32, float64, float16, bfloat16.*integer.*input of dtype"):
        tmg.functional.max_pool2d(torch.randn(1, 1, 4, 4).to(dtype), 2)


def test_max_pool_backward_rejects_a_zero_spatial_input_size():
    grad, idx = torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"input_size=\[1, 1, 0, 4\]"):
        ops.max_pool_backward(grad, idx, [1, 1, 0, 4], [2, 2], [2, 2], [0, 0], [1, 1])


def test_max_pool_backward_rejects_an_empty_grad_output_grid(device):
    """A forward never has zero output positions along an axis; such a grad_output is refused (on CUDA
    the gather would otherwise divide by its zero width)."""
    grad, idx = torch.ones(1, 1, 0, 3, device=device), torch.zeros(1, 1, 0, 3, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match=r"expected grad_output of shape \[1, 1, 2, 2\].*but got grad_output of shape \[1, 1, 0, 3\]"):
        ops.max_pool_backward(grad, idx, [1, 1, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1])
    # an input smaller than the window: the window grid a forward would compute is itself empty
    grad, idx = torch.ones(1, 1, 0, 2, device=device), torch.zeros(1, 1, 0, 2, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match=r"grad_output.*positive spatial sizes.*\[1, 1, 0, 2\]"):
        ops.max_pool_backward(grad, idx, [1, 1, 2, 4], [3, 2], [1, 2], [0, 0], [1, 1])


def test_float_pool_stride_is_a_type_error_naming_stride():
    with pytest.raises(TypeError, match=r"stride=2\.0"):
        tmg.functional.max_pool2d(torch.randn(1, 1, 4, 4), 2, stride=2.0)


@pytest.mark.parametrize("shape", [(1, 1, 1024, 20, 3), (1, 512, 16, 22, 3), (1, 256, 256, 22, 1)])
def test_batch_one_is_bit_identical_across_thread_counts(shape, restore_num_threads):
    """A batch of one is a single task for some layers; it must still not let BLAS split it by thread count."""
    n, cin, cout, size, k = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, size, size, generator=gen)
    w = torch.randn(cout, cin, k, k, generator=gen)
    go = torch.randn(n, cout, size, size, generator=gen)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y = ops.conv_forward(x, w, None, [1, 1], [k // 2, k // 2], [1, 1], 1)
        gi, gw, _ = ops.conv_backward(go, x, w, [1, 1], [k // 2, k // 2], [1, 1], 1, [True, True, False])
        results.append((y, gi, gw))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_windows_are_index_minus_one_in_ops_and_reference():
    from torch_manualgrad import reference

    x = torch.randn(1, 2, 2, dtype=torch.float64)  # kernel 2, dilation 3, padding 1: taps at -1 and 2, both outside
    out, idx = ops.max_pool_forward(x, [2], [1], [1], [3], False)
    ref_out, ref_idx = reference.max_pool_forward(x, (2,), (1,), (1,), (3,), False)
    assert torch.equal(idx, ref_idx) and (idx == -1).all()
    assert torch.isneginf(out).all() and torch.equal(out, ref_out)
    go = torch.ones_like(out)
    assert torch.equal(ops.max_pool_backward(go, idx, [1, 2, 2], [2], [1], [1], [3]), reference.max_pool_backward(go, idx, (1, 2, 2)))


@pytest.mark.parametrize(
    "x_shape, w_shape",
    # Columns of every image together over conv_cpu.cpp's kMaxColumnElems (4M), so that the weight
    # gradient takes the per-block slots too: 2 tiles of 579 + 578 positions an image; 1-d, 3 tiles.
    [((8, 64, 13, 89), (8, 64, 3, 3)), ((8, 128, 2000), (4, 128, 3))],
    ids=str,
)
def test_cache_sized_tiles_match_torch(x_shape, w_shape, restore_num_threads):
    """The CPU forward and weight gradient cut an image whose columns outgrow the L2 cache into tiles of
    positions (conv_cpu.cpp, cache_tiles): the tiles together give torch's output and gradients, and the
    same bits at any thread count."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w_shape[0], generator=gen, dtype=torch.float64, requires_grad=True)
    conv = F.conv1d if len(x_shape) == 3 else F.conv2d
    ours_fn = tmg.functional.conv1d if len(x_shape) == 3 else tmg.functional.conv2d
    expected = conv(x, w, b, padding=1)
    grad_output = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, (x, w, b), grad_output)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = ours_fn(x, w, b, padding=1)
        results.append((out, *torch.autograd.grad(out, (x, w, b), grad_output)))
    for got, want in zip(results[0], (expected, *expected_grads)):
        torch.testing.assert_close(got, want)
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_depthwise_with_padding_and_dilation_near_int32_max_matches_torch():
    """Issue 11: this valid call segfaulted (the padded plane's size overflowed int64 to 0)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 4, generator=gen, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, generator=gen, requires_grad=True)
    out = tmg.functional.conv2d(x, w, None, 1, 2**31 - 2, 2**31 - 2, 3)
    ref = F.conv2d(x, w, None, 1, 2**31 - 2, 2**31 - 2, 3)
    torch.testing.assert_close(out, ref)
    go = torch.randn(ref.shape, generator=gen)
    for ours, theirs in zip(torch.autograd.grad(out, (x, w), go), torch.autograd.grad(ref, (x, w), go)):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("stride", [[1, 2**26], [1, 2**40], [2**63 - 1, 2**62]], ids=str)
@pytest.mark.parametrize("return_indices", [False, True])
def test_pool_strides_beyond_the_input_give_one_window_per_row(stride, return_indices):
    """Issue 11: these took seconds and gigabytes, raised std::bad_alloc, or a ValueError naming nothing.
    Each row (or the whole plane) has a single window, at its start."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    got = tmg.functional.max_pool2d(x, 2, stride, return_indices=return_indices)
    windows = x[..., :2, :2] if stride[0] > 8 else x[..., :, :2].unfold(2, 2, 1).transpose(-1, -2)
    want = windows.amax((-2, -1)).reshape(2, 3, -1, 1)
    torch.testing.assert_close(got[0] if return_indices else got, want, rtol=0, atol=0)
    if return_indices and max(stride) < 2**31:  # torch takes 32-bit strides
        torch.testing.assert_close(got, F.max_pool2d(x, 2, stride, return_indices=True), rtol=0, atol=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda f, np: f.conv2d(torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3), None, np.int64(2), np.int32(1), np.int64(2), np.int64(2)),
        lambda f, np: f.conv1d(torch.randn(2, 8), torch.randn(4, 2, 3), None, (np.int64(2),), [np.int16(1)], torch.tensor(2)),
        lambda f, np: f.conv2d(torch.randn(1, 2, 8, 8), torch.randn(2, 2, 3, 3), None, (torch.tensor(2), 1)),
        lambda f, np: f.max_pool2d(torch.randn(1, 2, 9, 9), np.int64(3), (np.int64(2), 1), np.int64(1), np.int8(1), True, True),
        lambda f, np: f.max_pool1d(torch.randn(2, 9), np.uint8(3), np.int64(2), return_indices=True),
    ],
)
def test_numpy_integers_and_integer_scalar_tensors_as_sizes_match_torch(call):
    """torch's argument parser takes anything with __index__ for an int (numpy's integers, a 0-d integer
    tensor): sizes computed with numpy reach F.conv2d so, and ours took them for a TypeError."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    ours = call(tmg.functional, np)
    torch.manual_seed(0)
    theirs = call(F, np)
    for o, t in zip(ours if isinstance(ours, tuple) else (ours,), theirs if isinstance(theirs, tuple) else (theirs,)):
        torch.testing.assert_close(o, t)


@pytest.mark.parametrize("groups", [True, 2.0, None, "2"])
def test_groups_that_are_not_ints_are_type_errors_as_in_torch(groups):
    """groups=True was taken for 1 (and the others gave the dispatcher's RuntimeError); torch's parser
    raises TypeError for each."""
    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 2, 3, 3)
    with pytest.raises(TypeError):
        F.conv2d(x, w, None, 1, 0, 1, groups)
    with pytest.raises(TypeError, match="groups"):
        tmg.functional.conv2d(x, w, None, 1, 0, 1, groups)


@pytest.mark.parametrize("dims", (1, 2, 3))
@pytest.mark.parametrize("channels_last", (False, True))
def test_an_empty_batch_of_inputs_without_positions_convolves_as_torchs(dims, channels_last):
    """An empty batch whose input has a size of 0, padded into positions: torch returns the empty output of those
    positions and zero gradients; a batch that is not empty is refused, by both, with torch's words."""
    w = torch.randn(3, 4, *(2,) * dims, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    ours, theirs = getattr(tmg.functional, f"conv{dims}d"), getattr(torch.nn.functional, f"conv{dims}d")
    for size in ((0, 3, 1), (1, 0, 3), (3, 1, 0))[:dims]:
        x = torch.randn(0, 4, *size[:dims], dtype=torch.float64)
        if channels_last and dims > 1:
            x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
        results = []
        for fn in (theirs, ours):
            leaves = [t.detach().requires_grad_() for t in (x, w, b)]
            y = fn(*leaves, padding=1)
            results.append((y.shape, y.stride(), *torch.autograd.grad(y.sum(), leaves)))
        assert results[1][:2] == results[0][:2] and results[1][0][2:] == tuple(s + 1 for s in size[:dims])
        for mine, torchs in zip(results[1][2:], results[0][2:]):
            assert mine.shape == torchs.shape and not mine.any() and not torchs.any()
        full = torch.randn(2, 4, *size[:dims], dtype=torch.float64)
        for fn in (theirs, ours):
            with pytest.raises(RuntimeError, match="Only zero batch or zero channel inputs are supported"):
                fn(full, w, b, padding=1)
