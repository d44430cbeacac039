"""Tests of the verify, check and bench subcommands of `python -m torch_manualgrad`: command line and Python API."""
import argparse
import collections
import copy
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_manualgrad as tmg
from torch_manualgrad import bench, check
from torch_manualgrad.verify import VerifyResult, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER_TYPES = {"conv1": "Conv2d", "pool1": "MaxPool2d", "conv2": "Conv2d", "pool2": "MaxPool2d",
               "conv3": "Conv1d", "pool3": "MaxPool1d"}


def small_cnn():
    """All four converted layer types, with non-default options; input (N, 3, 12, 12). Also a verify factory."""
    return torch.nn.Sequential(collections.OrderedDict([
        ("conv1", torch.nn.Conv2d(3, 8, 3, padding=1)),
        ("relu1", torch.nn.ReLU(inplace=True)),
        ("pool1", torch.nn.MaxPool2d(2)),
        ("conv2", torch.nn.Conv2d(8, 8, 3, padding="same", groups=2)),
        ("relu2", torch.nn.ReLU()),
        ("pool2", torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)),  # 6x6 -> 4x4
        ("flat2", torch.nn.Flatten(2)),                                          # (N, 8, 16)
        ("conv3", torch.nn.Conv1d(8, 8, 3, padding=1, bias=False)),
        ("pool3", torch.nn.MaxPool1d(2)),
        ("flat", torch.nn.Flatten()),
        ("fc", torch.nn.Linear(8 * 8, 5)),
    ]))


def _input(dtype=torch.float32):
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _wrong_conv2d(monkeypatch, factor):
    """Make our Conv2d layers (only them) return output * factor."""
    right = tmg.functional.conv2d
    monkeypatch.setattr(tmg.nn.Conv2d, "_functional", staticmethod(lambda *a: right(*a) * factor))


def _cli(*args, cwd=ROOT, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "torch_manualgrad", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------- verify

def test_verify_good_model_passes_and_leaves_model_alone():
    torch.manual_seed(0)
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    result = verify(model, _input())
    assert isinstance(result, VerifyResult)
    assert result.ok and bool(result), result.report()
    assert [(layer.name, layer.type) for layer in result.layers] == list(LAYER_TYPES.items())
    for layer in result.layers:
        assert layer.ok and layer.calls == 1
        assert layer.output_max_rel < 1e-5 and layer.drift_rel is not None
        assert layer.grad_max_abs is not None and layer.grad_max_rel < 1e-5
    assert {layer.name: layer.grad_worst for layer in result.layers}["pool1"] == "input"
    assert [c.name for c in result.end_to_end] == ["model output", "input gradient", "parameter gradients"]
    assert all(c.ok for c in result.end_to_end)
    report = result.report()
    for name, kind in LAYER_TYPES.items():
        assert re.search(rf"^{name}\s+{kind}\s", report, re.MULTILINE), report
    assert "verify: OK" in report
    # the caller's model is neither converted nor given gradients
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_verify_flags_exactly_the_wrong_layers(monkeypatch):
    torch.manual_seed(0)
    _wrong_conv2d(monkeypatch, 1.01)
    result = verify(small_cnn(), _input())
    assert not result.ok and not bool(result)
    assert sorted(layer.name for layer in result.failed) == ["conv1", "conv2"]
    assert {layer.type for layer in result.failed} == {"Conv2d"}
    for layer in result.failed:  # 1% off in the output and in every gradient
        assert 5e-3 < layer.output_max_rel < 2e-2 and layer.grad_max_rel > 5e-3
    assert not result.end_to_end[0].ok  # the model output is off too
    report = result.report()
    assert re.search(r"^conv1\s+Conv2d\s.*FAIL", report, re.MULTILINE), report
    assert re.search(r"^pool1\s+MaxPool2d\s.*ok", report, re.MULTILINE), report
    assert "verify: FAILED (conv1, conv2)" in report


def test_verify_default_tolerances_follow_dtype(monkeypatch):
    torch.manual_seed(0)
    model = small_cnn()
    _wrong_conv2d(monkeypatch, 1 + 1e-6)  # invisible at float32's tolerance, an error in float64
    assert verify(model, _input()).ok
    result64 = verify(copy.deepcopy(model).double(), _input(torch.float64))
    assert not result64.ok and {layer.name for layer in result64.failed} == {"conv1", "conv2"}
    assert verify(copy.deepcopy(model).double(), _input(torch.float64), rtol=1e-4, atol=1e-6).ok


def test_verify_train_mode_dropout_batchnorm_and_shared_layer():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 3, padding=1)  # called twice
            self.bn = torch.nn.BatchNorm1d(4)
            self.drop = torch.nn.Dropout(0.5)
            self.pool = torch.nn.MaxPool1d(2, return_indices=True)
            self.unused = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x):
            y = self.drop(self.bn(self.conv(self.conv(x)))) + x
            values, indices = self.pool(y)
            return {"values": values, "indices": indices}

    torch.manual_seed(0)
    model = Net().train()
    stats = model.bn.running_mean.clone()
    result = verify(model, torch.randn(3, 4, 10))
    assert result.ok, result.report()
    by_name = {layer.name: layer for layer in result.layers}
    assert by_name["conv"].calls == 2 and by_name["pool"].calls == 1
    assert by_name["unused"].calls == 0 and by_name["unused"].note == "not called"
    assert torch.equal(model.bn.running_mean, stats) and model.training


