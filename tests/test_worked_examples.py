"""The worked examples of shared/seeds/README.md, with numbers derived by hand (not by the code under test)."""
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg

DTYPE = torch.float64
TIGHT = dict(rtol=0, atol=1e-12)


def t(values, device):
    return torch.tensor(values, dtype=DTYPE, device=device)


# --------------------------------------------------------------------------------------------------
# conv-weight-sharing: input [1, 2, 3], filter [0.3, 0.5], stride 1, no padding, zero bias
# --------------------------------------------------------------------------------------------------


def _conv_example(device):
    x = t([[[1.0, 2.0, 3.0]]], device).requires_grad_()  # (N=1, C=1, L=3)
    w = t([[[0.3, 0.5]]], device).requires_grad_()  # (out=1, in=1, k=2)
    b = t([0.0], device).requires_grad_()
    return x, w, b


def test_conv1d_example_forward(device):
    x, w, b = _conv_example(device)
    out = tmg.functional.conv1d(x, w, b)
    # [1*0.3 + 2*0.5, 2*0.3 + 3*0.5]
    torch.testing.assert_close(out, t([[[1.3, 2.1]]], device), **TIGHT)


def test_conv1d_example_backward_autograd(device):
    x, w, b = _conv_example(device)
    out = tmg.functional.conv1d(x, w, b)
    out.backward(t([[[-0.1, 0.2]]], device))
    # placement 1 adds [1*-0.1, 2*-0.1], placement 2 adds [2*0.2, 3*0.2]
    torch.testing.assert_close(w.grad, t([[[0.3, 0.4]]], device), **TIGHT)
    # the bias gradient is the sum of the output deltas
    torch.testing.assert_close(b.grad, t([0.1], device), **TIGHT)
    # [-0.03, -0.05, 0] + [0, 0.06, 0.1]
    torch.testing.assert_close(x.grad, t([[[-0.03, 0.01, 0.1]]], device), **TIGHT)


def test_conv1d_example_backward_op(device):
    x, w, _ = _conv_example(device)
    gi, gw, gb = torch.ops.manualgrad.conv_backward(
        t([[[-0.1, 0.2]]], device), x.detach(), w.detach(), [1], [0], [1], 1, [True, True, True]
    )
    torch.testing.assert_close(gi, t([[[-0.03, 0.01, 0.1]]], device), **TIGHT)
    torch.testing.assert_close(gw, t([[[0.3, 0.4]]], device), **TIGHT)
    torch.testing.assert_close(gb, t([0.1], device), **TIGHT)
    out = torch.ops.manualgrad.conv_forward(x.detach(), w.detach(), None, [1], [0], [1], 1)
    torch.testing.assert_close(out, t([[[1.3, 2.1]]], device), **TIGHT)


def test_conv1d_example_each_placement_adds(device):
    """One delta at a time: each placement's contribution on its own, and they add up."""
    x, w, _ = _conv_example(device)
    gi1, gw1, gb1 = torch.ops.manualgrad.conv_backward(
        t([[[-0.1, 0.0]]], device), x.detach(), w.detach(), [1], [0], [1], 1, [True, True, True]
    )
    torch.testing.assert_close(gi1, t([[[-0.03, -0.05, 0.0]]], device), **TIGHT)
    torch.testing.assert_close(gw1, t([[[-0.1, -0.2]]], device), **TIGHT)
    torch.testing.assert_close(gb1, t([-0.1], device), **TIGHT)
    gi2, gw2, gb2 = torch.ops.manualgrad.conv_backward(
        t([[[0.0, 0.2]]], device), x.detach(), w.detach(), [1], [0], [1], 1, [True, True, True]
    )
    torch.testing.assert_close(gi2, t([[[0.0, 0.06, 0.1]]], device), **TIGHT)
    torch.testing.assert_close(gw2, t([[[0.4, 0.6]]], device), **TIGHT)
    torch.testing.assert_close(gb2, t([0.2], device), **TIGHT)


