"""Host time per call (Python, dispatch, autograd, launches) of ours beside torch's, on inputs so small
that the kernels cost next to nothing; then where our forward+backward spends it (cProfile, then torch.profiler by op).

When a GPU finishes a layer sooner than the host can queue the next, this host time is the layer's time.
A middle column runs torch's own kernels behind a Python autograd.Function like ours, to separate what
that design costs from what our ops add:
python benchmarks/host_overhead.py [--device cuda|cpu] [--calls 200] [--samples 15] [--top 25]
"""
import argparse
import cProfile
import inspect
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_manualgrad as tmg  # noqa: E402

aten = torch.ops.aten


class _PoolWithTorchOps(torch.autograd.Function):
    """torch's own max-pool kernels behind a Python autograd.Function shaped like ours (autograd.py): what
    that design costs on the host, apart from anything our ops do."""

    @staticmethod
    def forward(x, kernel, stride, padding):
        return aten.max_pool2d_with_indices(x, kernel, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[1])
        ctx.geometry = inputs[1:]
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        x, indices = ctx.saved_tensors
        kernel, stride, padding = ctx.geometry
        grad = aten.max_pool2d_with_indices_backward(grad_output, x, kernel, stride, padding, [1, 1], False, indices)
        return grad, None, None, None


class _ConvWithTorchOps(torch.autograd.Function):
    """torch's own convolution kernels behind a Python autograd.Function, likewise."""

    @staticmethod
    def forward(x, weight, stride, padding):
        return aten.convolution(x, weight, None, stride, padding, [1, 1], False, [0, 0], 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.geometry = inputs[2:]

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        grad_x, grad_w, _ = aten.convolution_backward(
            grad_output, x, weight, None, stride, padding, [1, 1], False, [0, 0], 1, [True, True, False]
        )
        return grad_x, grad_w, None, None


for _function in (_PoolWithTorchOps, _ConvWithTorchOps):  # as autograd.py does
    _function.forward.__signature__ = inspect.signature(_function.forward)


class torch_ops_in_a_function:  # noqa: N801  (stands where a functional module goes)
    @staticmethod
    def max_pool2d(x, kernel, stride, padding):
        return _PoolWithTorchOps.apply(x, [kernel] * 2, [stride] * 2, [padding] * 2)[0]

    @staticmethod
    def conv2d(x, weight, bias, stride, padding):
        assert bias is None
        return _ConvWithTorchOps.apply(x, weight, [stride] * 2, [padding] * 2)


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


def op_table(step, device, calls, top):
    """torch.profiler's host time per ATen op and CUDA runtime call, summed over `calls` steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)


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
    print("| case | torch fwd | ours fwd | torch f+b | torch's ops in a Python Function, f+b | ours f+b |")
    print("|---|---|---|---|---|---|")
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

        for functional in (torch_ops_in_a_function, tmg.functional):  # every column computes the same gradients
            for got, want in zip(torch.autograd.grad(fn(functional, x, w), leaves, grad_out),
                                 torch.autograd.grad(fn(F, x, w), leaves, grad_out)):
                torch.testing.assert_close(got, want)
        timed = [(forward, F), (forward, tmg.functional), (forward_backward, F),
                 (forward_backward, torch_ops_in_a_function), (forward_backward, tmg.functional)]
        row = [host_us(make(functional), device, args.calls, args.samples) for make, functional in timed]
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
        print(f"\n### ours, {name}, forward+backward: host time by op (torch.profiler, {args.calls} calls)")
        print(op_table(step, device, args.calls, args.top))


if __name__ == "__main__":
    main()
