"""The demo subcommand (the main job): trains torch.nn's CNN and ours side by side on the digits, prints
per-epoch losses and gradient differences, test accuracy and timing, and exits 0 only if they agree."""
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo's extra (make test installs it)")


def test_demo_trains_both_models_to_the_same_result():
    proc = subprocess.run(
        [sys.executable, "-m", "torch_manualgrad", "demo", "--epochs", "4"], capture_output=True, text=True, timeout=600
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-2000:]
    assert out.count("largest gradient difference") == 4
    accuracies = [float(line.split("test accuracy")[1].split("%")[0]) for line in out.splitlines() if "test accuracy" in line]
    assert len(accuracies) == 2 and min(accuracies) > 90 and abs(accuracies[0] - accuracies[1]) <= 1.0, out
    assert "ms per epoch" in out and "both models agree" in out
