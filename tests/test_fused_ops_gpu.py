"""The GPU-only paths: fused ops and compiled blend kernels on CUDA, folding on CUDA, bf16 training.

Not in the default run (marker `gpu`); `benchmarks/gpu_check.sh` runs them on the device machine.
"""

import copy

import pytest
import timm
import torch

from openaff.folding import fuse_for_inference
from openaff.layers import AFF, IAFF, attention_blend, set_fusion_kernels, set_fusion_recompute

# Deselected in the default run (pyproject addopts), run by benchmarks/gpu_check.sh with `-m gpu`.
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _exact_fp32():
    # fp32 comparisons need fp32 arithmetic, not TF32.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(dtype=torch.float32, shape=(4, 64, 14, 14)):
    ts = [torch.randn(*shape, device="cuda", dtype=dtype).contiguous(memory_format=CL) for _ in range(3)]
    ts.append(torch.randn(shape[0], shape[1], 1, 1, device="cuda", dtype=dtype))
    return [t.requires_grad_() for t in ts]


@pytest.mark.parametrize("kernels", ["eager", "compiled"])
def test_blend_on_cuda_matches_formula(kernels):
    torch._dynamo.reset()
    x, y, a, g = _inputs()
    try:
        set_fusion_kernels(kernels)
        out = attention_blend(x, y, a, g, 2.0)
        go = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, y, a, g), go)
    finally:
        set_fusion_kernels("eager")
    w = torch.sigmoid(a + g)
    ref = 2 * x * w + 2 * y * (1 - w)
    want = torch.autograd.grad(ref, (x, y, a, g), go)
    assert _rel(out, ref) < 1e-5 and out.is_contiguous(memory_format=CL)
    for gt, wt in zip(got, want, strict=True):
        assert _rel(gt, wt) < 1e-5


def test_blend_bf16_autocast_close_to_fp32():
    x, y, a, g = _inputs()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attention_blend(x.bfloat16(), y.bfloat16(), a.bfloat16(), g.bfloat16(), 2.0)
    w = torch.sigmoid(a + g)
    assert out.dtype == torch.bfloat16 and _rel(out, 2 * x * w + 2 * y * (1 - w)) < 2e-2


@pytest.mark.parametrize("cls", [AFF, IAFF])
def test_recompute_on_cuda_same_grads_and_stats(cls):
    torch.manual_seed(0)
    base = cls(64, 16).cuda().to(memory_format=CL).train()
    plain, rec = copy.deepcopy(base), copy.deepcopy(base)
    rec.recompute = True
    x = torch.randn(4, 64, 14, 14, device="cuda").contiguous(memory_format=CL).requires_grad_()
    y = torch.randn_like(x)
    for m in (plain, rec):
        m(x, y).square().sum().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), rec.named_parameters(), strict=True):
        assert (p.grad - q.grad).norm() <= 1e-5 * max(p.grad.norm(), q.grad.norm(), 1e-3), n
    for (n, b), (_, c) in zip(plain.named_buffers(), rec.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=n)


def test_fold_on_cuda():
    torch.manual_seed(0)
    model = timm.create_model("aff_resnet50", layers=(1, 1, 1, 1), zero_init_last=False, num_classes=10)
    model = model.cuda().to(memory_format=CL)
    with torch.no_grad():
        model.train()
        model(torch.randn(16, 3, 64, 64, device="cuda"))
    model.eval()
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=CL)
    folded = fuse_for_inference(model, inplace=False)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5


@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_training_step_on_cuda(recompute):
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = timm.create_model("iaff_cifar_resnet8", width_mult=0.25, num_classes=10).cuda().train()
    m = copy.deepcopy(ref)
    set_fusion_recompute(recompute, m)
    x = torch.randn(8, 3, 16, 16, device="cuda")
    out_ref = ref(x)
    out_ref.square().mean().backward()
    out = torch.compile(m)(x)
    out.square().mean().backward()
    assert _rel(out, out_ref) < 1e-4
    for (n, p), (_, q) in zip(ref.named_parameters(), m.named_parameters(), strict=True):
        if p.grad is not None:
            assert (p.grad - q.grad).norm() <= 1e-3 * max(p.grad.norm(), 1e-3), n
