"""verify(model, example_inputs): does a model converted to our layers compute what the torch.nn one does?

Two deep copies of the model are made (the caller's model, its gradients and buffers are left alone):
a reference with torch.nn's layers (revert) and a converted one (convert). Both run forward and backward
on the same inputs, from the same RNG state (so dropout draws the same masks; train/eval mode is kept
as given); the backward is of a fixed random projection of every floating output.

Neither float32 run is the truth: a deep net amplifies rounding, most of all where a ReLU input sits
near 0 or two max-pool inputs nearly tie, so that rounding alone picks the branch (torch's own float32
gradients of a ResNet-50 in train mode are ~1e-2 off a float64 run). So each float32 run is judged
against a float64 run of the torch.nn model (same weights, inputs, dropout masks and output
projection) that *takes the same branches* as that float32 run: every ReLU-like activation keeps the
float32 run's sign pattern and every max-pool its argmax. Along fixed branches the network is a
smooth function, the float64 result is the float32 run's exact value up to float64 rounding, and the
float32 run's error is its rounding alone (~1e-6..1e-4 relative, not 1e-2). Ours passes when it is
not clearly worse than torch's own:

    ||ours - truth_ours||  <=  max(ratio * ||torch - truth_torch||,  rtol * ||truth|| + atol * sqrt(numel))

Norms are Frobenius norms of whole tensors, so a tensor whose true value is near zero (a batch-norm bias
whose gradient cancels) is judged by how its error compares with torch's, not by a max-relative
difference of noise. ratio = 10: on ResNet-18/50, Inception v3 and EfficientNet-B0 (benchmarks/models.py)
ours' error is 0.6-1.6x torch's along fixed branches, at most 4.5x on a few small tensors whose errors
are ~1e-5. The floor rtol is ~84 float32 epsilons (1e-5): torch's own error can be 0 by luck (a max-pool
is exact), and rounding in sums of a few hundred terms reaches that. atol (default 0) is an absolute
rms error always allowed. A planted 1% error (1e-2) is ~1000x beyond the allowance of a layer (~1e-5).
A gradient whose true value cancels to near zero (rms under 1e-3 of the typical one among the tensors
judged together, and torch's own result lost over half its digits) is rounding noise at the scale of
its terms, and torch's own can be exactly 0 by luck (cuDNN's batch-norm backward on an H200): it is
also allowed rtol times the typical rms per element, or `ratio` times torch's own rms error pooled over
the near-zero tensors (_near_zero_floor). Entries that both float32 runs overflowed in the same places
are left out.

Each converted layer is also checked *in isolation*: forward hooks in the torch float32 run record
the input of every call, and the torch.nn layer, ours and the torch.nn layer in float64 all run on
that very input with the same output gradient; outputs and input and parameter gradients are judged
by the same rule. That names the layer that makes an error. Models already in float64 have no
higher precision to compare with: torch's float64 run is the truth, and the allowance for each
end-to-end tensor is torch's own float32 error on it (a float32 probe run) scaled to float64.

A tensor on which torch's own float32 result has lost more than half its digits is reported as
ill-conditioned, with the reason (near zero, or rounding amplified), and how many ReLU signs and
max-pool maxima float64 would have chosen differently. Layers that stay on torch's kernels (see
convert.unconverted, and F.conv2d/F.max_pool2d calls inside a forward) are listed, not checked; with
everywhere=True the converted model runs inside torch_manualgrad.everywhere(), which computes those calls
with our kernels too, and they are listed as covered (checked end to end).

    python -m torch_manualgrad verify my_models:build_net --input-shape 8,3,32,32
"""
import collections
import contextlib
import copy
import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import functional as ours_functional
from . import nn as ours_nn
from . import routing
from .convert import Unconverted, convert, revert, unconverted
from . import _cli

__all__ = ["verify", "VerifyResult", "LayerRecord", "Comparison", "Unconverted", "default_tolerances",
           "DEFAULT_RATIO", "add_parser", "run"]

_OUR_LAYERS = (ours_nn.Conv1d, ours_nn.Conv2d, ours_nn.Conv3d, ours_nn.ConvTranspose1d, ours_nn.ConvTranspose2d,
               ours_nn.ConvTranspose3d, ours_nn.MaxPool1d, ours_nn.MaxPool2d, ours_nn.MaxPool3d)

# The floor of the allowance, per dtype of the tensors compared: (rtol, atol) in
# ||ours - truth|| <= rtol * ||truth|| + atol * sqrt(numel). float32: ~84 epsilons.
_TOLERANCES = {
    torch.float64: (1e-9, 0.0),
    torch.float32: (1e-5, 0.0),
    torch.float16: (1e-2, 0.0),
    torch.bfloat16: (5e-2, 0.0),
}
DEFAULT_RATIO = 10.0  # ours may be this many times further from the truth than torch's own float32 result


def default_tolerances(dtype):
    """The (rtol, atol) floor verify uses for tensors of `dtype` when none are given."""
    return _TOLERANCES.get(dtype, _TOLERANCES[torch.float32])


def _eps(dtype):
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps


@dataclasses.dataclass
class Comparison:
    """One group of end-to-end tensors (model outputs, input gradients, parameter gradients), or one
    layer's outputs or gradients in isolation.

    error: ||ours - truth|| / ||truth|| of the worst tensor (the one with the largest tolerance_used,
    named by `worst`); error_torch: the same for torch's own float32 result on that tensor.
    tolerance_used: ||ours - truth|| / allowance, the largest over the tensors; ok when <= 1.
    max_abs, max_rel: max|ours - torch| and that over max|torch|, elementwise over all the tensors
    (ours against torch's float32, not the truth; as before the float64 reference existed).
    ill_conditioned: (tensor, why) for the tensors on which torch's own result lost over half its digits.
    """

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    tolerance_used: float = 0.0
    ok: bool = True
    worst: str = ""
    error: Optional[float] = None
    error_torch: Optional[float] = None
    ill_conditioned: List[tuple] = dataclasses.field(default_factory=list)
    count: int = 0


@dataclasses.dataclass
class LayerRecord:
    """One converted layer: its qualified name, its torch.nn type, and how ours compared in isolation.

    output_error / grad_error: ||ours - truth|| / ||truth|| of the layer's output and of its worst
    gradient (grad_worst: "input", "weight" or "bias"), against the torch.nn layer run in float64 on the
    same input; *_error_torch: the same for torch's float32 layer. tolerance_used: the largest
    ||ours - truth|| / allowance over them; ok means <= 1.
    output_max_abs/_rel, grad_max_abs/_rel: elementwise max|ours - torch| (and over max|torch|).
    drift_rel / drift_torch: the normwise error of the layer's output inside the full runs, ours and
    torch's, each against its float64 run (accumulated from the layers before; informational).
    None where there was nothing to compare.
    """

    name: str
    type: str
    calls: int = 0
    output_max_abs: Optional[float] = None
    output_max_rel: Optional[float] = None
    grad_max_abs: Optional[float] = None
    grad_max_rel: Optional[float] = None
    grad_worst: str = ""
    drift_rel: Optional[float] = None
    tolerance_used: Optional[float] = None
    ok: bool = True
    note: str = ""
    output_error: Optional[float] = None
    output_error_torch: Optional[float] = None
    grad_error: Optional[float] = None
    grad_error_torch: Optional[float] = None
    drift_torch: Optional[float] = None


