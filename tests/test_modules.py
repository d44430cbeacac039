"""The nn modules and convert()/revert(): drop-in replacements for torch.nn's, interchangeable state_dicts, matched training."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_manualgrad as tmg

SWAPS = {nn.Conv1d: tmg.nn.Conv1d, nn.Conv2d: tmg.nn.Conv2d, nn.MaxPool1d: tmg.nn.MaxPool1d, nn.MaxPool2d: tmg.nn.MaxPool2d}


def cnn2d():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, groups=2),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
    )


def cnn1d():
    return nn.Sequential(
        nn.Conv1d(2, 4, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(3, stride=2),
        nn.Conv1d(4, 4, 4, dilation=2, padding="same", bias=False),
        nn.MaxPool1d(2, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 10, 3),
    )


class Nested(nn.Module):
    """Convs hidden inside a submodule, a ModuleList and a ModuleDict, plus a plain Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same", padding_mode="reflect"), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), nn.MaxPool2d(2)])
        self.heads = nn.ModuleDict({"pool": nn.MaxPool2d(3, stride=1, padding=1), "conv": nn.Conv2d(2, 2, 1)})
        self.fc = nn.Linear(2 * 4 * 4, 2)

    def forward(self, x):
        x = self.stem(x)
        for m in self.blocks:
            x = m(x)
        x = self.heads["conv"](self.heads["pool"](x))
        return self.fc(x.flatten(1))


MODELS = {
    "cnn2d": (cnn2d, (2, 3, 16, 16)),
    "cnn1d": (cnn1d, (2, 2, 37)),
    "nested": (Nested, (2, 1, 8, 8)),
}


def make_pair(name, device, dtype, seed=0):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(device=device, dtype=dtype)
    converted = tmg.convert(copy.deepcopy(model))
    x = torch.randn(shape, device=device, dtype=dtype, generator=None)
    return model, converted, x


def tols(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_convert_swaps_types_and_keeps_the_rest(name, device):
    factory, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory().to(device)
    model.eval()
    original = copy.deepcopy(model)
    result = tmg.convert(model)
    assert result is model, "convert works in place and returns the model"
    before = dict(original.named_modules())
    after = dict(model.named_modules())
    assert before.keys() == after.keys()
    for path, old in before.items():
        new = after[path]
        if type(old) in SWAPS:
            assert type(new) is SWAPS[type(old)], path
            assert isinstance(new, type(old)), path
        else:
            assert type(new) is type(old), path
        assert new.training == old.training, path
    sd_before, sd_after = original.state_dict(), model.state_dict()
    assert sd_before.keys() == sd_after.keys()
    for key in sd_before:
        assert torch.equal(sd_before[key], sd_after[key]), key
        assert sd_after[key].device == sd_before[key].device, key
    for (pname, p_old), (_, p_new) in zip(original.named_parameters(), model.named_parameters()):
        assert isinstance(p_new, nn.Parameter), pname
        assert p_new.requires_grad == p_old.requires_grad, pname


def test_convert_keeps_frozen_weights_buffers_and_hyperparameters(device):
    model = nn.Sequential(
        nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=False, padding_mode="replicate"),
        nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), ceil_mode=True),
    ).to(device)
    model[0].weight.requires_grad_(False)
    model[0].register_buffer("running_thing", torch.arange(3.0, device=device))
    expected_conv = {k: getattr(model[0], k) for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")}
    expected_pool = {k: getattr(model[1], k) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")}
    weight = model[0].weight.detach().clone()
    tmg.convert(model)
    assert type(model[0]) is tmg.nn.Conv2d and type(model[1]) is tmg.nn.MaxPool2d
    assert {k: getattr(model[0], k) for k in expected_conv} == expected_conv
    assert {k: getattr(model[1], k) for k in expected_pool} == expected_pool
    assert model[0].bias is None
    assert not model[0].weight.requires_grad
    assert torch.equal(model[0].weight, weight) and model[0].weight.device == weight.device
    assert torch.equal(model[0].running_thing, torch.arange(3.0, device=device))


@pytest.mark.parametrize("name", MODELS)
def test_revert_restores_torch_types(name, device, dtype):
    model, converted, x = make_pair(name, device, dtype)
    out = converted(x)
    reverted = tmg.revert(converted)
    assert reverted is converted
    for (path, a), (_, b) in zip(model.named_modules(), reverted.named_modules()):
        assert type(a) is type(b), path
    torch.testing.assert_close(reverted(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(out, model(x), **tols(dtype))
    # and once more: convert(revert(convert(m))) is a converted model again
    tmg.convert(reverted)
    assert any(type(m) in SWAPS.values() for m in reverted.modules())


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_matches_forward_and_backward(name, device, dtype):
    model, converted, x = make_pair(name, device, dtype)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    out_ref, out = model(x1), converted(x2)
    torch.testing.assert_close(out, out_ref, **tols(dtype))
    grad_output = torch.randn_like(out_ref)
    out_ref.backward(grad_output)
    out.backward(grad_output)
    torch.testing.assert_close(x2.grad, x1.grad, **tols(dtype))
    for (pname, p_ref), (_, p) in zip(model.named_parameters(), converted.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **tols(dtype), msg=lambda m: f"{pname}: {m}")


@pytest.mark.parametrize("name", MODELS)
def test_sgd_steps_stay_matched(name, device, dtype):
    model, converted, x = make_pair(name, device, dtype)
    target = torch.randn_like(model(x))
    opt_ref = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = torch.optim.SGD(converted.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        for m, o in ((model, opt_ref), (converted, opt)):
            o.zero_grad()
            F.mse_loss(m(x), target).backward()
            o.step()
    for (pname, p_ref), (_, p) in zip(model.named_parameters(), converted.named_parameters()):
        torch.testing.assert_close(p, p_ref, **tols(dtype), msg=lambda m: f"{pname}: {m}")


@pytest.mark.parametrize(
    "ours, theirs, kwargs",
    [
        (tmg.nn.Conv2d, nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=1, groups=2)),
        (tmg.nn.Conv2d, nn.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, bias=False, dilation=2)),
        (tmg.nn.Conv1d, nn.Conv1d, dict(in_channels=3, out_channels=3, kernel_size=2, groups=3, padding="same")),
    ],
)
def test_state_dict_round_trip(ours, theirs, kwargs, device):
    torch.manual_seed(1)
    a = ours(**kwargs).to(device)
    b = theirs(**kwargs).to(device)
    assert isinstance(a, theirs)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    # ours -> torch.nn (strict), then torch.nn -> ours (strict)
    b.load_state_dict(a.state_dict(), strict=True)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-2.0)
    a.load_state_dict(b.state_dict(), strict=True)
    for key, value in b.state_dict().items():
        assert torch.equal(a.state_dict()[key], value)
    x = torch.randn(2, kwargs["in_channels"], *([9] * (2 if theirs is nn.Conv2d else 1)), device=device)
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


def test_model_state_dict_round_trip_through_convert(device):
    torch.manual_seed(2)
    ours = tmg.convert(cnn2d()).to(device)
    theirs = cnn2d().to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours_again = tmg.convert(cnn2d()).to(device)
    ours_again.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16, device=device)
    torch.testing.assert_close(ours_again(x), theirs(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 4), padding=(2, 1), stride=(1, 2)),
        dict(kernel_size=4, padding="same"),  # even kernel: asymmetric padding
        dict(kernel_size=(2, 3), padding="same", dilation=(2, 1)),
        dict(kernel_size=3, padding="valid", groups=2),
    ],
    ids=str,
)
def test_conv2d_module_padding_modes_match_torch(padding_mode, kwargs, device):
    torch.manual_seed(3)
    theirs = nn.Conv2d(2, 4, padding_mode=padding_mode, dtype=torch.float64, **kwargs).to(device)
    ours = tmg.nn.Conv2d(2, 4, padding_mode=padding_mode, dtype=torch.float64, **kwargs).to(device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for shape in [(2, 2, 7, 8), (2, 7, 8)]:
        x1 = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_()
        out_ref, out = theirs(x1), ours(x2)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(out_ref)
        out_ref.backward(g)
        out.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=2), dict(kernel_size=2, padding="same"), dict(kernel_size=3, stride=2, padding=1, dilation=2)], ids=str)
