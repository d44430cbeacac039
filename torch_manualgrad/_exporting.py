"""How our functions and layers behave while torch's exporters trace them: torch.onnx.export (both
exporters), torch.jit.trace and torch.jit.script. functional.py and nn.py ask here.

ONNX: a .onnx file can hold only ONNX's own operators, run by onnxruntime's kernels; our kernels cannot
travel in it. So while torch.onnx.export runs, the functions compute with torch's own conv and max-pool,
which both exporters already translate into standard Conv and MaxPool nodes, every argument included
(ceil_mode, dilation, 'same' padding, and return_indices, whose ONNX indices count over the whole tensor
where torch's count per plane: the translations convert them). Nothing is needed from the user.

torch.jit.trace: the trace must record the same thing with and without autograd (its sanity check
traces again under torch.no_grad), and only a registered op survives torch.jit.save; so while tracing, our
functions (functional.py) call the ops, torch.ops.manualgrad.*, on both paths, never our Python torch.autograd.Functions
(which a trace cannot keep). The ops carry their own autograd (autograd.py registers the Functions'
formulas on them), so the traced module back-propagates, after saving and loading too. The one exception is
the transposed convolution: it is our conv_backward op, whose bool[3] output_mask the tracer cannot record
("Tracing a list of bool type is currently not supported"), so while tracing conv_transpose1d/2d/3d compute with
torch's, as for ONNX; the traced module then runs torch's kernel for those layers.

torch.jit.script cannot compile our Python functions (they take ints, tuples or strings where TorchScript
wants one type); our layers refuse it up front, pointing to torch.export and torch.compile.
"""
import sys

import torch

_TORCH_EXPORT_HINT = ("TorchScript is deprecated in favour of torch.export: torch.export.export(model, args) "
                      "records our ops, and torch.compile compiles them with their gradients")


_ONNX_STATE = None  # (the dynamo exporter's _flags module, the TorchScript exporter's GLOBALS), once found


def exporting_to_onnx():
    """Whether torch.onnx.export (either exporter) is tracing the model now."""
    onnx = sys.modules.get("torch.onnx")  # never imported: no export can be running
    if onnx is None:
        return False
    # torch.onnx.is_in_onnx_export() reads the same two flags, but imports their modules on every call, which
    # cost 2-4 µs of each of our calls (every convolution and max-pool asks); torch versions that keep them
    # elsewhere, and Dynamo (which knows that function, not the flags' property), get its answer.
    if torch.compiler.is_compiling():
        return onnx.is_in_onnx_export()
    global _ONNX_STATE
    if _ONNX_STATE is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

            known = hasattr(_flags, "_is_onnx_exporting") and hasattr(GLOBALS, "in_onnx_export")
            _ONNX_STATE = (_flags, GLOBALS) if known else False
        except ImportError:
            _ONNX_STATE = False
    if _ONNX_STATE is False:
        return onnx.is_in_onnx_export()
    flags, state = _ONNX_STATE
    return bool(state.in_onnx_export or flags._is_onnx_exporting)


def refuse_script(module):
    """For our layers' __prepare_scriptable__, which torch.jit.script calls on every module first."""
    raise RuntimeError(
        f"torch.jit.script cannot compile torch_manualgrad's {type(module).__name__} (its computation is "
        f"Python that TorchScript cannot type). {_TORCH_EXPORT_HINT}; torch.jit.trace "
        f"records our ops for inference; or script torch_manualgrad.revert(model) to use torch's layers."
    )
