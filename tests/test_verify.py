"""Tests of the unconverted-layer list (convert.unconverted, convert(strict=True)) on models shaped like
benchmarks/models.py's and timm's subclassed convs."""
import collections
import copy
import importlib.util
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
        ("up", torch.nn.ConvTranspose2d(4, 4, 2, stride=2)),
    ]))


EXPECTED = {"same": ("Conv2dSame", "own forward"), "std": ("ScaledStdConv2d", "own forward"),
            "padded": ("PaddedConv", "own _conv_forward"), "tagged": ("TaggedPool", "exact torch.nn types"),
            "up": ("ConvTranspose2d", "no ConvTranspose2d")}


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