def test_conv1d_module_padding_modes_match_torch(padding_mode, kwargs, device):
    torch.manual_seed(4)
    theirs = nn.Conv1d(3, 2, padding_mode=padding_mode, dtype=torch.float64, **kwargs).to(device)
    ours = tmg.nn.Conv1d(3, 2, padding_mode=padding_mode, dtype=torch.float64, **kwargs).to(device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x1 = torch.randn(2, 3, 9, dtype=torch.float64, device=device, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    out_ref, out = theirs(x1), ours(x2)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    out_ref.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_max_pool_module_indices_ceil_mode_match_torch(dim, device):
    theirs_cls, ours_cls = getattr(nn, f"MaxPool{dim}d"), getattr(tmg.nn, f"MaxPool{dim}d")
    kwargs = dict(kernel_size=3, stride=2, padding=1, return_indices=True, ceil_mode=True)
    theirs, ours = theirs_cls(**kwargs), ours_cls(**kwargs)
    assert isinstance(ours, theirs_cls)
    assert repr(ours).endswith(repr(theirs)[len(type(theirs).__name__):])
    shape = {1: (2, 3, 10), 2: (2, 3, 10, 9), 3: (2, 3, 5, 6, 4)}[dim]
    x = torch.randperm(torch.Size(shape).numel(), device=device).reshape(shape).to(torch.float64).requires_grad_()
    out, idx = ours(x)
    out_ref, idx_ref = theirs(x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    assert torch.equal(idx, idx_ref)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    unpool = getattr(nn, f"MaxUnpool{dim}d")(3, 2, 1)
    torch.testing.assert_close(unpool(out, idx, output_size=x.shape), unpool(out_ref, idx_ref, output_size=x.shape), rtol=0, atol=0)


def test_constructor_rejects_what_torch_rejects():
    with pytest.raises(ValueError, match="strided"):
        tmg.nn.Conv2d(2, 2, 3, padding="same", stride=2)
    with pytest.raises(ValueError, match="foo"):
        tmg.nn.Conv2d(2, 2, 3, padding="foo")
    with pytest.raises(ValueError, match="padding_mode"):
        tmg.nn.Conv1d(2, 2, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="groups"):
        tmg.nn.Conv2d(3, 2, 3, groups=2)


class _RecordOps(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(f"{func.namespace}.{func._opname}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_runs_on_our_ops(name, device):
    """Forward and backward of a converted model go through manualgrad ops, never aten's conv/pool kernels."""
    model, converted, x = make_pair(name, device, torch.float32)
    x.requires_grad_()
    with _RecordOps() as rec:
        out = converted(x)
        out.sum().backward()
    names = set(rec.names)
    assert {"manualgrad.conv_forward", "manualgrad.conv_backward", "manualgrad.max_pool_forward", "manualgrad.max_pool_backward"} <= names, names
    forbidden = {n for n in names if n.startswith("aten.") and ("conv" in n or "max_pool" in n or "mkldnn" in n)}
    assert not forbidden, forbidden
