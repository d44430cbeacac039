"""Kernel-by-kernel GPU time of one forward+backward per benchmark case, ours beside torch's (torch.profiler).

Separates the time the kernels take from the host time around them: python benchmarks/profile_gpu.py
[--batch 32] [--precision float32|tf32|bfloat16] [--only conv|pool] [--case NAME].
--device cpu profiles the CPU operators instead (self time per operator), e.g. to try the script
without a GPU.
"""
import argparse
import os
import sys
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the benchmark's cases and helpers)
import torch_manualgrad as tmg  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# The CUDA kernels' switches to their simpler paths (csrc/cuda/max_pool_cuda.cu, depthwise_cuda.cu):
# unset for "ours", one of them set for the comparison rows.
SWITCHES = ("TORCH_MANUALGRAD_POOL_CELLS", "TORCH_MANUALGRAD_DEPTHWISE_COLUMNS")


def kernel_table(case, functional, tensors, grad_out, device, steps=5):
    leaves = [t.detach().requires_grad_(True) for t in tensors]

    def step():
        out = bench.call(functional, case, leaves)
        torch.autograd.grad(out, leaves, grad_out)

    gpu = device.type == "cuda"
    for _ in range(3):
        step()
    bench.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        bench.synchronize(device)
    rows = {}
    for e in prof.key_averages():
        if gpu:
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        else:
            t = e.self_cpu_time_total
        if t > 0 and e.count >= steps and not e.key.startswith(("cuda", "Memcpy", "ProfilerStep")):
            rows[e.key] = (t / steps, e.count // steps)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--precision", default="float32", choices=sorted(bench.PRECISIONS))
    p.add_argument("--only", choices=["conv", "pool"])
    p.add_argument("--case")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = bench.set_precision(args.precision)
    where = "kernels" if device.type == "cuda" else "operators (self CPU time)"
    for case in bench.GPU_CASES:
        if (args.only and case.family != args.only) or (args.case and case.name != args.case):
            continue
        tensors = bench.make_tensors(case, case.batch or args.batch, device, dtype)
        with torch.no_grad():
            out = bench.call(F, case, tensors)
        grad_out = torch.randn_like(out)
        print(f"\n### {case.name} ({args.precision}) — {device.type.upper()} µs per forward+backward")
        runs = [("torch", F, {}), ("ours", tmg.functional, {})]
        if device.type == "cuda":  # the simpler kernels of the same build, for comparison
            if case.family == "pool":
                runs.append(("ours, per-pixel backward", tmg.functional, {"TORCH_MANUALGRAD_POOL_CELLS": "0"}))
            if case.name.startswith("depthwise"):
                runs.append(("ours, one output per thread", tmg.functional, {"TORCH_MANUALGRAD_DEPTHWISE_COLUMNS": "0"}))
        for who, functional, switches in runs:
            with mock.patch.dict(os.environ):  # the caller's environment comes back afterwards
                for name in SWITCHES:
                    os.environ.pop(name, None)
                os.environ.update(switches)
                rows = kernel_table(case, functional, tensors, grad_out, device)
            total = sum(t for t, _ in rows.values())
            print(f"  {who}: {total:8.1f} µs in {where}")
            for name, (t, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:8]:
                print(f"      {t:8.1f} µs  x{n}  {name[:110]}")


if __name__ == "__main__":
    main()
