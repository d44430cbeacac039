"""Host time per call (Python, dispatch, autograd, launches) of ours beside torch's, on inputs so small
that the kernels cost next to nothing; then where our forward+backward spends it (cProfile).

When a GPU finishes a layer sooner than the host can queue the next, this host time is the layer's time:
python benchmarks/host_overhead.py [--device cuda|cpu] [--calls 200] [--samples 15] [--top 25]
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_manualgrad as tmg  # noqa: E402

CASES = {
    "max_pool2d 3x3/1": (lambda f, x, w: f.max_pool2d(x, 3, 1, 1), (1, 4, 8, 8), None),
    "conv2d 3x3": (lambda f, x, w: f.conv2d(x, w, None, 1, 1), (1, 4, 8, 8), (4, 4, 3, 3)),
}


def host_us(step, device, calls, samples):
    """Median microseconds per step over `samples` runs of `calls` steps, the device drained around each run."""
    for _ in range(20):
        step()
    times = []
    for _ in range(samples):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    print(f"host µs per call on {device} (torch {torch.__version__}), median of {args.samples} x {args.calls} calls")
    print("| case | torch fwd | ours fwd | torch f+b | ours f+b |\n|---|---|---|---|---|")
    profiled = []
    for name, (fn, x_shape, w_shape) in CASES.items():
        x = torch.randn(x_shape, device=device, requires_grad=True)
        w = None if w_shape is None else torch.randn(w_shape, device=device, requires_grad=True)
        leaves = [t for t in (x, w) if t is not None]
        grad_out = torch.ones_like(fn(F, x, w))

        # Default arguments bind this case's tensors: the profile below runs after the loop has moved on.
        def forward(functional, fn=fn, x=x, w=w):
            def step():
                with torch.no_grad():
                    fn(functional, x, w)
            return step

        def forward_backward(functional, fn=fn, x=x, w=w, leaves=leaves, grad_out=grad_out):
            def step():
                torch.autograd.grad(fn(functional, x, w), leaves, grad_out)
            return step

        row = [host_us(make(functional), device, args.calls, args.samples)
               for make in (forward, forward_backward) for functional in (F, tmg.functional)]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
        profiled.append((name, forward_backward(tmg.functional)))
    for name, step in profiled:
        print(f"\n### ours, {name}, forward+backward: cProfile of {args.calls} calls (device work included)")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
