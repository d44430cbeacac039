"""PyTorch features a model builder relies on, with our layers swapped in: torch.compile (no graph break),
torch.export (our ops in the graph), channels-last memory format, opcheck on strided inputs (with and
without requires_grad), torch.use_deterministic_algorithms, and DistributedDataParallel on the gloo backend."""
import copy
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import torch_manualgrad as tmg
from common import LAYOUTS, randn_tensor, make_generator

ops = torch.ops.manualgrad


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 4, 2, padding="same"), torch.nn.ReLU(), torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 5),
    )


def test_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = tmg.convert(cnn()).to(device)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    x = torch.randn(2, 3, 16, 16, device=device)
    eager_out, compiled_out = model(x), compiled(x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    eager_out.sum().backward()
    compiled_out.sum().backward()
    for p, q in zip(model.parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5)


def test_export_contains_our_ops_and_matches_eager(device):
    torch.manual_seed(0)
    model = tmg.convert(cnn()).to(device).eval()
    x = torch.randn(2, 3, 16, 16, device=device)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"manualgrad.conv_forward.default", "manualgrad.max_pool_forward.default"} <= targets, targets
    assert not any("convolution" in t or "max_pool2d" in t for t in targets), targets
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_calls_match_recorded_calls(mode, device):
    """Without autograd (torch.no_grad, torch.inference_mode) the functions call the ops directly; the
    results are the same as when autograd records the call, and nothing is recorded."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    recorded = [tmg.functional.conv2d(x, w, b, padding=1), *tmg.functional.max_pool2d(x, 3, 2, 1, return_indices=True)]
    assert recorded[0].grad_fn is not None and recorded[1].grad_fn is not None
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        direct = [tmg.functional.conv2d(x, w, b, padding=1), *tmg.functional.max_pool2d(x, 3, 2, 1, return_indices=True)]
    for r, d in zip(recorded, direct):
        assert d.grad_fn is None and not d.requires_grad
        assert torch.equal(r.detach(), d)
    # without return_indices no indices are computed at all; the values are unchanged, in every layout
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        pooled = [tmg.functional.max_pool2d(x, 3, 2, 1), tmg.functional.max_pool2d(x_cl, 2),
                  tmg.functional.max_pool1d(x[0], 3, 2, 1), tmg.functional.max_pool2d(x[0], 2, ceil_mode=True)]
    expected = [F.max_pool2d(x, 3, 2, 1), F.max_pool2d(x_cl, 2), F.max_pool1d(x[0], 3, 2, 1),
                F.max_pool2d(x[0], 2, ceil_mode=True)]
    for p, e in zip(pooled, expected):
        assert p.shape == e.shape
        torch.testing.assert_close(p, e.detach(), rtol=0, atol=0)
    assert pooled[1].is_contiguous(memory_format=torch.channels_last)


def test_backward_with_and_without_create_graph_agree(device):
    """A plain backward calls the backward ops directly; create_graph=True goes through the
    differentiable backward Functions. Both give the same gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    y = tmg.functional.max_pool2d(tmg.functional.conv2d(x, w, padding=1), 3, 2, 1)
    g = torch.randn_like(y)
    plain = torch.autograd.grad(y, (x, w), g, retain_graph=True)
    graphed = torch.autograd.grad(y, (x, w), g, create_graph=True)
    assert all(t.grad_fn is not None for t in graphed)
    for p, q in zip(plain, graphed):
        assert torch.equal(p, q.detach())


def test_functions_apply_without_binding_matches_torchs_apply(device, monkeypatch):
    """Our Functions skip torch.autograd.Function.apply's argument binding (autograd._Function.apply) where it changes
    nothing. The graph they record must be the one torch's apply records: same outputs, gradients, double backward,
    and the same Function class as grad_fn. On the pinned torch the shortcut is taken at all."""
    from torch_manualgrad import autograd as ag

    if torch.__version__.startswith("2.13."):
        assert ag._UNWRAP_DEAD is not None
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)

    def run():
        y = tmg.functional.max_pool2d(tmg.functional.conv2d(x, w, padding=1), 3, 2, 1)
        g = torch.ones_like(y)
        first = torch.autograd.grad(y, (x, w), g, create_graph=True)
        second = torch.autograd.grad(sum(t.square().sum() for t in first), (x, w))
        return y, first, second, type(y.grad_fn).__name__

    fast = run()
    monkeypatch.setattr(ag, "_UNWRAP_DEAD", None)
    slow = run()
    assert fast[3] == slow[3] == "MaxPoolFunctionBackward"
    for a, b in zip([fast[0], *fast[1], *fast[2]], [slow[0], *slow[1], *slow[2]]):
        assert torch.equal(a.detach(), b.detach())


