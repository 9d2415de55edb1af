"""The fused fusion ops and the recompute mode against the straightforward formulas (AFF.md section 1)."""

import copy
import warnings

import pytest
import timm
import torch
from _layer_utils import randomize

from openaff.layers import (
    AFF,
    IAFF,
    MSCAM,
    attention_blend,
    attention_weight,
    create_fusion,
    fusion_kernels,
    set_fusion_kernels,
    set_fusion_recompute,
)
from openaff.layers.fused_ops import broadcast_operand, fusion_recompute
from openaff.layers.mscam import GlobalAvgPool2d

CL = torch.channels_last


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _naive_mscam(m: MSCAM, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(m.local_att(x) + m.global_att(x))


def naive_aff(m: AFF, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = _naive_mscam(m.mscam, x + y)
    return 2 * x * w + 2 * y * (1 - w)


def naive_iaff(m: IAFF, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1 = _naive_mscam(m.mscam1, x + y)
    z = x * w1 + y * (1 - w1)
    w2 = _naive_mscam(m.mscam2, z)
    return x * w2 + y * (1 - w2)


NAIVE = {AFF: naive_aff, IAFF: naive_iaff}


def _inputs(shape, dtype, channels_last=False, grad=True):
    out = []
    for s in (shape, shape, shape, (shape[0], shape[1], 1, 1)):
        t = torch.randn(*s, dtype=dtype)
        if channels_last and s[2] > 1:
            t = t.contiguous(memory_format=CL)
        out.append(t.requires_grad_(grad))
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("scale", [1.0, 2.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_blend_matches_formula_forward_and_gradients(dtype, tol, scale, channels_last):
    x, y, a, g = _inputs((3, 8, 5, 6), dtype, channels_last)
    out = attention_blend(x, y, a, g, scale)
    w = torch.sigmoid(a + g)
    ref = scale * x * w + scale * y * (1 - w)
    assert _rel(out, ref) < tol
    go = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, y, a, g), go)
    want = torch.autograd.grad(ref, (x, y, a, g), go)
    for gt, wt in zip(got, want, strict=True):
        assert gt.shape == wt.shape
        assert _rel(gt, wt) < tol
    if channels_last:
        assert out.is_contiguous(memory_format=CL)
        assert got[0].is_contiguous(memory_format=CL) and got[2].is_contiguous(memory_format=CL)
    # The no-autograd path (in-place into the weight buffer) computes the same numbers.
    with torch.no_grad():
        torch.testing.assert_close(attention_blend(x, y, a, g, scale), out, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(attention_blend(x, y, a, g, scale), out.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_blend_gradcheck_float64(scale):
    inputs = _inputs((2, 3, 4, 3), torch.float64)
    assert torch.autograd.gradcheck(lambda *t: attention_blend(*t, scale=scale), inputs)
    # The backward is made of differentiable ops, so second derivatives work as well.
    assert torch.autograd.gradgradcheck(lambda *t: attention_blend(*t, scale=scale), inputs)


@pytest.mark.parametrize("grad", [True, False])
def test_blend_with_two_global_logits_broadcasts(grad):
    # An all-global MS-CAM (aff_global_global) gives two B x C x 1 x 1 logits: the weight broadcasts,
    # with no resized output buffer (a warning, and deprecated) on either path.
    x, y = (torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=grad) for _ in range(2))
    a, g = (torch.randn(2, 4, 1, 1, dtype=torch.float64, requires_grad=grad) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = attention_blend(x, y, a, g, 2.0, inplace=True)
    w = torch.sigmoid(a + g)
    torch.testing.assert_close(out, 2 * x * w + 2 * y * (1 - w), rtol=1e-14, atol=1e-14)
    if grad:
        assert torch.autograd.gradcheck(lambda *t: attention_blend(*t, scale=2.0), (x, y, a, g))


def test_blend_partial_requires_grad():
    x, y, a, g = _inputs((2, 4, 3, 3), torch.float64)
    y.requires_grad_(False)
    g.requires_grad_(False)
    out = attention_blend(x, y, a, g, 2.0)
    gx, ga = torch.autograd.grad(out.sum(), (x, a))
    w = torch.sigmoid(a + g)
    torch.testing.assert_close(gx, 2 * w)
    torch.testing.assert_close(ga, 2 * (x - y) * w * (1 - w))


def test_blend_saves_only_its_inputs():
    x, y, a, g = _inputs((2, 4, 3, 3), torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attention_blend(x, y, a, g, 2.0)
    assert len(saved) == 4
    assert all(s is t for s, t in zip(saved, (x, y, a, g), strict=True))


def test_blend_mixed_dtypes_under_autocast():
    x, y, a, g = _inputs((2, 4, 3, 3), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_blend(x.bfloat16(), y, a.bfloat16(), g, 2.0)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and g.grad is not None and g.grad.dtype == torch.float32


def test_attention_weight_and_mscam():
    _, _, a, g = _inputs((2, 4, 3, 3), torch.float64)
    torch.testing.assert_close(attention_weight(a, g), torch.sigmoid(a + g), rtol=1e-15, atol=1e-15)
    m = MSCAM(8, 2).double().eval()
    randomize(m)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    local, glob = m.logits(x)
    assert local.shape == x.shape and glob.shape == (2, 8, 1, 1)
    torch.testing.assert_close(m(x), _naive_mscam(m, x), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("cls", [AFF, IAFF])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fusion_module_matches_straightforward(cls, training, recompute, dtype, tol):
    ref = cls(16, 4).to(dtype)
    randomize(ref)
    ref.train(training)
    m = copy.deepcopy(ref)
    m.recompute = recompute
    x = torch.randn(3, 16, 5, 5, dtype=dtype, requires_grad=True)
    y = torch.randn(3, 16, 5, 5, dtype=dtype, requires_grad=True)
    out = m(x, y)
    want = NAIVE[cls](ref, x, y)
    assert _rel(out, want) < tol
    go = torch.randn_like(out)
    params = [p for _, p in m.named_parameters()]
    ref_params = [p for _, p in ref.named_parameters()]
    got = torch.autograd.grad(out, [x, y, *params], go)
    exp = torch.autograd.grad(want, [x, y, *ref_params], go)
    scale = max(e.abs().max().item() for e in exp)
    for (name, _), gt, e in zip([("x", 0), ("y", 0), *m.named_parameters()], got, exp, strict=True):
        # Conv biases right before a training-mode BN have a zero gradient; compare absolutely there.
        err = (gt - e).norm().item()
        assert err <= tol * max(e.norm().item(), scale), name
    for (name, b), (_, rb) in zip(m.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(b, rb, rtol=tol, atol=tol, msg=name)


def test_recompute_updates_running_stats_once():
    torch.manual_seed(1)
    base = IAFF(8, 2).double().train()
    plain, rec = copy.deepcopy(base), copy.deepcopy(base)
    rec.recompute = True
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    for m in (plain, rec):
        m(x, x.flip(0)).square().sum().backward()
    for (name, b), (_, rb) in zip(plain.named_buffers(), rec.named_buffers(), strict=True):
        torch.testing.assert_close(b, rb, rtol=0, atol=1e-15, msg=name)
    assert rec.mscam1.local_att[1].num_batches_tracked.item() == 1
    for (name, p), (_, q) in zip(plain.named_parameters(), rec.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=name)


def test_recompute_batch_of_one_trains():
    m = AFF(16, 4).train()
    m.recompute = True
    x, y = torch.randn(1, 16, 4, 4, requires_grad=True), torch.randn(1, 16, 4, 4)
    m(x, y).sum().backward()
    assert x.grad is not None and m.mscam.global_att[1].weight.grad is not None


def _saved_bytes(model, x):
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(seen.values())


def test_training_memory_fused_below_straightforward_and_recompute_below_fused(monkeypatch):
    model = timm.create_model("aff_cifar_resnext11_32x4d", width_mult=0.5, num_classes=10).train()
    x = torch.randn(4, 3, 16, 16)
    fused = _saved_bytes(model, x)
    set_fusion_recompute(True, model)
    recomputed = _saved_bytes(model, x)
    set_fusion_recompute(False, model)
    monkeypatch.setattr(AFF, "_fuse", naive_aff)
    naive = _saved_bytes(model, x)
    assert recomputed < fused < naive


def test_set_fusion_recompute_default_and_model():
    assert fusion_recompute() is False
    try:
        set_fusion_recompute(True)
        assert create_fusion("aff", 8).recompute is True
    finally:
        set_fusion_recompute(False)
    model = timm.create_model("aff_cifar_resnet8", width_mult=0.25)
    set_fusion_recompute(True, model)
    assert all(m.recompute for m in model.modules() if isinstance(m, AFF))


def test_fusion_kernels_switch_validates():
    with pytest.raises(ValueError, match="eager"):
        set_fusion_kernels("triton")
    assert fusion_kernels() == "eager"


def _tiny_train_step(model, x):
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_models(a, b, tol):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if p.grad is not None:
            assert (p.grad - q.grad).norm() <= tol * max(p.grad.norm(), 1e-3), name
    for (name, u), (_, v) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        torch.testing.assert_close(u.float(), v.float(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("recompute", [False, True])
def test_compile_traces_fused_ops(recompute):
    # aot_eager runs dynamo and AOTAutograd (the part that must understand the Function and the
    # checkpoint) without generating kernels, so it is fast; the inductor run is the slow test below.
    torch._dynamo.reset()
    ref = timm.create_model("iaff_cifar_resnet8", width_mult=0.25, num_classes=10).train()
    m = copy.deepcopy(ref)
    set_fusion_recompute(recompute, m)
    x = torch.randn(4, 3, 16, 16)
    out_ref, _ = _tiny_train_step(ref, x)
    out, _ = _tiny_train_step(torch.compile(m, backend="aot_eager", fullgraph=True), x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    _compare_models(ref, m, 1e-4)


@pytest.mark.slow
def test_compile_inductor_tiny_model():
    torch._dynamo.reset()
    ref = timm.create_model("aff_cifar_resnet8", width_mult=0.25, num_classes=10).train()
    m = copy.deepcopy(ref)
    x = torch.randn(4, 3, 16, 16)
    out_ref, _ = _tiny_train_step(ref, x)
    out, _ = _tiny_train_step(torch.compile(m), x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    _compare_models(ref, m, 1e-3)


# inductor's code generation of the same graph is slow (12 s here): aot_eager covers this code in the default run.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_blend_kernels_match(backend):
    torch._dynamo.reset()
    x, y, a, g = _inputs((2, 4, 3, 3), torch.float64)
    out = attention_blend(x, y, a, g, 2.0)
    want = torch.autograd.grad(out.square().sum(), (x, y, a, g))
    try:
        set_fusion_kernels("compiled", backend=backend, devices=("cpu",))
        out2 = attention_blend(x, y, a, g, 2.0)
        got = torch.autograd.grad(out2.square().sum(), (x, y, a, g))
    finally:
        set_fusion_kernels("eager")
    torch.testing.assert_close(out2, out, rtol=1e-13, atol=1e-13)
    for gt, wt in zip(got, want, strict=True):
        torch.testing.assert_close(gt, wt, rtol=1e-12, atol=1e-13)


def test_blend_inplace_reuses_local_without_autograd():
    x, y, a, g = _inputs((2, 4, 3, 3), torch.float64, grad=False)
    want = attention_blend(x, y, a, g, 2.0)
    a2 = a.clone()
    with torch.no_grad():
        out = attention_blend(x, y, a2, g, 2.0, inplace=True)
    assert out.data_ptr() == a2.data_ptr()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # With autograd the logits are saved for the backward pass and left alone.
    x.requires_grad_()
    a3 = a.clone()
    attention_blend(x, y, a3, g, 2.0, inplace=True).sum().backward()
    torch.testing.assert_close(a3, a, rtol=0, atol=0)


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("branch", ["local_att", "global_att"])
def test_mscam_branch_fast_path(branch, folded):
    # Evaluation without autograd folds each branch's BatchNorms on the fly: the same values.
    from openaff.folding import fuse_for_inference
    from openaff.layers.mscam import _branch_eval

    m = MSCAM(16, 4).double().eval()
    randomize(m)
    if folded:
        fuse_for_inference(m)
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64)
    want = getattr(m, branch)(x)
    with torch.no_grad():
        fast = _branch_eval(getattr(m, branch), x)
        got = m.logits(x)[branch == "global_att"]
    torch.testing.assert_close(fast, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    # A hook on the branch must see its modules run, so the fast path steps aside.
    seen = []
    handle = getattr(m, branch)[-2].register_forward_hook(lambda mod, i, o: seen.append(o))
    with torch.no_grad():
        assert _branch_eval(getattr(m, branch), x) is None
        m.logits(x)
    handle.remove()
    assert len(seen) == 1


def test_mscam_branch_fast_path_steps_aside():
    # A BatchNorm left in training mode, or a layer the fast path does not know, runs the modules.
    from openaff.layers.mscam import _branch_eval

    m = MSCAM(8, 2).eval()
    x = torch.randn(2, 8, 4, 4)
    m.local_att[1].train()
    with torch.no_grad():
        assert _branch_eval(m.local_att, x) is None
    m.local_att[1].eval()
    m.local_att[2] = torch.nn.GELU()
    with torch.no_grad():
        assert _branch_eval(m.local_att, x) is None
        torch.testing.assert_close(m.logits(x)[0], m.local_att(x))


def test_broadcast_operand_widens_only_where_the_cpu_kernel_is_scalar():
    local = torch.randn(4, 16, 6, 5, dtype=torch.bfloat16).contiguous(memory_format=CL)
    g = torch.randn(4, 16, 1, 1, dtype=torch.bfloat16)
    wide = broadcast_operand(g, local)
    assert wide.shape == (4, 16, 1, 5) and wide.is_contiguous(memory_format=CL)
    torch.testing.assert_close(local + wide, local + g, rtol=0, atol=0)
    # NCHW, enough channels for a vector register, or nothing to broadcast: returned as it is.
    assert broadcast_operand(g, local.contiguous()) is g
    gf = g.float()
    assert broadcast_operand(gf, local.float()) is gf
    assert broadcast_operand(local, local) is local


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_blend_bf16_channels_last_matches_nchw(scale):
    # The widened path (bf16, 16 channels, channels_last) gives the numbers of the plain broadcast.
    x, y, a, g = _inputs((4, 16, 6, 5), torch.bfloat16, channels_last=True)
    xn, yn, an, gn = (t.detach().contiguous().requires_grad_() for t in (x, y, a, g))
    out, ref = attention_blend(x, y, a, g, scale), attention_blend(xn, yn, an, gn, scale)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (x, y, a, g), go), torch.autograd.grad(ref, (xn, yn, an, gn), go),
                         strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_global_pool_gradient_keeps_channels_last():
    pool = GlobalAvgPool2d()
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    out = pool(x)
    torch.testing.assert_close(out, torch.nn.functional.adaptive_avg_pool2d(x, 1), rtol=1e-14, atol=1e-14)
    go = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, go)
    # PyTorch's own pooling gives an NCHW gradient here; adding it to a channels_last one is slow.
    assert gx.is_contiguous(memory_format=CL) and not gx.is_contiguous()
    torch.testing.assert_close(gx, (go / 20).expand_as(x), rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(pool, (x,)) and torch.autograd.gradgradcheck(pool, (x,))
    assert isinstance(pool, torch.nn.AdaptiveAvgPool2d) and pool.output_size == 1
