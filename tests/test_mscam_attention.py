"""MS-CAM as an attention layer (issue 21): ``x · M(x)`` against its formula, in timm's attention slots (ResNet's
``attn_layer``, EfficientNet's ``se_layer``), its parameter count beside SE/ECA/CBAM as docs/own-network.md has it."""

import functools
from pathlib import Path

import pytest
import timm
import torch
from _nd_utils import as_2d_input, as_2d_state, randomize_nd
from test_fusion import assert_fx_is_eager, reference_mscam
from timm.layers import get_attn

from openaff.layers import MSCAM, MSCAMAttention

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-network.md"


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_attention_is_x_times_mscam(dims, training):
    m = MSCAMAttention(16, r=4, dims=dims).double().train(training)
    randomize_nd(m)
    flat = MSCAM(16, 4).double()
    flat.load_state_dict(as_2d_state(m.mscam))
    x = torch.randn(3, 16, *((5, 4, 3)[:dims]), dtype=torch.float64)
    want = as_2d_input(x) * reference_mscam(flat, as_2d_input(x), training)
    torch.testing.assert_close(as_2d_input(m(x)), want, rtol=1e-12, atol=1e-12)
    m.eval()
    with torch.no_grad():  # the folded fast path
        torch.testing.assert_close(m(x), x * m.mscam.formula(x), rtol=1e-12, atol=1e-12)


def test_timm_resnet_and_efficientnet_take_it():
    x = torch.randn(2, 3, 64, 64)
    res = timm.create_model("resnet10t", block_args=dict(attn_layer=MSCAMAttention), num_classes=3)
    assert all(type(b.se) is MSCAMAttention for b in res.modules() if hasattr(b, "se"))
    assert res.layer4[0].se.mscam.local_att[0].out_channels == 512 // 16
    res4 = timm.create_model("resnet10t", block_args=dict(attn_layer=functools.partial(MSCAMAttention, r=4)))
    assert res4.layer4[0].se.mscam.local_att[0].out_channels == 512 // 4
    eff = timm.create_model("test_efficientnet", se_layer=MSCAMAttention, num_classes=3)
    ses = [b.se for b in eff.modules() if hasattr(b, "se") and not isinstance(b.se, torch.nn.Identity)]
    assert ses and all(type(s) is MSCAMAttention for s in ses)
    for model in (res, eff):
        model.train()
        out = model(x)
        out.sum().backward()
        assert out.shape == (2, 3) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
        one = model(x[:1])  # a training batch of one: the global branch's BatchNorm keeps working
        one.sum().backward()
        assert torch.isfinite(one).all()


def test_attention_batch_of_one_at_1x1():
    m = MSCAMAttention(8, r=2).train()
    x = torch.randn(1, 8, 1, 1, requires_grad=True)
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_attention_rd_ratio_and_errors():
    assert MSCAMAttention(64, rd_ratio=0.25).mscam.r == 4
    assert MSCAMAttention(64).mscam.r == 16
    assert MSCAMAttention(64, 4, rd_ratio=0.5).mscam.r == 4  # an explicit r wins over timm's rd_ratio
    with pytest.raises(ValueError, match="rd_ratio must be positive"):
        MSCAMAttention(64, rd_ratio=0)
    with pytest.raises(ValueError, match=r"MSCAMAttention expects B x 64 x H x W inputs, got \(2, 64, 5\)"):
        MSCAMAttention(64)(torch.randn(2, 64, 5))
    m = MSCAMAttention(8, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())


def test_parameter_counts_in_the_doc():
    # The table of docs/own-network.md: one attention at C = 256 and at C = 2048, and resnet50d with the
    # attention in every bottleneck. MS-CAM(C, r=16): two branches of C*C/16 + C/16 + 2*C/16 + C/16*C + C + 2*C.
    doc = DOC.read_text()
    for c in (256, 2048):
        q = c // 16
        by_hand = 2 * (c * q + q + 2 * q + q * c + c + 2 * c)
        assert _params(MSCAMAttention(c)) == by_hand
        for n in (by_hand, *(_params(get_attn(k)(c)) for k in ("se", "eca", "cbam"))):
            assert f"{n:,}" in doc, n
    with torch.device("meta"):
        for attn in (None, "se", "eca", "cbam", MSCAMAttention):
            n = _params(timm.create_model("resnet50d", block_args=dict(attn_layer=attn)))
            assert f"{n:,}" in doc, (attn, n)


def test_attention_traces_scripts_and_exports():  # compiled in test_fusion_multi, with the other new modules
    m = MSCAMAttention(8, r=2).double()
    randomize_nd(m)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    m.eval()
    want = m(x)
    torch.testing.assert_close(torch.export.export(m, (x,)).module()(x), want, rtol=1e-12, atol=1e-12)
    for dims in (1, 2, 3):  # FX: the eager bits, float32
        one = MSCAMAttention(8, r=2, dims=dims)
        randomize_nd(one)
        assert_fx_is_eager(one, torch.randn(2, 8, *(4,) * dims))
    with pytest.warns(FutureWarning):
        scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), want, rtol=1e-12, atol=1e-12)
