"""Model-level benchmark: a training step and inference of whole networks, torch.nn vs torch_manualgrad.convert().

The networks are benchmarks/models.py's; the result is a markdown table. For each model the builder
runs once (seeded) and a deep copy is converted, so both sides hold the same weights; both see the same
input batch and labels. Two measurements per model and memory layout:

* train: model.train(), zero the gradients (set to None), forward, cross-entropy on random labels,
  backward. No optimizer step: it is the same elementwise update on both sides and would only dilute
  the comparison.
* infer: model.eval(), forward under torch.inference_mode().

Torch's and our calls alternate sample by sample (bench.py's interleaved_samples), after warm-up, and
each time is the median of up to --repeat samples, stopping once a measurement has spent --budget
seconds (never with fewer than 3 samples), so slow drift of a shared machine hits both sides alike.
Load that comes and goes within a measurement does not: the "n, spread" column gives the number of
samples per side and the larger of the two sides' (slowest - fastest) / median, and a spread of more
than about 20% says that the row was disturbed and is worth measuring again (--models, --layouts). Per layout (NCHW
and channels_last: the model and the input both converted with memory_format=torch.channels_last) the
ratios ours/torch are summarised by their geometric mean, which weighs a 2x slowdown and a 2x speedup
alike whatever the model's size.

Before timing, one call of each side (also a warm-up) is compared, from the same weights and
batch-norm statistics: the logits, and in train mode all parameter gradients taken together, each as
||ours - torch|| / ||torch||. The logits are continuous in every rounding error: in eval they agree to
about 1e-7, in train mode to 1e-6..1e-4 (batch norm over few values, as in the --quick copies, divides
by a standard deviation that rounding moves). The gradients are not continuous: where float32 rounding
puts a ReLU input on the other side of 0 (or breaks a max-pool near-tie) the derivative there flips,
and batch norm spreads the change over the batch, so two correct float32 runs of a deep net differ by
1e-5 to 1e-2 (and by far more where batch norm normalises a handful of values: batch 2 at 1 x 1). The
tolerances leave room for that and still catch a grossly wrong kernel (a missing term, a wrong index,
a wrong layout), which moves these norms by tens of percent; `python -m torch_manualgrad verify` is the
careful judgement, against float64 along each run's own branches.

Usage (from the repository root, with the package built)::

    python -m torch_manualgrad bench models                     # six models, batch 8 at 224, both layouts and modes
    python -m torch_manualgrad bench models --models resnet50 --modes train --layouts channels_last
    python benchmarks/model_bench.py --quick                    # smoke test: narrow copies at 64 x 64
"""
import argparse
import copy
import functools
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
try:
    import torch_manualgrad as tmg
except ImportError:
    # Running from a source checkout that was built in place but not installed.
    sys.path.insert(0, str(HERE.parent))
    import torch_manualgrad as tmg
from torch_manualgrad._cli import positive_int  # noqa: E402
from torch_manualgrad.bench import load_script  # noqa: E402

bench = load_script(HERE / "bench.py")      # interleaved_samples (the timing), describe_machine
models = load_script(HERE / "models.py")    # the architectures

# name -> the builder's arguments for --quick: narrow and shallow copies that run at 64 x 64 in milliseconds
MODELS = {
    "resnet18": dict(width=0.125),
    "resnet50": dict(width=0.125),
    "resnext50_32x4d": dict(width=0.125),
    "mobilenet_v2": dict(width=0.25),
    "efficientnet_b0": dict(width=0.25, depth=0.34),
    "convnext_tiny": dict(width=1 / 12, depth=0.2),
    "densenet121": dict(width=0.25, blocks=(2, 2, 2, 2)),
}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("train", "infer")

# Largest ||ours - torch|| / ||torch|| that counts as agreeing (see above), of the logits and the gradients.
TOLERANCE = {"logits": 1e-3, "gradients": 5e-2}

OUR_LAYERS = (tmg.nn.Conv1d, tmg.nn.Conv2d, tmg.nn.MaxPool1d, tmg.nn.MaxPool2d)


# ---------------------------------------------------------------------------
# The two measured calls
# ---------------------------------------------------------------------------

