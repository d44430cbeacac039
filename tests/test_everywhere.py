"""torch_manualgrad.everywhere(): torch's conv and max-pool functions computed by ours, whoever calls them
(F.* calls in a forward, conv subclasses with their own forward, torch.nn's layers, torch.* entry points),
with gradients; what it leaves to torch; nesting, threads, other modes, torch.compile and torch.fx."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import torch_manualgrad as tmg
from torch_manualgrad import routing


class Conv2dSame(torch.nn.Conv2d):
    """timm's shape: TensorFlow's 'SAME' padding, asymmetric where needed, then F.conv2d."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledStdConv2d(torch.nn.Conv2d):
    """timm's nf_resnet shape: the weight standardised per output channel (a differentiable function of
    the parameter), then F.conv2d."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Net(torch.nn.Module):
    """Each way torch's conv and max-pool get called: subclasses, plain torch.nn layers, F.* and torch.*
    calls in forward, 1-d and 2-d, with indices."""

    def __init__(self):
        super().__init__()
        self.same = Conv2dSame(3, 8, 3, stride=2)
        self.std = ScaledStdConv2d(8, 8, 3, padding=1, groups=2)
        self.plain = torch.nn.Conv2d(8, 8, 2, padding="same", padding_mode="reflect")
        self.pool = torch.nn.MaxPool2d(2, return_indices=True)
        self.conv1d = torch.nn.Conv1d(8, 4, 3)
        self.weight1d = torch.nn.Parameter(torch.randn(4, 4, 2) / 3)

    def forward(self, x):
        y = torch.relu(self.std(self.same(x)))
        y = F.max_pool2d(y, 3, stride=1, padding=1, ceil_mode=True)               # Inception's pools
        y, indices = self.pool(torch.relu(self.plain(y)))
        y = y + torch.max_pool2d(y, 3, 1, 1)                                        # torch.* entry point
        z = F.conv1d(self.conv1d(y.flatten(2)), self.weight1d, None, 1, 1)
        z, _ = F.max_pool1d(z, 2, return_indices=True)
        return y, indices, z


SERVED = {"F.conv2d": 3, "F.max_pool2d": 2, "torch.max_pool2d": 1, "F.conv1d": 2, "F.max_pool1d": 1}
OUR_OPS = {"manualgrad::conv_forward", "manualgrad::conv_backward", "manualgrad::max_pool_forward",
           "manualgrad::max_pool_backward"}
TORCH_OPS = {"aten::convolution", "aten::_convolution", "aten::convolution_backward", "aten::max_pool2d_with_indices",
             "aten::max_pool2d", "aten::max_pool1d", "aten::max_pool1d_with_indices",
             "aten::max_pool2d_with_indices_backward"}


def _net_and_input(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 15, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    return Net().to(device, dtype), x.requires_grad_()


def _loss(outputs):
    y, _, z = outputs
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    return (y * weights).sum() + z.square().sum()


def _run(model, x):
    outputs = model(x)
    return outputs, torch.autograd.grad(_loss(outputs), [x, *model.parameters()])


def test_every_call_is_served_by_ours_with_gradients_matching_torch(device):
    model, x = _net_and_input(torch.float64, device)
    (want, want_grads) = _run(model, x)
    with torch.profiler.profile() as prof:
        with tmg.everywhere() as mode:
            outputs = model(x)
        grads = torch.autograd.grad(_loss(outputs), [x, *model.parameters()])  # backward outside the block
    events = {e.name for e in prof.events()}
    assert OUR_OPS <= events and not events & TORCH_OPS, events & TORCH_OPS
    assert dict(mode.served) == SERVED and not mode.left
    torch.testing.assert_close(outputs[0], want[0], rtol=1e-10, atol=1e-12)
    assert torch.equal(outputs[1], want[1])
    torch.testing.assert_close(outputs[2], want[2], rtol=1e-10, atol=1e-12)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert type(model.plain) is torch.nn.Conv2d  # nothing was swapped
    with torch.profiler.profile() as prof:  # and after the block, torch's again
        _, after = _run(model, x)
    events = {e.name for e in prof.events()}
    assert not events & OUR_OPS and "aten::convolution_backward" in events, events & OUR_OPS
    for got, expected in zip(after, want_grads):  # torch's CUDA kernels need not repeat their bits (atomics)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_a_model_trains_under_everywhere_as_under_torch():
    model, x = _net_and_input(torch.float64)
    twin = Net().double()
    twin.load_state_dict(model.state_dict())
    for net, mode in ((model, tmg.everywhere()), (twin, None)):
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            if mode is not None:
                with mode:
                    loss = _loss(net(x))
            else:
                loss = _loss(net(x))
            loss.backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_converted_layers_pass_through_and_nothing_is_computed_twice():
    model, x = _net_and_input()
    tmg.convert(model)  # plain, pool and conv1d become ours; the subclasses and F.* calls stay torch's
    with tmg.everywhere() as mode:
        model(x)
    assert dict(mode.served) == {"F.conv2d": 2, "F.max_pool2d": 1, "torch.max_pool2d": 1, "F.conv1d": 1,
                                 "F.max_pool1d": 1}
    # ours calls F.pad inside ('same' with an even kernel); the mode is off while ours runs, and our own
    # functions are never intercepted
    w = torch.randn(4, 3, 2, 2)
    with tmg.everywhere() as mode:
        tmg.functional.conv2d(x, w, padding="same")
        torch.conv2d(x, w, padding="same")
    assert dict(mode.served) == {"F.conv2d": 1}


def test_what_ours_refuses_is_left_to_torch(monkeypatch):
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    # a call ours cannot serve (here made to refuse) is computed by torch, and counted with the reason
    def refuse(*args, **kwargs):
        raise NotImplementedError("no kernel for this\nsecond line")

    monkeypatch.setitem(routing._ROUTES, torch.conv2d, ("F.conv2d", refuse))
    with tmg.everywhere() as mode:
        out = F.conv2d(x, w, stride=2)
    assert torch.equal(out, F.conv2d(x, w, stride=2))
    assert dict(mode.left) == {("F.conv2d", "no kernel for this"): 1} and not mode.served
    monkeypatch.undo()

    # a dtype ours has no kernel for: torch's result
    with tmg.everywhere() as mode:
        out = F.conv2d(x.long(), w.long())
    assert torch.equal(out, F.conv2d(x.long(), w.long()))
    assert sum(mode.served.values()) + sum(mode.left.values()) == 1

    # where torch refuses the call as well, torch's own error is raised, as without the mode
    for bad in (lambda: F.conv2d(x, torch.randn(3, 5, 3, 3)), lambda: F.max_pool2d(x, 2, stride=0)):
        with pytest.raises(RuntimeError) as without:
            bad()
        with tmg.everywhere(), pytest.raises(RuntimeError) as within:
            bad()
        assert str(within.value) == str(without.value)

    # functions we have no kernel for are not intercepted at all
    with tmg.everywhere() as mode:
        F.adaptive_max_pool2d(x, 2)
        F.adaptive_max_pool3d(torch.randn(1, 2, 4, 4, 4), 2)
    assert not mode.served and not mode.left

    # complex conv and forward-mode AD: torch's result, whether ours serves them or leaves them to torch
    xc, wc = torch.randn(1, 2, 5, 5, dtype=torch.complex64), torch.randn(3, 2, 3, 3, dtype=torch.complex64)
    with tmg.everywhere() as mode:
        out = F.conv2d(xc, wc)
    torch.testing.assert_close(out, F.conv2d(xc, wc))
    assert sum(mode.served.values()) + sum(mode.left.values()) == 1
    tangent = torch.randn_like(x)
    with tmg.everywhere():
        got = torch.func.jvp(lambda t: F.max_pool2d(F.conv2d(t, w), 2), (x,), (tangent,))
    want = torch.func.jvp(lambda t: F.max_pool2d(F.conv2d(t, w), 2), (x,), (tangent,))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_modes_nest_and_stay_on_their_thread():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    with tmg.everywhere() as outer:
        with tmg.everywhere() as inner:
            F.conv2d(x, w)
        assert dict(inner.served) == {"F.conv2d": 1} and not outer.served  # the innermost serves
        F.conv2d(x, w)
        assert dict(outer.served) == {"F.conv2d": 1}

        seen = {}

        def elsewhere():  # another thread has its own (empty) mode stack
            seen["active"] = routing.active()
            seen["output"] = F.conv2d(x, w)
            with tmg.everywhere() as its_own:
                F.max_pool2d(x, 2)
            seen["its_own"] = dict(its_own.served)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert seen["active"] is False and seen["its_own"] == {"F.max_pool2d": 1}
        assert dict(outer.served) == {"F.conv2d": 1}  # nothing from the other thread
        assert routing.active()
    assert not routing.active()


class Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.conv2d, F.max_pool2d, tmg.functional.conv2d, tmg.functional.max_pool2d):
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_other_modes_compose_in_either_order():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    # a mode entered inside everywhere() sees torch's functions first, then everywhere() serves them
    with tmg.everywhere() as mode, Recorder() as inner:
        out = F.max_pool2d(F.conv2d(x, w), 2)
    assert inner.seen == [torch.conv2d, F.max_pool2d] and sum(mode.served.values()) == 2
    # one entered outside it sees what everywhere() made of them: our functions (verify relies on this)
    with Recorder() as outer, tmg.everywhere():
        again = F.max_pool2d(F.conv2d(x, w), 2)
    assert outer.seen == [tmg.functional.conv2d, tmg.functional.max_pool2d]
    assert torch.equal(out, again)


def test_works_under_torch_compile():
    model, x = _net_and_input(torch.float64)
    want, want_grads = _run(model, x)
    targets = []

    def backend(graph_module, example_inputs):  # records every op of the captured graphs, then runs them
        for module in graph_module.modules():
            if isinstance(module, torch.fx.GraphModule):
                targets.extend(str(n.target) for n in module.graph.nodes if n.op == "call_function")
        return graph_module.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with tmg.everywhere() as mode:
        outputs, grads = _run(compiled, x)
    assert {"manualgrad.conv_forward", "manualgrad.max_pool_forward"} <= set(targets)
    assert not any("conv2d" in t or "max_pool" in t for t in targets if not t.startswith("manualgrad")), targets
    assert dict(mode.served) == SERVED  # counted on every call, compiled or not
    torch.testing.assert_close(outputs[0], want[0], rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_under_torch_compile_what_ours_cannot_take_goes_to_torch_beforehand():
    """A refusal cannot be caught inside a compiled graph, so there the mode asks first, by dtype and
    device, what our kernels take (the ops' own checks were asked which dtypes those are)."""
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    block = torch.compile(lambda x, w: F.max_pool2d(F.conv2d(x, w), 2) * 2, fullgraph=True, backend="eager")
    with tmg.everywhere() as mode:
        floats = block(x, w)
        integers = block(x.long(), w.long())  # torch's CPU conv takes int64; ours does not
    torch.testing.assert_close(floats, F.max_pool2d(F.conv2d(x, w), 2) * 2)
    assert torch.equal(integers, F.max_pool2d(F.conv2d(x.long(), w.long()), 2) * 2)
    assert mode.served["F.conv2d"] == 1 and mode.served["F.max_pool2d"] >= 1
    assert mode.left[("F.conv2d", "no kernel of ours for torch.int64 on cpu (decided before the call, under "
                                  "torch.compile)")] == 1
    assert {torch.float32, torch.float64} <= routing._CONV_DTYPES and torch.int64 not in routing._CONV_DTYPES


class PoolInForward(torch.nn.Module):
    def forward(self, x):
        return torch.max_pool2d(F.max_pool2d(x, 2, ceil_mode=True), 3, 1, 1)


def test_fx_tracing_under_everywhere_records_our_functions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ScaledStdConv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 1), PoolInForward())
    with tmg.everywhere():
        traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    # the subclass and the calls in forward are traced through, and each of their calls becomes ours; the
    # torch.nn.Conv2d is a leaf of fx's default tracer, run by the graph as it is (torch's, unless the graph
    # runs under everywhere() too)
    assert targets.count(tmg.functional.conv2d) == 1 and targets.count(tmg.functional.max_pool2d) == 2
    assert not {torch.conv2d, F.max_pool2d, torch.max_pool2d} & set(targets)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["1"]
    x = torch.randn(2, 3, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
