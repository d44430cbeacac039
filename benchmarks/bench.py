"""Benchmark of torch_manualgrad's conv and max-pool ops against torch's built-ins, printed as a markdown table.

Both implementations run in the same process, on the same tensors, one right
after the other, so the ratio column compares like with like on whatever
machine runs it.  For every case we time

* the forward pass alone, under ``torch.no_grad()`` (inference), and
* forward + backward: the forward with input, weight and bias requiring grad,
  then ``torch.autograd.grad`` with a fixed random output gradient.

Each time is the median of up to ``--repeat`` runs after ``--warmup`` runs,
stopping early once ``--budget`` seconds have gone into one measurement (but
never with fewer than 3 runs), so a slow case cannot blow up the whole run.
Torch's and our runs alternate within a measurement, so slow drift of the
machine affects both columns alike.  Even so, on a small shared machine
ratios within about +-10-15% of 1 are noise: run torch against itself (the
same script with tmg.functional swapped for torch.nn.functional) to see how
much.  On a GPU a run is 10 back-to-back calls between two CUDA events, so
launches queue as in a model and the host's overhead shows only where it
exceeds the GPU's time.

Work per case, used for the throughput columns:

* conv: FLOPs = 2 * N * C_out * prod(out spatial) * (C_in / groups) * prod(kernel)
  for the forward; forward + backward counts 3x that (grad_input and
  grad_weight each cost one forward's worth; grad_bias is negligible).
* max-pool: the minimum bytes moved.  The forward (inference, no indices
  asked for) reads the input and writes the output.  Forward+backward: the
  forward also writes the int64 indices; backward reads grad_output plus the
  indices and writes grad_input.

Before timing, the outputs and gradients of the two implementations are
compared once; the ``agrees`` column says whether they matched (a fast wrong
kernel is not a result).  For float32 conv rows the ``fwd error`` column gives
each forward's normwise error against a float64 forward of the same values,
||y - y64|| / ||y64||, torch's and ours (speed is not bought with accuracy).

Usage (from the repository root, with the package built)::

    python benchmarks/bench.py                 # full CPU run, batch 8
    python benchmarks/bench.py --only conv --threads 1
    python benchmarks/bench.py --quick         # smoke test: batch 1, one run each
    python benchmarks/bench.py --device cuda   # the GPU shapes (ResNet-50 layers at --batch 32)
    python benchmarks/bench.py models [...]    # whole networks instead: hands over to model_bench.py
"""

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:
    import torch_manualgrad as tmg
except ImportError:
    # Running from a source checkout that was built in place but not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch_manualgrad as tmg
from torch_manualgrad._cli import device as cli_device, positive_int  # noqa: E402


# ---------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    family: str            # "conv" or "pool"
    op: str                # function name, the same in torch.nn.functional and tmg.functional
    input_shape: tuple     # (C, *spatial); the batch size is prepended at run time
    weight_shape: tuple = None   # conv only: (C_out, C_in / groups, *kernel); transposed: (C_in, C_out / groups, *kernel)
    kwargs: dict = field(default_factory=dict)
    batch: int = None      # overrides --batch (the GPU list fixes some cases' batch)
    channels_last: bool = False  # input (and weight) and output gradient in torch.channels_last (2-d only)

    @property
    def transposed(self):
        return self.op.startswith("conv_transpose")

    @property
    def out_channels(self):
        groups = self.kwargs.get("groups", 1)
        return self.weight_shape[1] * groups if self.transposed else self.weight_shape[0]

    def describe(self):
        c, *spatial = self.input_shape
        size = "×".join(map(str, spatial))
        k = self.kwargs
        if self.family == "conv":
            kernel = self.weight_shape[2:]
            text = f"{c}→{self.out_channels} @{size} {'transposed ' if self.transposed else ''}k{'×'.join(map(str, kernel))}"
            if _not_one(k.get("stride", 1)):
                text += f"/{_fmt(k['stride'])}"
            if _not_zero(k.get("padding", 0)):
                text += f" p{_fmt(k['padding'])}"
            if k.get("groups", 1) != 1:
                text += f" g{k['groups']}"
            if self.channels_last:
                text += " channels_last"
        else:
            text = f"{c}ch @{size} k{_fmt(k['kernel_size'])}"
            if "stride" in k:
                text += f"/{_fmt(k['stride'])}"
            if _not_zero(k.get("padding", 0)):
                text += f" p{_fmt(k['padding'])}"
            if self.channels_last:
                text += " channels_last"
        return text