@dataclasses.dataclass
class VerifyResult:
    """What verify() found. Truthy when no converted layer and no end-to-end tensor is clearly worse than
    torch's own rounding. `unconverted` lists what ran on torch's kernels instead (not checked); `covered`,
    with verify(everywhere=True), what convert() left but everywhere() computed with our kernels (checked
    end to end); `notes` says what the truth was and which branches it followed."""

    ok: bool
    layers: List[LayerRecord]
    end_to_end: List[Comparison]
    rtol: Optional[float] = None  # None: the per-dtype defaults
    atol: Optional[float] = None
    error: str = ""  # set when the converted model raised where the torch.nn one did not
    ratio: float = DEFAULT_RATIO
    unconverted: List[Unconverted] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    covered: List[Unconverted] = dataclasses.field(default_factory=list)  # verify(everywhere=True): see verify

    def __bool__(self):
        return self.ok

    @property
    def failed(self):
        """The records of the layers beyond tolerance."""
        return [layer for layer in self.layers if not layer.ok]

    def report(self):
        """A printable table: one row per converted layer, the end-to-end comparisons, what was not
        converted, and a verdict."""
        def num(value):
            return "-" if value is None else f"{value:.1e}"

        header = ("layer", "type", "calls", "out err", "torch", "grad err", "torch", "worst grad",
                  "drift", "torch", "tol used", "status")
        rows = [(layer.name or "(model)", layer.type, str(layer.calls), num(layer.output_error),
                 num(layer.output_error_torch), num(layer.grad_error), num(layer.grad_error_torch),
                 layer.grad_worst or "-", num(layer.drift_rel), num(layer.drift_torch),
                 "-" if layer.tolerance_used is None else f"{layer.tolerance_used:.2g}",
                 ("ok" if layer.ok else "FAIL") + (f" ({layer.note})" if layer.note else ""))
                for layer in self.layers]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = []
        if rows:
            out += [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
            out.append("(errors are ||x - truth|| / ||truth||: ours, then torch's float32 beside it; the "
                       "truth is the torch.nn layer in float64 on the same input)")
        else:
            out.append("no torch.nn Conv1d/2d/3d, ConvTranspose1d/2d/3d or MaxPool1d/2d/3d layers to convert in this model")
        if self.end_to_end:
            out.append("")
            out.append("end to end (whole model; ours and torch's errors against their float64 runs):")
            width = max(len(c.name) for c in self.end_to_end)
            for c in self.end_to_end:
                where = f"  worst: {c.worst}" if c.worst and c.count > 1 else ""
                out.append(f"  {c.name.ljust(width)}  ours {num(c.error)}  torch {num(c.error_torch)}  "
                           f"tol used {c.tolerance_used:.2g}  {'ok' if c.ok else 'FAIL'}{where}")
            ill = [(c.name, label, why) for c in self.end_to_end for label, why in c.ill_conditioned]
            if ill:
                out.append(f"  ill-conditioned (torch's own result lost over half its digits; judged by the "
                           f"ratio alone): {len(ill)} tensors")
                for _, label, why in ill[:6]:
                    out.append(f"    {label}: {why}")
                if len(ill) > 6:
                    out.append(f"    ... and {len(ill) - 6} more")
        for note in self.notes:
            out.append(f"  {note}")
        for records, title in ((self.covered, "covered by everywhere() ({}; computed by our kernels, checked end "
                                              "to end only):"),
                               (self.unconverted, "not converted ({}; these run on torch's kernels and are not "
                                                  "checked):")):
            if records:
                out += ["", title.format(len(records))]
                width = max(len(r.name or "(model)") for r in records)
                twidth = max(len(r.type) for r in records)
                out += [f"  {(r.name or '(model)').ljust(width)}  {r.type.ljust(twidth)}  {r.reason}" for r in records]
        if self.error:
            out += ["", f"error: {self.error}"]
        tol = (f"ours within {self.ratio:g}x torch's own error, or rtol "
               f"{'by dtype' if self.rtol is None else f'{self.rtol:g}'}, atol "
               f"{'by dtype' if self.atol is None else f'{self.atol:g}'}")
        left = f"; {len(self.unconverted)} not converted" if self.unconverted else ""
        out.append("")
        if self.ok and not self.layers:
            out.append(f"verify: OK, nothing converted; outputs and gradients agree (tolerance: {tol}){left}")
        elif self.ok:
            agree = "1 layer agrees" if len(self.layers) == 1 else f"{len(self.layers)} layers agree"
            out.append(f"verify: OK, {agree} with torch.nn (tolerance: {tol}){left}")
        else:
            bad = ", ".join(layer.name for layer in self.failed) or "end-to-end comparison"
            out.append(f"verify: FAILED ({bad}) (tolerance: {tol}){left}")
        return "\n".join(out)

    def __str__(self):
        return self.report()


# ---------------------------------------------------------------------------------------------------
# Judging one tensor
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Judged:
    label: str
    error: float  # ||ours - truth_ours|| / ||truth_ours||
    error_torch: float  # ||torch - truth_torch|| / ||truth_torch||
    used: float  # ||ours - truth_ours|| / allowance
    max_abs: float
    max_rel: float
    rms: float  # ||truth|| / sqrt(numel), to tell near-zero tensors
    dtype: torch.dtype
    distance: float = 0.0  # ||ours - truth_ours||
    allowance: float = 0.0
    numel: int = 0
    torch_rms_error: float = 0.0  # torch's own error per element, ||torch - truth|| / sqrt(numel)
    rtol: float = 0.0  # the floor's rtol this tensor was judged with

    @property
    def ok(self):
        return self.used <= 1.0

    @property
    def ill(self):
        """torch's own result kept fewer than half its digits."""
        return self.error_torch > math.sqrt(_eps(self.dtype))


def _as_float(t):
    t = t.detach()
    return t.to(torch.complex128) if t.is_complex() else t.to(torch.float64)


def _distance(x, truth):
    """||x - truth|| of two float64 tensors, where the same inf or nan in the same place as in truth counts
    as agreement and a non-finite value anywhere else is infinitely far."""
    diff = x - truth
    d = torch.linalg.vector_norm(diff).item()
    if math.isfinite(d):
        return d
    nonfinite = ~torch.isfinite(truth)
    same = (x == truth) | (x.isnan() & truth.isnan())
    diff = torch.where(nonfinite & same, torch.zeros_like(diff), diff)
    d = torch.linalg.vector_norm(diff).item()
    return d if math.isfinite(d) else math.inf


def _norm(t):
    """||t|| of a float64 tensor over its finite entries."""
    n = torch.linalg.vector_norm(t).item()
    return n if math.isfinite(n) else torch.linalg.vector_norm(t[torch.isfinite(t)]).item()


def _elementwise(a, b):
    """(max|a - b|, that / max|b|) of two float64 tensors: the old, max-relative measure, kept for information."""
    if a.numel() == 0:
        return 0.0, 0.0
    max_abs = (a - b).abs().max().item()
    scale = b.abs().max().item()
    if not (math.isfinite(max_abs) and math.isfinite(scale)):
        diff = (a - b).abs()
        same_nonfinite = ((a == b) | (a.isnan() & b.isnan())) & ~torch.isfinite(b)
        max_abs = torch.where(same_nonfinite, torch.zeros_like(diff), diff).nan_to_num(nan=math.inf).max().item()
        finite = b[torch.isfinite(b)].abs()
        scale = finite.max().item() if finite.numel() else 0.0
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf))


