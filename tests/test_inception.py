"""The same-layer (Inception-style) family: structure, one cell by hand, exact sizes, every fusion type,
timm's API, scripting, FX and bad arguments (AFF.md §3 and §4b, "Same layer")."""

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from _layer_utils import check_timm_head, randomize
from test_timm_conformance import ATOL, RTOL, _build, _FirstOutput, _same_training, _timm_fx_model
from torch import nn

from openaff.catalog import model_info
from openaff.layers import create_fusion, fusion_names, register_fusion
from openaff.layers.fusion import _FUSIONS as fusion_registry
from openaff.models.aff_inception import DilatedPairCell, InceptionPreActBlock

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|load)` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("quick_torchscript")]

NAMES = [f"{p}cifar_inception_resnet{d}" for p in ("", "aff_", "iaff_") for d in (8, 14, 20, 26)]
TINY = dict(width_mult=0.25)




def _same_layer(name: str, channels: int, r: int = 4) -> nn.Module:
    return create_fusion(name, channels, r, scenario="same-layer")


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _cells(model: nn.Module) -> list[tuple[str, DilatedPairCell]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DilatedPairCell)]


# --- names and structure --------------------------------------------------------------------------

def test_registered_names():
    assert sorted(timm.list_models("*cifar_inception_resnet*")) == sorted(NAMES)
    for name in NAMES:
        depth = int(name.rsplit("resnet", 1)[1])
        fusion = name.split("_cifar")[0] if name.startswith(("aff_", "iaff_")) else "add"
        with torch.device("meta"):
            model = timm.create_model(name)
        assert len(model.layer1) == len(model.layer2) == len(model.layer3) == (depth - 2) // 6
        assert type(model.conv1.fusion) is type(_same_layer(fusion, 8))
        assert model.num_classes == 100 and model.pretrained_cfg["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("fusion", ["add", "aff", "iaff"])
@pytest.mark.parametrize("b", [1, 2])
def test_every_3x3_conv_is_a_dilated_pair(fusion, b):
    with torch.device("meta"):
        model = timm.create_model("cifar_inception_resnet8", fusion=fusion, b=b, width_mult=0.25, in_chans=1)
    cells = _cells(model)
    # The stem and two per block: 1 + 2·3·b fusions, all of the requested type, one per cell.
    assert len(cells) == 1 + 6 * b
    want = type(_same_layer(fusion, 8))
    fusions = [m for m in model.modules() if isinstance(m, want)]
    assert len(fusions) == 1 + 6 * b and all(any(c.fusion is f for _, c in cells) for f in fusions)
    assert cells[0][0] == "conv1" and cells[0][1].conv_d1.in_channels == cells[0][1].conv_d2.in_channels == 1
    in_cells = set()
    for name, cell in cells:
        d1, d2 = cell.conv_d1, cell.conv_d2
        assert (d1.kernel_size, d1.dilation, d1.padding) == ((3, 3), (1, 1), (1, 1))
        assert (d2.kernel_size, d2.dilation, d2.padding) == ((3, 3), (2, 2), (2, 2))
        assert d1.stride == d2.stride and d1.bias is not None and d2.bias is not None
        assert (d1.in_channels, d1.out_channels) == (d2.in_channels, d2.out_channels)
        assert d1.stride == ((2, 2) if name in ("layer2.0.conv1", "layer3.0.conv1") else (1, 1))
        # Each branch: conv -> BN (none for add), no ReLU anywhere in the cell.
        assert set(dict(cell.named_children())) == {"conv_d1", "conv_d2", "bn_d1", "bn_d2", "fusion"}
        bn = nn.Identity if fusion == "add" else nn.BatchNorm2d
        assert type(cell.bn_d1) is bn and type(cell.bn_d2) is bn
        in_cells |= {d1, d2}
    # No other 3x3 conv anywhere; the shortcuts are AvgPool -> Conv1x1 without BN.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == len(in_cells) == 2 * len(cells)
    for stage in ("layer2", "layer3"):
        pool, conv = getattr(model, stage)[0].downsample
        assert isinstance(pool, nn.AvgPool2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert model.layer1[0].downsample is None


def _bn_eval(t: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return ((t - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def _single_layer_attention(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``sigmoid(L1(z) + G1(z))`` from an MS-CAM's weights: ``L1`` = Conv1x1(C->C, bias) -> BN, ``G1`` = GAP -> L1."""
    (conv_l, bn_l), (_, conv_g, bn_g) = m.local_att, m.global_att
    local = _bn_eval(F.conv2d(z, conv_l.weight, conv_l.bias), bn_l)
    glob = _bn_eval(F.conv2d(z.mean((2, 3), keepdim=True), conv_g.weight, conv_g.bias), bn_g)
    return torch.sigmoid(local + glob)


def _hand_fusion(fusion: nn.Module, big: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """AFF.md §4b's same-layer AFF / iAFF of ``Y = big`` (dilated) and ``X = small``, from the module's weights."""
    if hasattr(fusion, "mscam"):  # AFF: X·w + Y·(1 − w), no factor 2
        w = _single_layer_attention(fusion.mscam, small + big)
        return small * w + big * (1 - w)
    w1 = _single_layer_attention(fusion.mscam1, small + big)  # iAFF: two such stages
    z = small * w1 + big * (1 - w1)
    w2 = _single_layer_attention(fusion.mscam2, z)
    return small * w2 + big * (1 - w2)


@pytest.mark.parametrize("fusion", ["add", "aff", "iaff"])
def test_one_cell_by_hand_in_float64(fusion):
    # A strided cell at an odd size (7 -> 4): padding = dilation keeps both branches the same size.
    model = timm.create_model("cifar_inception_resnet8", fusion=fusion, width_mult=0.25).double().eval()
    cell = model.layer2[0].conv1
    randomize(cell)
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    near = F.conv2d(x, cell.conv_d1.weight, cell.conv_d1.bias, stride=2, padding=1, dilation=1)  # X
    wide = F.conv2d(x, cell.conv_d2.weight, cell.conv_d2.bias, stride=2, padding=2, dilation=2)  # Y
    assert near.shape == wide.shape == (2, 32, 4, 4)
    if fusion == "add":
        want = near + wide  # the authors' same-layer Add has no branch BatchNorms
    else:
        near, wide = _bn_eval(near, cell.bn_d1), _bn_eval(wide, cell.bn_d2)
        want = _hand_fusion(cell.fusion, wide, near)
        # Which input is Y matters: exchanged, the same weights give another cell.
        assert (_hand_fusion(cell.fusion, near, wide) - want).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(cell(x), want, rtol=1e-12, atol=1e-12)


def test_block_residual_is_a_plain_add():
    model = timm.create_model("aff_cifar_inception_resnet8", width_mult=0.25).double().eval()
    block = model.layer2[0]
    assert isinstance(block, InceptionPreActBlock) and not hasattr(block, "fusion")
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        branch = block.conv2(torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(x))))))
        torch.testing.assert_close(block(x), branch + block.downsample(x), rtol=1e-12, atol=1e-12)


def test_dropped_block_is_the_shortcut():
    model = timm.create_model("aff_cifar_inception_resnet8", width_mult=0.25, drop_path_rate=1.0).train()
    block = model.layer3[0]  # the last block: the full rate
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(block(x), block.downsample(x))


# --- sizes ----------------------------------------------------------------------------------------

def _cell_params(cin: int, cout: int, fusion: str) -> int:
    convs = 2 * (9 * cin * cout + cout)  # two 3x3 convs with bias
    bns = 0 if fusion == "add" else 2 * 2 * cout
    return convs + bns + _fusion_params(fusion, cout)


def _fusion_params(fusion: str, c: int) -> int:
    # Same-layer AFF: one single-layer attention, L1 and G1 each Conv1x1(C->C, bias) -> BN; no r.
    attention = 2 * (c * c + c + 2 * c)
    return {"add": 0, "aff": attention, "iaff": 2 * attention}[fusion]


@pytest.mark.parametrize("fusion", ["add", "aff", "iaff"])
def test_parameter_count_by_hand(fusion):
    # b = 1, width 0.25: widths 16/32/64, RGB, 100 classes; the frozen input BN is not counted.
    bn = lambda c: 2 * c  # noqa: E731
    stem = _cell_params(3, 16, fusion)
    stage1 = bn(16) + _cell_params(16, 16, fusion) + bn(16) + _cell_params(16, 16, fusion)
    stage2 = bn(16) + _cell_params(16, 32, fusion) + bn(32) + _cell_params(32, 32, fusion) + 16 * 32
    stage3 = bn(32) + _cell_params(32, 64, fusion) + bn(64) + _cell_params(64, 64, fusion) + 32 * 64
    head = bn(64) + 64 * 100 + 100
    with torch.device("meta"):
        model = timm.create_model("cifar_inception_resnet8", fusion=fusion, width_mult=0.25)
    assert _trainable(model) == stem + stage1 + stage2 + stage3 + head
    assert model_info("cifar_inception_resnet8", fusion=fusion, width_mult=0.25).params == _trainable(model)


def test_model_info_multiply_adds_by_hand():
    # Plain addition, b = 1, width 0.25 at 32x32: the 3x3 pairs, the two shortcuts and the classifier.
    def pair(cin, cout, hw):
        return 2 * hw * hw * 9 * cin * cout

    macs = (pair(3, 16, 32) + 2 * pair(16, 16, 32) + pair(16, 32, 16) + pair(32, 32, 16) + 16 * 16 * 16 * 32
            + pair(32, 64, 8) + pair(64, 64, 8) + 8 * 8 * 32 * 64 + 64 * 100)
    info = model_info("cifar_inception_resnet8", width_mult=0.25)
    assert info.gmacs == pytest.approx(macs / 1e9, rel=1e-12) and info.input_size == (3, 32, 32)


# --- every fusion type ----------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", fusion_names())
def test_every_fusion_type_trains(fusion):
    model = timm.create_model("cifar_inception_resnet8", fusion=fusion, width_mult=0.25, num_classes=7).train()
    assert all(type(c.fusion) is type(_same_layer(fusion, 8)) for _, c in _cells(model))
    x = torch.randn(2, 3, 16, 16).requires_grad_()
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    # Every weight learns (a bias right before a training BatchNorm has a zero gradient by design).
    still = [n for n, p in model.named_parameters() if n.endswith("weight") and p.requires_grad and not p.grad.any()]
    assert not still, f"zero gradient for {still}"
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        a, b = model(x[:1]), model(x)[:1]  # evaluation: an image's logits do not depend on the batch
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_users_fusion_without_scenarios_is_used_as_it_is():
    @register_fusion("test_inception_max")
    class MaxFusion(nn.Module):
        def __init__(self, channels: int, r: int = 4) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.maximum(x, y)

    try:
        model = timm.create_model("cifar_inception_resnet8", fusion="test_inception_max", **TINY).eval()
        assert all(isinstance(c.fusion, MaxFusion) for _, c in _cells(model))
        cell, x = model.layer1[0].conv2, torch.randn(2, 16, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(cell(x), torch.maximum(cell.bn_d2(cell.conv_d2(x)), cell.bn_d1(cell.conv_d1(x))))
    finally:
        fusion_registry.pop("test_inception_max")  # other tests list the registered types


# --- timm's API -----------------------------------------------------------------------------------

@pytest.mark.parametrize("in_chans, size", [(3, 32), (1, 28), (3, 64)])
def test_features_only(in_chans, size):
    feats = timm.create_model("iaff_cifar_inception_resnet8", features_only=True, in_chans=in_chans, **TINY).eval()
    assert feats.feature_info.channels() == [16, 16, 32, 64]
    assert feats.feature_info.reduction() == [1, 1, 2, 4]
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        outs = feats(x)
    assert [o.shape[1] for o in outs] == feats.feature_info.channels()
    assert [o.shape[-1] for o in outs] == [-(-size // r) for r in feats.feature_info.reduction()]
    picked = timm.create_model("iaff_cifar_inception_resnet8", features_only=True, out_indices=(1, 3),
                               in_chans=in_chans, **TINY)
    assert picked.feature_info.channels() == [16, 64]


def test_timm_api():
    model = timm.create_model("aff_cifar_inception_resnet14", in_chans=1, num_classes=10, **TINY)
    x = torch.randn(2, 1, 28, 28)
    check_timm_head(model, x, (2, 64, 7, 7), 10)
    assert model.group_matcher()["stem"] == r"^input_norm|conv1"
    # Gradient checkpointing: the same step, the same gradients.
    model.train()
    plain = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    for m in (model, plain):
        torch.manual_seed(1)
        m(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["pool_size"] == (8, 8) and cfg["classifier"] == "fc"
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["crop_pct"] == 1.0


def test_first_convs_are_both_stem_branches():
    # Both stem convolutions see the image: the configuration names both (timm's first_conv may be a tuple).
    model = timm.create_model("aff_cifar_inception_resnet8", **TINY)
    first = model.pretrained_cfg["first_conv"]
    assert first == ("conv1.conv_d1", "conv1.conv_d2")
    state = model.state_dict()
    for name in first:
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d) and conv.in_channels == 3 and name + ".weight" in state
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3} == set(first)


def test_channels_last_matches_contiguous():
    model = timm.create_model("iaff_cifar_inception_resnet8", **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_batch_of_one_trains():
    model = timm.create_model("iaff_cifar_inception_resnet8", **TINY).train()
    model(torch.randn(1, 3, 16, 16)).sum().backward()
    assert model.conv1.conv_d2.weight.grad is not None


# --- scripting and tracing ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar_inception_resnet8", "aff_cifar_inception_resnet8",
                                  "iaff_cifar_inception_resnet8"])
def test_torchscript_and_fx(name):
    with timm.set_scriptable(True):
        model, x = _build(name, TINY)
    scripted = torch.jit.script(copy.deepcopy(model))
    assert "prim::PythonOp" not in str(scripted.inlined_graph)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    timm_fx = _FirstOutput(_timm_fx_model(copy.deepcopy(model)), model.num_classes).eval()
    with torch.no_grad():
        want = model(x)
        for other in (scripted, traced, timm_fx):
            torch.testing.assert_close(other(x), want, rtol=RTOL, atol=ATOL)
    _same_training(copy.deepcopy(model), [scripted, traced, timm_fx], x)


def test_fx_feature_extraction():
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    fx_net = timm.create_model("aff_cifar_inception_resnet8", features_only=True, feature_cls="fx", **TINY).eval()
    torch.manual_seed(1)
    list_net = timm.create_model("aff_cifar_inception_resnet8", features_only=True, **TINY).eval()
    with torch.no_grad():
        got, want = fx_net(x), list_net(x)
    assert [o.shape[1] for o in got] == fx_net.feature_info.channels() == [16, 16, 32, 64]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_legacy_onnx_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    # Grey 30x30 images: 15 -> 8 sends the ceil-mode shortcut pool and the strided cells through odd maps.
    model, x = _build("aff_cifar_inception_resnet8", TINY, in_chans=1, size=30)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(model, (x[:2],), path, dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    tracer_warnings = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not tracer_warnings, tracer_warnings  # nothing frozen into the graph from the example input
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(x)
    (got,) = session.run(None, {"images": x.numpy()})
    assert want.std() > 0.1
    assert abs(got - want.numpy()).max() < 1e-4


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(b=0), ValueError, r"b \(blocks per stage\) must be an integer >= 1, got 0"),
    (dict(b=1.5), ValueError, r"b \(blocks per stage\) must be an integer >= 1, got 1.5"),
    (dict(width_mult=0), ValueError, "width_mult must be a number > 0, got 0"),
    (dict(width_mult="wide"), ValueError, "width_mult must be a number > 0, got 'wide'"),
    (dict(r=0), ValueError, r"r \(attention channel reduction\) must be an integer >= 1, got 0"),
    (dict(in_chans=0), ValueError, "in_chans must be an integer >= 1, got 0"),
    (dict(num_classes=-1), ValueError, "num_classes must be an integer >= 0, got -1"),
    (dict(fusion="nope"), ValueError, "unknown fusion type 'nope'; choose one of .*aff"),
    (dict(fusion_stages=(1,)), TypeError, "unexpected keyword argument 'fusion_stages'"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        timm.create_model("aff_cifar_inception_resnet8", **kwargs)
    assert "\n" not in str(info.value)


def test_bad_input_is_named():
    model = timm.create_model("aff_cifar_inception_resnet8", **TINY)
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("aff_cifar_inception_resnet32")
