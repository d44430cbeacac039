"""The benchmark script runs end to end (--quick) and reports that every case agrees with torch."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_runs_and_agrees():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--quick"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "agrees" not in line]
    assert len(rows) >= 11, proc.stdout
    assert all(line.rstrip().endswith("| yes |") for line in rows), proc.stdout
    # The forward error column: torch's and our float32 errors against float64 on conv rows, a dash on pools.
    for line in rows:
        cells = [c.strip() for c in line.strip("| \n").split(" | ")]
        if cells[0].startswith("maxpool"):
            assert cells[-2] == "—", line
            continue
        match = re.fullmatch(r"(\S+) / (\S+) \(\S+×\)", cells[-2])
        assert match, line
        assert 0 < float(match.group(1)) < 1e-5 and 0 < float(match.group(2)) < 1e-5, line
    assert "our CPU BLAS: " in proc.stdout


def test_profile_script_runs_on_the_cpu():
    """benchmarks/profile_gpu.py (the per-kernel view used on GPUs) also runs with --device cpu, where it
    lists our registered ops beside torch's."""
    for case, op in (("maxpool 3x3/2", "manualgrad::max_pool_backward"), ("conv3x3 512", "manualgrad::conv_backward")):
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "profile_gpu.py"), "--device", "cpu", "--batch", "1",
             "--case", case],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"### {case}" in proc.stdout and "  torch:" in proc.stdout and "  ours:" in proc.stdout, proc.stdout
        assert op in proc.stdout, proc.stdout


def test_host_overhead_script_runs_on_the_cpu():
    """benchmarks/host_overhead.py gives a row of five positive timings per case and profiles our ops."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--device", "cpu", "--calls", "5",
         "--samples", "2", "--top", "40"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.strip("| ").split(" | ") for line in proc.stdout.splitlines()
            if line.startswith("| ") and "torch fwd" not in line]
    assert [row[0] for row in rows] == ["max_pool2d 3x3/1", "conv2d 3x3"], proc.stdout
    assert all(float(v) > 0 for row in rows for v in row[1:]), proc.stdout
    for op in ("manualgrad.max_pool_backward", "manualgrad.conv_backward"):
        assert op in proc.stdout, proc.stdout