def _judge(label, ours, theirs, truth_ours, truth_theirs, rtol, atol, ratio, torch_error=None):
    """Judge one tensor: ours against truth_ours, allowed `ratio` times torch's relative error (theirs
    against truth_theirs, or `torch_error` when estimated elsewhere; none when truth_theirs is None,
    i.e. torch's result is the truth), and at least the floor rtol * ||truth|| + atol * sqrt(numel)."""
    dtype = (theirs if theirs is not None else ours if ours is not None else truth_ours).dtype
    if ours is None or truth_ours is None or ours.shape != truth_ours.shape:
        return _Judged(label, math.inf, 0.0, math.inf, math.inf, math.inf, 1.0, dtype)
    floor_rtol, floor_atol = default_tolerances(dtype)
    rtol = floor_rtol if rtol is None else rtol
    atol = floor_atol if atol is None else atol
    n = ours.numel()
    if n == 0:
        return _Judged(label, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, dtype)
    o, t = _as_float(ours), _as_float(truth_ours)
    r = _as_float(theirs) if theirs is not None and theirs.shape == ours.shape else None
    tr_full = None if truth_theirs is None or truth_theirs is truth_ours else _as_float(truth_theirs)
    if r is not None:
        # Both float32 runs overflowed (or made NaN) in the same places, which float64 need not: those entries say
        # nothing about either; ours is judged on the rest, against torch's error there
        bad = ~torch.isfinite(o)
        if bad.any() and torch.equal(bad, ~torch.isfinite(r)) and torch.equal(o[bad].nan_to_num(), r[bad].nan_to_num()):
            keep = ~bad
            o, r, t = o[keep], r[keep], t[keep]
            tr_full = None if tr_full is None or tr_full.shape != bad.shape else tr_full[keep]
            n = o.numel()
            if n == 0:
                return _Judged(label, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, dtype)
    max_abs, max_rel = _elementwise(o, r) if r is not None else (math.inf, math.inf)
    truth_norm = _norm(t)
    d_ours = _distance(o, t)
    err_torch, torch_abs = 0.0, 0.0  # torch's error, relative and scaled to ||truth_ours||
    if torch_error is not None:
        err_torch, torch_abs = torch_error, (torch_error * truth_norm if truth_norm > 0 else 0.0)
    elif truth_theirs is not None and r is not None and theirs.shape == truth_theirs.shape:
        tr = t if truth_theirs is truth_ours else tr_full
        d_theirs, theirs_norm = _distance(r, tr), (truth_norm if tr is t else _norm(tr))
        if theirs_norm > 0:
            err_torch, torch_abs = d_theirs / theirs_norm, d_theirs / theirs_norm * truth_norm
        else:  # the true value is exactly 0: compare absolute errors
            err_torch, torch_abs = (0.0 if d_theirs == 0 else math.inf), d_theirs
    allowance = max(rtol * truth_norm + atol * math.sqrt(n), ratio * torch_abs)
    used = d_ours / allowance if allowance > 0 else (0.0 if d_ours == 0 else math.inf)
    error = d_ours / truth_norm if truth_norm > 0 else (0.0 if d_ours == 0 else math.inf)
    return _Judged(label, error, err_torch, used, max_abs, max_rel, truth_norm / math.sqrt(n), dtype,
                   d_ours, allowance, n, torch_abs / math.sqrt(n), rtol)


NEAR_ZERO = 1e-3  # a tensor whose rms is under this share of the typical one has a true value that cancels


