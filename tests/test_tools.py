"""Tools pointed at a converted model: torch.fx tracing (leaf and traced-through layers, feature extraction),
ONNX export by both of torch's exporters, run in onnxruntime, and torch.jit.trace / torch.jit.script."""
import io
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg
from torch_manualgrad.functional import max_pool2d as our_max_pool2d  # imported by name, as user code may

TORCHS = {torch.conv1d, torch.conv2d, F.max_pool1d, F.max_pool2d, F._max_pool2d, F.max_pool2d_with_indices,
          torch.max_pool2d, torch.max_pool1d}


class Net(torch.nn.Module):
    """Every argument our layers take, 1-d and 2-d, a padding mode, max-pool indices, and a call of our
    functional API in forward; returns the output, the indices and a 1-d branch."""

    def __init__(self):
        super().__init__()
        self.grouped = torch.nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=3)
        self.same = torch.nn.Conv2d(6, 4, 4, padding="same", bias=False)  # even kernel: one extra zero on the right
        self.reflect = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.valid = torch.nn.Conv2d(4, 4, 1, padding="valid")
        self.pool = torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True, return_indices=True)
        self.conv1d = torch.nn.Conv1d(4, 2, 3, padding=2, dilation=2, padding_mode="circular")
        self.pool1d = torch.nn.MaxPool1d(2, ceil_mode=True)

    def forward(self, x):
        y = torch.relu(self.valid(self.reflect(self.same(self.grouped(x)))))
        y, indices = self.pool(y)
        z = self.pool1d(self.conv1d(y.flatten(2)))
        return our_max_pool2d(y, 2, 1, dilation=2), indices, z


def _models():
    torch.manual_seed(0)
    reference = Net()
    converted = tmg.convert(Net())
    converted.load_state_dict(reference.state_dict())
    return reference, converted


def _input(requires_grad=False):
    return torch.randn(2, 3, 13, 11, generator=torch.Generator().manual_seed(1), requires_grad=requires_grad)


def _grads(model, x):
    out, _, z = model(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + z.square().sum()
    return torch.autograd.grad(loss, [x, *model.parameters()])


def _call_targets(graph_module):
    return [n.target for n in graph_module.graph.nodes if n.op == "call_function"]


# ------------------------------------------------------------------------------------------- torch.fx

def test_symbolic_trace_records_our_functions_and_computes_with_them():
    _, converted = _models()
    traced = torch.fx.symbolic_trace(converted)
    targets = _call_targets(traced)
    # fx's default tracer keeps torch.nn's own classes as call_module leaves and traces through the rest:
    # ours live in torch_manualgrad.nn, so each layer is one call of our function, its parameters get_attr
    assert targets.count(tmg.functional.conv2d) == 4 and targets.count(tmg.functional.conv1d) == 1
    assert targets.count(tmg.functional.max_pool2d) == 2 and targets.count(tmg.functional.max_pool1d) == 1
    assert not TORCHS & set(targets)
    modules = dict(traced.named_modules())
    assert not any(isinstance(modules[n.target], (torch.nn.Conv2d, torch.nn.MaxPool2d))
                   for n in traced.graph.nodes if n.op == "call_module")
    x = _input(requires_grad=True)
    for got, want in zip(traced(x), converted(x)):
        assert torch.equal(got, want)
    for got, want in zip(_grads(traced, x), _grads(converted, x)):
        assert torch.equal(got, want)
    with torch.profiler.profile() as prof:
        _grads(traced, x)
    names = {e.name for e in prof.events()}
    assert {"manualgrad::conv_forward", "manualgrad::conv_backward", "manualgrad::max_pool_backward"} <= names
    assert not names & {"aten::convolution", "aten::max_pool2d_with_indices"}


def test_a_function_calling_our_functional_api_traces():
    def block(x, w):
        return tmg.functional.max_pool1d(tmg.functional.conv1d(x, w, None, 1, "same"), 2, return_indices=True)[0]

    traced = torch.fx.symbolic_trace(block)
    assert _call_targets(traced)[:2] == [tmg.functional.conv1d, tmg.functional.max_pool1d]
    x, w = torch.randn(2, 3, 9), torch.randn(4, 3, 2)
    assert torch.equal(traced(x, w), block(x, w))


class LeafTracer(torch.fx.Tracer):
    """Keeps conv and max-pool layers, torch.nn's or subclasses, as call_module leaves (as torchvision's
    feature extraction does when given leaf_modules)."""

    def is_leaf_module(self, m, qualified_name):
        return isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.MaxPool1d, torch.nn.MaxPool2d)) or \
            super().is_leaf_module(m, qualified_name)