def test_channels_last_in_channels_last_out(device):
    x = torch.randn(2, 3, 9, 8, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(5, 3, 3, 3, device=device)
    ours, theirs = tmg.functional.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1)
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    out, idx = tmg.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert out.stride() == ref.stride() and idx.stride() == ref_idx.stride()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)
    (grad,) = torch.autograd.grad((ours.sum() + out.sum()), x)
    (ref_grad,) = torch.autograd.grad((theirs.sum() + ref.sum()), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_on_strided_inputs(layout, requires_grad, device):
    gen = make_generator(0)
    x = randn_tensor((2, 4, 7, 6), device, torch.float64, gen, layout, requires_grad)
    w = randn_tensor((6, 2, 3, 2), device, torch.float64, gen, layout, requires_grad)
    b = torch.randn(6, device=device, dtype=torch.float64, requires_grad=requires_grad)
    geometry = ([2, 1], [1, 0], [1, 2], 2)
    torch.library.opcheck(ops.conv_forward.default, (x, w, b, *geometry))
    go = randn_tensor(tuple(ops.conv_forward(x, w, b, *geometry).shape), device, torch.float64, gen, layout, requires_grad)
    torch.library.opcheck(ops.conv_backward.default, (go, x, w, *geometry, [True, True, True]))
    pool = ([3, 2], [2, 1], [1, 1], [1, 1], True)
    torch.library.opcheck(ops.max_pool_forward.default, (x, *pool))
    out, idx = ops.max_pool_forward(x.detach(), *pool)
    gp = randn_tensor(tuple(out.shape), device, torch.float64, gen, layout, requires_grad)
    torch.library.opcheck(ops.max_pool_backward.default, (gp, idx, list(x.shape), *pool[:4]))


def test_silent_under_deterministic_algorithms(device):
    torch.manual_seed(0)
    model = tmg.convert(cnn()).to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)


# --- DistributedDataParallel, gloo, 2 processes on this machine ---------------------------------------

STEPS, BATCH = 3, 8


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 3, 16, 16, generator=gen), torch.randint(0, 5, (STEPS, BATCH), generator=gen)


def _train(model, inputs, labels):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in zip(inputs, labels):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _ddp_worker(rank, world, rendezvous, initial, out_path):
    torch.set_num_threads(1)
    # a file rendezvous: no fixed port that another process could take between choosing and binding it
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model = tmg.convert(cnn())
        model.load_state_dict(initial)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        inputs, labels = _data()
        half = BATCH // world  # each process trains on its share of every batch
        _train(ddp, inputs[:, rank * half:(rank + 1) * half], labels[:, rank * half:(rank + 1) * half])
        if rank == 0:
            torch.save(model.state_dict(), out_path)
        # Both ranks tear down together: a rank that destroyed its group while the other was still
        # busy sometimes aborted in gloo ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Reached only on success. Leave without C++ static destructors: the rare abort above was never
    # caught in the act, and exit-time teardown of gloo's threads is the other place it could come from.
    os._exit(0)


def test_ddp_gloo_two_processes_matches_single_process(tmp_path):
    torch.manual_seed(0)
    initial = cnn().state_dict()
    out_path = str(tmp_path / "ddp.pt")
    rendezvous = str(tmp_path / "rendezvous")
    mp.spawn(_ddp_worker, args=(2, rendezvous, initial, out_path), nprocs=2, join=True)
    single = tmg.convert(cnn())
    single.load_state_dict(initial)
    _train(single, *_data())  # the mean loss over the whole batch = DDP's average of the two halves' gradients
    trained = torch.load(out_path)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dims", (1, 2, 3))
def test_flop_counter_counts_a_converted_model_as_the_original(dims):
    """torch.utils.flop_counter.FlopCounterMode: our ops carry torch's formulas for its convolution ops, so a
    converted model's forward and backward count what the original's did (it counted 0 before), transposed and
    grouped layers included; max-pool counts nothing in either."""
    nn = torch.nn
    conv, transposed, pool = (getattr(nn, f"{name}{dims}d") for name in ("Conv", "ConvTranspose", "MaxPool"))
    model = nn.Sequential(conv(3, 8, 3, padding=1), pool(2), conv(8, 8, 3, groups=4, bias=False),
                          transposed(8, 4, 3, stride=2), transposed(4, 4, 2, groups=2))
    converted = tmg.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, *(10,) * dims)
    totals = []
    for m in (model, converted):
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            m(x).sum().backward()
        counts = counter.get_flop_counts()["Global"]
        totals.append((counter.get_total_flops(), sorted(counts.values())))
    assert totals[0][0] > 0 and totals[1] == totals[0]