def _typical_rms(judged):
    sizes = sorted(j.rms for j in judged if j.rms > 0 and math.isfinite(j.rms))
    return sizes[len(sizes) // 2] if sizes else None


def _near_zero_floor(judged, typical_rms, ratio):
    """Re-judge the tensors whose true value cancels to near zero (rms under NEAR_ZERO of typical_rms, and
    torch's own result lost over half its digits: a sum of terms that cancel, not merely a small tensor).

    Their float32 results are rounding noise at the scale of the terms that cancel, not of the tiny
    result, and torch's own can be exactly 0 by luck: on an H200, cuDNN's batch-norm backward gave an
    EfficientNet-B0's first batch-norm bias gradient as 0 while ours was 3e-7 off, like torch's own on the
    eight sibling tensors, and the allowance, 10x torch's error, was 0 there. So each such tensor may
    also be off by rtol times the typical rms per element, or by `ratio` times torch's own rms error
    per element pooled (the median) over all the near-zero tensors, whichever is larger. A real error
    upstream shows at the scale of the terms, far beyond this (a 1% error by a factor of 1000). A tensor
    that is merely small (a weight gradient of a layer fed tiny inputs) keeps torch's digits, and the
    plain rule: there an error is a share of the tensor itself, which the floor would hide.
    """
    if not typical_rms:
        return judged
    near = [j for j in judged if j.rms < NEAR_ZERO * typical_rms and j.numel > 0 and j.ill]
    if not near:
        return judged
    noise = sorted(j.torch_rms_error for j in near)
    pooled = ratio * noise[len(noise) // 2]
    near_ids = {id(j) for j in near}
    out = []
    for j in judged:
        if id(j) in near_ids and math.isfinite(j.distance):
            floor = max(j.rtol * typical_rms, pooled if math.isfinite(pooled) else 0.0) * math.sqrt(j.numel)
            allowance = max(j.allowance, floor)
            used = j.distance / allowance if allowance > 0 else (0.0 if j.distance == 0 else math.inf)
            j = dataclasses.replace(j, used=used, allowance=allowance)
        out.append(j)
    return out


def _summarise(name, judged, typical_rms=None):
    """A Comparison over judged tensors; ill-conditioned ones get a reason."""
    result = Comparison(name)
    for j in judged:
        result.count += 1
        result.max_abs = max(result.max_abs, j.max_abs)
        result.max_rel = max(result.max_rel, j.max_rel)
        if j.used > result.tolerance_used or not result.worst:
            result.worst, result.error, result.error_torch = j.label, j.error, j.error_torch
            result.tolerance_used = max(result.tolerance_used, j.used)
        result.ok = result.ok and j.ok
        if j.ill:
            dtype_name = str(j.dtype).replace("torch.", "")
            why = f"torch's own {dtype_name} error {j.error_torch:.1e}, ours {j.error:.1e}"
            if typical_rms and j.rms < NEAR_ZERO * typical_rms:
                why += (f"; near zero (rms {j.rms:.1e} where this model's gradients are typically "
                        f"{typical_rms:.1e}): its terms cancel")
            else:
                why += "; rounding amplified (a near-singular step, or a branch verify cannot pin down)"
            result.ill_conditioned.append((j.label, why))
    return result


# ---------------------------------------------------------------------------------------------------
# Following branches: a TorchFunctionMode around each forward
# ---------------------------------------------------------------------------------------------------

def _piece_const(value):
    return lambda x: value


# Piecewise activations: function -> (argument names with defaults, breakpoints(args), pieces(args)).
# The branch of an element is the number of breakpoints its input exceeds.
_RELU = ((("input", None),), lambda a: [0.0], lambda a: [_piece_const(0.0), lambda x: x])
_HARDTANH = ((("input", None), ("min_val", -1.0), ("max_val", 1.0), ("inplace", False)),
             lambda a: [a["min_val"], a["max_val"]],
             lambda a: [_piece_const(a["min_val"]), lambda x: x, _piece_const(a["max_val"])])
_LEAKY = ((("input", None), ("negative_slope", 0.01), ("inplace", False)), lambda a: [0.0],
          lambda a: [lambda x: x * a["negative_slope"], lambda x: x])
_PIECEWISE = {
    F.relu: ((("input", None), ("inplace", False)),) + _RELU[1:],
    torch.relu: _RELU, torch.relu_: _RELU, torch.Tensor.relu: _RELU, torch.Tensor.relu_: _RELU,
    F.relu6: ((("input", None), ("inplace", False)), lambda a: [0.0, 6.0],
              lambda a: [_piece_const(0.0), lambda x: x, _piece_const(6.0)]),
    F.hardtanh: _HARDTANH, F.hardtanh_: _HARDTANH,
    F.leaky_relu: _LEAKY, F.leaky_relu_: _LEAKY,
    F.hardswish: ((("input", None), ("inplace", False)), lambda a: [-3.0, 3.0],
                  lambda a: [_piece_const(0.0), lambda x: x * (x + 3) / 6, lambda x: x]),
    F.hardsigmoid: ((("input", None), ("inplace", False)), lambda a: [-3.0, 3.0],
                    lambda a: [_piece_const(0.0), lambda x: x / 6 + 0.5, _piece_const(1.0)]),
}
_INPLACE = {torch.relu_, torch.Tensor.relu_, F.hardtanh_, F.leaky_relu_}
_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}

_POOL_ARGS = (("input", None), ("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1),
              ("ceil_mode", False), ("return_indices", False))
_MAX_POOLS = {F.max_pool1d: 1, F._max_pool1d: 1, F.max_pool1d_with_indices: 1, torch.max_pool1d: 1,
              F.max_pool2d: 2, F._max_pool2d: 2, F.max_pool2d_with_indices: 2, torch.max_pool2d: 2,
              F.max_pool3d: 3, F._max_pool3d: 3, F.max_pool3d_with_indices: 3, torch.max_pool3d: 3}
# Ours take part in __torch_function__ as torch's do (functional.py): so every max-pool, our layers' and
# those everywhere() serves included, is seen here, in call order.
_OUR_MAX_POOLS = {ours_functional.max_pool1d: 1, ours_functional.max_pool2d: 2, ours_functional.max_pool3d: 3}

# torch's own conv and max-pool entry points: called inside a converted model's forward they are work
# that convert() could not reach
_TORCH_KERNELS = {torch.conv1d: "F.conv1d", torch.conv2d: "F.conv2d", torch.conv3d: "F.conv3d",
                  torch.conv_transpose1d: "F.conv_transpose1d", torch.conv_transpose2d: "F.conv_transpose2d",
                  torch.conv_transpose3d: "F.conv_transpose3d",
                  F.adaptive_max_pool1d: "F.adaptive_max_pool1d", F.adaptive_max_pool2d: "F.adaptive_max_pool2d",
                  F.adaptive_max_pool3d: "F.adaptive_max_pool3d"}
_TORCH_KERNELS.update({f: f"F.max_pool{d}d" for f, d in _MAX_POOLS.items()})
_TORCH_KERNELS[torch.max_pool1d] = "torch.max_pool1d"
_TORCH_KERNELS[torch.max_pool2d] = "torch.max_pool2d"
_TORCH_KERNELS[torch.max_pool3d] = "torch.max_pool3d"

_DRAW_NEW = {torch.rand, torch.randn}
_DRAW_LIKE = {torch.rand_like, torch.randn_like}
_DRAW_INPLACE = {torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.bernoulli_, torch.Tensor.exponential_,
                 torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.geometric_}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}


def _bind(names, args, kwargs):
    bound = {name: default for name, default in names}
    bound.update(zip((name for name, _ in names), args))
    bound.update(kwargs)
    return bound


def _pool_indices(bound, dims, ours=False):
    pool = getattr(ours_functional if ours else F, f"max_pool{dims}d")
    return pool(bound["input"].detach(), bound["kernel_size"], bound["stride"], bound["padding"],
                bound["dilation"], ceil_mode=bound["ceil_mode"], return_indices=True)[1]


def _gather(x, indices, dims):
    """The max-pool output whose maxima sit at `indices` (flat per plane, as torch's)."""
    return x.flatten(-dims).gather(-1, indices.flatten(-dims)).view(indices.shape)


class _Branches(TorchFunctionMode):
    """Active during one forward. Records (replay=None) the branch of every piecewise activation and the
    argmax of every torch max-pool, in call order; or, given such a record, makes each call take the
    recorded branches and counts where its own input would have chosen differently. Optionally draws
    random numbers in float32 for float64 tensors (so that a float64 run sees the float32 runs' draws)
    and counts torch conv/pool calls by the innermost module running (`stack`).

    Inside verify(everywhere=True) the everywhere() mode is entered inside this one, so it sees torch's
    calls first: what it serves reaches this mode as our function (a max-pool still records its argmax,
    by our kernel), and only what reaches torch's kernels is counted in `calls`."""

    def __init__(self, replay=None, draw_dtype=None, stack=None):
        super().__init__()
        self.decisions = []
        self.replay = replay
        self.draw_dtype = draw_dtype
        self.stack = stack
        self.calls = collections.Counter()
        self.flips = collections.Counter()
        self.lost = ""  # why replaying stopped, if it did

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack is not None and func in _TORCH_KERNELS:
            self.calls[(self.stack[-1] if self.stack else "", _TORCH_KERNELS[func])] += 1
        if func in _PIECEWISE:
            return self._piecewise(func, args, kwargs)
        if func in _MAX_POOLS or func in _OUR_MAX_POOLS:
            return self._max_pool(func, args, kwargs)
        if self.draw_dtype is not None:
            drawn = self._draw(func, args, kwargs)
            if drawn is not NotImplemented:
                return drawn
        return func(*args, **kwargs)

    def _next(self, kind, shape):
        """The recorded decision for this call, or None once the two runs' calls no longer line up."""
        k = len(self.decisions)
        self.decisions.append(None)
        if self.lost:
            return None
        if k >= len(self.replay) or self.replay[k][0] != kind or self.replay[k][1].shape != shape:
            self.lost = f"call {k + 1} ({kind}) does not match the float32 run's"
            return None
        return self.replay[k][1]

    def _piecewise(self, func, args, kwargs):
        names, breakpoints, pieces = _PIECEWISE[func]
        a = _bind(names, args, kwargs)
        x = a["input"]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return func(*args, **kwargs)
        points = breakpoints(a)
        seen = x.detach()
        # one breakpoint: a bool per element; two: 0, 1 or 2
        branch = seen > points[0] if len(points) == 1 else sum((seen > p).to(torch.int8) for p in points)
        if self.replay is None:
            self.decisions.append((func.__name__, branch))
            return func(*args, **kwargs)
        recorded = self._next(func.__name__, branch.shape)
        if recorded is None:
            return func(*args, **kwargs)
        self.flips["activation"] += int((branch != recorded).sum())
        inplace = func in _INPLACE or bool(a.get("inplace", False))
        parts = pieces(a)
        if func in _RELUS:  # the common case, without temporaries: zero where float32 was <= 0
            return x.masked_fill_(~recorded, 0.0) if inplace else x.masked_fill(~recorded, 0.0)
        source = x.clone() if inplace else x
        values = [piece(source) for piece in parts]
        if len(values) == 2:
            out = torch.where(recorded, values[1], values[0])
        else:
            out = torch.where(recorded == 2, values[2], torch.where(recorded == 1, values[1], values[0]))
        return x.copy_(out) if inplace else out

    def _max_pool(self, func, args, kwargs):
        ours = func in _OUR_MAX_POOLS
        dims = _OUR_MAX_POOLS[func] if ours else _MAX_POOLS[func]
        a = _bind(_POOL_ARGS, args, kwargs)
        x = a["input"]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return func(*args, **kwargs)
        if self.replay is None:
            self.decisions.append(("max_pool", _pool_indices(a, dims, ours)))
            return func(*args, **kwargs)
        own = _pool_indices(a, dims, ours)
        recorded = self._next("max_pool", own.shape)
        if recorded is None or bool((recorded < 0).any()):
            return func(*args, **kwargs)
        self.flips["max_pool"] += int((own != recorded).sum())
        out = _gather(x, recorded, dims)
        pair = func in (F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices) or (
            func in (F.max_pool1d, F.max_pool2d, F.max_pool3d, *_OUR_MAX_POOLS) and a["return_indices"])
        return (out, recorded) if pair else out

    def _draw(self, func, args, kwargs):
        """Random numbers for float64 tensors drawn in float32 (the float32 runs' values), else NotImplemented."""
        wide = torch.float64
        if func in _DRAW_NEW and kwargs.get("dtype", torch.get_default_dtype()) == wide:
            return func(*args, **dict(kwargs, dtype=self.draw_dtype)).to(wide)
        if func in _DRAW_LIKE and kwargs.get("dtype", args[0].dtype) == wide:
            return func(*args, **dict(kwargs, dtype=self.draw_dtype)).to(wide)
        if func in _DRAW_INPLACE and args[0].dtype == wide:
            rest = [a.to(self.draw_dtype) if isinstance(a, torch.Tensor) and a.dtype == wide else a for a in args[1:]]
            drawn = getattr(torch.empty_like(args[0], dtype=self.draw_dtype), func.__name__)(*rest, **kwargs)
            with torch.no_grad():
                args[0].copy_(drawn)
            return args[0]
        if func in _DROPOUTS:
            a = _bind((("input", None), ("p", 0.5), ("training", True), ("inplace", False)), args, kwargs)
            x = a["input"]
            if a["training"] and a["p"] > 0 and isinstance(x, torch.Tensor) and x.dtype == wide:
                # the same call on float32 ones draws the float32 run's mask
                kept = func(torch.ones_like(x, dtype=self.draw_dtype), a["p"], True, False) != 0
                scale = kept.to(wide) * (1.0 / (1.0 - a["p"]) if a["p"] < 1 else 0.0)
                return x.mul_(scale) if a["inplace"] else x * scale
        return NotImplemented


# ---------------------------------------------------------------------------------------------------
# Running a model
# ---------------------------------------------------------------------------------------------------

def _tensors(obj):
    """The tensors in a (nested) output: a tensor, tuple/list, dict or dataclass-like object."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _floating(tensors):
    return [t for t in tensors if t is not None and (t.is_floating_point() or t.is_complex())]


def _as_args(example_inputs):
    """example_inputs → (args, kwargs): a tensor is one argument, a tuple/list several, a dict keywords."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _map_tensors(obj, fn):
    """`obj` with fn applied to every tensor in it (through tuples, namedtuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(o, fn) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _fresh_leaf(t):
    """A copy of t that is a new leaf, requiring grad when floating."""
    t = t.detach().clone()
    return t.requires_grad_() if (t.is_floating_point() or t.is_complex()) else t


def _fresh_leaves(obj):
    """A copy of the inputs in which every floating tensor is a new leaf that requires grad."""
    return _map_tensors(obj, _fresh_leaf)


def _cuda_devices(model, inputs):
    devices = {t.device.index or 0 for t in list(model.parameters()) + list(model.buffers()) + _tensors(inputs)
               if t.device.type == "cuda"}
    return sorted(devices)


def _projection(tensors, seed, dtypes=None):
    """Fixed random tensors to weight the outputs with: the backward is of sum(output * projection).
    Each is rounded to its entry of `dtypes` (the float32 run's dtype, for a float64 run) first."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [t.dtype for t in tensors]
    return [torch.randn(t.shape, generator=gen).to(dtype).to(device=t.device, dtype=t.dtype)
            for t, dtype in zip(tensors, dtypes)]


@dataclasses.dataclass
class _Run:
    outputs: list
    input_grads: list
    param_grads: Dict[str, torch.Tensor]
    captured: Dict[str, dict]
    branches: Optional[_Branches]
    projected: list  # dtypes of the outputs the backward projected


def _run_model(model, args, kwargs, layer_names, seed, keep_inputs, branches=None, projection_dtypes=None,
               everywhere=None):
    """Forward (inside `branches`, and inside that the everywhere() mode `everywhere`, if given) + backward of
    a fixed random projection. Returns a _Run with outputs, input grads, param grads and per-layer captures
    ({name: {"inputs": [...], "outputs": [...]}})."""
    modules = dict(model.named_modules())
    captured = {name: {"inputs": [], "outputs": []} for name in layer_names}
    handles = []

    def hook(name):
        def record(module, inputs, output):
            if keep_inputs and inputs and isinstance(inputs[0], torch.Tensor):
                captured[name]["inputs"].append(inputs[0].detach().clone())
            captured[name]["outputs"].append([t.detach().clone() for t in _floating(_tensors(output))])
        return record

    for name in layer_names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    if branches is not None and branches.stack is not None:
        stack = branches.stack

        def enter(name):
            return lambda module, inputs: stack.append(name)  # None: a pre-hook's result would replace inputs

        def leave(module, inputs, output):
            stack.pop()  # and return None, or the output would be replaced

        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave, always_call=True))
    args, kwargs = _fresh_leaves(args), _fresh_leaves(kwargs)
    input_leaves = [t for t in _floating(_tensors([args, kwargs])) if t.requires_grad]
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model, [args, kwargs])), torch.enable_grad():
            torch.manual_seed(seed)
            # the model gets copies of the leaves, which an in-place first step (ReLU(inplace=True)) may change
            # where a leaf that requires grad may not be
            fed_args, fed_kwargs = (_map_tensors(a, lambda t: t.clone() if t.requires_grad else t) for a in (args, kwargs))
            with branches or contextlib.nullcontext(), everywhere or contextlib.nullcontext():
                output = model(*fed_args, **fed_kwargs)
            outputs = [t for t in _floating(_tensors(output)) if t.requires_grad]
            grads = [None] * (len(input_leaves) + len(named_params))
            projected = [o.dtype for o in outputs]
            if outputs:
                dtypes = None if projection_dtypes is None else projection_dtypes[:len(outputs)]
                weights = _projection(outputs, seed + 1, dtypes)
                loss = sum((o * w).sum() for o, w in zip(outputs, weights))
                grads = list(torch.autograd.grad(loss, input_leaves + [p for _, p in named_params],
                                                 allow_unused=True))
    finally:
        for handle in handles:
            handle.remove()
    all_outputs = [t.detach() for t in _floating(_tensors(output))]
    input_grads = grads[:len(input_leaves)]
    param_grads = {n: g for (n, _), g in zip(named_params, grads[len(input_leaves):])}
    return _Run(all_outputs, input_grads, param_grads, captured, branches, projected)


