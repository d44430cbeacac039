"""The benchmark script runs end to end (--quick) and reports that every case agrees with torch."""
import os
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
