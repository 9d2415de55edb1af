"""timm conformance: what timm's own ``tests/test_models.py`` asserts, for every model family, plus FX
feature extraction and the legacy (TorchScript-based) ONNX exporter. ``tests/test_timm_models.py`` runs
timm's file itself on the registered models.

timm's test -> ours: ``test_model_forward`` / ``test_model_backward`` -> :func:`test_forward_backward`;
``test_model_default_cfgs`` -> :func:`test_default_cfg` (every registered model) and
:func:`test_default_cfg_names_the_model` (on the meta device, with timm's factory keywords);
``test_model_forward_features`` -> :func:`test_features_only`; ``test_model_forward_torchscript`` ->
:func:`test_torchscript`; ``test_model_forward_fx`` / ``test_model_backward_fx`` -> :func:`test_fx`
(timm's own FX tracer set-up, and plain ``torch.fx.symbolic_trace``).

As timm asserts, with no tolerance and no exception: every parameter gets a gradient, in backward and in
FX backward (the pre-activation ResNet's input BatchNorm has no parameters); an FX graph's output is the
model's, bit for bit (``torch.equal``; timm's ``torch.all(fx_outputs == outputs)``). Beyond timm, the same
holds in training (outputs and BatchNorm statistics, bit for bit; the gradients, which the fused blend's
backward rounds differently from autograd's, to a tolerance) and for FX feature extraction. TorchScript and
ONNX run the MS-CAM branches unfolded (see :mod:`openaff.layers.tracing`), so they are compared with a
tolerance (timm compares nothing there). The families are built tiny (one block per stage, narrow widths)
with calibrated BatchNorm statistics, so that the comparisons see well-conditioned, non-trivial numbers.
"""

import copy
import io
import warnings

import numpy as np
import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