def test_conv1d_example_unbatched_and_module(device):
    x = t([[1.0, 2.0, 3.0]], device).requires_grad_()  # unbatched (C=1, L=3)
    conv = tmg.nn.Conv1d(1, 1, 2, dtype=DTYPE, device=device)
    with torch.no_grad():
        conv.weight.copy_(t([[[0.3, 0.5]]], device))
        conv.bias.zero_()
    out = conv(x)
    torch.testing.assert_close(out, t([[1.3, 2.1]], device), **TIGHT)
    out.backward(t([[-0.1, 0.2]], device))
    torch.testing.assert_close(conv.weight.grad, t([[[0.3, 0.4]]], device), **TIGHT)
    torch.testing.assert_close(conv.bias.grad, t([0.1], device), **TIGHT)
    torch.testing.assert_close(x.grad, t([[-0.03, 0.01, 0.1]], device), **TIGHT)


# --------------------------------------------------------------------------------------------------
# maxpool-backprop: a 2x2 max-pool feeding a fully connected layer whose neurons carry gradients 2, 3, 6
# --------------------------------------------------------------------------------------------------

POOL_INPUT = [
    [1.0, 5.0, 2.0, 0.0],
    [3.0, 4.0, 9.0, 1.0],
    [7.0, 7.0, 6.0, 8.0],
    [2.0, 0.0, 8.0, 3.0],
]
# windows (row-major): [1 5; 3 4] -> 5 at (0,1); [2 0; 9 1] -> 9 at (1,2);
# [7 7; 2 0] -> tie, first in scan order (2,0); [6 8; 8 3] -> tie, first in scan order (2,3)
FC_WEIGHT = [
    [1.0, 0.0, 2.0, -1.0],
    [0.0, 1.0, 1.0, 2.0],
    [1.0, -1.0, 0.0, 1.0],
]
FC_GRADS = [2.0, 3.0, 6.0]