def test_a_tracer_may_keep_our_layers_as_leaves():
    _, converted = _models()
    graph = LeafTracer().trace(converted)
    traced = torch.fx.GraphModule(converted, graph)
    leaves = [n.target for n in graph.nodes if n.op == "call_module"]
    assert leaves[:4] == ["grouped", "same", "reflect", "valid"]
    assert type(traced.get_submodule("same")) is tmg.nn.Conv2d  # the leaf is our layer, and computes with ours
    assert _call_targets(traced).count(tmg.functional.max_pool2d) == 1  # the call written in forward
    x = _input()
    for got, want in zip(traced(x), converted(x)):
        assert torch.equal(got, want)


def test_feature_extraction_from_a_traced_converted_model():
    """What torchvision's create_feature_extractor does: trace, make intermediate nodes the outputs, drop
    the rest; the features are the converted layers' outputs, computed by ours, with gradients."""
    _, converted = _models()
    traced = torch.fx.symbolic_trace(converted)
    nodes = {n.name: n for n in traced.graph.nodes}
    wanted = [nodes["conv2d_1"], nodes["max_pool2d"]]  # the output of `same` and the pooled map
    for node in list(traced.graph.nodes):
        if node.op == "output":
            traced.graph.erase_node(node)
    traced.graph.output({"same": wanted[0], "pool": wanted[1]})
    traced.graph.eliminate_dead_code()
    traced.recompile()
    assert not any(n.target in (tmg.functional.conv1d, tmg.functional.max_pool1d) for n in traced.graph.nodes)

    seen = {}
    converted.same.register_forward_hook(lambda m, i, o: seen.__setitem__("same", o))
    converted.pool.register_forward_hook(lambda m, i, o: seen.__setitem__("pool", o))
    x = _input(requires_grad=True)
    converted(x)
    features = traced(x)
    assert torch.equal(features["same"], seen["same"])
    assert torch.equal(features["pool"][0], seen["pool"][0]) and torch.equal(features["pool"][1], seen["pool"][1])
    got = torch.autograd.grad(features["pool"][0].sum(), x)[0]
    want = torch.autograd.grad(seen["pool"][0].sum(), x)[0]
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------- ONNX

