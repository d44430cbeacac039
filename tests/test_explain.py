"""Tests for `python -m torch_manualgrad explain`: each lesson exits 0, prints the source documents' numbers, and --plot writes PNGs."""
import argparse
import os
import re
import subprocess
import sys

import pytest

from torch_manualgrad import explain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_explain(*args):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", MPLBACKEND="Agg")
    done = subprocess.run(
        [sys.executable, "-m", "torch_manualgrad", "explain", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "✗" not in done.stdout, done.stdout
    return done.stdout


def numbers(text):
    """Every number printed, as a set of strings exactly as written (1.3, -0.03, ...)."""
    return set(re.findall(r"-?\d+(?:\.\d+)?", text))


def assert_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC and os.path.getsize(path) > 1000, path


def test_conv1d_lesson_and_figure(tmp_path):
    out = run_explain("conv1d", "--plot", str(tmp_path / "figures"))
    # forward [1.3, 2.1]; per-placement weight shares [-0.1, -0.2] and [0.4, 0.6]; dW; db;
    # the input gradient placement by placement, then dX
    for expected in ("[1.3, 2.1]", "[-0.1, -0.2]", "[0.4, 0.6]", "[0.3, 0.4]", "db = (-0.1) + 0.2 = 0.1",
                     "[-0.03, -0.05, 0]", "[0, 0.06, 0.1]", "[-0.03, 0.01, 0.1]"):
        assert expected in out, expected
    assert {"1.3", "2.1", "0.3", "0.4", "-0.03", "0.01", "0.1", "-0.05", "0.06"} <= numbers(out)
    assert "✓ all" in out and out.count("✓") >= 10
    written = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("wrote ")]
    assert written == [os.path.join(str(tmp_path / "figures"), "conv1d_example.png")]
    assert_png(written[0])


def test_maxpool_lesson_and_figure(tmp_path):
    out = run_explain("maxpool", "--plot", str(tmp_path))
    assert "gradients 2, 3, 6" in out
    # grad(P_j) = Σ_i grad(FC_i) × W_ij, with the three FC gradients as factors
    assert re.search(r"grad\(P0\) = 2×\S+ \+ 3×\S+ \+ 6×\S+ = ", out)
    assert "tie" in out and "first in scan order" in out
    assert "SUM" in out and "used by 4 conv outputs" in out
    assert "✓ all" in out
    path = os.path.join(str(tmp_path), "maxpool_routing.png")
    assert path in out
    assert_png(path)


def test_conv2d_lesson_and_figure(tmp_path):
    out = run_explain("conv2d", "--plot", str(tmp_path))
    assert "sum over the 9 placements" in out and "running sum" in out
    assert "✓ all" in out
    path = os.path.join(str(tmp_path), "conv_weight_grad.png")
    assert path in out
    assert_png(path)


def test_transposed_lesson():
    """The conv1d example's deltas [-0.1, 0.2] through the filter [0.3, 0.5]: the transposed convolution is that
    example's input gradient [-0.03, 0.01, 0.1]; its own gradients for g = [1, 2, 3] are [1.3, 2.1] and
    [0.3, 0.4]; with stride 2, [1, 2] becomes [0.3, 0.5, 0.6, 1]."""
    out = run_explain("transposed")
    assert "conv_transpose1d(δ, w) = [-0.03, 0.01, 0.1]" in out
    assert {"1.3", "2.1", "0.4"} <= numbers(out)
    assert "= [0.3, 0.5, 0.6, 1]" in out
    assert "all 8 checks agree" in out


def test_a_wrong_kernel_result_fails_the_lesson(monkeypatch, capsys):
    """A check that disagrees with torch prints ✗ and makes the exit status non-zero."""
    right = explain._conv_grads

    def off_by_a_bit(grad_output, x, w):
        gi, gw, gb = right(grad_output, x, w)
        return gi, gw * 1.01, gb

    monkeypatch.setattr(explain, "_conv_grads", off_by_a_bit)
    status = explain.run(argparse.Namespace(example="conv1d", plot=None))
    out = capsys.readouterr().out
    assert status != 0
    assert "✗" in out and "FAILED" in out


@pytest.mark.parametrize("example", sorted(explain.EXAMPLES))
def test_every_lesson_passes_in_process(example, capsys):
    assert explain.run(argparse.Namespace(example=example, plot=None)) == 0
    assert "✗" not in capsys.readouterr().out