def _layer_alone(module, x, seed, projection_dtypes=None):
    """One layer on one input, differentiated against a fixed output gradient: (floating outputs,
    [("input", grad), (param name, grad), ...], integer outputs, dtypes of the differentiated outputs)."""
    x = x.detach().clone()
    if x.is_floating_point():
        x.requires_grad_()
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []), \
            torch.enable_grad():
        torch.manual_seed(seed)
        everything = _tensors(module(x))
    outputs = _floating(everything)
    integers = [t for t in everything if not (t.is_floating_point() or t.is_complex())]
    wrt = ([("input", x)] if x.requires_grad else []) + params
    differentiable = [o for o in outputs if o.requires_grad]
    dtypes = [o.dtype for o in differentiable]
    if not differentiable or not wrt:
        return [o.detach() for o in outputs], [], integers, dtypes
    grads = torch.autograd.grad(differentiable, [t for _, t in wrt],
                                grad_outputs=_projection(differentiable, seed + 2, projection_dtypes),
                                allow_unused=True)
    return [o.detach() for o in outputs], [(label, g) for (label, _), g in zip(wrt, grads)], integers, dtypes


def _floating_dtypes(model, inputs):
    return {t.dtype for t in list(model.parameters()) + list(model.buffers()) + _tensors(inputs)
            if t.is_floating_point() or t.is_complex()}