def train_step(model, x, labels):
    """One training step without the optimizer; returns the logits."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, labels).backward()
    return out


def infer(model, x, labels=None):
    """An eval-mode forward; labels unused (train_step's call shape)."""
    with torch.inference_mode():
        return model(x)


STEPS = {"train": train_step, "infer": infer}


def relative_difference(ours, theirs):
    """||ours - theirs|| / ||theirs|| over lists of tensors taken together (Frobenius norms)."""
    diff = math.sqrt(sum(float((a.double() - b.double()).norm()) ** 2 for a, b in zip(ours, theirs)))
    scale = math.sqrt(sum(float(b.double().norm()) ** 2 for b in theirs))
    return diff / scale if scale else diff


def compare(mode, reference, converted, x, labels):
    """One call of each side (the same random draws for dropout and stochastic depth), compared:
    {"logits": relative difference, "gradients": the same over all parameter gradients (train only)}."""
    # Train steps update batch-norm running statistics, which rounding makes differ slightly between
    # the two sides (in an ill-conditioned net, more than slightly): compare from the same state.
    converted.load_state_dict(reference.state_dict())
    results = []
    for model in (reference, converted):
        torch.manual_seed(1)
        out = STEPS[mode](model, x, labels).detach()
        grads = [p.grad for p in model.parameters() if p.grad is not None] if mode == "train" else []
        results.append([out] + grads)
    ours, theirs = results[1], results[0]
    diff = {"logits": relative_difference(ours[:1], theirs[:1])}
    if mode == "train":
        # a parameter with a gradient on one side only is as wrong as it gets
        diff["gradients"] = relative_difference(ours[1:], theirs[1:]) if len(ours) == len(theirs) else math.inf
    return diff


# ---------------------------------------------------------------------------
# One model in one layout
# ---------------------------------------------------------------------------

def build_pair(name, args):
    """torch.nn's model, seeded, and a converted deep copy of it (the same weights)."""
    torch.manual_seed(0)
    kwargs = MODELS[name] if args.quick else {}
    reference = getattr(models, name)(num_classes=args.classes, **kwargs)
    converted = tmg.convert(copy.deepcopy(reference))
    return reference, converted


def run_model(name, layout, args):
    reference, converted = build_pair(name, args)
    memory_format = LAYOUTS[layout]
    reference.to(memory_format=memory_format)
    converted.to(memory_format=memory_format)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).contiguous(memory_format=memory_format)
    labels = torch.randint(args.classes, (args.batch,), generator=gen)
    result = dict(
        model=name, layout=layout, ms={}, diff={}, spread={},
        params=sum(p.numel() for p in reference.parameters()),
        layers=sum(isinstance(m, OUR_LAYERS) for m in converted.modules()),
        left=len(tmg.unconverted(converted)),
    )
    timing = dict(warmup=args.warmup, repeat=args.repeat, budget_s=args.budget, min_runs=min(3, args.repeat))
    for mode in args.modes:
        reference.train(mode == "train")
        converted.train(mode == "train")
        result["diff"][mode] = compare(mode, reference, converted, x, labels)
        samples = bench.interleaved_samples({"torch": functools.partial(STEPS[mode], reference, x, labels),
                                             "ours": functools.partial(STEPS[mode], converted, x, labels)},
                                            torch.device("cpu"), **timing)
        medians = {side: statistics.median(times) * 1e3 for side, times in samples.items()}
        result["ms"][mode] = (medians["torch"], medians["ours"])
        result["spread"][mode] = (len(samples["torch"]), max((max(t) - min(t)) / statistics.median(t)
                                                             for t in samples.values()))
    return result