def _fmt(v):
    return "×".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def _not_one(v):
    return any(x != 1 for x in (v if isinstance(v, (tuple, list)) else [v]))


def _not_zero(v):
    return any(x != 0 for x in (v if isinstance(v, (tuple, list)) else [v]))


CASES = [
    # ResNet-style 3x3 convolutions: each stage does about the same FLOPs.
    Case("conv3x3 64", "conv", "conv2d", (64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
    Case("conv3x3/2 128", "conv", "conv2d", (128, 56, 56), (128, 128, 3, 3), dict(stride=2, padding=1)),
    Case("conv3x3 256", "conv", "conv2d", (256, 14, 14), (256, 256, 3, 3), dict(padding=1)),
    Case("conv3x3 512", "conv", "conv2d", (512, 7, 7), (512, 512, 3, 3), dict(padding=1)),
    # The stem: few input channels, a big kernel, a big image.
    Case("stem 7x7/2", "conv", "conv2d", (3, 224, 224), (64, 3, 7, 7), dict(stride=2, padding=3)),
    # Pointwise: a plain matrix multiply in disguise.
    Case("conv1x1 64→256", "conv", "conv2d", (64, 56, 56), (256, 64, 1, 1), {}),
    # Depthwise (MobileNet-style): groups == channels, very little work per byte.
    Case("depthwise 3x3", "conv", "conv2d", (144, 56, 56), (144, 1, 3, 3), dict(padding=1, groups=144)),
    Case("conv1d k3", "conv", "conv1d", (256, 1024), (256, 256, 3), dict(padding=1)),
    # Grouped (ResNeXt-50 32x4d): 32 groups of 16 channels, and a stride-2 block's 32 groups of 8.
    Case("grouped 3x3 512 g32", "conv", "conv2d", (512, 14, 14), (512, 16, 3, 3), dict(padding=1, groups=32)),
    Case("grouped 3x3/2 256 g32", "conv", "conv2d", (256, 56, 56), (256, 8, 3, 3), dict(stride=2, padding=1, groups=32)),
    Case("grouped 3x3 512 g32 CL", "conv", "conv2d", (512, 14, 14), (512, 16, 3, 3), dict(padding=1, groups=32),
         channels_last=True),
    # A DCGAN/U-Net decoder layer: 4x4 stride 2 doubles the size.
    Case("convT 4x4/2", "conv", "conv_transpose2d", (256, 16, 16), (256, 128, 4, 4), dict(stride=2, padding=1)),
    # Max pooling: memory-bound, so judged in GB/s.
    Case("maxpool 3x3/2", "pool", "max_pool2d", (64, 112, 112), None, dict(kernel_size=3, stride=2, padding=1)),
    Case("maxpool 2x2/2", "pool", "max_pool2d", (128, 64, 64), None, dict(kernel_size=2, stride=2)),
    Case("maxpool1d 3/2", "pool", "max_pool1d", (128, 8192), None, dict(kernel_size=3, stride=2, padding=1)),
    # ResNet's stem pool in a channels_last model, where torch's kernels are ten times faster than in NCHW
    Case("maxpool 3x3/2 CL", "pool", "max_pool2d", (64, 112, 112), None, dict(kernel_size=3, stride=2, padding=1),
         channels_last=True),
]


def cases_3d(c3d_batch, pool_batch):
    """The 3-d rows (issue 14), video and volumes; the C3D and max-pool rows' batch differs by list."""
    return [
        # C3D / R(2+1)D: 3x3x3 over 16 frames of 56x56
        Case("conv3d 3x3x3 64", "conv", "conv3d", (64, 16, 56, 56), (64, 64, 3, 3, 3), dict(padding=1), batch=c3d_batch),
        # one level of a 3-d U-Net: 32 channels at 64^3, batch 2
        Case("conv3d U-Net 32", "conv", "conv3d", (32, 64, 64, 64), (32, 32, 3, 3, 3), dict(padding=1), batch=2),
        # the U-Net's upsampling: 2x2x2 stride 2 doubles each side
        Case("convT3d 2x2x2/2", "conv", "conv_transpose3d", (128, 32, 32, 32), (128, 64, 2, 2, 2), dict(stride=2),
             batch=2),
        Case("maxpool3d 2x2x2/2", "pool", "max_pool3d", (64, 16, 56, 56), None, dict(kernel_size=2, stride=2),
             batch=pool_batch),
        Case("maxpool3d 3x3x3/2", "pool", "max_pool3d", (64, 16, 56, 56), None,
             dict(kernel_size=3, stride=2, padding=1), batch=pool_batch),
    ]


CASES += cases_3d(c3d_batch=1, pool_batch=4)


# The GPU list (issue 3): ResNet-50's layers at batch 32, depthwise layers, a DCGAN decoder layer (transposed),
# three max-pools, and the 3-d rows (issue 14).
GPU_CASES = [
    Case("stem 7x7/2", "conv", "conv2d", (3, 224, 224), (64, 3, 7, 7), dict(stride=2, padding=3)),
    Case("conv3x3 64", "conv", "conv2d", (64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
    Case("conv1x1 64→256", "conv", "conv2d", (64, 56, 56), (256, 64, 1, 1), {}),
    Case("conv3x3/2 128", "conv", "conv2d", (128, 56, 56), (128, 128, 3, 3), dict(stride=2, padding=1)),
    Case("conv3x3 256", "conv", "conv2d", (256, 14, 14), (256, 256, 3, 3), dict(padding=1)),
    Case("conv3x3 512", "conv", "conv2d", (512, 7, 7), (512, 512, 3, 3), dict(padding=1)),
    Case("depthwise 3x3", "conv", "conv2d", (144, 56, 56), (144, 1, 3, 3), dict(padding=1, groups=144)),
    # ConvNeXt-T's first stage: the largest unrolled window
    Case("depthwise 7x7", "conv", "conv2d", (96, 56, 56), (96, 1, 7, 7), dict(padding=3, groups=96)),
    Case("convT 4x4/2", "conv", "conv_transpose2d", (256, 16, 16), (256, 128, 4, 4), dict(stride=2, padding=1)),
    Case("maxpool 3x3/2", "pool", "max_pool2d", (64, 112, 112), None, dict(kernel_size=3, stride=2, padding=1)),
    Case("maxpool 2x2/2", "pool", "max_pool2d", (128, 64, 64), None, dict(kernel_size=2, stride=2), batch=64),
    Case("maxpool 3x3/1", "pool", "max_pool2d", (64, 56, 56), None, dict(kernel_size=3, stride=1, padding=1)),
] + cases_3d(c3d_batch=8, pool_batch=32)

# Precision modes: the tensors' dtype and whether matrix products may use TF32 (GPU only).
PRECISIONS = {"float32": (torch.float32, False), "tf32": (torch.float32, True), "bfloat16": (torch.bfloat16, False)}


def set_precision(name):
    dtype, tf32 = PRECISIONS[name]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return dtype


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def synchronize(device):
    """Wait for queued GPU work, so the clock measures the kernels rather than their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# On a GPU one sample is this many back-to-back calls between two CUDA events, divided by the count:
# calls queue up as they do in a model, so the host's launch overhead counts only where it exceeds
# the GPU's time (a single synchronised call would add a launch and a sync to every sample).
GPU_CALLS_PER_SAMPLE = 10


def seconds_per_call(fn, device):
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    synchronize(device)
    start.record()
    for _ in range(GPU_CALLS_PER_SAMPLE):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / GPU_CALLS_PER_SAMPLE


def median_ms(fns, device, warmup, repeat, budget_s, min_runs):
    """Median milliseconds per call of each function in ``fns`` (a dict label -> callable)."""
    samples = interleaved_samples(fns, device, warmup, repeat, budget_s, min_runs)
    return {label: statistics.median(times) * 1e3 for label, times in samples.items()}


def interleaved_samples(fns, device, warmup, repeat, budget_s, min_runs):
    """Seconds per call of each function in ``fns`` (a dict label -> callable), a list per label.

    The functions are timed in alternation, one sample of each per round, so
    that drift in the machine (frequency, other load) hits both sides alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {label: [] for label in fns}
    spent = 0.0
    rounds = 0
    while rounds < repeat and (spent < budget_s or rounds < min_runs):
        for label, fn in fns.items():
            elapsed = seconds_per_call(fn, device)
            samples[label].append(elapsed)
            spent += elapsed * (GPU_CALLS_PER_SAMPLE if device.type == "cuda" else 1)
        rounds += 1
    return samples


# ---------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------

def make_tensors(case, batch, device, dtype):
    """The leaf tensors of a case: (input, weight, bias) for conv, (input,) for pool."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *case.input_shape), generator=gen, dtype=dtype).to(device)
    if case.family == "pool":
        return (x.contiguous(memory_format=torch.channels_last) if case.channels_last else x,)
    fan_in = math.prod(case.weight_shape[1:])
    w = (torch.randn(case.weight_shape, generator=gen, dtype=dtype) / math.sqrt(fan_in)).to(device)
    b = torch.randn(case.out_channels, generator=gen, dtype=dtype).to(device)
    if case.channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    return (x, w, b)


def call(functional, case, tensors):
    """Run the case's op from one functional module (torch's or ours)."""
    fn = getattr(functional, case.op)
    if case.family == "conv":
        x, w, b = tensors
        return fn(x, w, b, **case.kwargs)
    (x,) = tensors
    return fn(x, **case.kwargs)


def forward_and_grads(functional, case, tensors, grad_out):
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    out = call(functional, case, leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def agree(a, b, loose=False):
    """Agreement scaled by the magnitude of the reference values: float32-tight, or loose for
    TF32/bfloat16 (about 3 significant digits)."""
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    scale = b.abs().max().item() if b.numel() else 0.0
    rtol, atol = (3e-2, 1e-2) if loose else (1e-3, 1e-4)
    return torch.allclose(a, b, rtol=rtol, atol=atol * max(scale, 1.0))


def work(case, tensors, out):
    """(forward work, forward+backward work, unit) for the throughput columns."""
    if case.family == "conv":
        w = tensors[1]
        # Every output element is a dot product of length (C_in/groups)*prod(kernel): one
        # multiply and one add per term. Transposed: every input element is spread over
        # (C_out/groups)*prod(kernel) outputs, a multiply and an add each.
        fwd = 2 * (tensors[0] if case.transposed else out).numel() * math.prod(w.shape[1:])
        return fwd, 3 * fwd, "FLOP"
    x = tensors[0]
    size = x.element_size()
    index_size = 8  # int64
    # Inference needs no indices; training writes them in the forward and reads them back.
    fwd = x.numel() * size + out.numel() * size
    train_fwd = fwd + out.numel() * index_size
    bwd = out.numel() * (size + index_size) + x.numel() * size
    return fwd, train_fwd + bwd, "B"


def run_case(case, args, device):
    dtype = PRECISIONS[args.precision][0]
    tensors = make_tensors(case, args.batch if args.quick else case.batch or args.batch, device, dtype)
    leaves = [t.detach().requires_grad_(True) for t in tensors]

    with torch.no_grad():
        torch_out = call(F, case, tensors)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(torch_out.shape, generator=gen).to(device, dtype)
    if case.channels_last:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)

    # Check ours against torch once before timing anything.
    out_t, grads_t = forward_and_grads(F, case, tensors, grad_out)
    out_m, grads_m = forward_and_grads(tmg.functional, case, tensors, grad_out)
    loose = args.precision != "float32"
    agrees = agree(out_m, out_t, loose) and all(agree(gm, gt, loose) for gm, gt in zip(grads_m, grads_t))
    errors = forward_errors(case, tensors, out_t, out_m) if case.family == "conv" and dtype == torch.float32 else None
    del out_t, grads_t, out_m, grads_m

    def forward(functional):
        def run():
            with torch.no_grad():
                call(functional, case, tensors)
        return run

    def forward_backward(functional):
        def run():
            out = call(functional, case, leaves)
            torch.autograd.grad(out, leaves, grad_out)
        return run

    timing = dict(warmup=args.warmup, repeat=args.repeat, budget_s=args.budget, min_runs=args.min_runs)
    ms = {}
    for kind, make in (("fwd", forward), ("fb", forward_backward)):
        medians = median_ms({"torch": make(F), "ours": make(tmg.functional)}, device, **timing)
        for label, value in medians.items():
            ms[label, kind] = value
    fwd_work, fb_work, unit = work(case, tensors, torch_out)
    return dict(case=case, ms=ms, work=(fwd_work, fb_work, unit), agrees=agrees, errors=errors, batch=tensors[0].shape[0])


def forward_errors(case, tensors, out_torch, out_ours):
    """Normwise error of torch's and our float32 forward against torch's forward in float64 on the CPU."""
    with torch.no_grad():
        truth = call(F, case, [t.detach().cpu().double() for t in tensors])
    scale = truth.norm().item() or 1.0
    return tuple((out.cpu().double() - truth).norm().item() / scale for out in (out_torch, out_ours))


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def human(amount, unit):
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if amount >= scale:
            return f"{amount / scale:.2f} {prefix}{unit}"
    return f"{amount:.0f} {unit}"


def rate(amount, ms):
    """Throughput in G<unit>/s for `amount` units done in `ms` milliseconds."""
    return amount / (ms * 1e-3) / 1e9


def table(results):
    header = [
        "case", "shape (N=batch)", "work fwd", "torch fwd ms", "ours fwd ms", "ours/torch fwd",
        "torch f+b ms", "ours f+b ms", "ours/torch f+b",
        "torch fwd / f+b", "ours fwd / f+b", "fwd error torch / ours", "agrees",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in results:
        case, ms = r["case"], r["ms"]
        fwd_work, fb_work, unit = r["work"]
        per_s = "GFLOP/s" if unit == "FLOP" else "GB/s"

        def rates(who):
            return f"{rate(fwd_work, ms[who, 'fwd']):.1f} / {rate(fb_work, ms[who, 'fb']):.1f} {per_s}"

        row = [
            case.name, case.describe() + (f" N={r['batch']}" if case.batch else ""), human(fwd_work, unit),
            f"{ms['torch', 'fwd']:.3f}", f"{ms['ours', 'fwd']:.3f}", f"{ms['ours', 'fwd'] / ms['torch', 'fwd']:.2f}",
            f"{ms['torch', 'fb']:.3f}", f"{ms['ours', 'fb']:.3f}", f"{ms['ours', 'fb'] / ms['torch', 'fb']:.2f}",
            rates("torch"), rates("ours"), errors(r["errors"]), "yes" if r["agrees"] else "**NO**",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def errors(pair):
    if pair is None:
        return "—"
    err_torch, err_ours = pair
    return f"{err_torch:.1e} / {err_ours:.1e} ({err_ours / err_torch:.2f}×)" if err_torch else f"0 / {err_ours:.1e}"


def describe_machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return tmg._blas.cpuinfo("model name") or platform.processor() or platform.machine()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The model-level benchmark (a training step and inference of ResNet-18/50, MobileNetV2, "
               "EfficientNet-B0, ConvNeXt-T and DenseNet-121, converted vs torch.nn) is the same command with "
               "'models' first: see 'models --help'.")
    p.add_argument("--device", type=cli_device, default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--only", choices=["conv", "pool"], default=None, help="run only one family of cases")
    p.add_argument("--match", default=None, metavar="TEXT", help="run only the cases whose name contains TEXT")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size N (default 8; 1 with --quick)")
    p.add_argument("--repeat", type=int, default=None, help="most timed runs per measurement (default 15; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2; 0 with --quick)")
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds (both sides together) after which a measurement stops repeating, "
                        "once it has 3 runs (default 2.0)")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 1, a single run per measurement")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="float32",
                   help="float32 (TF32 off, default), tf32 (TF32 matrix products) or bfloat16; the last two are for GPUs")
    p.add_argument("--cases", choices=["cpu", "gpu"], default=None,
                   help="which fixed list of shapes (default: gpu on a CUDA device, cpu otherwise)")
    args = p.parse_args(argv)
    quick = args.quick
    if args.batch is None:
        args.batch = 1 if quick else 8
    if args.repeat is None:
        args.repeat = 1 if quick else 15
    if args.warmup is None:
        args.warmup = 0 if quick else 2
    args.min_runs = min(3, args.repeat)
    if args.batch < 1 or args.repeat < 1 or args.warmup < 0:
        p.error("--batch and --repeat must be at least 1, --warmup at least 0")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["models"]:
        # one command for both benchmarks (and so for `python -m torch_manualgrad bench models`)
        from torch_manualgrad.bench import load_script

        model_bench = load_script(os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_bench.py"))
        return model_bench.main(argv[1:], prog=f"{os.path.basename(sys.argv[0] or 'bench.py')} models")
    args = parse_args(argv)
    device = torch.device(args.device)  # an existing cpu or cuda[:N], as the option's type checked
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    set_precision(args.precision)
    use_gpu_list = args.cases == "gpu" or (args.cases is None and device.type == "cuda")
    cases = [c for c in (GPU_CASES if use_gpu_list else CASES)
             if args.only in (None, c.family) and (args.match is None or args.match in c.name)]
    print(
        f"torch_manualgrad vs torch {torch.__version__} on {device} ({describe_machine(device)}), "
        f"threads {torch.get_num_threads()}, batch {args.batch} (unless the case says), {args.precision}, "
        f"median of up to {args.repeat} runs after {args.warmup} warm-up; our CPU BLAS: {tmg._blas.blas()}\n"
    )
    started = time.perf_counter()
    results = []
    for case in cases:
        results.append(run_case(case, args, device))
        print(f"  done: {case.name}", file=sys.stderr, flush=True)
    print(table(results))
    print(f"\nratio < 1 means ours is faster.  Total benchmark time {time.perf_counter() - started:.1f} s.")
    return 0 if all(r["agrees"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
