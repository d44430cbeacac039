"""Tests of verify's judgement (float64 truth along each float32 run's branches, ours against torch's own
error) on ResNet/Inception/EfficientNet-shaped models, planted 1% errors, and the unconverted-layer list."""
import collections
import copy
import importlib.util
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg
from torch_manualgrad import verify as verify_function
from torch_manualgrad.convert import Unconverted, unconverted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("benchmark_models", os.path.join(ROOT, "benchmarks", "models.py"))
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)
verify_module = importlib.import_module("torch_manualgrad.verify")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="CUDA is not available"))]


def _input(size=64, device="cpu", dtype=torch.float32, seed=1):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def _small(name, train, device="cpu", **kwargs):
    """A narrow copy of one of benchmarks/models.py's nets, seeded, in train or eval mode."""
    torch.manual_seed(0)
    sizes = {"resnet18": dict(width=0.25), "resnet50": dict(width=0.25),
             "inception_v3": dict(width=0.25, depth_a=1, depth_c=1),
             "efficientnet_b0": dict(width=0.25, depth=0.34)}
    return getattr(models, name)(num_classes=10, **dict(sizes[name], **kwargs)).train(train).to(device)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor` (a planted backward error)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _plant(monkeypatch, output=1.0, weight_grad=1.0):
    """Make our Conv2d wrong, but only in layers marked `planted` (the mark survives verify's deep copies;
    the torch.nn reference never runs this code)."""
    right = tmg.nn.Conv2d._conv_forward

    def wrong(self, input, weight, bias):
        if not getattr(self, "planted", False):
            return right(self, input, weight, bias)
        return right(self, input, _ScaleGrad.apply(weight, weight_grad), bias) * output

    monkeypatch.setattr(tmg.nn.Conv2d, "_conv_forward", wrong)


# ------------------------------------------------------------------------------ correct conversions are OK

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0"])
def test_old_false_alarms_in_train_mode_are_ok(name, device):
    # Deep nets in train mode at batch 2: rounding picks ReLU branches, batch norm cancels some gradients
    # to ~0. The old verify (ours against torch's float32, max-relative, rtol 1e-4) failed both.
    result = verify_function(_small(name, True, device), _input(device=device))
    assert result.ok, result.report()
    params = {c.name: c for c in result.end_to_end}["parameter gradients"]
    assert params.max_rel > 1e-4  # ours and torch's float32 do differ by what the old rule called a failure
    assert params.tolerance_used < 1  # but ours is as close to the truth as torch's
    # the worst by allowance used may be a near-zero tensor (its relative error is noise over ~0)
    assert params.error < 1e-3 or params.worst in dict(params.ill_conditioned)
    assert all(layer.ok and layer.output_error < 1e-5 for layer in result.layers)
    assert "verify: OK" in result.report()


def test_near_zero_gradients_are_called_ill_conditioned_not_failed():
    # EfficientNet's projection batch norm feeds a 1x1 conv and another batch norm in train mode, which
    # removes any per-channel shift: the true gradient of the bias is zero up to rounding.
    result = verify_function(_small("efficientnet_b0", True), _input())
    params = {c.name: c for c in result.end_to_end}["parameter gradients"]
    ill = dict(params.ill_conditioned)
    assert "blocks.1.project.1.bias" in ill, params.ill_conditioned
    assert "near zero" in ill["blocks.1.project.1.bias"]
    assert "ill-conditioned" in result.report() and result.ok


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["resnet18", "inception_v3"])
def test_resnet18_and_inception_are_ok(name, train):
    size = 75 if name == "inception_v3" else 64
    result = verify_function(_small(name, train), _input(size))
    assert result.ok, result.report()
    kinds = collections.Counter(layer.type for layer in result.layers)
    assert kinds == ({"Conv2d": 20, "MaxPool2d": 1} if name == "resnet18" else {"Conv2d": 24})


def test_following_branches_removes_the_drift():
    # One ReLU input of this net sits so close to 0 that float32 and float64 put it on different sides:
    # that one element moves torch's own float32 gradients ~1e-2 away from an unguided float64 run. The
    # float64 run that takes torch's float32 branches is ~1e-6 away, torch's rounding alone.
    model, x = _small("resnet18", True, width=0.5), _input(96)
    ref_run = verify_module._run_model(copy.deepcopy(model), (x,), {}, [], 0, False, verify_module._Branches())
    wide = copy.deepcopy(model).double()
    free = verify_module._run_model(copy.deepcopy(wide), (x.double(),), {}, [], 0, False)
    follow = verify_module._run_model(copy.deepcopy(wide), (x.double(),), {}, [], 0, False,
                                      verify_module._Branches(replay=ref_run.branches.decisions,
                                                              draw_dtype=torch.float32))
    assert follow.branches.flips["activation"] > 0 and not follow.branches.lost

    def error(run, truth):  # the median over parameter tensors of torch's relative error
        errors = sorted(float((run.param_grads[n] - truth.param_grads[n]).norm() / truth.param_grads[n].norm())
                        for n in run.param_grads)
        return errors[len(errors) // 2]

    assert error(ref_run, follow) < 1e-5 and error(ref_run, free) > 100 * error(ref_run, follow)


# ------------------------------------------------------------------------------ planted errors are caught

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("where", ["output", "weight_grad"])
def test_planted_one_percent_error_in_one_resnet18_conv_is_named(monkeypatch, where, train, device):
    _plant(monkeypatch, **{where: 1.01})
    model = _small("resnet18", train, device)
    model.layer2[0].conv1.planted = True
    result = verify_function(model, _input(device=device))
    assert not result.ok
    assert [layer.name for layer in result.failed] == ["layer2.0.conv1"], result.report()
    bad = result.failed[0]
    if where == "output":
        assert 5e-3 < bad.output_error < 2e-2 and bad.output_error_torch < 1e-6
    else:
        assert bad.grad_worst == "weight" and 5e-3 < bad.grad_error < 2e-2
        assert bad.output_error < 1e-6  # the forward is right
    assert bad.tolerance_used > 100  # not a close call
    assert "verify: FAILED (layer2.0.conv1)" in result.report()


def _judged_params(near_zero, ours_noise, torch_noises, typical=0.1, n=16, seed=0):
    """Judged parameter gradients as verify makes them: 20 ordinary tensors of rms `typical` (ours and torch's
    1e-7 relative off), then one near-zero tensor per torch noise (its truth ~1e-15 rms, i.e. cancelled;
    ours `ours_noise` rms off), all in float32."""
    g = torch.Generator().manual_seed(seed)

    def rand(scale):
        return torch.randn(n, generator=g, dtype=torch.float64) * scale

    judged = []
    for i in range(20):
        truth = rand(typical)
        ours, theirs = (truth + rand(typical * 1e-7)).float(), (truth + rand(typical * 1e-7)).float()
        judged.append(verify_module._judge(f"w{i}", ours, theirs, truth, truth, None, None, 10.0))
    for i, torch_noise in enumerate(torch_noises):
        truth = rand(near_zero)
        theirs = torch.zeros(n) if torch_noise == 0 else (truth + rand(torch_noise)).float()
        ours = (truth + rand(ours_noise)).float()
        judged.append(verify_module._judge(f"bn{i}.bias", ours, theirs, truth, truth, None, None, 10.0))
    return judged


@pytest.mark.parametrize("siblings", [0, 8], ids=["alone", "with-siblings"])
def test_near_zero_gradient_that_torch_got_exactly_is_not_a_false_alarm(siblings):
    # On an H200, cuDNN's batch-norm backward gave one EfficientNet-B0 batch-norm bias gradient (true value
    # ~1e-15: its terms cancel) as exactly 0, while ours was 3e-7 off, as torch's own was on its siblings;
    # 10x torch's error was then an allowance of 0, and verify cried wolf. Such a tensor is allowed
    # rounding at the scale of the model's gradients.
    judged = _judged_params(1e-15, 3e-7, [0.0] + [3e-7] * siblings)
    lucky = judged[20]
    assert lucky.error_torch == pytest.approx(1.0) and not lucky.ok  # the old rule alone fails it
    typical = verify_module._typical_rms(judged)
    floored = verify_module._near_zero_floor(judged, typical, 10.0)
    assert all(j.ok for j in floored)
    assert [j.used for j in floored[:20]] == [j.used for j in judged[:20]]  # ordinary tensors: the same rule
    summary = verify_module._summarise("parameter gradients", floored, typical)
    assert summary.ok and "bn0.bias" in dict(summary.ill_conditioned)
    assert "near zero" in dict(summary.ill_conditioned)["bn0.bias"]


@pytest.mark.parametrize("siblings", [0, 8], ids=["alone", "with-siblings"])
def test_near_zero_gradient_still_fails_an_error_at_the_scale_of_its_terms(siblings):
    # An error upstream of a cancelling sum shows at the scale of its terms: 1% of the model's typical
    # gradient (1e-3 here) is far beyond the floor (1e-5 x 0.1 = 1e-6 per element, or 10x torch's 3e-7).
    judged = _judged_params(1e-15, 1e-3, [0.0] + [3e-7] * siblings)
    floored = verify_module._near_zero_floor(judged, verify_module._typical_rms(judged), 10.0)
    assert not floored[20].ok and floored[20].used > 50
    assert all(j.ok for j in floored[:20])


def test_planted_error_in_a_small_weight_gradient_is_named(monkeypatch):
    # A layer fed tiny inputs (1e-5: raw sensor data in SI units) has a weight gradient far below the model's
    # others, but torch keeps its digits there: a 1% error in it is 1% of the tensor, not noise over a
    # cancelled sum, and must still be named (a first near-zero rule, floored at the model's scale, hid it)
    _plant(monkeypatch, weight_grad=1.01)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    model[0].planted = True
    result = verify_function(model, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 1e-5)
    assert [layer.name for layer in result.failed] == ["0"], result.report()
    assert result.layers[0].grad_error == pytest.approx(0.01, rel=1e-3)


def test_near_zero_floor_leaves_small_tensors_that_keep_their_digits_alone():
    # tiny (rms 1e-9 where the model's gradients are 0.1) but computed to float32 precision by torch: no floor
    judged = _judged_params(1e-9, 1e-11, [1e-16])
    assert not judged[20].ill and not judged[20].ok  # ours 1% off
    floored = verify_module._near_zero_floor(judged, verify_module._typical_rms(judged), 10.0)
    assert floored[20].used == judged[20].used


def test_planted_error_in_a_depthwise_conv_of_efficientnet_is_named(monkeypatch):
    _plant(monkeypatch, weight_grad=1.01)
    model = _small("efficientnet_b0", True)
    model.blocks[2].depthwise[0].planted = True
    result = verify_function(model, _input())
    assert [layer.name for layer in result.failed] == ["blocks.2.depthwise.0"], result.report()


def test_ratio_and_rtol_set_the_allowance(monkeypatch):
    _plant(monkeypatch, output=1 + 5e-5)  # 5e-5 relative: above the float32 floor (1e-5), far above rounding
    model = _small("resnet18", False)
    model.conv1.planted = True
    result = verify_function(model, _input())
    assert [layer.name for layer in result.failed] == ["conv1"]
    assert verify_function(model, _input(), rtol=1e-4).ok  # a looser floor
    assert verify_function(model, _input(), ratio=1000).ok  # or 1000 x torch's ~2e-7
    with pytest.raises(ValueError, match="ratio"):
        verify_function(model, _input(), ratio=0)


# ------------------------------------------------------------------------------ float64 and random draws

def test_float64_model_uses_a_float32_probe():
    # In float64 there is no higher precision: torch's float64 run is the truth, and the allowance for a
    # near-zero gradient comes from torch's own float32 error on it, scaled to float64.
    model = _small("efficientnet_b0", True).double()
    result = verify_function(model, _input(dtype=torch.float64))
    assert result.ok, result.report()
    params = {c.name: c for c in result.end_to_end}["parameter gradients"]
    assert params.ill_conditioned and params.max_rel > 1e-9  # the old float64 rule would have failed
    assert any("float32 probe" in note or "probe run" in note for note in result.notes)


def test_float64_model_still_catches_a_small_error(monkeypatch):
    _plant(monkeypatch, output=1 + 1e-6)
    model = _small("resnet18", True).double()
    model.layer3[1].conv2.planted = True
    result = verify_function(model, _input(dtype=torch.float64))
    assert [layer.name for layer in result.failed] == ["layer3.1.conv2"], result.report()


class _NoisyNet(torch.nn.Module):
    """Conv, multiplicative uniform noise from torch.rand_like, dropout, max-pool: random draws a float64
    run must see in float32 (torch.rand in float64 draws other numbers from the same seed)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        y = y * (0.5 + torch.rand_like(y))
        y = F.dropout(torch.relu(y), 0.3, self.training)
        noise = torch.empty_like(y).uniform_(0.9, 1.1)
        return self.conv2(self.pool(y * noise))


def test_random_draws_match_in_the_float64_runs():
    torch.manual_seed(0)
    result = verify_function(_NoisyNet().train(), _input(16))
    assert result.ok, result.report()
    out = result.end_to_end[0]
    assert out.error_torch < 1e-5  # torch's float32 against a float64 run that drew the same numbers
    torch.manual_seed(0)
    x32 = torch.rand(1000)
    torch.manual_seed(0)
    assert not torch.equal(torch.rand(1000, dtype=torch.float64).float(), x32)  # why it has to


# ------------------------------------------------------------------------------ following branches

def test_branches_replay_relu_and_max_pool_decisions():
    x32 = torch.tensor([[[[1e-8, -1.0, 2.0, 2.0 + 1e-6]]]])
    x64 = torch.tensor([[[[-1e-8, -1.0, 2.0 + 1e-6, 2.0]]]], dtype=torch.float64, requires_grad=True)

    def net(x):
        return F.max_pool2d(F.relu(x), (1, 2)), torch.nn.ReLU6()(x - 1.5), F.leaky_relu(x, 0.1)

    record = verify_module._Branches()
    with record:
        net(x32)
    assert [kind for kind, _ in record.decisions] == ["relu", "max_pool", "hardtanh", "leaky_relu"]
    replay = verify_module._Branches(replay=record.decisions)
    with replay:
        pooled, clipped, leaky = net(x64)
    # relu keeps x32's sign (x64's -1e-8 passes through), the max-pool x32's argmax (index 3, not 2)
    assert pooled.tolist() == [[[[-1e-8, 2.0]]]]
    assert clipped.flatten().tolist() == pytest.approx([0.0, 0.0, 0.5 + 1e-6, 0.5], abs=1e-12)
    assert leaky[0, 0, 0, 0].item() == -1e-8  # the positive branch, as in float32
    # both windows: the first sees the forced relu's [-1e-8, 0], whose own maximum is the 0
    assert replay.flips["activation"] == 2 and replay.flips["max_pool"] == 2
    pooled.sum().backward()
    assert x64.grad[0, 0, 0].tolist() == [1.0, 0.0, 0.0, 1.0]  # through the recorded branches only


def test_branches_stop_following_when_the_calls_differ():
    record = verify_module._Branches()
    with record:
        F.relu(torch.randn(3))
    replay = verify_module._Branches(replay=record.decisions)
    with replay:
        F.relu(torch.randn(4, dtype=torch.float64))
    assert "does not match" in replay.lost and replay.flips["activation"] == 0


# ------------------------------------------------------------------------------ layers left unconverted

class ScaledStdConv2d(torch.nn.Conv2d):
    """timm's shape: standardise the weight per output channel, then F.conv2d (its own forward)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PaddedConv(torch.nn.Conv2d):
    """A subclass that overrides only _conv_forward."""

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(F.pad(input, [1, 1, 1, 1]), weight, bias)


class TaggedPool(torch.nn.MaxPool2d):
    """A subclass that changes nothing it computes (still not swapped: convert swaps exact types)."""


def _mixed_net():
    return torch.nn.Sequential(collections.OrderedDict([
        ("plain", torch.nn.Conv2d(3, 4, 3, padding=1)),
        ("same", models.Conv2dSame(4, 4, 3, stride=2)),
        ("std", ScaledStdConv2d(4, 4, 1)),
        ("padded", PaddedConv(4, 4, 3)),
        ("norm", torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(4, 4, 1))),
        ("spectral", torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv2d(4, 4, 1))),
        ("tagged", TaggedPool(2)),
        ("pool", torch.nn.MaxPool2d(1)),
        ("adaptive", torch.nn.AdaptiveMaxPool2d(2)),
    ]))


EXPECTED = {"same": ("Conv2dSame", "own forward"), "std": ("ScaledStdConv2d", "own forward"),
            "padded": ("PaddedConv", "own _conv_forward"), "tagged": ("TaggedPool", "exact torch.nn types"),
            "adaptive": ("AdaptiveMaxPool2d", "no AdaptiveMaxPool2d")}


def test_unconverted_lists_every_layer_left_on_torch_kernels():
    torch.manual_seed(0)
    model = _mixed_net()
    before = unconverted(model)
    tmg.convert(model)
    found = unconverted(model)
    assert found == before  # the same answer before and after convert()
    assert all(isinstance(r, Unconverted) for r in found)
    assert [r.name for r in found] == list(EXPECTED)
    for name, kind, reason in found:  # (qualified name, type, reason) records
        assert kind == EXPECTED[name][0] and EXPECTED[name][1] in reason, (name, kind, reason)
    assert type(model.plain) is tmg.nn.Conv2d and type(model.pool) is tmg.nn.MaxPool2d
    assert isinstance(model.norm, tmg.nn.Conv2d) and isinstance(model.spectral, tmg.nn.Conv2d)
    assert unconverted(tmg.convert(_small("resnet18", False))) == []
    parametrized_same = torch.nn.utils.parametrizations.weight_norm(models.Conv2dSame(2, 2, 3))
    assert [(r.type, "own forward" in r.reason) for r in unconverted(parametrized_same)] == [
        ("ParametrizedConv2dSame", True)]
    lazy = torch.nn.Sequential(torch.nn.LazyConv2d(4, 3))
    assert [(r.name, r.type) for r in unconverted(lazy)] == [("0", "LazyConv2d")]
    assert "first forward" in unconverted(lazy)[0].reason


def test_convert_strict_refuses_and_changes_nothing():
    model = _mixed_net()
    with pytest.raises(ValueError, match=r"5 layers cannot be converted:\n  same \(Conv2dSame\)"):
        tmg.convert(model, strict=True)
    assert type(model.plain) is torch.nn.Conv2d
    clean = tmg.convert(_small("resnet18", False), strict=True)
    assert isinstance(clean.conv1, tmg.nn.Conv2d)


def test_parametrized_layers_are_converted_and_reverted():
    torch.manual_seed(0)
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(3, 4, 3))
    x = _input(8)
    expected = conv(x)
    tmg.convert(conv)
    assert isinstance(conv, tmg.nn.Conv2d) and type(conv).__name__ == "ParametrizedConv2d"
    assert torch.allclose(conv(x), expected, atol=1e-6) and unconverted(conv) == []
    ops = []
    with torch.profiler.profile() as prof:
        conv(x)
    ops = {e.name for e in prof.events()}
    assert "manualgrad::conv_forward" in ops and "aten::convolution" not in ops
    tmg.revert(conv)
    assert type(conv).__bases__ == (torch.nn.Conv2d,) and torch.equal(conv(x), expected)
    tmg.convert(conv)
    torch.nn.utils.parametrize.remove_parametrizations(conv, "weight")
    assert type(conv) is tmg.nn.Conv2d  # what was under the parametrization: our layer

    with pytest.warns(FutureWarning):
        hooked = torch.nn.utils.weight_norm(torch.nn.Conv2d(4, 4, 3))  # a pre-hook: the class stays Conv2d
    tmg.convert(hooked)
    assert type(hooked) is tmg.nn.Conv2d and unconverted(hooked) == []


def test_verify_checks_parametrized_layers_against_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(3, 4, 3)),
                                torch.nn.ReLU(),
                                torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv2d(4, 4, 3)))
    result = verify_function(model.train(), _input(10))
    assert result.ok and [layer.name for layer in result.layers] == ["0", "2"], result.report()
    assert result.layers[0].grad_worst in ("input", "parametrizations.weight.original0",
                                           "parametrizations.weight.original1", "bias")


def test_verify_flags_a_wrong_parametrized_layer(monkeypatch):
    _plant(monkeypatch, output=1.01)
    model = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(3, 4, 3)))
    model[0].planted = True
    result = verify_function(model, _input(10))
    assert [layer.name for layer in result.failed] == ["0"], result.report()


def test_verify_lists_unconverted_layers_and_functional_calls():
    torch.manual_seed(0)
    result = verify_function(_mixed_net(), _input(8))
    assert result.ok, result.report()
    assert [layer.name for layer in result.layers] == ["plain", "norm", "spectral", "pool"]
    assert [r.name for r in result.unconverted] == list(EXPECTED)  # Conv2dSame's own F.conv2d not listed twice
    report = result.report()
    assert "not converted (5; these run on torch's kernels and are not checked):" in report
    assert re.search(r"^  same\s+Conv2dSame\s+a torch.nn.Conv2d subclass with its own forward", report, re.MULTILINE)
    assert report.rstrip().endswith("; 5 not converted")

    # Inception's max-pools are F.max_pool2d calls in forward: listed by the module that makes them
    inception = verify_function(_small("inception_v3", False), _input(75))
    calls = {(r.name, r.type): r.reason for r in inception.unconverted}
    assert set(calls) == {("", "F.max_pool2d"), ("Mixed_6a", "F.max_pool2d")}
    assert calls[("", "F.max_pool2d")].startswith("called in forward (2 calls)")
    assert re.search(r"^  \(model\)\s+F.max_pool2d\s+called in forward", inception.report(), re.MULTILINE)


def test_verify_everywhere_covers_subclasses_and_functional_calls():
    torch.manual_seed(0)
    result = verify_function(_mixed_net(), _input(8), everywhere=True)
    assert result.ok, result.report()
    assert [layer.name for layer in result.layers] == ["plain", "norm", "spectral", "pool"]
    assert [r.name for r in result.covered] == ["same", "std", "padded", "tagged"]
    assert [(r.name, r.type) for r in result.unconverted] == [("adaptive", "AdaptiveMaxPool2d")]  # no kernel of ours
    report = result.report()
    assert "covered by everywhere() (4; computed by our kernels, checked end to end only):" in report
    assert re.search(r"^  same\s+Conv2dSame\s+a torch.nn.Conv2d subclass with its own forward.*; everywhere\(\) "
                     r"computed its F.conv2d \(1 call\) with our kernels$", report, re.MULTILINE), report
    assert report.rstrip().endswith("; 1 not converted")

    # Inception's F.max_pool2d calls: covered, and their argmaxes are followed by the float64 truth
    inception = verify_function(_small("inception_v3", False), _input(75), everywhere=True)
    assert inception.ok and not inception.unconverted, inception.report()
    calls = {(r.name, r.type): r.reason for r in inception.covered}
    assert set(calls) == {("", "F.max_pool2d"), ("Mixed_6a", "F.max_pool2d")}
    assert calls[("", "F.max_pool2d")] == "called in forward (2 calls): everywhere() computed them with our kernels"
    assert not any("stopped following" in note for note in inception.notes), inception.notes


def test_verify_everywhere_judges_what_it_covers(monkeypatch):
    """A 1% error in what everywhere() computes (here: F.conv2d calls of a subclass) fails the end-to-end
    comparison, though no converted layer is wrong; without everywhere=True torch's kernel ran there."""
    from torch_manualgrad import routing

    def wrong(*args, **kwargs):
        return tmg.functional.conv2d(*args, **kwargs) * 1.01

    monkeypatch.setitem(routing._ROUTES, torch.conv2d, ("F.conv2d", wrong))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), ScaledStdConv2d(4, 4, 3))
    assert verify_function(model, _input(10)).ok
    result = verify_function(model, _input(10), everywhere=True)
    assert not result.ok and [c.name for c in result.end_to_end if not c.ok] == ["model output", "input gradient",
                                                                               "parameter gradients"]
    assert not result.failed  # the converted layers alone are right


def test_verify_refuses_to_run_inside_everywhere():
    refused = pytest.raises(RuntimeError, match=r"inside torch_manualgrad.everywhere\(\).*everywhere=True")
    with tmg.everywhere(), refused:
        verify_function(_mixed_net(), _input(8))


def test_efficientnet_with_tf_same_padding_lists_its_convs():
    model = _small("efficientnet_b0", False, tf_same=True)
    result = verify_function(model, _input())
    assert result.ok, result.report()
    same = [r for r in result.unconverted if r.type == "Conv2dSame"]
    assert len(same) == sum(isinstance(m, models.Conv2dSame) for m in model.modules()) > 20
    assert {layer.name.rsplit(".", 1)[-1] for layer in result.layers} == {"conv_reduce", "conv_expand"}


def test_a_model_that_changes_its_input_in_place_is_verified():
    # verify differentiates with respect to the inputs, made leaves that require grad; a first in-place step
    # (ReLU(inplace=True)) raised "a leaf Variable that requires grad is being used in an in-place operation"
    # (found by fuzzing verify). The model now gets copies of the leaves.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(2))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    before = x.clone()
    result = verify_function(model, x)
    assert result.ok, result.report()
    assert "input gradient" in {c.name for c in result.end_to_end}
    assert torch.equal(x, before)  # the caller's input is left alone


def test_entries_both_float32_runs_overflowed_are_left_out():
    # A model whose float32 runs overflow to inf (a DenseNet fed large inputs) where float64 does not: every
    # layer downstream was reported FAILED with "ours inf, torch inf" (found by fuzzing verify)
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(64, generator=g, dtype=torch.float64) * 1e38
    theirs = (truth * (1 + 1e-7 * torch.randn(64, generator=g, dtype=torch.float64))).float()
    ours = (truth * (1 + 1e-7 * torch.randn(64, generator=g, dtype=torch.float64))).float()
    theirs[:5] = ours[:5] = float("inf")
    theirs[5] = ours[5] = float("nan")
    judged = verify_module._judge("x", ours, theirs, truth, truth, None, None, 10.0)
    assert judged.ok and math.isfinite(judged.error)
    wrong = ours.clone()
    wrong[10:] *= 1.01  # a 1% error on the entries that are still finite
    assert not verify_module._judge("x", wrong, theirs, truth, truth, None, None, 10.0).ok
    alone = ours.clone()
    alone[6] = float("inf")  # ours overflows where torch's does not
    assert not verify_module._judge("x", alone, theirs, truth, truth, None, None, 10.0).ok


def test_float64_model_whose_float32_probe_lost_the_value_is_ok():
    # Tiny input (1e-7) and conv biases near 0.5: the batch norm's x - mean cancels seven digits, float32 loses the
    # weight gradient altogether (probe error ~0.5), and scaled by the epsilons that underestimated torch's own
    # float64 error (5e-10 against ours 9e-9): a false alarm (found by fuzzing verify)
    torch.manual_seed(30)
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3, padding=1), torch.nn.Conv1d(4, 3, 1), torch.nn.BatchNorm1d(3),
                                torch.nn.Conv1d(3, 2, 1)).train().double()
    x = torch.randn(2, 3, 5, dtype=torch.float64)[:, :1] * 1e-7
    result = verify_function(model, x)
    assert result.ok, result.report()
