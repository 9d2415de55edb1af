"""Inputs of different widths and sizes (issue 21): Conv1x1-BN projection, resize to the finest map, fuse; the FPN
merge is that module (its weight names and outputs unchanged)."""

import pytest
import torch
import torch.nn.functional as F
from _nd_utils import as_2d_input, as_2d_state, randomize_nd
from test_fusion import assert_fx_is_eager, reference
from torch.fx._symbolic_trace import PH

from openaff.layers import AFF, AlignedFusion, MultiInputAFF, Projection, create_fusion
from openaff.segmentation.fpn import FPNMerge


def _project(t, proj, training):
    """Conv1x1(bias) -> BN (-> ReLU) of a Projection, by hand, any rank."""
    w = proj[0].weight.flatten(1)
    z = torch.einsum("oc,bc...->bo...", w, t) + proj[0].bias.view(1, -1, *([1] * (t.dim() - 2)))
    bn, dims, view = proj[1], [0, *range(2, t.dim())], (1, -1, *([1] * (t.dim() - 2)))
    if training:
        mean, var = z.mean(dims, keepdim=True), z.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = bn.running_mean.view(view), bn.running_var.view(view)
    z = (z - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(view) + bn.bias.view(view)
    return torch.relu(z) if len(proj) == 3 else z


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("resize", ["nearest", "bilinear"])
def test_different_channels_and_sizes_is_the_recipe(resize, training):
    m = create_fusion("aff", 8, 2, in_channels=(12, 8), resize=resize).double().train(training)
    assert type(m) is AlignedFusion and type(m.fuse) is AFF and hasattr(m, "project") and not hasattr(m, "project2")
    randomize_nd(m)
    x = torch.randn(2, 12, 3, 4, dtype=torch.float64)  # coarse and wide
    y = torch.randn(2, 8, 6, 8, dtype=torch.float64)   # fine: sets the size
    kw = {} if resize == "nearest" else dict(align_corners=False)
    xp = F.interpolate(_project(x, m.project, training), size=(6, 8), mode=resize, **kw)  # project, then resize
    want = reference("aff", m.fuse, xp, y, training)
    out = m(x, y)
    assert out.shape == y.shape
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # The order does not matter for the size: the finer map sets it, whichever argument it is.
    m2 = create_fusion("aff", 8, 2, in_channels=(8, 12), resize=resize).double().train(training)
    m2.load_state_dict({k.replace("project.", "project2."): v for k, v in m.state_dict().items()})
    assert m2(y, x).shape == y.shape


def test_three_inputs_of_three_widths_and_1d():
    m = create_fusion("aff", 8, 2, in_channels=(4, 8, 16), dims=1, resize="bilinear").double().eval()
    assert type(m.fuse) is MultiInputAFF and m.fuse.inputs == 3
    assert [n for n, _ in m.named_children()] == ["project", "project3", "fuse"]
    randomize_nd(m)
    a, b, c = (torch.randn(2, ch, n, dtype=torch.float64) for ch, n in ((4, 5), (8, 10), (16, 20)))
    up = [F.interpolate(t, size=20, mode="linear", align_corners=False) for t in (_project(a, m.project, False), b)]
    want = m.fuse.formula(*up, _project(c, m.project3, False))
    torch.testing.assert_close(m(a, b, c), want, rtol=1e-12, atol=1e-12)


def test_resize_only_and_3d():
    m = create_fusion("iaff", 8, 2, resize="nearest", dims=3).double().eval()
    assert not any(isinstance(c, Projection) for c in m.children())
    randomize_nd(m)
    x, y = torch.randn(1, 8, 2, 2, 2, dtype=torch.float64), torch.randn(1, 8, 4, 4, 4, dtype=torch.float64)
    flat = create_fusion("iaff", 8, 2).double().eval()
    flat.load_state_dict(as_2d_state(m.fuse))
    want = reference("iaff", flat, *(as_2d_input(t) for t in (F.interpolate(x, size=(4, 4, 4)), y)), False)
    torch.testing.assert_close(m(x, y).flatten(3), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [4, 1])
def test_aligned_fusion_trains_with_batch_of_one(size):
    m = create_fusion("aff", 8, 2, in_channels=(16, 8)).train()
    x, y = torch.randn(1, 16, size, size, requires_grad=True), torch.randn(1, 8, size, size)
    out = m(x, y)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert m.project[0].weight.grad is not None


def test_fpn_merge_is_the_aligned_fusion_with_the_same_names():
    merge = FPNMerge(32, 16, "aff", 4)
    assert isinstance(merge, AlignedFusion) and isinstance(merge.project, Projection)
    assert [n for n, _ in merge.named_children()] == ["project", "fuse", "smooth"]
    keys = list(merge.state_dict())
    assert keys[:7] == ["project.0.weight", "project.0.bias", "project.1.weight", "project.1.bias",
                        "project.1.running_mean", "project.1.running_var", "project.1.num_batches_tracked"]
    assert [type(t).__name__ for t in merge.project] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert merge.resize_first and merge.size_from == 1  # upsample the high-level map to the low-level's size
    # The computation of the merge before it was this module: smooth(fuse(project(up(high)), low)).
    merge = merge.double().eval()
    randomize_nd(merge)
    high, low = torch.randn(2, 32, 3, 3, dtype=torch.float64), torch.randn(2, 16, 6, 6, dtype=torch.float64)
    up = F.interpolate(high, size=(6, 6), mode="bilinear", align_corners=False)
    want = merge.smooth(merge.fuse(merge.project(up), low))
    torch.testing.assert_close(merge(high, low), want, rtol=1e-12, atol=1e-12)


def test_aligned_errors():
    m = create_fusion("aff", 8, in_channels=(16, 8))
    with pytest.raises(ValueError, match=r"AlignedFusion input 1 must be B x 16 x H x W \(in_channels=\(16, 8\), "
                                         r"dims=2\), got \(1, 12, 2, 2\)"):
        m(torch.randn(1, 12, 2, 2), torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match="built for 2 inputs"):
        m(torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="resize must be one of nearest, bilinear, got 'cubic'"):
        create_fusion("aff", 8, in_channels=(16, 8), resize="cubic")
    with pytest.raises(ValueError, match="inputs=3 but 2 in_channels given"):
        create_fusion("aff", 8, in_channels=(16, 8), inputs=3)
    # Without the wrapper the plain module says what to use.
    with pytest.raises(ValueError, match=r"same shape, got \(1, 8, 4, 4\) and \(1, 16, 4, 4\); for maps of different "
                                         r"channels or sizes use create_fusion\(name, 8, r, in_channels=\(8, 16\), "
                                         r"resize='nearest'\)"):
        create_fusion("aff", 8)(torch.randn(1, 8, 4, 4), torch.randn(1, 16, 4, 4))


def test_aligned_fusion_traces_and_exports():  # compiled in test_fusion_multi, with the other new modules
    m = create_fusion("aff", 8, 2, in_channels=(16, 8), resize="bilinear").double()
    randomize_nd(m)
    x, y = torch.randn(2, 16, 3, 3, dtype=torch.float64), torch.randn(2, 8, 6, 6, dtype=torch.float64)
    m.eval()
    want = m(x, y)
    traced = assert_fx_is_eager(m, x, y, concrete_args=(PH, PH))
    # The traced graph resizes at run time: another size works too, bit for bit.
    x2, y2 = torch.randn(1, 16, 2, 2, dtype=torch.float64), torch.randn(1, 8, 5, 5, dtype=torch.float64)
    assert torch.equal(traced(x2, y2), m(x2, y2))
    # In 3-D, three inputs, float32.
    m3 = create_fusion("iaff", 8, 2, in_channels=(16, 8, 4), dims=3)
    randomize_nd(m3)
    assert_fx_is_eager(m3, torch.randn(2, 16, 2, 2, 2), torch.randn(2, 8, 4, 4, 4), torch.randn(2, 4, 4, 4, 4),
                       concrete_args=(PH,) * 3)
    exported = torch.export.export(m, (x, y))
    torch.testing.assert_close(exported.module()(x, y), want, rtol=1e-12, atol=1e-12)