def agrees(result):
    return "error" not in result and all(d <= TOLERANCE[what] for diff in result["diff"].values()
                                         for what, d in diff.items())


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def table(results, modes, layouts):
    header = ["model", "layout", "params", "our layers"]
    for mode in modes:
        header += [f"torch {mode} ms", f"ours {mode} ms", f"{mode} ours/torch", f"{mode} n, spread"]
    header.append("agrees (rel. diff)")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['layout']} | error: {r['error']} |")
            continue
        layers = str(r["layers"]) + (f" (+{r['left']} torch's)" if r["left"] else "")
        row = [r["model"], r["layout"], f"{r['params'] / 1e6:.2f}M", layers]
        for mode in modes:
            torch_ms, ours_ms = r["ms"][mode]
            n, spread = r["spread"][mode]
            row += [f"{torch_ms:.1f}", f"{ours_ms:.1f}", f"{ours_ms / torch_ms:.2f}", f"{n}, {spread:.0%}"]
        diffs = [f"{what} {max(d[what] for d in r['diff'].values() if what in d):.0e}"
                 for what in TOLERANCE if any(what in d for d in r["diff"].values())]
        row.append(("yes" if agrees(r) else "**NO**") + f" ({', '.join(diffs)})")
        lines.append("| " + " | ".join(row) + " |")
    for layout in layouts:
        row = ["**geomean**", layout, "", ""]
        for mode in modes:
            ratios = ratios_of(results, mode, layout)
            row += ["", "", f"**{geomean([q for _, q in ratios]):.2f}**", ""]
        row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ratios_of(results, mode, layout):
    """(model, ours/torch) of every model measured in this mode and layout."""
    return [(r["model"], r["ms"][mode][1] / r["ms"][mode][0])
            for r in results if "error" not in r and r["layout"] == layout]


def worst(results, modes, layouts):
    """A phrase per mode: the largest ratio and where it is."""
    lines = []
    for mode in modes:
        found = [(q, model, layout) for layout in layouts for model, q in ratios_of(results, mode, layout)]
        if found:
            q, model, layout = max(found)
            lines.append(f"worst {mode}: {q:.2f} ({model}, {layout})")
    return lines


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def _choices(text, allowed, what, parser):
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        parser.error(f"{what}: expected a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return chosen


def parse_args(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the models")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: nchw, channels_last")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: train (forward + loss + backward), "
                                                          "infer (eval forward under inference_mode)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size (default 8; 2 with --quick)")
    p.add_argument("--size", type=int, default=None, help="input height and width (default 224; 64 with --quick)")
    p.add_argument("--repeat", type=int, default=None, help="most timed samples per side and measurement "
                                                          "(default 10; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per side before timing, besides the "
                                                          "agreement check's (default 1; 0 with --quick)")
    p.add_argument("--budget", type=float, default=10.0,
                   help="seconds (both sides together) after which one measurement (model, layout, mode) stops "
                        "taking samples, once it has 3")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: narrow, shallow copies of the models (10 classes) at batch 2, 64 x 64, one sample")
    args = p.parse_args(argv)
    args.models = _choices(args.models, list(MODELS), "--models", p)
    args.layouts = _choices(args.layouts, list(LAYOUTS), "--layouts", p)
    args.modes = _choices(args.modes, list(MODES), "--modes", p)
    quick = args.quick
    for name, full, small in (("batch", 8, 2), ("size", 224, 64), ("repeat", 10, 1), ("warmup", 1, 0)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.batch < 1 or args.repeat < 1 or args.warmup < 0 or args.size < 32:
        p.error("--batch and --repeat must be at least 1, --warmup at least 0, --size at least 32")
    args.classes = 10 if quick else 1000
    return args


def main(argv=None, prog=None):
    args = parse_args(argv, prog)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(
        f"torch_manualgrad (convert) vs torch.nn, torch {torch.__version__} on cpu ({bench.describe_machine(cpu)}, "
        f"{os.cpu_count()} logical CPUs), threads {torch.get_num_threads()}, batch {args.batch} at "
        f"{args.size}x{args.size}, float32{', quick copies' if args.quick else ''}; median of up to {args.repeat} "
        f"samples after {args.warmup} warm-up + 1 checked call, budget {args.budget:g} s per measurement\n"
    )
    started = time.perf_counter()
    results = []
    for name in args.models:
        for layout in args.layouts:
            try:
                results.append(run_model(name, layout, args))
            except Exception as exc:  # one failing model should not hide the others' figures
                traceback.print_exc()
                results.append(dict(model=name, layout=layout, error=f"{type(exc).__name__}: {exc}".splitlines()[0]))
            print(f"  done: {name} {layout} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    print(table(results, args.modes, args.layouts))
    print("\n" + "; ".join(["ratio < 1 means ours is faster"] + worst(results, args.modes, args.layouts)) +
          f". Total benchmark time {time.perf_counter() - started:.1f} s.")
    return 0 if all(agrees(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
