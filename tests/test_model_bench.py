"""Tests of the model-level benchmark: the MobileNetV2, ConvNeXt-T and DenseNet-121 builders of benchmarks/models.py
(published sizes; small copies converted agree with torch.nn in float64) and benchmarks/model_bench.py end to end."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import torch_manualgrad as tmg
from torch_manualgrad.bench import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
models = load_script(os.path.join(ROOT, "benchmarks", "models.py"))
model_bench = load_script(os.path.join(ROOT, "benchmarks", "model_bench.py"))
# narrow, shallow copies that run at 64 x 64 in milliseconds
SMALL = {"mobilenet_v2": dict(width=0.25), "convnext_tiny": dict(width=1 / 12, depth=0.2),
         "densenet121": dict(width=0.25, blocks=(2, 2, 2, 2)), "resnext50_32x4d": dict(width=0.125)}


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


# ----------------------------------------------------------------------------------------- the builders

def test_mobilenet_v2_has_the_papers_shape():
    model = models.mobilenet_v2()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's mobilenet_v2
    assert _count(model, torch.nn.Conv2d) == 52
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert [m.stride for m in depthwise].count((2, 2)) == 4  # with the stem: 224 -> 7
    assert _count(model, torch.nn.ReLU6) == 35 and _count(model, torch.nn.ReLU) == 0
    assert sum(block.residual for block in model.modules() if isinstance(block, models.InvertedResidual)) == 10


def test_convnext_tiny_has_the_papers_shape():
    model = models.convnext_tiny()
    assert sum(p.numel() for p in model.parameters()) == 28_589_128  # torchvision's convnext_tiny
    blocks = [m for m in model.modules() if isinstance(m, models.ConvNeXtBlock)]
    assert [len(stage) for stage in model.stages] == [3, 3, 9, 3]
    assert [stage[0].dwconv.in_channels for stage in model.stages] == [96, 192, 384, 768]
    assert all(b.dwconv.kernel_size == (7, 7) and b.dwconv.groups == b.dwconv.in_channels for b in blocks)
    assert all(b.pwconv1.out_features == 4 * b.pwconv1.in_features for b in blocks)
    assert all(torch.all(b.gamma == 1e-6) for b in blocks)
    # stochastic depth rises linearly from 0 at the first block to 0.1 at the last
    assert blocks[0].drop_path == 0 and blocks[-1].drop_path == pytest.approx(0.1)
    # what convert() reaches: stem, 18 depthwise, 3 downsampling convs; the 36 pointwise layers are Linear
    assert _count(model, torch.nn.Conv2d) == 22 and _count(model, torch.nn.Linear) == 37
    assert model.stem[0].kernel_size == model.stem[0].stride == (4, 4)
    assert all(d[1].kernel_size == d[1].stride == (2, 2) for d in model.downsample)


def test_resnext50_32x4d_has_the_papers_shape():
    model = models.resnext50_32x4d()
    assert sum(p.numel() for p in model.parameters()) == 25_028_904  # torchvision's resnext50_32x4d
    grouped = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(grouped) == 16 and all(m.groups == 32 and m.kernel_size == (3, 3) for m in grouped)
    assert sorted({m.in_channels for m in grouped}) == [128, 256, 512, 1024]  # 4, 8, 16 and 32 a group
    assert [m.stride for m in grouped].count((2, 2)) == 3
    assert _count(model, torch.nn.Conv2d) == 53


def test_densenet121_has_the_papers_shape():
    model = models.densenet121()
    assert sum(p.numel() for p in model.parameters()) == 7_978_856  # torchvision's densenet121
    blocks = [m for m in model.modules() if isinstance(m, models.DenseBlock)]
    assert [len(b.layers) for b in blocks] == [6, 12, 24, 16]
    assert [b.out_channels for b in blocks] == [256, 512, 1024, 1024]
    layers = [m for m in model.modules() if isinstance(m, models.DenseLayer)]
    assert all(l.conv1.out_channels == 128 and l.conv2.out_channels == 32 for l in layers)
    transitions = [m for m in model.modules() if isinstance(m, models.Transition)]
    assert [t[2].out_channels for t in transitions] == [128, 256, 512]  # compression 0.5
    assert _count(model, torch.nn.Conv2d) == 120 and _count(model, torch.nn.MaxPool2d) == 1
    assert _count(model, torch.nn.AvgPool2d) == 3
    assert model.fc.in_features == 1024


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(SMALL))
def test_small_copy_converted_agrees_in_float64(name, train, memory_format):
    """Ours and torch.nn's on one narrow copy in float64: outputs, input and parameter gradients agree to
    float64 rounding (stochastic depth and dropout make the same draws on both sides)."""
    torch.manual_seed(0)
    reference = getattr(models, name)(num_classes=10, **SMALL[name]).double().train(train)
    converted = tmg.convert(copy.deepcopy(reference))
    assert not tmg.unconverted(converted)
    assert any(isinstance(m, tmg.nn.Conv2d) for m in converted.modules())
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runs = []
    for model in (reference, converted):
        model.to(memory_format=memory_format)
        leaf = x.contiguous(memory_format=memory_format).requires_grad_(True)
        torch.manual_seed(2)
        out = model(leaf)
        out.square().sum().backward()
        runs.append([out.detach(), leaf.grad] + [p.grad for p in model.parameters()])
    assert len(runs[0]) == len(runs[1]) and all(g is not None for g in runs[1])
    for ours, theirs in zip(runs[1], runs[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9 * max(1.0, theirs.abs().max().item()))


def test_drop_path_drops_whole_samples_in_training_only():
    branch = torch.ones(1000, 3, 2, 2, dtype=torch.float64)
    torch.manual_seed(0)
    kept = models._drop_path(branch, 0.25, training=True)
    per_sample = kept.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 1 / 0.75}  # the kept are scaled to keep the mean
    assert torch.all(per_sample == per_sample[:, :1])  # a sample is kept or dropped whole
    assert 0.2 < (per_sample[:, 0] == 0).float().mean() < 0.3
    assert models._drop_path(branch, 0.25, training=False) is branch


# --------------------------------------------------------------------------------------------- the runner

def _rows(stdout):
    """The table's body rows, each as a list of cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_quick_run_through_the_cli():
    """`python -m torch_manualgrad bench models --quick`: bench.py hands over to model_bench.py, which prints a
    row for every default model in both layouts, all agreeing, and a geomean row per layout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch_manualgrad", "bench", "models", "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    machine = model_bench.bench.describe_machine(torch.device("cpu"))
    assert machine in first and f"torch {torch.__version__}" in first and "threads" in first, first
    rows = _rows(proc.stdout)
    body = [row for row in rows if not row[0].startswith("**")]
    expected = [(name, layout) for name in model_bench.MODELS for layout in ("nchw", "channels_last")]
    assert [(row[0], row[1]) for row in body] == expected, proc.stdout
    for row in body:
        for torch_ms, ours_ms, ratio, spread in (row[4:8], row[8:12]):  # train, then infer
            assert float(torch_ms) > 0 and float(ours_ms) > 0 and float(ratio) > 0
            n, percent = spread.split(", ")
            assert n == "1" and percent == "0%"  # one sample per side in --quick: no spread to see
        assert row[-1].startswith("yes (logits "), row
    geomeans = {row[1]: row for row in rows if row[0] == "**geomean**"}
    assert set(geomeans) == {"nchw", "channels_last"}
    for layout, row in geomeans.items():
        ratios = [float(r[6]) for r in body if r[1] == layout]
        expected_train = torch.tensor(ratios).log().mean().exp().item()
        assert float(row[6].strip("*")) == pytest.approx(expected_train, abs=0.011)
        assert float(row[10].strip("*")) > 0
    assert "worst train:" in proc.stdout and "worst infer:" in proc.stdout


def test_spread_column_counts_samples(capsys):
    """With several samples the spread column gives their number and the worse side's (max - min) / median."""
    # (a budget no busy machine reaches: the samples must stop at --repeat, not at the budget)
    assert model_bench.main(["--quick", "--models", "mobilenet_v2", "--layouts", "nchw", "--modes", "infer",
                             "--repeat", "4", "--budget", "1e6"]) == 0
    n, percent = _rows(capsys.readouterr().out)[0][7].split(", ")
    assert n == "4" and percent.endswith("%") and int(percent[:-1]) >= 0


