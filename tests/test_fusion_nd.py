"""1-D and 3-D fusion (issue 21): every fusion type and MSCAM with ``dims=1`` / ``dims=3`` against the written-out
formulas of test_fusion (through the 2-D equivalent input: every op is pointwise or global over the positions);
FX graphs of every type give the eager bits, and every type exports to ONNX (onnxruntime gives its outputs)."""

import copy

import numpy as np
import pytest
import torch
from _nd_utils import as_2d_input, as_2d_state, randomize_nd
from test_fusion import CASE_IDS, CASES, assert_fx_is_eager, reference, reference_mscam

from openaff.layers import (
    MSCAM,
    ContextBatchNorm1d,
    ContextBatchNorm2d,
    ContextBatchNorm3d,
    create_fusion,
    register_fusion,
)
from openaff.layers.fusion import _FUSIONS

SHAPES = {1: (3, 8, 7), 3: (3, 8, 3, 2, 4)}


def _pair(name, options, dims, training):
    m = create_fusion(name, 8, r=2, dims=dims, **options).double().train(training)
    randomize_nd(m)
    flat = create_fusion(name, 8, r=2, **options).double().train(training)
    flat.load_state_dict(as_2d_state(m))
    return m, flat


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_every_type_in_1d_and_3d_is_the_formula(name, options, dims, training):
    m, flat = _pair(name, options, dims, training)
    x = torch.randn(*SHAPES[dims], dtype=torch.float64)
    y = torch.randn(*SHAPES[dims], dtype=torch.float64)
    out = m(x, y)
    assert out.shape == x.shape
    want = reference(name, flat, as_2d_input(x), as_2d_input(y), training, **options)
    torch.testing.assert_close(as_2d_input(out), want, rtol=1e-12, atol=1e-12)
    if training:  # the same BatchNorm updates as the 2-D module on the same values
        flat(as_2d_input(x), as_2d_input(y))
        for (k, a), b in zip(m.state_dict().items(), as_2d_state(flat).values(), strict=True):
            torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_fast_path_is_the_formula_path_in_1d_and_3d(name, options, dims):
    # Evaluation without autograd folds the BatchNorms on the fly (1x1 convolutions of any rank); with autograd,
    # the fused blend; both against the written-out `formula` (what FX and TorchScript compute).
    m, _ = _pair(name, options, dims, False)
    if not hasattr(m, "formula"):
        return  # add and concat have one path
    x = torch.randn(*SHAPES[dims], dtype=torch.float64, requires_grad=True)
    y = torch.randn(*SHAPES[dims], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x, y), m.formula(x, y), rtol=1e-12, atol=1e-12)
    for training in (False, True):
        fast, plain = copy.deepcopy(m).train(training), copy.deepcopy(m).train(training)
        out, want = fast(x, y), plain.formula(x, y)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, [x, *fast.parameters()], g),
                        torch.autograd.grad(want, [x, *plain.parameters()], g), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 3])
def test_mscam_in_1d_and_3d(dims):
    m = MSCAM(16, 4, dims=dims).double()
    randomize_nd(m)
    flat = MSCAM(16, 4).double()
    flat.load_state_dict(as_2d_state(m))
    conv, norm = {1: (torch.nn.Conv1d, ContextBatchNorm1d), 3: (torch.nn.Conv3d, ContextBatchNorm3d)}[dims]
    assert type(m.local_att[0]) is conv and type(m.local_att[1]) is norm and type(m.global_att[2]) is norm
    assert [k for k in m.state_dict()] == [k for k in flat.state_dict()]  # the same weight names in every rank
    x = torch.randn(2, 16, *SHAPES[dims][2:], dtype=torch.float64)
    for training in (False, True):
        m.train(training)
        torch.testing.assert_close(as_2d_input(m(x)), reference_mscam(flat, as_2d_input(x), training),
                                   rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        m.eval()
        torch.testing.assert_close(m(x), m.formula(x), rtol=1e-12, atol=1e-12)
    # out_channels: a wider attention (the k-input soft selection's), the same layers otherwise.
    wide = MSCAM(16, 4, dims=dims, out_channels=32)
    assert wide(x.float()).shape == (2, 32, *x.shape[2:]) and wide.local_att[0].out_channels == 4


@pytest.mark.parametrize("size", [3, 1])
@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_batch_of_one_trains_in_1d_and_3d(name, options, dims, size):
    m = create_fusion(name, 8, r=2, dims=dims, **options).train()
    shape = (1, 8) + (size,) * dims
    x, y = torch.randn(*shape, requires_grad=True), torch.randn(*shape)
    out = m(x, y)
    out.sum().backward()
    assert torch.isfinite(out).all() and x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cls, ref, shape", [(ContextBatchNorm1d, torch.nn.BatchNorm1d, (3, 4, 5)),
                                             (ContextBatchNorm1d, torch.nn.BatchNorm1d, (3, 4)),
                                             (ContextBatchNorm3d, torch.nn.BatchNorm3d, (2, 4, 2, 1, 3))])