def _to_float64(obj):
    return _map_tensors(obj, lambda t: t.to(torch.float64) if t.is_floating_point() else t)


def _to_float32(obj):
    return _map_tensors(obj, lambda t: t.to(torch.float32) if t.dtype == torch.float64 else t)


def _same_decisions(a, b):
    return len(a) == len(b) and all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _describe(message, exc):
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{message} ({type(exc).__name__}: {text})"


# ---------------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _full_float32():
    """TF32 off while verify runs: on Ampere and later GPUs torch's float32 convolutions default to TF32
    (cuDNN's allow_tf32), whose ~1e-3 error would set ours an allowance of 1e-2 and hide a 1% error."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def verify(model, example_inputs, rtol=None, atol=None, *, seed=0, ratio=DEFAULT_RATIO, everywhere=False):
    """Check `model` converted to our layers against the same model on torch.nn's, layer by layer and end
    to end, each float32 result against a float64 run that takes the same ReLU/max-pool branches.

    model: a torch.nn.Module (left untouched: every run uses a deep copy, in the train/eval mode given).
    example_inputs: a tensor, a tuple/list of positional arguments, or a dict of keyword arguments.
    A tensor passes when  ||ours - truth|| <= max(ratio * ||torch - truth||, rtol * ||truth|| + atol *
    sqrt(numel)): ours may be `ratio` times as far from the truth as torch's own result, and always
    rtol (relative, normwise) from it. rtol, atol: None picks them per dtype (float32 1e-5 and 1e-8,
    float64 1e-9 and 1e-12, float16 1e-2, bfloat16 5e-2). For a float64 model torch's float64 run is
    the truth and its own error is estimated from a float32 run scaled to float64.
    seed: the RNG seed every run starts from (dropout masks) and of the random output projections.

    On a GPU, TF32 is switched off while verify runs (and restored after), so that both sides round as
    float32 does.

    everywhere=True runs the converted model inside torch_manualgrad.everywhere(), as a model meant to run
    that way would: F.conv2d/F.max_pool2d calls in a forward and nn.Conv2d subclasses with their own forward
    compute with our kernels too, and are judged in the end-to-end comparison (not alone: they are not
    layers of ours). VerifyResult.covered lists them, `unconverted` what still reached torch's kernels.
    verify itself must not run inside everywhere(), which would compute its torch.nn reference with ours.

    Returns a VerifyResult (truthy when nothing is clearly worse than torch; .report() prints the table).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"verify: expected model to be a torch.nn.Module, but got {type(model).__name__}")
    if not ratio > 0:
        raise ValueError(f"verify: expected ratio > 0, but got ratio={ratio!r}")
    if routing.active():
        raise RuntimeError("verify: called inside torch_manualgrad.everywhere(), which would compute the torch.nn "
                           "reference with our kernels as well; call verify(model, example_inputs, "
                           "everywhere=True) outside it instead")
    with _full_float32():
        return _verify(model, example_inputs, rtol, atol, seed, ratio, everywhere)


def _verify(model, example_inputs, rtol, atol, seed, ratio, everywhere):
    try:
        pristine = revert(copy.deepcopy(model))
        reference = copy.deepcopy(pristine)
        converted = convert(copy.deepcopy(model))
    except Exception as exc:
        raise RuntimeError(f"verify: could not deep-copy the model ({type(exc).__name__}: {exc})") from exc
    layer_names = [name for name, module in converted.named_modules() if isinstance(module, _OUR_LAYERS)]
    ref_modules, our_modules = dict(reference.named_modules()), dict(converted.named_modules())
    args, kwargs = _as_args(example_inputs)
    dtypes = _floating_dtypes(model, [args, kwargs])
    wide_model = bool(dtypes & {torch.float64, torch.complex128, torch.complex64})
    notes = []

    # the runs being judged: torch.nn's and ours, recording their branches
    ref_run = _run_model(reference, args, kwargs, layer_names, seed, True, _Branches())
    our_branches = _Branches(stack=[])
    served = collections.Counter()  # (innermost module running, function) → calls everywhere() served

    def count_served(name, was_served, reason):
        if was_served:
            served[(our_branches.stack[-1] if our_branches.stack else "", name)] += 1

    mode = routing.Everywhere(on_call=count_served) if everywhere else None
    try:
        our_run = _run_model(converted, args, kwargs, layer_names, seed, False, our_branches, everywhere=mode)
    except Exception as exc:
        our_run, our_error = None, f"the converted model raised {type(exc).__name__}: {exc}"
    else:
        our_error = ""

    # the truths
    truth_ref = truth_ours = probe = None
    if not wide_model:
        try:
            truth_ref, truth_ours = _float64_truths(pristine, args, kwargs, layer_names, seed, ref_run, our_run)
        except Exception as exc:
            notes.append(_describe("no float64 reference: the model did not run in float64, so ours is judged "
                                   "against torch's float32 result with the floor tolerance alone", exc))
    elif dtypes & {torch.complex64, torch.complex128}:
        notes.append("complex tensors: torch's run is the truth and the floor tolerance alone applies")
    else:
        try:
            probe = _float32_probe(pristine, args, kwargs, seed)
        except Exception as exc:
            notes.append(_describe("no float32 probe: torch's float64 run is the truth and the floor tolerance "
                                   "alone applies", exc))
    if truth_ref is not None:
        notes.append(_branch_note(truth_ref, truth_ours))
    elif probe is not None:
        notes.append("model in float64: torch's float64 run is the truth; each tensor's allowance is ratio x "
                     "torch's own float32 error on it (a probe run), scaled by the epsilons to float64")

    layers = [_check_layer(index, name, ref_modules[name], our_modules[name], ref_run, our_run, truth_ref,
                           truth_ours, seed, rtol, atol, ratio, wide_model)
              for index, name in enumerate(layer_names)]

    end_to_end = []
    if our_run is not None:
        end_to_end = _end_to_end(ref_run, our_run, truth_ref, truth_ours, probe, rtol, atol, ratio)
    left, covered = _left_and_covered(unconverted(converted), our_branches.calls, served)
    ok = not our_error and all(layer.ok for layer in layers) and all(c.ok for c in end_to_end)
    return VerifyResult(ok=ok, layers=layers, end_to_end=end_to_end, rtol=rtol, atol=atol, error=our_error,
                        ratio=ratio, unconverted=left, notes=notes, covered=covered)