from openaff.catalog import list_openaff_models
from openaff.layers import AFF, IAFF
from openaff.layers.tracing import is_tracing

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|load)` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("quick_torchscript")]

TINY_IMAGENET = dict(layers=(1, 1, 1, 1))
TINY_SMALL = dict(width_mult=0.25)
# Every family: ImageNet ResNet-D / ResNeXt-D with AFF and iAFF, small-image pre-activation ResNet and
# ResNeXt with AFF, iAFF and plain addition, the same-layer (Inception-style) pre-activation ResNet.
FAMILIES = [
    ("aff_resnet50", TINY_IMAGENET),
    ("iaff_resnet50", TINY_IMAGENET),
    ("aff_resnext50_32x4d", TINY_IMAGENET),
    ("iaff_resnext50_32x4d", TINY_IMAGENET),
    ("aff_cifar_resnet8", TINY_SMALL),
    ("iaff_cifar_resnet8", TINY_SMALL),
    ("cifar_resnet8", TINY_SMALL),
    ("aff_cifar_resnext11_32x4d", TINY_SMALL),
    ("iaff_cifar_resnext11_32x4d", TINY_SMALL),
    ("cifar_resnext11_32x4d", TINY_SMALL),
    ("aff_cifar_inception_resnet8", TINY_SMALL),
    ("iaff_cifar_inception_resnet8", TINY_SMALL),
    ("cifar_inception_resnet8", TINY_SMALL),
]
IDS = [name for name, _ in FAMILIES]
# float32 agreement of a scripted / exported model with the eager one.
RTOL, ATOL = 1e-4, 1e-5




def _size(name: str) -> int:
    # The smallest inputs that keep every stage's map larger than 1x1.
    return 16 if "cifar" in name else 64


def _quick_size(name: str) -> int:
    # For the numerical comparisons: the ImageNet models' last stage at 1x1 (the fusions of stage 3
    # still see 2x2 maps), a quarter of the arithmetic.
    return 16 if "cifar" in name else 32


def _calibrate(model: nn.Module, in_chans: int, size: int) -> nn.Module:
    """Random BatchNorm affine parameters, running statistics measured on a batch of random images, eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # the running statistics become the calibration batch's
                if m.affine:  # not the input BN of the pre-activation ResNet, which has no parameters
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
        model.train()
        model(torch.randn(4, in_chans, size, size))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
                # The global branches see one value per image: keep their variance off zero.
                m.running_var.clamp_(min=0.1)
    return model.eval()


def _build(name: str, kwargs: dict, dtype: torch.dtype = torch.float32, in_chans: int = 3,
           size: int | None = None, **extra) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    size = size or _quick_size(name)
    model = _calibrate(timm.create_model(name, in_chans=in_chans, **kwargs, **extra), in_chans, size)
    return model.to(dtype), torch.randn(4, in_chans, size, size, dtype=dtype)


def _train_step(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(g)
    # Names as in the model itself (a feature-extractor wrapper adds "net.").
    return out.detach(), {n.removeprefix("net."): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _same_training(eager: nn.Module, others: list[nn.Module], x: torch.Tensor, rtol: float = RTOL,
                   atol: float = ATOL, grad_tol: float = 2e-2, exact: bool = False) -> None:
    """A training step of each of ``others`` (scripted or traced, each with its own copy of the
    weights) matches ``eager``'s: outputs, every trainable parameter's gradient, and the BatchNorm
    statistics it updates; with ``exact`` (FX graphs) outputs and statistics bit for bit.

    Gradients are compared by norm (``|a - b| <= grad_tol * |b|``, with a floor at a thousandth of
    the whole gradient's norm, for the convolution biases before a training BatchNorm, whose
    gradient is zero but for rounding). In float32 the bound is loose on purpose: a training
    BatchNorm over a few values per channel (the global branches see one per image) amplifies
    last-bit differences of the forward pass, so that for some inputs two roundings of the same
    network differ by up to ~1 % at the stem (eager against float64 does too). The float64 test
    holds the formulas to 1e-10.
    """
    g = torch.randn(x.shape[0], eager.num_classes, dtype=x.dtype)
    out, grads = _train_step(eager, x, g)
    floor = 1e-3 * torch.stack([grad.norm() for grad in grads.values()]).norm()
    for other in others:
        out_other, grads_other = _train_step(other, x, g)
        if exact:
            assert torch.equal(out_other, out)
        else:
            torch.testing.assert_close(out_other, out, rtol=rtol, atol=atol)
        assert grads_other.keys() == grads.keys()
        for n, grad in grads.items():
            assert grads_other[n] is not None, f"no gradient for {n}"
            assert (grads_other[n] - grad).norm() <= grad_tol * max(grad.norm(), floor), n
        buffers = {n.removeprefix("net."): b for n, b in other.named_buffers()}
        for n, b in eager.named_buffers():
            if exact:
                assert torch.equal(buffers[n], b), n
            else:
                torch.testing.assert_close(buffers[n], b, rtol=rtol, atol=atol, msg=n)


# --- timm's test_model_forward / test_model_backward ----------------------------------------------

def _no_gradient(model: nn.Module) -> list[str]:
    """timm's ``assert x.grad is not None, f'No gradient for {n}'`` over every parameter, and its count check."""
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing or sum(p.numel() for p in model.parameters()) == sum(p.grad.numel() for p in model.parameters())
    return missing


@pytest.mark.parametrize("name, kwargs", FAMILIES, ids=IDS)
def test_forward_backward(name, kwargs):
    model = timm.create_model(name, num_classes=42, **kwargs).eval()
    size = _size(name)
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 42) and not torch.isnan(out).any()
    model.train()
    out = model(torch.randn(2, 3, size, size))
    out.mean().backward()
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    assert not _no_gradient(model)


# --- timm's test_model_default_cfgs ---------------------------------------------------------------

@pytest.mark.parametrize("name", list_openaff_models())
def test_default_cfg(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    c, h, w = cfg["input_size"]
    assert c == 3 and h == w and len(cfg["mean"]) == len(cfg["std"]) == c
    assert 0 < cfg["crop_pct"] <= 1 and cfg["interpolation"] in ("bilinear", "bicubic")
    assert cfg["pool_size"] == ((h // 32, w // 32) if "cifar" not in name else (h // 4, w // 4))
    assert cfg["classifier"] == "fc"
    # The same-layer family's stem is a cell of two convolutions, both seeing the image.
    expected = ("conv1" if "cifar" in name else "conv1.0") if "inception" not in name \
        else ("conv1.conv_d1", "conv1.conv_d2")
    assert cfg["first_conv"] == expected


@pytest.mark.parametrize("name, kwargs", FAMILIES, ids=IDS)
def test_default_cfg_names_the_model(name, kwargs):
    # What timm's test checks against the model, for every family (the deeper members are the same
    # classes with the same names; test_default_cfg checks their configurations).
    with pytest.raises(TypeError):  # unknown arguments are refused, not ignored
        timm.create_model(name, device="meta", not_a_model_arg=1, **kwargs)
    # timm's factory keywords: every parameter and buffer made there, in that dtype (no device context).
    made = timm.create_model(name, device="meta", dtype=torch.float64, **kwargs)
    assert {(t.device.type, t.dtype) for t in [*made.parameters(), *made.buffers()] if t.is_floating_point()} \
        == {("meta", torch.float64)}
    with torch.device("meta"):  # shapes only, at the configuration's full input size
        model = timm.create_model(name, **kwargs).eval()
        cfg = model.pretrained_cfg
        assert cfg["num_classes"] == model.num_classes
        state = model.state_dict()
        # The classifier name points at the head, first_conv at the convolution that sees the image.
        assert cfg["classifier"] + ".weight" in state
        assert model.get_classifier() is model.get_submodule(cfg["classifier"])
        for conv in (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]:
            assert conv + ".weight" in state
            first = model.get_submodule(conv)
            assert isinstance(first, nn.Conv2d) and first.in_channels == cfg["input_size"][0]
        x = torch.empty(1, *cfg["input_size"])
        assert model.forward_features(x).shape[-2:] == cfg["pool_size"]
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, "")
        assert model(x).shape[-2:] == cfg["pool_size"]


# --- timm's test_model_forward_features -----------------------------------------------------------

@pytest.mark.parametrize("name, kwargs", FAMILIES, ids=IDS)
def test_features_only(name, kwargs):
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    size = _size(name)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, size, size))
    info = model.feature_info
    assert len(info.channels()) >= 4 and len(outs) == len(info.channels())
    assert [o.shape[1] for o in outs] == info.channels()
    assert [size // o.shape[-1] for o in outs] == info.reduction()
    assert not any(torch.isnan(o).any() for o in outs)


# --- timm's test_model_forward_torchscript (and backward through the scripted model) --------------

@pytest.mark.parametrize("name, kwargs", FAMILIES, ids=IDS)
def test_torchscript(name, kwargs):
    with timm.set_scriptable(True):
        model, x = _build(name, kwargs)
    eager = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    # The fused blend is an autograd Function (a Python op TorchScript cannot save); none is left.
    assert "prim::PythonOp" not in str(scripted.inlined_graph)
    with torch.no_grad():
        want = eager(x)
        torch.testing.assert_close(scripted(x), want, rtol=RTOL, atol=ATOL)
        if name == IDS[-1]:  # once: the scripted model saves and loads (nothing of Python left in it)
            buf = io.BytesIO()
            torch.jit.save(scripted, buf)
            buf.seek(0)
            torch.testing.assert_close(torch.jit.load(buf)(x), want, rtol=RTOL, atol=ATOL)
    _same_training(eager, [scripted], x)


# --- timm's test_model_forward_fx / test_model_backward_fx ----------------------------------------

def _timm_fx_model(model: nn.Module) -> nn.Module:
    """timm's test helper ``_create_fx_model(model, train=True)``: torchvision's feature extractor with
    timm's tracer set-up, returning the graph's output in evaluation mode and, in training mode, the
    nodes the output is made of (both graphs are traced; one module serves both modes)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    graph = NodePathTracer(**tracer_kwargs).trace(model)
    graph_nodes = list(reversed(graph.nodes))
    output_names = [n.name for n in graph_nodes[0]._input_nodes]
    node_names = [n.name for n in graph_nodes]
    train_return = [train_nodes[-node_names.index(n)] for n in output_names]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


class _FirstOutput(nn.Module):
    """The single output of a feature extractor's dict, so it trains like the model."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net, self.num_classes = net, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.net(x).values()
        return out


@pytest.mark.parametrize("name, kwargs", FAMILIES, ids=IDS)
def test_fx(name, kwargs):
    model, x = _build(name, kwargs)
    timm_fx = _FirstOutput(_timm_fx_model(copy.deepcopy(model)), model.num_classes).eval()
    # Plain symbolic_trace, traced once in eval mode: the graph follows train()/eval() like the model.
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    # The MS-CAM branches are leaves: the graph runs their on-the-fly BatchNorm folding as eager does.
    leaves = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert any(t.endswith(".local_att") for t in leaves) or "aff" not in name
    with torch.inference_mode():  # timm's test_model_forward_fx
        want = model(x)
        for other in (timm_fx, traced):
            assert torch.equal(other(x), want)
    # timm's test_model_backward_fx (every parameter a gradient) and, beyond it, training bit for bit.
    _same_training(copy.deepcopy(model), [timm_fx, traced], x, grad_tol=1e-3, exact=True)
    assert not _no_gradient(traced)
    # Batch of one in training mode: the MS-CAM BatchNorms test the batch size when the graph runs.
    size = _size(name)  # a map larger than 1x1 everywhere: the backbone's own BatchNorms need it
    traced.train()(torch.randn(1, 3, size, size)).sum().backward()


@pytest.mark.parametrize("name, kwargs", [("aff_cifar_resnet8", TINY_SMALL), ("iaff_resnext50_32x4d", TINY_IMAGENET),
                                          ("iaff_cifar_inception_resnet8", TINY_SMALL)])
def test_formulas_match_fast_path_in_float64(name, kwargs):
    # Scripted models compute the formulas with the branches unfolded; in float64 they agree with the eager
    # fast path to rounding, in evaluation and in training (outputs, gradients, statistics). FX graphs give its
    # bits (gradients: to rounding).
    model, x = _build(name, kwargs, dtype=torch.float64)
    scripted = torch.jit.script(copy.deepcopy(model))
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(scripted(x), want, rtol=1e-11, atol=1e-12)
        assert torch.equal(traced(x), want)
    _same_training(copy.deepcopy(model), [scripted], x, rtol=1e-10, atol=1e-12, grad_tol=1e-10)
    _same_training(model, [traced], x, grad_tol=1e-10, exact=True)


# --- FX feature extraction ------------------------------------------------------------------------

def _return_nodes(model: nn.Module) -> dict[str, str]:
    """The last feature map and, where there is one, the last MS-CAM's attention weight: a node of
    its own in the traced graph (``<fusion>.sigmoid``; ``sigmoid_1`` for iAFF's second MS-CAM)."""
    nodes = {model.feature_info[-1]["module"]: "features"}
    fusions = [(n, m) for n, m in model.named_modules() if isinstance(m, (AFF, IAFF))]
    if fusions:
        name, fusion = fusions[-1]
        nodes[f"{name}.sigmoid{'_1' if isinstance(fusion, IAFF) else ''}"] = "attention"
    return nodes


def _check_extractor(model: nn.Module, net: nn.Module, x: torch.Tensor) -> None:
    for training in (False, True):  # the extractors trace a graph for each mode
        model.train(training)
        net.train(training)
        with torch.no_grad():
            want = model.forward_features(x)
            out = net(x)
        assert torch.equal(out["features"], want)
        if "attention" in out:
            att = out["attention"]  # the last block's, at the resolution of the last feature map
            assert att.shape == want.shape and 0 <= att.min() < att.max() <= 1


@pytest.mark.parametrize("name, kwargs", FAMILIES, ids=IDS)
def test_fx_feature_extraction(name, kwargs):
    size = _size(name)
    x = torch.randn(2, 3, size, size)
    torch.manual_seed(1)
    fx_net = timm.create_model(name, features_only=True, feature_cls="fx", **kwargs).eval()
    torch.manual_seed(1)
    list_net = timm.create_model(name, features_only=True, **kwargs).eval()
    with torch.no_grad():
        got, want = fx_net(x), list_net(x)
    assert [o.shape[1] for o in got] == fx_net.feature_info.channels()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    model, x = _build(name, kwargs)
    _check_extractor(model, timm.models.create_feature_extractor(copy.deepcopy(model), _return_nodes(model)), x)


@pytest.mark.parametrize("name, kwargs", [("iaff_resnet50", TINY_IMAGENET), ("aff_cifar_resnext11_32x4d", TINY_SMALL),
                                          ("aff_cifar_inception_resnet8", TINY_SMALL)])
def test_torchvision_feature_extraction(name, kwargs):
    # Without timm's tracer settings: every module that is not PyTorch's own is traced through.
    model, x = _build(name, kwargs)
    _check_extractor(model, create_feature_extractor(copy.deepcopy(model), _return_nodes(model)), x)


# --- legacy ONNX export ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs", FAMILIES, ids=IDS)
def test_legacy_onnx_export(name, kwargs, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    # Odd maps before a strided stage (72: 9 -> 5 -> 3; 30: 15 -> 8) send the ceil-mode shortcut pools
    # through; grey images for the small-image models.
    in_chans, size = (1, 30) if "cifar" in name else (3, 72)
    model, x = _build(name, kwargs, in_chans=in_chans, size=size)
    x = x[:2]
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    tracer_warnings = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not tracer_warnings, tracer_warnings  # nothing was frozen into the graph from the example input
    assert {n.domain for n in onnx.load(path).graph.node} <= {""}  # standard ONNX operators only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, in_chans, size, size)  # another batch size than the export's
    with torch.no_grad():
        want = model(x3)
    (got,) = session.run(None, {"images": x3.numpy()})
    assert want.std() > 0.1  # non-trivial outputs, so that the bound means something
    assert np.abs(got - want.numpy()).max() < 1e-4


# --- a full registered model ----------------------------------------------------------------------

def test_full_imagenet_model_scripts_and_traces():
    model, x = _build("iaff_resnet50", {}, size=64)
    x = x[:1]
    with torch.no_grad():
        want = model(x)
        # Sixteen blocks of float32 rounding, compared as a whole: 2e-5 measured (eager against float64: 4e-4).
        assert (torch.jit.script(copy.deepcopy(model))(x) - want).norm() < 1e-4 * want.norm()
        assert torch.equal(torch.fx.symbolic_trace(copy.deepcopy(model))(x), want)


# --- the fast paths stay where they were ------------------------------------------------------------

def test_eager_and_export_keep_the_fast_path(monkeypatch):
    # torch.compile(fullgraph=True) of the fast path: tests/test_fused_ops.py.
    model, x = _build("iaff_cifar_resnet8", TINY_SMALL)
    with torch.no_grad():
        want = model(x)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))  # before formula is broken below
    assert not is_tracing()

    def broken(*args):
        raise AssertionError("formula path taken")

    for cls in (AFF, IAFF):
        monkeypatch.setattr(cls, "formula", broken)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    model(x).sum().backward()  # evaluation with gradients
    copy.deepcopy(model).train()(x).sum().backward()  # training
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), want, rtol=RTOL, atol=ATOL)
    # The traced graph holds the formula's ops around the branches' leaf calls, not calls back into the fusions.
    with torch.no_grad():
        assert torch.equal(traced(x), want)