@pytest.fixture
def onnx():
    """onnx, onnxscript and onnxruntime are test dependencies (the Makefile installs them)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    return pytest.importorskip("onnx")


def _export(onnx, model, x, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        if dynamo:
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
        return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_our_export_flag_reads_torchs(dynamo, onnx):
    """_exporting.exporting_to_onnx reads torch's flags itself (torch.onnx.is_in_onnx_export imports two modules
    a call): it must give torch's answer before, during and after an export by either exporter."""
    from torch_manualgrad import _exporting

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((_exporting.exporting_to_onnx(), torch.onnx.is_in_onnx_export()))
            return x * 2

    assert seen == [] and not _exporting.exporting_to_onnx()
    _export(onnx, Probe(), torch.randn(2, 3), dynamo)
    assert seen and all(ours == torchs for ours, torchs in seen)
    assert any(torchs for _, torchs in seen)
    assert not _exporting.exporting_to_onnx() and not torch.onnx.is_in_onnx_export()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_gives_standard_nodes_that_onnxruntime_runs(dynamo, onnx):
    import onnxruntime

    _, converted = _models()
    converted.eval()
    x = _input()
    proto = _export(onnx, converted, x, dynamo)
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # standard operators only, no custom domain

    def attributes(op_type):
        return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                for n in proto.graph.node if n.op_type == op_type]

    convs, pools = attributes("Conv"), attributes("MaxPool")
    assert len(convs) == 5 and [c.get("group", 1) for c in convs] == [3, 1, 1, 1, 1]
    assert convs[0]["dilations"] == [1, 2] and convs[0]["strides"] == [2, 1] and convs[0]["pads"] == [1, 2, 1, 2]
    # the three max-pools, and one more of kernel 1 that gives each plane's offset in MaxPool's whole-tensor
    # indices, for the translation to turn them into torch's per-plane indices
    assert sorted(p["kernel_shape"] for p in pools) == [[1, 1], [2], [2, 2], [3, 3]]
    assert [p.get("ceil_mode", 0) for p in pools if p["kernel_shape"] == [3, 3]] == [1]
    onnx.checker.check_model(proto)

    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = converted(x)
    assert len(got) == 3
    torch.testing.assert_close(torch.from_numpy(got[0]), want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.from_numpy(got[1]), want[1])  # MaxPool's indices, converted to torch's per-plane ones
    torch.testing.assert_close(torch.from_numpy(got[2]), want[2], rtol=1e-5, atol=1e-5)
    # once the export is over, the model computes with ours again
    with torch.profiler.profile() as prof:
        converted(x)
    assert "manualgrad::conv_forward" in {e.name for e in prof.events()}


# ------------------------------------------------------------------------------------------ TorchScript

def quiet_jit(test):
    """Without torch's deprecation notices for TorchScript, and the tracer's note on the 'same' padding
    arithmetic (a constant of the weight's shape)."""
    test = pytest.mark.filterwarnings("ignore::DeprecationWarning")(test)
    return pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")(test)

def _has_own_autograd(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"manualgrad::{op}", "Autograd")


@quiet_jit
def test_jit_trace_for_inference_records_our_ops_and_saves():
    _, converted = _models()
    x = _input()
    with torch.no_grad():
        traced = torch.jit.trace(converted, x)  # check_trace=True: traced again, graphs and outputs compared
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert {"manualgrad::conv_forward", "manualgrad::max_pool_forward"} <= kinds
    assert not kinds & {"aten::_convolution", "aten::conv2d", "aten::max_pool2d", "prim::PythonOp"}
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for got, want in zip(loaded(x), converted(x)):
        assert torch.equal(got, want)


@quiet_jit
def test_jit_trace_with_gradients_keeps_them_through_save_and_load(tmp_path):
    """With gradients the trace records our ops too (their own autograd is the Functions' formulas), so the
    traced module, saved and loaded, back-propagates as the eager one."""
    _, converted = _models()
    x = _input(requires_grad=True)
    assert _has_own_autograd("conv_forward") and _has_own_autograd("max_pool_forward")
    traced = torch.jit.trace(converted, x)
    assert {"manualgrad::conv_forward", "manualgrad::max_pool_forward"} <= {n.kind() for n in traced.inlined_graph.nodes()}
    torch.jit.save(traced, tmp_path / "traced.pt")
    loaded = torch.jit.load(tmp_path / "traced.pt")
    want = _grads(converted, x)
    for model in (traced, loaded):
        for got, expected in zip(_grads(model, x), want):
            torch.testing.assert_close(got, expected)


@quiet_jit
def test_jit_script_is_refused_with_a_pointer_to_torch_export():
    _, converted = _models()
    for model in (converted, converted.same, tmg.nn.MaxPool1d(2)):
        with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile torch_manualgrad's .*torch.export"):
            torch.jit.script(model)
    scripted = torch.jit.script(tmg.revert(_models()[1]).same)  # torch's layers script as before
    x = torch.randn(1, 6, 5, 5)
    torch.testing.assert_close(scripted(x), tmg.convert(_models()[1]).same(x))
