"""Max-pool of integer tensors (uint8, int8, int16, int32, int64), as torch's max_pool2d takes them on the CPU
(on CUDA too, where torch's refuses them; its CPU result is the reference there):
maxima and indices bit for bit against torch on every forward path (phase sweep, direct loop, 1-d rows,
chunked long planes), windows of nothing but the type's lowest value, padding that must never win, ties,
channels-last input; and no gradient (integer tensors cannot require grad)."""
import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg

tf = tmg.functional
INTEGERS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]

# (input spatial size, kernel, stride, padding, dilation, ceil_mode): the phase sweep (stride near the
# kernel), the direct loop (stride far above the kernel; dilation a multiple of the stride), ceil_mode
# windows hanging over the end, and planes wider than one chunk of the sweep
GEOMETRIES = [
    ((7, 9), (3, 3), (2, 2), (1, 1), (1, 1), False),
    ((6, 11), (2, 3), (1, 2), (1, 1), (2, 1), True),
    ((5, 40), (2, 2), (3, 17), (1, 1), (1, 1), False),
    ((6, 12), (2, 3), (2, 2), (0, 1), (1, 4), True),
    ((2, 9000), (2, 5), (1, 3), (1, 2), (1, 1), False),
]


def int_input(shape, dtype, gen, low=False):
    info = torch.iinfo(dtype)
    start = info.min if low else max(info.min, -3)
    return torch.randint(start, start + 4, shape, generator=gen, dtype=torch.int64).to(dtype)


def check_against_torch(x, kwargs, dims, device):
    pool_ours, pool_theirs = getattr(tf, f"max_pool{dims}d"), getattr(F, f"max_pool{dims}d")
    # torch's CUDA max-pool refuses integers ("not implemented for 'Int'"): its CPU one is the reference
    theirs, their_indices = pool_theirs(x.cpu(), **kwargs, return_indices=True)
    x = x.to(device)
    ours, our_indices = (t.cpu() for t in pool_ours(x, **kwargs, return_indices=True))
    assert ours.dtype == x.dtype and torch.equal(ours, theirs)
    assert torch.equal(pool_ours(x, **kwargs).cpu(), theirs)  # the path without indices
    in_window = our_indices >= 0  # -1: a window wholly in the padding, where torch's index is arbitrary
    assert torch.equal(our_indices[in_window], their_indices[in_window])
    info = torch.iinfo(x.dtype)
    assert (ours[~in_window] == info.min).all()  # such a window's maximum is the lowest value, as torch's


@pytest.mark.parametrize("dtype", INTEGERS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"in{g[0]}-k{g[1]}-s{g[2]}-p{g[3]}-d{g[4]}-ceil{g[5]}")
@pytest.mark.parametrize("low", [False, True], ids=["small", "lowest"])
def test_max_pool2d_matches_torch(device, dtype, geometry, low):
    size, kernel, stride, padding, dilation, ceil_mode = geometry
    gen = torch.Generator().manual_seed(0)
    x = int_input((2, 3, *size), dtype, gen, low=low)
    kwargs = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    check_against_torch(x, kwargs, 2, device)


@pytest.mark.parametrize("dtype", INTEGERS)
@pytest.mark.parametrize("low", [False, True], ids=["small", "lowest"])
def test_max_pool1d_matches_torch(device, dtype, low):
    """torch's max_pool1d takes integers only when it returns indices; both our paths take them."""
    gen = torch.Generator().manual_seed(1)
    for length, kernel, stride, padding, dilation, ceil_mode in [(13, 3, 2, 1, 1, True), (40, 2, 9, 1, 3, False), (9000, 4, 3, 2, 1, False)]:
        x = int_input((2, 3, length), dtype, gen, low=low)
        kwargs = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
        check_against_torch(x, kwargs, 1, device)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_all_lowest_windows_and_padding(device, dtype):
    """Every value the type's lowest: padding (never read as a value) must not win, and each window's
    argmax is its first in-bounds tap, as torch's (torch's test_max_pool2d_corner_cases too)."""
    low = torch.iinfo(dtype).min
    x = torch.full((1, 1, 2, 2), low, dtype=dtype)
    check_against_torch(x, dict(kernel_size=2, stride=1, padding=1), 2, device)
    x = torch.tensor([[[[-1, -2], [-3, -4]]]]).to(dtype) if dtype != torch.uint8 else torch.tensor([[[[4, 3], [2, 1]]]], dtype=dtype)
    check_against_torch(x, dict(kernel_size=2, stride=2, padding=1, dilation=2, ceil_mode=True), 2, device)
    x = torch.full((1, 1, 1, 1), low, dtype=dtype)  # the only window's taps all fall in the padding
    ours, indices = tf.max_pool2d(x.to(device), 2, 1, 1, 2, return_indices=True)
    assert ours.item() == low and indices.item() == -1


def test_channels_last_and_unbatched_integers(device):
    gen = torch.Generator().manual_seed(2)
    x = int_input((2, 4, 6, 6), torch.int32, gen).contiguous(memory_format=torch.channels_last)[:, ::2]
    ours, theirs = tf.max_pool2d(x.to(device), 2), F.max_pool2d(x, 2)
    assert torch.equal(ours.cpu(), theirs) and ours.stride() == theirs.stride()
    check_against_torch(int_input((3, 5, 5), torch.int16, gen), dict(kernel_size=3, stride=2, padding=1), 2, device)


def test_integer_max_pool_has_no_gradient(device):
    x = torch.arange(16, dtype=torch.int64, device=device).reshape(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="only Tensors of floating point dtype can require gradients"):
        x.requires_grad_()
    with pytest.raises(RuntimeError, match=r"grad_output.*Long.*cannot require grad"):
        torch.ops.manualgrad.max_pool_backward(
            torch.ones(1, 1, 2, 2, dtype=torch.int64, device=device), torch.zeros(1, 1, 2, 2, dtype=torch.int64, device=device),
            [1, 1, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1])
    assert tmg.nn.MaxPool2d(2)(x).dtype == torch.int64
