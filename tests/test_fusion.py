"""The fusion modules against a direct computation of AFF.md section 1's equations."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _layer_utils import randomize

from openaff.layers import AFF, IAFF, MSCAM, ContextBatchNorm2d, create_fusion, fusion_names, register_fusion


def _branch(x, seq, offset, training):
    """Conv1x1(bias) -> BN -> ReLU -> Conv1x1(bias) -> BN from the Sequential's modules, by hand."""
    conv1, bn1, conv2, bn2 = seq[offset], seq[offset + 1], seq[offset + 3], seq[offset + 4]

    def bn(t, m):
        if training:
            mean = t.mean(dim=(0, 2, 3), keepdim=True)
            var = t.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        else:
            mean, var = m.running_mean.view(1, -1, 1, 1), m.running_var.view(1, -1, 1, 1)
        return (t - mean) / torch.sqrt(var + m.eps) * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)

    t = bn(F.conv2d(x, conv1.weight, conv1.bias), bn1)
    return bn(F.conv2d(torch.relu(t), conv2.weight, conv2.bias), bn2)


def reference_mscam(m: MSCAM, x: torch.Tensor, training: bool = False) -> torch.Tensor:
    local = _branch(x, m.local_att, 0, training)
    glob = _branch(x.mean(dim=(2, 3), keepdim=True), m.global_att, 1, training)
    return torch.sigmoid(local + glob)


@pytest.mark.parametrize("training", [False, True])
def test_mscam_matches_equations(training):
    m = MSCAM(16, r=4).double()
    randomize(m)
    m.train(training)
    x = torch.randn(3, 16, 5, 6, dtype=torch.float64)
    expected = reference_mscam(m, x, training)
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)
    assert m.local_att[0].out_channels == 4 and m.global_att[1].out_channels == 4


def test_aff_has_factor_two():
    m = AFF(8, r=2).double().eval()
    randomize(m)
    x, y = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 8, 4, 4, dtype=torch.float64)
    w = reference_mscam(m.mscam, x + y)
    torch.testing.assert_close(m(x, y), 2 * x * w + 2 * y * (1 - w), rtol=1e-12, atol=1e-12)
    # Equal inputs: the weights sum to 2, like x + y.
    torch.testing.assert_close(m(x, x), 2 * x, rtol=1e-12, atol=1e-12)


def test_iaff_uses_its_own_second_mscam():
    m = IAFF(8, r=2).double().eval()
    randomize(m)
    x, y = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 8, 4, 4, dtype=torch.float64)
    w1 = reference_mscam(m.mscam1, x + y)
    z = x * w1 + y * (1 - w1)
    w2 = reference_mscam(m.mscam2, z)
    expected = x * w2 + y * (1 - w2)
    torch.testing.assert_close(m(x, y), expected, rtol=1e-12, atol=1e-12)
    # The widely copied bug reuses M1's global branch in the second stage; ours must differ from it.
    buggy_w2 = torch.sigmoid(_branch(z, m.mscam2.local_att, 0, False)
                             + _branch(z.mean(dim=(2, 3), keepdim=True), m.mscam1.global_att, 1, False))
    assert not torch.allclose(m(x, y), x * buggy_w2 + y * (1 - buggy_w2))
    # Every parameter of the second MS-CAM receives a gradient.
    m(x, y).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.mscam2.parameters())


@pytest.mark.parametrize("name, formula", [
    ("add", lambda x, y, w: x + y),
    ("ms_se", lambda x, y, m: y + reference_mscam(m.mscam, x) * x),
    ("ms_gau", lambda x, y, m: reference_mscam(m.mscam, x) * y + x),
    ("ms_sa", lambda x, y, m: reference_mscam(m.mscam, x + y) * y + x),
    ("concat", lambda x, y, m: F.conv2d(torch.cat([x, y], 1), m.conv.weight, m.conv.bias)),
])
def test_other_fusions(name, formula):
    m = create_fusion(name, 8, r=2).double().eval()
    if list(m.parameters()):
        randomize(m)
    x, y = torch.randn(2, 8, 3, 3, dtype=torch.float64), torch.randn(2, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x, y), formula(x, y, m), rtol=1e-12, atol=1e-12)


def test_factory():
    assert {"add", "aff", "iaff"} <= set(fusion_names())
    assert isinstance(create_fusion("AFF", 16, 4), AFF)
    assert isinstance(create_fusion("iAFF", 16, 4), IAFF)
    assert create_fusion("aff", 64, 16).mscam.local_att[0].out_channels == 4
    with pytest.raises(ValueError, match="unknown fusion type 'sum'.*aff"):
        create_fusion("sum", 8)