def test_options_choose_models_layouts_and_modes(capsys):
    assert model_bench.main(["--quick", "--models", "convnext_tiny,resnet18", "--layouts", "channels_last",
                             "--modes", "infer"]) == 0
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if line.startswith("| model")][0]
    assert "infer" in header and "train" not in header
    rows = _rows(out)
    assert [(r[0], r[1]) for r in rows] == [("convnext_tiny", "channels_last"), ("resnet18", "channels_last"),
                                            ("**geomean**", "channels_last")]
    assert rows[0][-1].startswith("yes (logits ") and "gradients" not in rows[0][-1]


def test_a_wrong_kernel_is_reported(monkeypatch, capsys):
    """Our Conv2d made 1% wrong, as a wrong index would (a plain scale would not do: the batch norm after each
    conv undoes it in train mode): the agrees column says NO and the exit code is 1."""
    right = tmg.functional.conv2d

    def wrong(*args):
        out = right(*args)
        return out + 0.01 * out.roll(1, -1)

    monkeypatch.setattr(tmg.nn.Conv2d, "_functional", staticmethod(wrong))
    assert model_bench.main(["--quick", "--models", "resnet18", "--layouts", "nchw", "--modes", "train"]) == 1
    assert _rows(capsys.readouterr().out)[0][-1].startswith("**NO**")


def test_a_failing_model_is_a_row_not_a_crash(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(tmg.nn.MaxPool2d, "_functional", staticmethod(broken))
    assert model_bench.main(["--quick", "--models", "resnet18,mobilenet_v2", "--layouts", "nchw"]) == 1
    rows = _rows(capsys.readouterr().out)
    assert rows[0][:3] == ["resnet18", "nchw", "error: RuntimeError: no kernel for this"]
    assert rows[1][0] == "mobilenet_v2" and rows[1][-1].startswith("yes")  # MobileNetV2 has no max-pool


def test_help_names_the_models_command(capsys):
    from torch_manualgrad.__main__ import main

    assert main(["bench", "--help"]) == 0
    assert "'models'" in capsys.readouterr().out
    assert main(["bench", "models", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: torch-manualgrad bench models ")
    for option in ("--models", "--layouts", "--modes", "--batch", "--size", "--budget", "--threads", "--quick"):
        assert option in out
    with pytest.raises(SystemExit):
        model_bench.parse_args(["--models", "vgg16"])
    assert "expected a comma-separated list of resnet18" in capsys.readouterr().err
