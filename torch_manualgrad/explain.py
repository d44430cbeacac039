"""python -m torch_manualgrad explain {conv1d,maxpool,conv2d,transposed}: the source documents' worked examples, computed by our kernels and checked against torch autograd.

Only the inputs of each example are written here (the input, the filter, the deltas coming back); every
result that is printed comes out of torch.ops.manualgrad.* and is compared with torch's own autograd
and with the loop-level reference (torch_manualgrad.reference), one ✓ or ✗ line per comparison. A single placement's (or window's) share of a gradient is obtained by
calling the backward op with a grad_output that holds that placement's delta and zeros elsewhere.
`--plot DIR` also draws the examples as PNG figures (matplotlib, imported only then).
"""
import os
import sys

import torch
import torch.nn.functional as F

from . import functional, reference
from ._ops import ops

DTYPE = torch.float64  # the examples' decimals (0.3, -0.03, ...) print exactly at float64
ALL_GRADS = [True, True, True]


# --------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------


def _num(v):
    """A number the way the documents write it: 1.3, -0.03, 0 (no float noise, no -0)."""
    v = float(v)
    if v != v:
        return "nan"
    if abs(v) < 1e-12:
        return "0"
    return f"{v:.6g}"


def _p(v):
    """A factor in a product: negative numbers in parentheses."""
    s = _num(v)
    return f"({s})" if s.startswith("-") else s


def _list(t):
    """A tensor as a nested list: [1.3, 2.1] or [[1, 2], [0, 1]]."""
    if t.dim() == 0:
        return _num(t)
    return "[" + ", ".join(_list(s) for s in t) + "]"


def _grid(t, indent="    "):
    """A 2-d tensor as aligned rows."""
    rows = [[_num(v) for v in row] for row in t.tolist()]
    width = max(len(s) for row in rows for s in row)
    return "\n".join(indent + "  ".join(s.rjust(width) for s in row) for row in rows)


class Lesson:
    """Prints the lesson and keeps the score of the checks against torch autograd."""

    def __init__(self):
        self.passed = 0
        self.failed = []

    def title(self, text):
        print()
        print(text)
        print("=" * len(text))

    def section(self, text):
        print()
        print(text)
        print("-" * len(text))

    def say(self, text=""):
        print(text)

    def grid(self, label, t, indent="    "):
        print(f"  {label}")
        print(_grid(t, indent))

    def check(self, what, ours, expected):
        """One ✓/✗ line: ours against the expected tensor (exact for integers, to 1e-12 for floats)."""
        ours, expected = torch.as_tensor(ours), torch.as_tensor(expected)
        if ours.shape != expected.shape:
            ok = False
        elif ours.is_floating_point() or expected.is_floating_point():
            ok = torch.allclose(ours.to(DTYPE), expected.to(DTYPE), rtol=1e-9, atol=1e-12)
        else:
            ok = torch.equal(ours, expected)
        if ok:
            self.passed += 1
            print(f"  ✓ {what}")
        else:
            self.failed.append(what)
            print(f"  ✗ {what}: ours {_list(ours)}, torch {_list(expected)}")
        return ok

    def summary(self):
        total = self.passed + len(self.failed)
        print()
        if self.failed:
            print(f"✗ {len(self.failed)} of {total} checks FAILED: " + "; ".join(self.failed))
        else:
            print(f"✓ all {total} checks agree with torch autograd")
        return 0 if not self.failed else 1


# --------------------------------------------------------------------------------------------------
# Our ops with stride 1, no padding, no dilation, one group (all the examples use that geometry)
# --------------------------------------------------------------------------------------------------


def _t(values):
    return torch.tensor(values, dtype=DTYPE)


def _conv(x, w, b=None):
    d = x.dim() - 2
    return ops.conv_forward(x, w, b, [1] * d, [0] * d, [1] * d, 1)


def _conv_grads(grad_output, x, w):
    d = x.dim() - 2
    return ops.conv_backward(grad_output, x, w, [1] * d, [0] * d, [1] * d, 1, ALL_GRADS)


def _against_reference(delta, x, w, grads):
    """(ours, the reference's) for (grad_input, grad_weight, grad_bias) of a stride-1 unpadded conv."""
    d = x.dim() - 2
    loop = reference.conv_backward(delta, x, w, (1,) * d, (0,) * d, (1,) * d, 1)
    return torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in loop])


def _pool(x, k, s):
    d = x.dim() - 2
    return ops.max_pool_forward(x, [k] * d, [s] * d, [0] * d, [1] * d, False)


def _pool_grad(grad_output, indices, x, k, s):
    d = x.dim() - 2
    return ops.max_pool_backward(grad_output, indices, list(x.shape), [k] * d, [s] * d, [0] * d, [1] * d)


def _only_at(delta, position):
    """delta with every entry but one set to zero: what a single placement sends back."""
    one = torch.zeros_like(delta)
    one[(0, 0) + position] = delta[(0, 0) + position]
    return one