def test_register_a_new_fusion_in_a_few_lines():
    @register_fusion("test_max")
    class MaxFusion(torch.nn.Module):
        def __init__(self, channels, r=4):
            super().__init__()

        def forward(self, x, y):
            return torch.maximum(x, y)

    x, y = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(create_fusion("test_max", 4)(x, y), torch.maximum(x, y))
    with pytest.raises(ValueError, match="already registered"):
        register_fusion("aff")(MaxFusion)


def test_fusion_rejects_mismatched_inputs():
    m = AFF(8)
    with pytest.raises(ValueError, match="same shape"):
        m(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match="B x 8 x H x W"):
        m(torch.randn(1, 6, 4, 4), torch.randn(1, 6, 4, 4))


def test_batch_of_one_global_branch_uses_running_stats():
    bn = ContextBatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(4.0)
    bn.train()
    x = torch.randn(1, 4, 1, 1, requires_grad=True)
    out = bn(x)
    torch.testing.assert_close(out, (x - 0.5) / torch.sqrt(torch.tensor(4.0 + bn.eps)))
    out.sum().backward()
    assert x.grad is not None and bn.weight.grad is not None
    # Running statistics stay as they were: one sample says nothing about the batch distribution.
    assert torch.all(bn.running_mean == 0.5) and torch.all(bn.running_var == 4.0)
    # Two values per channel: ordinary batch statistics, running stats updated.
    bn(torch.randn(2, 4, 1, 1))
    assert not torch.all(bn.running_mean == 0.5)


def test_mscam_trains_with_batch_of_one():
    m = AFF(16, 4).train()
    x, y = torch.randn(1, 16, 4, 4, requires_grad=True), torch.randn(1, 16, 4, 4)
    m(x, y).sum().backward()
    assert x.grad is not None


def _fusion_pair(name: str):
    m = create_fusion(name, 8, r=2).double()
    randomize(m)
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 8, 5, 4, dtype=torch.float64, requires_grad=True)
    return m, x, y


@pytest.mark.parametrize("mode", ["eval_no_grad", "eval_grad", "train"])
@pytest.mark.parametrize("name", ["aff", "iaff"])
def test_formula_path_matches_fast_path(name, mode):
    # Scripted and traced models compute `formula` (written-out equations); eager ones the fused
    # blend, with BatchNorm folded on the fly when no gradient is needed. Same numbers, gradients
    # and BatchNorm updates, up to float64 rounding.
    fast, x, y = _fusion_pair(name)
    plain = copy.deepcopy(fast)
    fast.train(mode == "train")
    plain.train(mode == "train")
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        out = fast(x, y)
        want = plain.formula(x, y)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if mode == "eval_no_grad":
        return
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, y, *fast.parameters()], g)
    expected = torch.autograd.grad(want, [x, y, *plain.parameters()], g)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    for (n, a), (_, b) in zip(fast.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=n)


def test_mscam_formula_is_the_equation():
    m = MSCAM(16, r=4).double().eval()
    randomize(m)
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(m.formula(x), reference_mscam(m, x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.formula(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_context_batchnorm_is_batchnorm_from_two_values_on(momentum):
    # The same outputs, running statistics and batch counter as PyTorch's BatchNorm2d.
    ours, ref = ContextBatchNorm2d(4, momentum=momentum).double(), torch.nn.BatchNorm2d(4, momentum=momentum).double()
    randomize(ours)
    ref.load_state_dict(ours.state_dict())
    for shape in [(2, 4, 1, 1), (3, 4, 2, 2), (1, 4, 3, 1)]:
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-13, atol=1e-13)
    ours.eval()
    ref.eval()
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-13, atol=1e-13)
    for (n, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=n)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", fusion_names())
def test_every_fusion_scripts_and_traces(name):
    m, x, y = _fusion_pair(name)
    x, y = x.detach(), y.detach()
    scripted = torch.jit.script(m)
    traced = torch.fx.symbolic_trace(m)
    for training in (True, False):
        for module in (m, scripted, traced):
            module.train(training)
        state = copy.deepcopy(m.state_dict())
        want = m(x, y)
        for other in (scripted, traced):
            m.load_state_dict(state)  # the training passes update the shared BatchNorm statistics
            torch.testing.assert_close(other(x, y), want, rtol=1e-12, atol=1e-12, msg=f"{name} {type(other)}")