def _calls(count):
    return f"{count} call{'s' * (count > 1)}"


def _left_and_covered(layers, torch_calls, served):
    """What ran on torch's kernels (layers convert() left, and torch conv/pool calls in a forward, by the
    innermost module making them), and what everywhere() computed with ours instead: a layer is covered
    when everywhere() served calls inside it and none inside it reached torch."""
    def inside(name, where):
        return where == name or where.startswith(f"{name}.") if name else True

    left, covered = [], []
    for r in layers:
        mine = sum(n for (where, _), n in served.items() if inside(r.name, where))
        theirs = sum(n for (where, _), n in torch_calls.items() if inside(r.name, where))
        if mine and not theirs:
            functions = " and ".join(sorted({f for (where, f) in served if inside(r.name, where)}))
            covered.append(r._replace(reason=f"{r.reason}; everywhere() computed its {functions} ({_calls(mine)}) "
                                             f"with our kernels"))
        else:
            left.append(r)
    listed = {r.name for r in layers}
    for (where, function), count in sorted(torch_calls.items()):
        if where not in listed:
            left.append(Unconverted(where, function, f"called in forward ({_calls(count)}): torch's kernel runs, "
                                                     f"convert() cannot reach it"))
    for (where, function), count in sorted(served.items()):
        if where not in listed:
            covered.append(Unconverted(where, function, f"called in forward ({_calls(count)}): everywhere() computed "
                                                        f"{'it' if count == 1 else 'them'} with our kernels"))
    return left, covered


def _float64_truths(pristine, args, kwargs, layer_names, seed, ref_run, our_run):
    """The torch.nn model in float64, run once along torch's float32 branches and once along ours
    (once, when they took the same branches)."""
    wide = copy.deepcopy(pristine).to(torch.float64)
    args64, kwargs64 = _to_float64(args), _to_float64(kwargs)
    dtypes = ref_run.projected

    def along(decisions):
        return _run_model(copy.deepcopy(wide), args64, kwargs64, layer_names, seed, False,
                          _Branches(replay=decisions, draw_dtype=torch.float32), projection_dtypes=dtypes)

    truth_ref = along(ref_run.branches.decisions)
    if our_run is None:
        return truth_ref, None
    if _same_decisions(ref_run.branches.decisions, our_run.branches.decisions):
        return truth_ref, truth_ref
    return truth_ref, along(our_run.branches.decisions)


_SATURATED = 0.1  # a float32 probe error from which the scaled float64 estimate is no longer proportional


def _float32_probe(pristine, args, kwargs, seed):
    """For a float64 model: torch's relative error per end-to-end tensor at float32 (against float64 along
    the float32 run's branches), scaled to float64 by the ratio of the epsilons."""
    narrow = copy.deepcopy(pristine).to(torch.float32)
    run32 = _run_model(narrow, _to_float32(args), _to_float32(kwargs), [], seed, False, _Branches())
    run64 = _run_model(copy.deepcopy(pristine), args, kwargs, [], seed, False,
                       _Branches(replay=run32.branches.decisions, draw_dtype=torch.float32),
                       projection_dtypes=run32.projected)
    scale = _eps(torch.float64) / _eps(torch.float32)

    def rel(x, truth):
        if x is None or truth is None or x.shape != truth.shape:
            return 0.0
        x, truth = _as_float(x), _as_float(truth)
        norm = _norm(truth)
        d = _distance(x, truth)
        error = d / norm if norm > 0 else (0.0 if d == 0 else math.inf)
        # A float32 error near 1 has stopped growing with the conditioning (float32 lost the value altogether),
        # so scaled down it says only that float64 may lose more than that: a tensor that ill-conditioned may
        # lose half its float64 digits (a batch norm's x - mean cancelling seven digits of a 1e-7 input made
        # float64 errors of 9e-9 where the scaled estimate was 5e-10; found by fuzzing verify)
        if error >= _SATURATED:
            return max(error * scale, math.sqrt(_eps(torch.float64)))
        return error * scale

    return {
        "outputs": [rel(a, b) for a, b in zip(run32.outputs, run64.outputs)],
        "input_grads": [rel(a, b) for a, b in zip(run32.input_grads, run64.input_grads)],
        "param_grads": {n: rel(g, run64.param_grads.get(n)) for n, g in run32.param_grads.items()},
    }


def _branch_note(truth_ref, truth_ours):
    def counts(run):
        f = run.branches.flips
        return f"{f['activation']} activation and {f['max_pool']} max-pool"

    text = (f"truth: float64 runs along each float32 run's branches; float64 alone would have chosen "
            f"{counts(truth_ref)} branches differently from torch's float32 run")
    if truth_ours is not None:
        text += f", {counts(truth_ours)} from ours"
    lost = [run.branches.lost for run in (truth_ref, truth_ours) if run is not None and run.branches.lost]
    if lost:
        text += f" (stopped following at {lost[0]}; errors after it include branch changes)"
    return text


def _check_layer(index, name, ref_module, our_module, ref_run, our_run, truth_ref, truth_ours, seed, rtol, atol,
                 ratio, wide_model):
    """One converted layer in isolation, on every input it received in torch's run."""
    record = LayerRecord(name=name, type=_torch_type_name(our_module))
    inputs = ref_run.captured[name]["inputs"]
    record.calls = len(inputs)
    if not inputs:
        record.note = "not called"
        return record
    wide_module = None
    if not wide_model:
        try:
            wide_module = copy.deepcopy(ref_module).to(torch.float64)
        except Exception:
            wide_module = None
    out_judged, grad_judged = [], []
    for call, x in enumerate(inputs):
        call_seed = seed + 1000 * (index + 1) + call
        try:
            theirs_out, theirs_grads, theirs_ints, projected = _layer_alone(ref_module, x, call_seed)
            mine_out, mine_grads, mine_ints, _ = _layer_alone(our_module, x, call_seed)
        except Exception as exc:
            record.ok = False
            record.note = f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return record
        truth_out, truth_grads = theirs_out, theirs_grads
        exact = True  # torch's own result is the truth (a float64 layer, or no float64 copy)
        if wide_module is not None and x.is_floating_point():
            try:
                truth_out, truth_grads, _, _ = _layer_alone(wide_module, x.to(torch.float64), call_seed, projected)
                exact = False
            except Exception:
                pass
        if len(mine_out) != len(theirs_out) or len(mine_ints) != len(theirs_ints):
            record.ok = False
            record.note = "returned different outputs"
        elif any(not torch.equal(m, t) for m, t in zip(mine_ints, theirs_ints)):
            record.ok = False
            record.note = "indices differ from torch's"
        for i, (m, t, tr) in enumerate(zip(mine_out, theirs_out, truth_out)):
            out_judged.append(_judge(f"output {i}", m, t, tr, None if exact else tr, rtol, atol, ratio))
        for (label, m), (_, t), (_, tr) in zip(mine_grads, theirs_grads, truth_grads):
            if m is not None or t is not None:
                grad_judged.append(_judge(label, m, t, tr, None if exact else tr, rtol, atol, ratio))
    out_cmp = _summarise("output", out_judged)
    grad_cmp = _summarise("grad", _near_zero_floor(grad_judged, _typical_rms(grad_judged), ratio))
    record.output_max_abs, record.output_max_rel = out_cmp.max_abs, out_cmp.max_rel
    record.output_error, record.output_error_torch = out_cmp.error, out_cmp.error_torch
    if grad_cmp.worst:
        record.grad_max_abs, record.grad_max_rel, record.grad_worst = grad_cmp.max_abs, grad_cmp.max_rel, grad_cmp.worst
        record.grad_error, record.grad_error_torch = grad_cmp.error, grad_cmp.error_torch
    record.tolerance_used = max(out_cmp.tolerance_used, grad_cmp.tolerance_used)
    record.ok = record.ok and out_cmp.ok and grad_cmp.ok
    record.drift_rel, record.drift_torch = _drift(name, ref_run, our_run, truth_ref, truth_ours)
    return record