def _torch_grads(fn, inputs, grad_output):
    """torch's answer: fn built from torch.nn.functional, differentiated by torch autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out.detach(),) + torch.autograd.grad(out, leaves, grad_output)


def _positions(shape):
    """Every position of a spatial shape, row-major."""
    if len(shape) == 1:
        return [(i,) for i in range(shape[0])]
    return [(i, j) for i in range(shape[0]) for j in range(shape[1])]


def _where(position):
    return "(" + ",".join(str(i) for i in position) + ")"


def _window(t, position, k, s=1):
    """The k-wide slice (k×k in 2-d) of an (N, C, *spatial) tensor under a placement."""
    index = (0, 0) + tuple(slice(p * s, p * s + k) for p in position)
    return t[index]


# --------------------------------------------------------------------------------------------------
# conv1d: the conv-weight-sharing document
# --------------------------------------------------------------------------------------------------


def explain_conv1d(lesson, plot_dir):
    x = _t([[[1.0, 2.0, 3.0]]])  # (N, C, L)
    w = _t([[[0.3, 0.5]]])  # (out, in, k)
    b = _t([0.0])
    delta = _t([[[-0.1, 0.2]]])  # ∂L/∂y, from the next layer
    k = w.shape[-1]

    lesson.title("conv1d: one filter, shared by every placement (the conv-weight-sharing example)")
    lesson.say(f"input x = {_list(x[0, 0])}, filter w = {_list(w[0, 0])}, bias b = {_num(b[0])}; "
               "stride 1, no padding, no activation.")
    lesson.say("Every result below is computed by torch.ops.manualgrad.*; each ✓ compares it with torch autograd.")

    lesson.section("Forward: slide w along x; each placement is a dot product of its slice with w, plus b")
    y = _conv(x, w, b)
    ref_y, ref_gx, ref_gw, ref_gb = _torch_grads(F.conv1d, (x, w, b), delta)
    lesson.say("Next to each output: its local derivatives, what backward will multiply the delta by.")
    for (p,) in _positions(y.shape[2:]):
        piece = x[0, 0, p:p + k]
        terms = " + ".join(f"{_p(a)}×{_p(c)}" for a, c in zip(piece, w[0, 0]))
        lesson.say(f"  y{p + 1} = {terms} + {_num(b[0])} = {_num(y[0, 0, p])}"
                   f"      ∂y{p + 1}/∂w = its slice {_list(piece)},  ∂y{p + 1}/∂x[{p}:{p + k}] = w,  ∂y{p + 1}/∂b = 1")
    lesson.say(f"  y = {_list(y[0, 0])}")
    lesson.check("y matches torch.nn.functional.conv1d", y, ref_y)

    lesson.section("Backward: the weight gradient is a sum over placements")
    lesson.say(f"The next layer sends back the deltas δ = ∂L/∂y = {_list(delta[0, 0])}.")
    lesson.say("w is one parameter that every placement uses, so by the chain rule")
    lesson.say("  ∂L/∂w = Σ_p δ_p · ∂y_p/∂w = Σ_p δ_p × slice_p")
    lesson.say("One parameter gets one update, so the shared copies stay identical (no averaging needed).")
    lesson.say("Each placement on its own (conv_backward with its delta and zeros elsewhere):")
    shares = {}
    for (p,) in _positions(delta.shape[2:]):
        one = _only_at(delta, (p,))
        shares[p] = _conv_grads(one, x, w)
        _, _, ref_one_w, _ = _torch_grads(F.conv1d, (x, w, b), one)
        piece = x[0, 0, p:p + k]
        lesson.say(f"  placement {p + 1}: δ{p + 1} × slice = {_num(delta[0, 0, p])} × {_list(piece)} "
                   f"= {_list(shares[p][1][0, 0])}")
        lesson.check(f"placement {p + 1}'s weight share matches torch autograd", shares[p][1], ref_one_w)
    gx, gw, gb = _conv_grads(delta, x, w)
    summed_w = sum(share[1] for share in shares.values())
    lesson.say(f"  dW = {' + '.join(_list(share[1][0, 0]) for share in shares.values())} = {_list(summed_w[0, 0])}")
    lesson.check("the sum over placements equals one conv_backward call with all the deltas", summed_w, gw)
    lesson.check(f"dW = {_list(gw[0, 0])} matches torch autograd", gw, ref_gw)

    lesson.section("Backward: the bias gradient")
    lesson.say("∂y_p/∂b = 1 at every placement, so db = Σ_p δ_p:")
    lesson.say(f"  db = {' + '.join(_p(d) for d in delta[0, 0])} = {_num(gb[0])}")
    lesson.check(f"db = {_num(gb[0])} matches torch autograd", gb, ref_gb)

    lesson.section("Backward: the input gradient, built placement by placement")
    lesson.say("∂y_p/∂x = w on placement p's slice, so each placement adds δ_p × w into its slice.")
    lesson.say("Start from zeros shaped like x and add the placements one at a time:")
    running = torch.zeros_like(x)
    lesson.say(f"  {'start from':<52}{_list(running[0, 0])}")
    for p, (share_x, _, _) in shares.items():
        _, ref_one_x, _, _ = _torch_grads(F.conv1d, (x, w, b), _only_at(delta, (p,)))
        running = running + share_x
        added = f"placement {p + 1} adds δ{p + 1} × w = {_list(share_x[0, 0])}"
        lesson.say(f"  {added:<44}giving  {_list(running[0, 0])}")
        lesson.check(f"placement {p + 1}'s input share matches torch autograd", share_x, ref_one_x)
    lesson.say(f"  dX = {_list(running[0, 0])}")
    lesson.check("the accumulated placements equal one conv_backward call", running, gx)
    lesson.check(f"dX = {_list(gx[0, 0])} matches torch autograd", gx, ref_gx)
    lesson.check("dX, dW and db match the loop-level reference (torch_manualgrad.reference)",
                 *_against_reference(delta, x, w, (gx, gw, gb)))
    both = [p for p in range(x.shape[-1]) if sum(1 for q in shares if q <= p < q + k) > 1]
    for p in both:
        parts = " + ".join(_p(share[0][0, 0, p]) for share in shares.values())
        lesson.say(f"x[{p}] sits under both placements, so its gradient is a sum: {parts} = {_num(gx[0, 0, p])}.")

    if plot_dir is not None:
        return [_plot_conv1d(plot_dir, x, w, delta, shares, gw, gx)]
    return []


# --------------------------------------------------------------------------------------------------
# maxpool: the maxpool-backprop document
# --------------------------------------------------------------------------------------------------


def _describe_windows(lesson, x, out, idx, k, s, indent="  "):
    """One line per window: its values, the max and where it was (first in scan order on ties)."""
    width = x.shape[-1]
    for pos in _positions(out.shape[2:]):
        values = _window(x, pos, k, s)
        where = divmod(int(idx[(0, 0) + pos]), width)
        ties = int((values == out[(0, 0) + pos]).sum())
        note = f"   (a tie of {ties}: the first in scan order wins)" if ties > 1 else ""
        lesson.say(f"{indent}window {_where(pos)}: {_list(values)} → max {_num(out[(0, 0) + pos])} "
                   f"at x{_where(where)}{note}")


def explain_maxpool(lesson, plot_dir):
    lesson.title("maxpool: how a gradient gets back through a max-pooling layer (the maxpool-backprop example)")
    lesson.say("Every result below is computed by torch.ops.manualgrad.*; each ✓ compares it with torch autograd.")
    lesson.say("Rule: a unit's gradient is the sum, over every next-layer unit that used it, of that unit's")
    lesson.say("gradient × how much that unit depends on it. Max itself is an activation whose derivative")
    lesson.say("is 1 at the window's maximum and 0 elsewhere.")

    # ---- A: max-pool → fully connected ----------------------------------------------------------
    lesson.section("A. A max-pool feeding a fully connected layer")
    x = _t([[[[1, 5, 2, 0],
               [3, 2, 4, 4],
               [0, 1, 7, 2],
               [6, 2, 3, 1]]]])
    W = _t([[0.5, -1.0, 0.25, 0.0],
            [1.0, 0.5, -0.5, 0.25],
            [-0.25, 0.25, 0.5, 1.0]])  # FC weights W[i, j]: neuron i, pooling unit j
    grad_fc = _t([2.0, 3.0, 6.0])  # the three FC neurons' gradients, as in the question
    k = s = 2
    lesson.grid("the layer before pooling, x (4×4); max-pool 2×2, stride 2:", x[0, 0])
    P, idx = _pool(x, k, s)
    ref_P, ref_idx = F.max_pool2d(x, k, s, return_indices=True)
    lesson.say("Forward, with the local derivative of each pooling unit next to it:")
    _describe_windows(lesson, x, P, idx, k, s)
    lesson.say("  ∂P_j/∂x = 1 at its window's max, 0 for the other three inputs of the window")
    flat_P = P.flatten()
    lesson.say(f"  pooling units P = {_list(flat_P)}   (P0..P3, row by row)")
    lesson.check("P matches torch.nn.functional.max_pool2d", P, ref_P)
    lesson.check("the argmax indices (ties included) match torch's return_indices", idx, ref_idx)

    # An FC layer over the 2×2 pooled map is a convolution whose kernel covers the whole map, so our
    # conv kernels compute it (and show that the layer type does not change the rule).
    W_conv = W.reshape(3, 1, k, k)
    fc = _conv(P, W_conv)
    lesson.say("The FC layer FC_i = Σ_j W_ij P_j (no activation here, f' = 1) is a convolution whose 2×2")
    lesson.say("kernel covers the whole pooled map, so our conv kernels compute it; ∂FC_i/∂P_j = W_ij:")
    for i in range(W.shape[0]):
        terms = " + ".join(f"{_p(W[i, j])}×{_p(flat_P[j])}" for j in range(W.shape[1]))
        lesson.say(f"  FC{i} = {terms} = {_num(fc[0, i, 0, 0])}")
    lesson.check("the FC outputs match torch.nn.functional.linear", fc.flatten(), F.linear(flat_P, W))

    lesson.say(f"Backward: the FC neurons carry the gradients {', '.join(_num(g) for g in grad_fc)}. Each pooling")
    lesson.say("unit collects from every FC neuron: grad(P_j) = Σ_i grad(FC_i) × f'(·) × W_ij, with f' = 1 here")
    gP = _conv_grads(grad_fc.reshape(1, 3, 1, 1), P, W_conv)[0]
    _, ref_gP = _torch_grads(lambda p: F.linear(p.flatten(1), W), (P,), grad_fc.reshape(1, 3))
    for j, g in enumerate(gP.flatten()):
        terms = " + ".join(f"{_num(grad_fc[i])}×{_p(W[i, j])}" for i in range(W.shape[0]))
        lesson.say(f"  grad(P{j}) = {terms} = {_num(g)}")
    lesson.check("grad(P) matches torch autograd", gP.flatten(), ref_gP.flatten())
    distinct = len(set(round(float(g), 9) for g in gP.flatten()))
    lesson.say(f"The pooling units do not share one gradient ({distinct} different values among {gP.numel()}):")
    lesson.say("each sees the FC gradients through its own column of weights.")

    lesson.say("Through the max-pool: each window's max receives grad(P_j) whole; the rest of the window gets 0.")
    gx = _pool_grad(gP, idx, x, k, s)
    _, ref_gx = _torch_grads(lambda t: F.linear(F.max_pool2d(t, k, s).flatten(1), W), (x,), grad_fc.reshape(1, 3))
    lesson.grid("grad(x) = max_pool_backward(grad(P)):", gx[0, 0])
    lesson.check("grad(x) through max-pool and FC matches torch autograd", gx, ref_gx)
    loop_P, loop_idx = reference.max_pool_forward(x, (k, k), (s, s), (0, 0), (1, 1), False)
    loop_gx = reference.max_pool_backward(gP, loop_idx, tuple(x.shape))
    lesson.check("P, its argmax and grad(x) match the loop-level reference (torch_manualgrad.reference)",
                 torch.cat([P.flatten(), idx.flatten().to(DTYPE), gx.flatten()]),
                 torch.cat([loop_P.flatten(), loop_idx.flatten().to(DTYPE), loop_gx.flatten()]))
    for pos in _positions(P.shape[2:]):
        values = _window(x, pos, k, s)
        tied = (values == P[(0, 0) + pos]).nonzero().tolist()
        if len(tied) > 1:
            cells = [(pos[0] * s + r, pos[1] * s + c) for r, c in tied]
            winner = divmod(int(idx[(0, 0) + pos]), x.shape[-1])
            others = ", ".join(f"x{_where(cell)}" for cell in cells if cell != winner)
            lesson.say(f"  window {_where(pos)} had a tie: x{_where(winner)}, first in scan order, takes all of "
                       f"{_num(gx[(0, 0) + winner])}; the equal {others} gets {_num(gx[(0, 0) + cells[-1]])}.")

    # ---- B: max-pool → convolution ---------------------------------------------------------------
    lesson.section("B. A max-pool feeding a convolution: contributions add")
    x2 = _t([[[[3, 1, 0, 2, 5, 1],
                [2, 8, 4, 1, 0, 2],
                [1, 0, 2, 6, 3, 3],
                [5, 2, 7, 1, 0, 4],
                [0, 9, 1, 1, 2, 2],
                [4, 3, 0, 5, 6, 1]]]])
    K = _t([[[[1.0, -1.0],
              [0.5, 2.0]]]])  # the next layer's 2×2 kernel
    G = _t([[[[1.0, 2.0],
              [-1.0, 0.5]]]])  # the gradients of the conv outputs
    lesson.grid("x (6×6); max-pool 2×2, stride 2 → P (3×3); then a 2×2 convolution → C (2×2)", x2[0, 0])
    P2, idx2 = _pool(x2, k, s)
    ref_P2 = F.max_pool2d(x2, k, s)
    lesson.grid("P:", P2[0, 0])
    lesson.check("P matches torch.nn.functional.max_pool2d", P2, ref_P2)
    C = _conv(P2, K)
    lesson.grid(f"kernel K = {_list(K[0, 0])};  C = conv(P, K), each C[o] = Σ K[t]·P[o+t], ∂C[o]/∂P[o+t] = K[t]:",
                C[0, 0])
    lesson.check("C matches torch.nn.functional.conv2d", C, F.conv2d(P2, K))
    lesson.grid("the gradients of the conv outputs, grad(C):", G[0, 0])
    lesson.say("Only the conv outputs whose window covers a pooling unit contribute to it (the rest")
    lesson.say("contribute 0), and a unit used by several of them receives the SUM of their contributions.")
    lesson.say("Each conv output's contribution comes from conv_backward with that output's gradient alone:")
    kk = K.shape[-1]
    shares = {o: _conv_grads(_only_at(G, o), P2, K)[0] for o in _positions(G.shape[2:])}
    for unit in _positions(P2.shape[2:]):
        users = [o for o in shares if all(0 <= u - c < kk for u, c in zip(unit, o))]
        terms = " + ".join(
            f"{_p(G[(0, 0) + o])}×{_p(K[(0, 0) + tuple(u - c for u, c in zip(unit, o))])}" for o in users)
        parts = " + ".join(_p(shares[o][(0, 0) + unit]) for o in users)
        total = sum(shares[o][(0, 0) + unit] for o in shares)
        if len(users) == 1:
            lesson.say(f"  P{_where(unit)}: used by 1 conv output:  {terms} = {_num(total)}")
        else:
            lesson.say(f"  P{_where(unit)}: used by {len(users)} conv outputs: {terms} = {parts} = {_num(total)}")
    gP2 = _conv_grads(G, P2, K)[0]
    _, ref_gP2 = _torch_grads(lambda p: F.conv2d(p, K), (P2,), G)
    lesson.check("the per-output contributions add up to one conv_backward call",
                 sum(shares.values()), gP2)
    lesson.check("grad(P) matches torch autograd", gP2, ref_gP2)
    lesson.say("Then the max-pool sends each grad(P) to its window's max:")
    _describe_windows(lesson, x2, P2, idx2, k, s, indent="    ")
    gx2 = _pool_grad(gP2, idx2, x2, k, s)
    _, ref_gx2 = _torch_grads(lambda t: F.conv2d(F.max_pool2d(t, k, s), K), (x2,), G)
    lesson.grid("grad(x):", gx2[0, 0])
    lesson.check("grad(x) through max-pool and conv matches torch autograd", gx2, ref_gx2)

    # ---- C: overlapping windows --------------------------------------------------------------------
    lesson.section("C. Overlapping windows (2×2, stride 1): one input can win several windows")
    x3, G3 = _overlap_example()
    k3, s3 = 2, 1
    lesson.grid("x (4×4):", x3[0, 0])
    P3, idx3 = _pool(x3, k3, s3)
    ref_P3, ref_idx3 = F.max_pool2d(x3, k3, s3, return_indices=True)
    _describe_windows(lesson, x3, P3, idx3, k3, s3)
    lesson.check("P and its argmax indices match torch", torch.cat([P3.flatten(), idx3.flatten().to(DTYPE)]),
                 torch.cat([ref_P3.flatten(), ref_idx3.flatten().to(DTYPE)]))
    lesson.grid("the incoming gradient grad(P) (3×3):", G3[0, 0])
    gx3 = _pool_grad(G3, idx3, x3, k3, s3)
    _, ref_gx3 = _torch_grads(lambda t: F.max_pool2d(t, k3, s3), (x3,), G3)
    for cell, sources in _winners(idx3, x3.shape[-1]).items():
        terms = " + ".join(_p(G3[(0, 0) + o]) for o in sources)
        total = f"{terms} = {_num(gx3[(0, 0) + cell])}" if len(sources) > 1 else _num(gx3[(0, 0) + cell])
        lesson.say(f"  x{_where(cell)} is the max of {len(sources)} window{'s' if len(sources) > 1 else ''} "
                   f"{', '.join(_where(o) for o in sources)}: it receives {total}")
    lesson.grid("grad(x) (zero wherever an input won no window):", gx3[0, 0])
    lesson.check("grad(x) with overlapping windows matches torch autograd", gx3, ref_gx3)

    if plot_dir is not None:
        return [_plot_maxpool(plot_dir, x3, G3, idx3, gx3)]
    return []


def _overlap_example():
    x = _t([[[[1, 3, 2, 0],
              [4, 9, 1, 2],
              [0, 2, 5, 5],
              [3, 1, 0, 6]]]])
    grad = _t([[[[1.0, 2.0, 0.5],
                 [-1.0, 3.0, 1.0],
                 [2.0, -0.5, 1.5]]]])
    return x, grad


def _winners(indices, width):
    """Input cell → the windows (output positions) whose max it was, in scan order."""
    won = {}
    for o in _positions(indices.shape[2:]):
        won.setdefault(divmod(int(indices[(0, 0) + o]), width), []).append(o)
    return dict(sorted(won.items()))


# --------------------------------------------------------------------------------------------------
# conv2d: the same story in two dimensions
# --------------------------------------------------------------------------------------------------


def _conv2d_example():
    x = _t([[[[1, 2, 0, 1],
              [0, 1, 3, 2],
              [2, 1, 0, 1],
              [1, 0, 2, 3]]]])
    w = _t([[[[0.5, -1.0],
              [1.0, 0.25]]]])
    b = _t([0.5])
    delta = _t([[[[0.1, -0.2, 0.4],
                  [0.3, 0.5, -0.1],
                  [-0.3, 0.2, 0.1]]]])
    return x, w, b, delta


def explain_conv2d(lesson, plot_dir):
    x, w, b, delta = _conv2d_example()
    k = w.shape[-1]
    lesson.title("conv2d: the same story in two dimensions")
    lesson.say("Every result below is computed by torch.ops.manualgrad.*; each ✓ compares it with torch autograd.")
    lesson.grid("input x (1×1×4×4):", x[0, 0])
    lesson.say(f"  kernel w = {_list(w[0, 0])}, bias b = {_num(b[0])}; stride 1, no padding → 3×3 placements")

    lesson.section("Forward: y[i,j] = Σ_(r,c) x[i+r, j+c]·w[r,c] + b")
    y = _conv(x, w, b)
    ref_y, ref_gx, ref_gw, ref_gb = _torch_grads(F.conv2d, (x, w, b), delta)
    first = _window(x, (0, 0), k)
    terms = " + ".join(f"{_p(a)}×{_p(c)}" for a, c in zip(first.flatten(), w.flatten()))
    lesson.say(f"  y(0,0) = {terms} + {_num(b[0])} = {_num(y[0, 0, 0, 0])}")
    lesson.say(f"      ∂y(0,0)/∂w = its slice {_list(first)},  ∂y(0,0)/∂x[0:2, 0:2] = w,  ∂y(0,0)/∂b = 1")
    lesson.grid("y:", y[0, 0])
    lesson.check("y matches torch.nn.functional.conv2d", y, ref_y)

    lesson.section("Backward: dW is the sum over the 9 placements of δ × slice")
    lesson.grid("the deltas δ = ∂L/∂y coming back:", delta[0, 0])
    lesson.say("Each placement on its own (conv_backward with its delta and zeros elsewhere), and the running sum:")
    shares, torch_shares, lines = {}, {}, []
    running = torch.zeros_like(w)
    for pos in _positions(delta.shape[2:]):
        one = _only_at(delta, pos)
        shares[pos] = _conv_grads(one, x, w)
        torch_shares[pos] = _torch_grads(F.conv2d, (x, w, b), one)[1:3]
        running = running + shares[pos][1]
        lines.append((f"placement {_where(pos)}: {_num(delta[(0, 0) + pos]):>4} × {_list(_window(x, pos, k))}",
                      f"= {_list(shares[pos][1][0, 0])}", f"running sum {_list(running[0, 0])}"))
    widths = [max(len(line[i]) for line in lines) for i in range(2)]
    for a, b_, c in lines:
        lesson.say(f"  {a.ljust(widths[0])} {b_.ljust(widths[1])}   {c}")
    gx, gw, gb = _conv_grads(delta, x, w)
    lesson.check(f"all {len(shares)} placements' weight shares match torch autograd",
                 torch.stack([share[1] for share in shares.values()]),
                 torch.stack([share[1] for share in torch_shares.values()]))
    lesson.say(f"  dW = {_list(gw[0, 0])}")
    lesson.check("the sum over placements equals one conv_backward call", running, gw)
    lesson.check("dW matches torch autograd", gw, ref_gw)

    lesson.section("Backward: db = Σ δ")
    lesson.say(f"  db = {' + '.join(_p(d) for d in delta.flatten())} = {_num(gb[0])}")
    lesson.check("db matches torch autograd", gb, ref_gb)

    lesson.section("Backward: dX, each placement adding δ × w into its slice")
    acc = torch.zeros_like(x)
    lines = []
    for pos, (share_x, _, _) in shares.items():
        acc = acc + share_x
        lines.append((f"{_num(delta[(0, 0) + pos]):>4} × w = {_list(_window(share_x, pos, k))}",
                      f"x[{pos[0]}:{pos[0] + k}, {pos[1]}:{pos[1] + k}]", pos))
    width = max(len(line[0]) for line in lines)
    for added, where, pos in lines:
        lesson.say(f"  placement {_where(pos)} adds {added.ljust(width)}  into {where}")
    lesson.check(f"all {len(shares)} placements' input shares match torch autograd",
                 torch.stack([share[0] for share in shares.values()]),
                 torch.stack([share[0] for share in torch_shares.values()]))
    lesson.grid("dX (accumulated):", acc[0, 0])
    lesson.check("the accumulated placements equal one conv_backward call", acc, gx)
    lesson.check("dX matches torch autograd", gx, ref_gx)
    lesson.check("dX, dW and db match the loop-level reference (torch_manualgrad.reference)",
                 *_against_reference(delta, x, w, (gx, gw, gb)))
    # How many placements overlap each input: the input gradient of an all-ones kernel under all-ones
    # deltas, i.e. our own col2im counting for us.
    cover = _conv_grads(torch.ones_like(delta), x, torch.ones_like(w))[0]
    lesson.grid("how many placements cover each input (conv_backward with all-ones δ and w), i.e. how many "
                f"contributions each dX entry adds up (1 to {int(cover.max())}):", cover[0, 0])

    if plot_dir is not None:
        return [_plot_conv2d(plot_dir, x, delta, shares, gw)]
    return []


# --------------------------------------------------------------------------------------------------
# Figures (matplotlib is imported only here)
# --------------------------------------------------------------------------------------------------


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _heat(ax, values, title, limit=None, cmap="RdBu_r", labels=None, fontsize=10, low=None):
    """A small annotated heat map of a 2-d tensor; text turns white on dark cells."""
    data = values.tolist()
    limit = limit or max(1e-9, max(abs(v) for row in data for v in row))
    image = ax.imshow(data, cmap=cmap, vmin=-limit if low is None else low, vmax=limit)
    for r, row in enumerate(data):
        for c, v in enumerate(row):
            text = labels[r][c] if labels is not None else _num(v)
            red, green, blue, _ = image.cmap(image.norm(v))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(c, r, text, ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def _save(fig, plot_dir, name):
    os.makedirs(plot_dir, exist_ok=True)
    path = os.path.join(plot_dir, name)
    fig.savefig(path)
    return path


def _plot_conv1d(plot_dir, x, w, delta, shares, gw, gx):
    fig = _figure(8, 3.2)
    axes = fig.subplots(1, 2)
    for ax, which, total, labels, title in (
        (axes[0], 1, gw[0, 0], [f"w[{i}]" for i in range(w.shape[-1])], "weight gradient: placements add"),
        (axes[1], 0, gx[0, 0], [f"x[{i}]" for i in range(x.shape[-1])], "input gradient: placements add"),
    ):
        n = len(labels)
        width = 0.8 / (len(shares) + 1)
        for p, share in shares.items():
            values = share[which][0, 0].tolist()
            offsets = [i + (p - len(shares) / 2) * width for i in range(n)]
            ax.bar(offsets, values, width, label=f"placement {p + 1} (δ={_num(delta[0, 0, p])})")
        offsets = [i + (len(shares) / 2) * width for i in range(n)]
        bars = ax.bar(offsets, total.tolist(), width, color="black", label="sum")
        for bar, v in zip(bars, total.tolist()):
            ax.annotate(_num(v), (bar.get_x() + bar.get_width() / 2, v), ha="center",
                        va="bottom" if v >= 0 else "top", fontsize=8)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xticks(range(n))
        ax.set_xticklabels(labels)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    fig.suptitle(f"conv1d: x = {_list(x[0, 0])}, w = {_list(w[0, 0])}, δ = {_list(delta[0, 0])}", fontsize=10)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 0.92))
    return _save(fig, plot_dir, "conv1d_example.png")


def _plot_maxpool(plot_dir, x, grad, indices, grad_x):
    from matplotlib.patches import Rectangle

    won = _winners(indices, x.shape[-1])
    fig = _figure(11, 4)
    ax_x, ax_g, ax_dx = fig.subplots(1, 3)

    labels = [[_num(v) for v in row] for row in x[0, 0].tolist()]
    for (r, c), sources in won.items():
        names = [_where(o) for o in sources]
        lines = [" ".join(names[i:i + 2]) for i in range(0, len(names), 2)]
        labels[r][c] = f"{labels[r][c]}\nmax of\n" + "\n".join(lines)
    _heat(ax_x, x[0, 0], "input x; each window's max is boxed\n(windows 2×2, stride 1, overlapping)",
          cmap="Greys", labels=labels, fontsize=8, low=0.0, limit=float(x.abs().max()) * 3)
    for (r, c), sources in won.items():
        ax_x.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="tab:red",
                                 linewidth=1 + 1.5 * len(sources)))

    target = [["" for _ in range(grad.shape[-1])] for _ in range(grad.shape[-2])]
    for cell, sources in won.items():
        for o in sources:
            target[o[0]][o[1]] = f"{_num(grad[(0, 0) + o])}\n→ x{_where(cell)}"
    _heat(ax_g, grad[0, 0], "incoming grad(P) per window\nand the input it is routed to", labels=target, fontsize=8)

    limit = float(grad_x.abs().max())
    sums = [[_num(v) for v in row] for row in grad_x[0, 0].tolist()]
    for (r, c), sources in won.items():
        if len(sources) > 1:
            terms = [_p(grad[(0, 0) + o]) for o in sources]
            lines = [" + ".join(terms[i:i + 2]) for i in range(0, len(terms), 2)]
            sums[r][c] = "\n+ ".join(lines) + f"\n= {_num(grad_x[0, 0, r, c])}"
    _heat(ax_dx, grad_x[0, 0], "grad(x): winners of several windows\nreceive the sum; the rest get 0",
          limit=limit, labels=sums, fontsize=7)
    fig.suptitle("max-pool backward: each window's gradient goes to its argmax; overlapping windows add",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, plot_dir, "maxpool_routing.png")


def _plot_conv2d(plot_dir, x, delta, shares, gw):
    from matplotlib.gridspec import GridSpec
    from matplotlib.patches import Rectangle

    k = gw.shape[-1]
    rows, cols = delta.shape[2:]
    fig = _figure(11, 7.2)
    grid = GridSpec(rows, cols + 2, figure=fig, width_ratios=[1] * cols + [0.25, 1.6])
    limit = max(float(share[1].abs().max()) for share in shares.values())
    limit = max(limit, float(gw.abs().max()))
    for (r, c), share in shares.items():
        ax = fig.add_subplot(grid[r, c])
        _heat(ax, share[1][0, 0], f"placement ({r},{c}): δ = {_num(delta[0, 0, r, c])}\n× slice "
              f"{_list(_window(x, (r, c), k))}", limit=limit, fontsize=9)
        ax.title.set_fontsize(7)
    ax_x = fig.add_subplot(grid[0, cols + 1])
    _heat(ax_x, x[0, 0], "input x, slice of placement (0,0) boxed", cmap="Greys",
          limit=float(x.abs().max()) * 3, low=0.0, fontsize=8)
    ax_x.add_patch(Rectangle((-0.5, -0.5), k, k, fill=False, edgecolor="tab:red", linewidth=2))
    ax_d = fig.add_subplot(grid[1, cols + 1])
    _heat(ax_d, delta[0, 0], "deltas δ = ∂L/∂y (one per placement)", fontsize=8)
    ax_w = fig.add_subplot(grid[2, cols + 1])
    _heat(ax_w, gw[0, 0], "dW = sum of the 9 panels", limit=limit, fontsize=11)
    ax_w.title.set_fontweight("bold")
    fig.suptitle("conv2d weight gradient: one shared kernel, so dW = Σ over placements of δ × input slice",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, plot_dir, "conv_weight_grad.png")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------
# transposed: the conv1d example's input gradient is a transposed convolution
# --------------------------------------------------------------------------------------------------


def explain_transposed(lesson, plot_dir):
    x = _t([[[1.0, 2.0, 3.0]]])
    w = _t([[[0.3, 0.5]]])
    delta = _t([[[-0.1, 0.2]]])
    k = w.shape[-1]

    lesson.title("transposed convolution: a convolution's input gradient, used as a layer")
    lesson.say(f"The conv1d example: x = {_list(x[0, 0])}, filter w = {_list(w[0, 0])}, deltas δ = {_list(delta[0, 0])}.")
    lesson.say("Its input gradient adds δ_p × w into each placement's slice: a short signal (one value per")
    lesson.say("placement) becomes a long one (one value per input). A transposed convolution is that same map,")
    lesson.say("used forwards: torch_manualgrad's conv_transpose1d/2d call the conv_backward op for the input")
    lesson.say("gradient only, with the layer's input in the place of δ.")

    lesson.section("Forward: each input value spreads value × w into its slice of the output")
    up = functional.conv_transpose1d(delta, w)
    running = torch.zeros(1, 1, delta.shape[-1] + k - 1, dtype=DTYPE)
    for p in range(delta.shape[-1]):
        share = torch.zeros_like(running)
        share[0, 0, p:p + k] = delta[0, 0, p] * w[0, 0]
        running = running + share
        lesson.say(f"  input {p + 1}: {_p(delta[0, 0, p])} × w = {_list(share[0, 0, p:p + k])} into positions "
                   f"{p}..{p + k - 1}, giving {_list(running[0, 0])}")
    lesson.say(f"  conv_transpose1d(δ, w) = {_list(up[0, 0])}")
    gx = _conv_grads(delta, x, w)[0]
    lesson.check("conv_transpose1d(δ, w) equals the conv1d example's input gradient dX", up, gx)
    lesson.check("conv_transpose1d matches torch.nn.functional.conv_transpose1d", up, F.conv_transpose1d(delta, w))
    lesson.check("and the loop-level reference's input gradient", up,
                 reference.conv_backward(delta, x, w, (1,), (0,), (1,), 1)[0])

    lesson.section("Backward: its input gradient is a convolution, its weight gradient conv's with the roles swapped")
    g = _t([[[1.0, 2.0, 3.0]]])  # ∂L/∂(transposed output), from the next layer
    lesson.say(f"Say the next layer sends back g = {_list(g[0, 0])}. Input value p reached the output only through")
    lesson.say("its slice, times w, so ∂L/∂input_p = the dot product of g's slice p with w: a plain convolution.")
    leaves = [delta.clone().requires_grad_(), w.clone().requires_grad_()]
    out = functional.conv_transpose1d(*leaves)
    ours_gi, ours_gw = torch.autograd.grad(out, leaves, g)
    conv = _conv(g, w)
    for p in range(delta.shape[-1]):
        terms = " + ".join(f"{_p(a)}×{_p(c)}" for a, c in zip(g[0, 0, p:p + k], w[0, 0]))
        lesson.say(f"  ∂L/∂input{p + 1} = {terms} = {_num(ours_gi[0, 0, p])}")
    lesson.check("the input gradient is conv1d(g, w)", ours_gi, conv)
    lesson.say("The weight gradient: w multiplied every input value p into g's slice p, so")
    lesson.say("  ∂L/∂w = Σ_p input_p × g's slice p — conv1d's weight gradient, with g as its input and the layer's")
    lesson.say("  input as its deltas:")
    swapped = _conv_grads(delta, g, w)[1]
    lesson.say(f"  ∂L/∂w = {' + '.join(f'{_p(delta[0, 0, p])}×{_list(g[0, 0, p:p + k])}' for p in range(delta.shape[-1]))}"
               f" = {_list(ours_gw[0, 0])}")
    lesson.check("the weight gradient is conv_backward's with input and deltas swapped", ours_gw, swapped)
    _, ref_gi, ref_gw = _torch_grads(F.conv_transpose1d, (delta, w), g)
    lesson.check("both match torch autograd through F.conv_transpose1d", torch.cat([ours_gi.flatten(), ours_gw.flatten()]),
                 torch.cat([ref_gi.flatten(), ref_gw.flatten()]))

    lesson.section("Stride 2: the transposed convolution upsamples")
    small = _t([[[1.0, 2.0]]])
    lesson.say(f"With stride 2 the slices of neighbouring inputs start two apart: input {_list(small[0, 0])}, w = "
               f"{_list(w[0, 0])}.")
    up2 = functional.conv_transpose1d(small, w, stride=2)
    for p in range(small.shape[-1]):
        lesson.say(f"  input {p + 1}: {_p(small[0, 0, p])} × w = {_list(small[0, 0, p] * w[0, 0])} into positions "
                   f"{2 * p}..{2 * p + k - 1}")
    lesson.say(f"  conv_transpose1d(input, w, stride=2) = {_list(up2[0, 0])}: twice as long, as a decoder wants")
    lesson.check("matches torch.nn.functional.conv_transpose1d with stride 2", up2, F.conv_transpose1d(small, w, stride=2))
    x_long = torch.zeros(1, 1, 4, dtype=DTYPE, requires_grad=True)
    (gx2,) = torch.autograd.grad(functional.conv1d(x_long, w, stride=2), x_long, small)
    lesson.check("and it is the input gradient of the stride-2 conv1d at those deltas", up2, gx2)
    return []


EXAMPLES = {
    "conv1d": explain_conv1d,
    "maxpool": explain_maxpool,
    "conv2d": explain_conv2d,
    "transposed": explain_transposed,
}


def add_parser(commands):
    p = commands.add_parser(
        "explain",
        help="walk through the source documents' worked examples, computed by our kernels",
        description="A short lesson on one worked example: every number is computed by torch.ops.manualgrad.* "
                    "and checked against torch autograd (exit status 1 if any check fails).",
    )
    p.add_argument("example", choices=list(EXAMPLES),
                   help="conv1d: shared-weight gradients; maxpool: routing through max-pool; conv2d: the 2-d story; "
                        "transposed: a convolution's input gradient as a layer")
    p.add_argument("--plot", metavar="DIR", default=None, help="also write PNG figures into DIR (needs matplotlib)")
    return p


def _printable_stdout():
    """Keep ✓, ×, ∂ and friends from crashing on a terminal that cannot encode them."""
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓✗×→Σ∂δ·".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="replace")


def run(args):
    _printable_stdout()
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("explain --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    lesson = Lesson()
    written = EXAMPLES[args.example](lesson, args.plot)
    status = lesson.summary()
    for path in written:
        print(f"wrote {path}")
    return status