def test_context_batchnorm_other_ranks(cls, ref, shape):
    ours, theirs = cls(4).double(), ref(4).double()
    randomize_nd(ours)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-13, atol=1e-13)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    # One value per channel: the running statistics, left unchanged (PyTorch's layer raises here).
    one = torch.randn(1, 4, *([1] * (len(shape) - 2)), dtype=torch.float64, requires_grad=True)
    before = ours.running_mean.clone()
    out = ours(one)
    view = (1, -1) + (1,) * (len(shape) - 2)
    want = (one - ours.running_mean.view(view)) / torch.sqrt(ours.running_var.view(view) + ours.eps) \
        * ours.weight.view(view) + ours.bias.view(view)
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)
    out.sum().backward()
    assert one.grad is not None and torch.equal(ours.running_mean, before)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        theirs(one)
    assert issubclass(ContextBatchNorm2d, torch.nn.BatchNorm2d) and issubclass(cls, ref)


def test_rank_errors_name_what_to_use():
    m = create_fusion("aff", 64, 4)
    with pytest.raises(ValueError, match=r"fusion expects B x 64 x H x W inputs, got \(2, 64, 10\); build it with "
                                         r"create_fusion\(\.\.\., dims=1\)"):
        m(torch.randn(2, 64, 10), torch.randn(2, 64, 10))
    with pytest.raises(ValueError, match=r"fusion expects B x 64 x D x H x W inputs, got \(2, 64, 3, 3\); .*dims=2"):
        create_fusion("iaff", 64, 4, dims=3)(torch.randn(2, 64, 3, 3), torch.randn(2, 64, 3, 3))
    with pytest.raises(ValueError, match=r"dims must be 1 \(B x C x L\), 2 .* or 3 .*, got 4"):
        create_fusion("aff", 8, dims=4)
    with pytest.raises(ValueError, match="MSCAM: dims must be"):
        MSCAM(8, dims=0)

    @register_fusion("test_nd_max")
    class MaxFusion(torch.nn.Module):
        def __init__(self, channels, r=4):
            super().__init__()

        def forward(self, x, y):
            return torch.maximum(x, y)

    try:
        with pytest.raises(ValueError, match="fusion type 'test_nd_max' has no 1-D form"):
            create_fusion("test_nd_max", 8, dims=1)
        assert isinstance(create_fusion("test_nd_max", 8, dims=2), MaxFusion)  # dims=2: the class as it is
    finally:  # test_fusion checks the registry holds the zoo (and its own test type) only
        _FUSIONS.pop("test_nd_max")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_1d_module_scripts_exports_and_traces():  # compiled in test_fusion_multi, with the other new modules
    m = create_fusion("aff", 8, 2, dims=1).double()
    randomize_nd(m)
    x, y = torch.randn(2, 8, 6, dtype=torch.float64), torch.randn(2, 8, 6, dtype=torch.float64)
    m.eval()
    want = m(x, y)
    assert torch.equal(torch.fx.symbolic_trace(m)(x, y), want)
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x, y), want, rtol=1e-12, atol=1e-12)
    exported = torch.export.export(m, (x, y))
    torch.testing.assert_close(exported.module()(x, y), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_every_type_in_1d_and_3d_traces_bit_for_bit(name, options, dims):
    m = create_fusion(name, 8, r=2, dims=dims, **options)  # float32, where two roundings would show
    randomize_nd(m)
    assert_fx_is_eager(m, torch.randn(*SHAPES[dims]), torch.randn(*SHAPES[dims]))


# Every fusion type once (short skip) and the same-layer AFF and iAFF, whose attention and blend differ.
EVERY_TYPE = [case for i, case in enumerate(CASES) if case[0] not in {n for n, _ in CASES[:i]}] + [
    ("aff", dict(scenario="same-layer")), ("iaff", dict(scenario="same-layer"))]


class EveryType(torch.nn.Module):
    """Every fusion type (:data:`EVERY_TYPE`) in 1-D and in 3-D in one module: one export or compilation for all
    of them (tests/test_fusion_multi.py compiles it)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.fusions = torch.nn.ModuleList(create_fusion(name, channels, 2, dims=dims, **options)
                                           for name, options in EVERY_TYPE for dims in (1, 3))

    def forward(self, x1: torch.Tensor, y1: torch.Tensor, x3: torch.Tensor, y3: torch.Tensor) -> list[torch.Tensor]:
        return [fuse(x1, y1) if fuse.dims == 1 else fuse(x3, y3) for fuse in self.fusions]

    @staticmethod
    def inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 4, 7), torch.randn(batch, 4, 7), torch.randn(batch, 4, 3, 2, 4),
                torch.randn(batch, 4, 3, 2, 4))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_every_type_in_1d_and_3d_exports_to_onnx(dynamo, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    m = EveryType().eval()
    randomize_nd(m)
    xs = EveryType.inputs()
    path = tmp_path / "every_type.onnx"
    torch.onnx.export(m, xs, path, dynamo=dynamo, opset_version=18 if dynamo else 17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs, strict=True)})
    with torch.no_grad():
        want = m(*xs)
    assert len(got) == len(want) == 2 * len(EVERY_TYPE)
    for g, w, (name, _) in zip(got, want, [c for c in EVERY_TYPE for _ in (1, 3)], strict=True):
        assert w.std() > 0.1 and np.abs(g - w.numpy()).max() < 1e-5, name