def test_max_pool_into_fc(device):
    x = t([[POOL_INPUT]], device).requires_grad_()  # (1, 1, 4, 4)
    pooled, idx = tmg.functional.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(pooled, t([[[[5.0, 9.0], [7.0, 8.0]]]], device), rtol=0, atol=0)
    assert idx.tolist() == [[[[1, 6], [8, 11]]]]

    pooled.retain_grad()
    fc = F.linear(pooled.flatten(1), t(FC_WEIGHT, device))  # f is the identity, so f' = 1
    # FC = W @ [5, 9, 7, 8] = [5 + 14 - 8, 9 + 7 + 16, 5 - 9 + 8]
    torch.testing.assert_close(fc, t([[11.0, 32.0, 4.0]], device), rtol=0, atol=0)
    fc.backward(t([FC_GRADS], device))

    # grad(P_j) = sum_i grad(FC_i) W_ij = 2*W[0] + 3*W[1] + 6*W[2]: different for every pooling unit
    torch.testing.assert_close(pooled.grad, t([[[[8.0, -3.0], [7.0, 10.0]]]], device), rtol=0, atol=0)
    # only each window's max unit receives it; ties go to the first maximum; everything else is zero
    expected = [
        [0.0, 8.0, 0.0, 0.0],
        [0.0, 0.0, -3.0, 0.0],
        [7.0, 0.0, 0.0, 10.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    torch.testing.assert_close(x.grad, t([[expected]], device), rtol=0, atol=0)


def test_max_pool_into_fc_op(device):
    x = t([[POOL_INPUT]], device)
    out, idx = torch.ops.manualgrad.max_pool_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert idx.tolist() == [[[[1, 6], [8, 11]]]]
    grad = torch.ops.manualgrad.max_pool_backward(t([[[[8.0, -3.0], [7.0, 10.0]]]], device), idx, list(x.shape), [2, 2], [2, 2], [0, 0], [1, 1])
    expected = [[0.0, 8.0, 0.0, 0.0], [0.0, 0.0, -3.0, 0.0], [7.0, 0.0, 0.0, 10.0], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(grad, t([[expected]], device), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# maxpool-backprop: a max-pool feeding a convolution; contributions to a shared pooling unit ADD
# --------------------------------------------------------------------------------------------------


def test_max_pool_into_conv1d_contributions_add(device):
    # pool k=2, s=2: [4 1 | 0 6 | 2 2] -> P = [4, 6, 2] at indices [0, 3, 4] (the tie goes to the first)
    x = t([[[4.0, 1.0, 0.0, 6.0, 2.0, 2.0]]], device).requires_grad_()
    pooled = tmg.functional.max_pool1d(x, 2)
    torch.testing.assert_close(pooled, t([[[4.0, 6.0, 2.0]]], device), rtol=0, atol=0)
    # conv with filter [2, 3]: C = [2*4 + 3*6, 2*6 + 3*2] = [26, 18]
    w = t([[[2.0, 3.0]]], device)
    out = tmg.functional.conv1d(pooled, w)
    torch.testing.assert_close(out, t([[[26.0, 18.0]]], device), rtol=0, atol=0)
    out.backward(t([[[5.0, 7.0]]], device))
    # P0 is used by C0 only: 5*2 = 10; P1 by both: 5*3 + 7*2 = 29 (added, not 15*14);
    # P2 by C1 only: 7*3 = 21. Each goes to the argmax of its window.
    torch.testing.assert_close(x.grad, t([[[10.0, 0.0, 0.0, 29.0, 21.0, 0.0]]], device), rtol=0, atol=0)


def test_max_pool_into_conv2d_contributions_add(device):
    # 6x6 input, 2x2 pool: each window holds one positive maximum (1..9) among -1s
    x = t(
        [
            [
                [
                    [-1.0, -1.0, 2.0, -1.0, -1.0, -1.0],
                    [-1.0, 1.0, -1.0, -1.0, 3.0, -1.0],
                    [-1.0, 4.0, -1.0, -1.0, 6.0, -1.0],
                    [-1.0, -1.0, -1.0, 5.0, -1.0, -1.0],
                    [7.0, -1.0, -1.0, -1.0, -1.0, -1.0],
                    [-1.0, -1.0, 8.0, -1.0, -1.0, 9.0],
                ]
            ]
        ],
        device,
    ).requires_grad_()
    pooled = tmg.functional.max_pool2d(x, 2)
    torch.testing.assert_close(pooled, t([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]]], device), rtol=0, atol=0)
    w = t([[[[1.0, 2.0], [3.0, 4.0]]]], device)
    out = tmg.functional.conv2d(pooled, w)  # 2x2 output, every upstream gradient 1
    # out[0][0] = 1*1 + 2*2 + 3*4 + 4*5 = 37, out[0][1] = 2 + 6 + 15 + 24 = 47,
    # out[1][0] = 4 + 10 + 21 + 32 = 67, out[1][1] = 5 + 12 + 24 + 36 = 77
    torch.testing.assert_close(out, t([[[[37.0, 47.0], [67.0, 77.0]]]], device), rtol=0, atol=0)
    out.backward(torch.ones_like(out))
    # pooling unit (i, j) collects w[i-a][j-b] from every output (a, b) whose window covers it:
    # corners get one weight, edges two, the centre all four: 1 + 2 + 3 + 4 = 10
    expected_pooled_grad = [[1.0, 3.0, 2.0], [4.0, 10.0, 6.0], [3.0, 7.0, 4.0]]
    expected = [[0.0] * 6 for _ in range(6)]
    argmax = {(0, 0): (1, 1), (0, 1): (0, 2), (0, 2): (1, 4), (1, 0): (2, 1), (1, 1): (3, 3), (1, 2): (2, 4),
              (2, 0): (4, 0), (2, 1): (5, 2), (2, 2): (5, 5)}
    for (i, j), (r, c) in argmax.items():
        expected[r][c] = expected_pooled_grad[i][j]
    torch.testing.assert_close(x.grad, t([[expected]], device), rtol=0, atol=0)


def test_max_pool_overlapping_windows_add(device):
    """Overlapping windows (stride < kernel) that pick the same input unit add their gradients there."""
    x = t([[[0.0, 9.0, 1.0, 2.0]]], device).requires_grad_()
    out, idx = tmg.functional.max_pool1d(x, 2, stride=1, return_indices=True)
    # windows [0 9] [9 1] [1 2] -> 9, 9, 2 at indices 1, 1, 3
    assert idx.tolist() == [[[1, 1, 3]]]
    out.backward(t([[[2.0, 3.0, 6.0]]], device))
    torch.testing.assert_close(x.grad, t([[[0.0, 5.0, 0.0, 6.0]]], device), rtol=0, atol=0)