def _drift(name, ref_run, our_run, truth_ref, truth_ours):
    """How far the layer's output was from the truth inside the full runs: (ours, torch's)."""
    def worst(run, truth):
        if run is None or truth is None:
            return None
        got, want = run.captured[name]["outputs"], truth.captured[name]["outputs"]
        if len(got) != len(want):
            return None
        errors = [_distance(_as_float(g), _as_float(w)) / max(_norm(_as_float(w)), 1e-300)
                  for gs, ws in zip(got, want) for g, w in zip(gs, ws) if g.shape == w.shape]
        return max(errors) if errors else None

    if truth_ref is None:  # float64 model: ours against torch's own run
        return worst(our_run, ref_run), None
    return worst(our_run, truth_ours), worst(ref_run, truth_ref)


def _end_to_end(ref_run, our_run, truth_ref, truth_ours, probe, rtol, atol, ratio):
    exact = truth_ref is None  # no float64 run: torch's own result is the truth
    if exact:
        truth_ref = truth_ours = ref_run

    def judge(label, ours, theirs, t_ours, t_theirs, probe_error):
        return _judge(label, ours, theirs, t_ours, None if exact else t_theirs, rtol, atol, ratio,
                      torch_error=probe_error)

    def at(seq, i):
        return seq[i] if i < len(seq) else None

    outputs = [judge(f"output {i}", o, at(ref_run.outputs, i), at(truth_ours.outputs, i),
                     at(truth_ref.outputs, i), probe and at(probe["outputs"], i))
               for i, o in enumerate(our_run.outputs)]
    result = [_summarise("model output", outputs)]
    if ref_run.input_grads:
        grads = [judge(f"input {i}", g, at(ref_run.input_grads, i), at(truth_ours.input_grads, i),
                       at(truth_ref.input_grads, i), probe and at(probe["input_grads"], i))
                 for i, g in enumerate(our_run.input_grads) if g is not None or at(ref_run.input_grads, i) is not None]
        result.append(_summarise("input gradient", grads))
    if ref_run.param_grads:
        params = [judge(n, our_run.param_grads.get(n), g, truth_ours.param_grads.get(n), truth_ref.param_grads.get(n),
                        probe and probe["param_grads"].get(n))
                  for n, g in ref_run.param_grads.items() if g is not None or our_run.param_grads.get(n) is not None]
        typical = _typical_rms(params)
        result.append(_summarise("parameter gradients", _near_zero_floor(params, typical, ratio), typical))
    return result


def _torch_type_name(module):
    """The torch.nn class a converted layer stands for, e.g. "Conv2d"."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn"):
            return cls.__name__
    return type(module).__name__


# ---------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _load_factory(target):
    """"package.module:factory" or "path/to/file.py:factory" (attribute may be dotted) → the callable."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FACTORY (e.g. my_models:build_net), got {target!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise ImportError(f"no such file: {module_name}")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` does for the working directory
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    factory = functools.reduce(getattr, attr.split("."), module)
    if not callable(factory):
        raise TypeError(f"{target} is a {type(factory).__name__}, not a callable")
    return factory


def _parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(v < 0 for v in shape):
        raise ValueError(f"expected --input-shape as comma-separated sizes, e.g. 1,3,32,32, got {text!r}")
    return shape


def _move(obj, device, dtype):
    return _map_tensors(obj, lambda t: t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point())
                                            else None))


def add_parser(commands):
    p = commands.add_parser(
        "verify", help="check a model converted to our layers against the torch.nn original, layer by layer",
        description="Build a model from MODULE:FACTORY, convert a copy to torch_manualgrad's layers, run both "
                    "forward and backward on the same input, and judge every converted layer's output and "
                    "gradients, and the whole model's, against float64 runs, allowing ours RATIO times torch's "
                    "own float32 error. Lists the layers that could not be converted. Exit status 0 when "
                    "nothing is clearly worse than torch, 1 otherwise.",
    )
    p.add_argument("target", metavar="MODULE:FACTORY",
                   help="a callable returning a model, or (model, example_input); MODULE may be a dotted module "
                        "name (importable from the working directory) or a path to a .py file")
    p.add_argument("--input-shape", default=None, help="random example input of this shape, e.g. 1,3,32,32 "
                                                       "(required unless the factory returns an example input)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="cast the model and input to this dtype (default: as the factory made them)")
    p.add_argument("--device", type=_cli.device, default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--eval", action="store_true", help="put the model in eval mode first (default: as returned)")
    p.add_argument("--ratio", type=_cli.non_negative_float, default=DEFAULT_RATIO,
                   help=f"how many times torch's own error ours may reach (default {DEFAULT_RATIO:g})")
    p.add_argument("--rtol", type=_cli.non_negative_float, default=None, help="relative error always allowed (default: by dtype)")
    p.add_argument("--atol", type=_cli.non_negative_float, default=None, help="absolute rms error always allowed (default: by dtype)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random input, dropout and projections")
    p.add_argument("--everywhere", action="store_true",
                   help="run the converted model inside torch_manualgrad.everywhere(), so that F.conv2d/"
                        "F.max_pool2d calls and conv subclasses with their own forward compute with ours too")
    return p


def run(args):
    try:
        factory = _load_factory(args.target)
        shape = _parse_shape(args.input_shape) if args.input_shape else None
        device = torch.device(args.device)
    except Exception as exc:
        print(f"verify: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if not args.ratio > 0:
        print(f"verify: --ratio must be positive, got {args.ratio}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    made = factory()
    example = None
    if isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, example = made
    if not isinstance(made, torch.nn.Module):
        print(f"verify: {args.target} returned a {type(made).__name__}, expected a torch.nn.Module "
              "or (module, example_input)", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype] if args.dtype else None
    model = made.to(device=device, dtype=dtype) if dtype else made.to(device=device)
    if args.eval:
        model.eval()
    if shape is not None:
        input_dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        gen = torch.Generator().manual_seed(args.seed)
        example = torch.randn(shape, generator=gen, dtype=input_dtype).to(device)
    elif example is None:
        print(f"verify: {args.target} returned no example input: pass --input-shape", file=sys.stderr)
        return 2
    else:
        example = _move(example, device, dtype)
    result = verify(model, example, rtol=args.rtol, atol=args.atol, seed=args.seed, ratio=args.ratio,
                    everywhere=args.everywhere)
    print(result.report())
    return 0 if result.ok else 1