def test_verify_cli_good_model_exits_0():
    proc = _cli("verify", f"{os.path.join(ROOT, 'tests', 'test_cli.py')}:small_cnn", "--input-shape", "2,3,12,12")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, kind in LAYER_TYPES.items():
        assert re.search(rf"^{name}\s+{kind}\s.*ok$", proc.stdout, re.MULTILINE), proc.stdout
    assert "verify: OK, 6 layers agree" in proc.stdout


def test_verify_cli_everywhere_covers_functional_calls(tmp_path):
    (tmp_path / "pooled.py").write_text(textwrap.dedent("""
        import torch
        import torch.nn.functional as F

        class Pooled(torch.nn.Sequential):
            def forward(self, x):
                return F.max_pool2d(super().forward(x), 2)

        def build():
            return Pooled(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), torch.randn(2, 3, 10, 10)
    """))
    plain = _cli("verify", "pooled:build", cwd=tmp_path)
    assert plain.returncode == 0 and "not converted (1;" in plain.stdout, plain.stdout + plain.stderr
    proc = _cli("verify", "pooled:build", "--everywhere", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^  \(model\)\s+F.max_pool2d\s+called in forward \(1 call\): everywhere\(\) computed it",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert "not converted" not in proc.stdout and "verify: OK, 1 layer agrees" in proc.stdout


def test_verify_cli_wrong_layer_exits_1(tmp_path):
    # A factory module (imported by name from the working directory) that returns (model, example input)
    # and, as a stand-in for a bug, makes our MaxPool1d double its output.
    (tmp_path / "wrongpool.py").write_text(textwrap.dedent("""
        import torch
        import torch_manualgrad as tmg

        def build():
            right = tmg.functional.max_pool1d
            tmg.nn.MaxPool1d._functional = staticmethod(lambda *a, **k: right(*a, **k) * 2)
            model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.MaxPool1d(2), torch.nn.Conv1d(4, 1, 1))
            return model, torch.randn(1, 2, 11)
    """))
    proc = _cli("verify", "wrongpool:build", "--dtype", "float64", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"^1\s+MaxPool1d\s.*FAIL", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^0\s+Conv1d\s.*ok$", proc.stdout, re.MULTILINE), proc.stdout
    assert "verify: FAILED (1)" in proc.stdout


def test_verify_cli_lists_unconverted_layers_and_takes_ratio(tmp_path):
    # A torch.nn.Conv2d subclass with its own forward stays torch's: listed, not checked, not a failure.
    (tmp_path / "subclassed.py").write_text(textwrap.dedent("""
        import torch

        class PaddedConv(torch.nn.Conv2d):
            def forward(self, x):
                return super().forward(torch.nn.functional.pad(x, [1, 1, 1, 1]))

        def build():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), PaddedConv(4, 4, 3))
    """))
    proc = _cli("verify", "subclassed:build", "--input-shape", "2,3,9,9", "--ratio", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^0\s+Conv2d\s.*ok$", proc.stdout, re.MULTILINE), proc.stdout
    assert "not converted (1; these run on torch's kernels and are not checked):" in proc.stdout
    assert re.search(r"^  2\s+PaddedConv\s+a torch.nn.Conv2d subclass with its own forward", proc.stdout, re.MULTILINE)
    assert "verify: OK, 1 layer agrees" in proc.stdout and "ours within 4x torch's own error" in proc.stdout
    assert _cli("verify", "subclassed:build", "--input-shape", "2,3,9,9", "--ratio", "0", cwd=tmp_path).returncode == 2


def test_verify_cli_usage_errors(capsys):
    from torch_manualgrad.__main__ import main

    assert main(["verify", "no_such_module_xyz:build", "--input-shape", "1,3,8,8"]) == 2
    assert main(["verify", f"{os.path.join(ROOT, 'tests', 'test_cli.py')}:small_cnn"]) == 2  # no input, no shape
    err = capsys.readouterr().err
    assert "no_such_module_xyz" in err and "--input-shape" in err


@pytest.mark.parametrize("args,says", [
    (["verify", "{cnn}", "--input-shape", "1,4,12,12"], "expected input[1, 4, 12, 12] to have 3 channels"),
    (["verify", "{cnn}", "--input-shape", "1,3,2,2"], "RuntimeError"),
    (["verify", "{cnn}", "--input-shape", "1,3,12,12", "--device", "meta"], "argument --device"),
    (["verify", "{cnn}", "--input-shape", "1,3,12,12", "--atol", "nan"], "argument --atol"),
    (["explain", "conv1d", "--plot", "{file}"], "FileExistsError"),
    (["demo", "--epochs", "0"], "argument --epochs: expected a positive integer, got 0"),
    (["demo", "--epochs", "-1"], "argument --epochs"),
    (["demo", "--batch-size", "0"], "argument --batch-size"),
    (["demo", "--device", "foo"], "argument --device"),
    (["bench", "--threads", "0", "--quick"], "argument --threads"),
    (["bench", "models", "--threads", "0", "--quick"], "argument --threads"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_user_mistakes_are_one_line_errors(args, says, tmp_path):
    # a user's shape, path or option that does not work: exit 2 and a message naming it, never a Python
    # traceback (a fuzzer found 16 such tracebacks)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cnn = f"{os.path.join(ROOT, 'tests', 'test_cli.py')}:small_cnn"
    proc = _cli(*(a.format(cnn=cnn, file=a_file) for a in args))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and says in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------------------------- check

def test_check_configurations_cover_the_matrix():
    full, quick = check.configurations(), check.configurations(quick=True)
    assert len(quick) < len(full)
    for configs in (full, quick):
        names = [c.name for c in configs]
        assert len(names) == len(set(names))
        assert {c.op for c in configs} == {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                                           "conv_transpose3d", "max_pool1d", "max_pool2d", "max_pool3d"}
        transposed = [c for c in configs if c.op.startswith("conv_transpose")]
        for key in ("stride", "padding", "output_padding", "dilation", "groups"):
            assert len({c.kwargs[key] for c in transposed}) > 1, key
        assert any(c.kwargs["output_padding"] >= c.kwargs["stride"] for c in transposed)
        convs = [c for c in configs if c.is_conv and c not in transposed]
        pools = [c for c in configs if not c.is_conv]
        same_kernels = {c.weight_shape[-1] % 2 for c in convs if c.kwargs["padding"] == "same"}
        assert same_kernels == {0, 1}  # 'same' with an odd and an even kernel
        assert any(c.kwargs["padding"] == "valid" for c in convs)
        for key, values in (("stride", {1, 2}), ("dilation", {1, 2}), ("groups", {1, 2})):
            assert values <= {c.kwargs[key] for c in convs}, key
        assert {c.bias for c in convs} == {True, False}
        for key, values in (("ceil_mode", {False, True}), ("return_indices", {False, True}),
                            ("padding", {0, 1}), ("dilation", {1, 2}), ("kernel_size", {2, 3})):
            assert values <= {c.kwargs[key] for c in pools}, key
        for c in pools:  # inputs without ties
            x = c.make_inputs()[0]
            assert x.dtype == torch.float64 and x.unique().numel() == x.numel()
    assert {c.name for c in quick} <= {c.name for c in full}


def test_check_run_config_passes_and_catches_a_wrong_backward(monkeypatch):
    config = next(c for c in check.configurations(quick=True) if c.op == "conv2d" and c.bias)
    result = check.run_config(config)
    assert result.passed, result.message

    right = tmg.autograd.ConvFunction.backward

    def wrong(ctx, grad_output):
        grads = list(right(ctx, grad_output))
        grads[1] = grads[1] * 1.01  # the weight gradient 1% off
        return tuple(grads)

    monkeypatch.setattr(tmg.autograd.ConvFunction, "backward", staticmethod(wrong))
    result = check.run_config(config)
    assert not result.passed and "Jacobian mismatch" in result.message


def test_check_quick_cli_passes():
    proc = _cli("check", "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    summary = re.search(r"^check: (\d+) passed, 0 failed", proc.stdout, re.MULTILINE)
    assert summary, proc.stdout
    n = len(check.configurations(quick=True))
    assert int(summary.group(1)) == n
    assert sum(bool(re.search(r"\sPASS\s+\d+\.\d+s$", line)) for line in lines) == n


# ----------------------------------------------------------------------------------------------- bench

def test_bench_cli_passes_options_through():
    proc = _cli("bench", "--quick", "--only", "pool")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| case |") and set(table[1]) <= set("|-")
    rows = table[2:]
    assert rows and all("pool" in row.split("|")[1] for row in rows), proc.stdout  # --only pool reached bench.py
    assert all(row.rstrip().endswith("| yes |") for row in rows), proc.stdout


def test_bench_help_is_bench_scripts(capsys):
    from torch_manualgrad.__main__ import main

    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--only" in out and "--quick" in out and "torch-manualgrad bench" in out


def test_bench_without_the_script_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "bench_script", lambda: tmp_path / "benchmarks" / "bench.py")
    assert bench.run(argparse.Namespace(bench_argv=["--quick"])) == 2
    assert "benchmark script is not here" in capsys.readouterr().err
