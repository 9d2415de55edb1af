"""The fusion modules against a direct computation of AFF.md's equations (section 1, and 4b for the study's zoo)."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from _layer_utils import randomize

from openaff.layers import (
    AFF,
    FUSION_SCENARIOS,
    IAFF,
    MSCAM,
    ContextBatchNorm2d,
    create_fusion,
    fusion_names,
    fusion_options,
    register_fusion,
)


def _bn(t, m, training):
    if training:
        mean = t.mean(dim=(0, 2, 3), keepdim=True)
        var = t.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean, var = m.running_mean.view(1, -1, 1, 1), m.running_var.view(1, -1, 1, 1)
    return (t - mean) / torch.sqrt(var + m.eps) * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)


def _branch(x, seq, offset, training):
    """Conv1x1(bias) -> BN -> ReLU -> Conv1x1(bias) -> BN from the Sequential's modules, by hand."""
    conv1, bn1, conv2, bn2 = seq[offset], seq[offset + 1], seq[offset + 3], seq[offset + 4]
    t = _bn(F.conv2d(x, conv1.weight, conv1.bias), bn1, training)
    return _bn(F.conv2d(torch.relu(t), conv2.weight, conv2.bias), bn2, training)


def reference_mscam(m: MSCAM, x: torch.Tensor, training: bool = False) -> torch.Tensor:
    local = _branch(x, m.local_att, 0, training)
    glob = _branch(x.mean(dim=(2, 3), keepdim=True), m.global_att, 1, training)
    return torch.sigmoid(local + glob)


# --- AFF.md 4b by hand: the study's zoo, with X the input of smaller receptive field and Y the other ---



def _gap(t):
    return t.mean(dim=(2, 3), keepdim=True)


def _conv(t, conv):
    return F.conv2d(t, conv.weight, conv.bias)


def L1(t, seq, tr):  # noqa: N802  (AFF.md's names)
    """Conv1x1(C->C, bias) -> BN."""
    return _bn(_conv(t, seq[0]), seq[1], tr)


def G1(t, seq, tr):  # noqa: N802
    """GAP -> Conv1x1(C->C, bias) -> BN."""
    return _bn(_conv(_gap(t), seq[1]), seq[2], tr)


def Lr(t, seq, tr):  # noqa: N802
    return _branch(t, seq, 0, tr)


def Gr(t, seq, tr):  # noqa: N802
    return _branch(_gap(t), seq, 1, tr)


def _half(t, seq, offset, tr):
    """Conv1x1(C->C/r, bias) -> BN -> ReLU."""
    return torch.relu(_bn(_conv(t, seq[offset]), seq[offset + 1], tr))


def _ms_att(mscam, t, tr, bottleneck):
    if bottleneck:
        return torch.sigmoid(Lr(t, mscam.local_att, tr) + Gr(t, mscam.global_att, tr))
    return torch.sigmoid(L1(t, mscam.local_att, tr) + G1(t, mscam.global_att, tr))


def _concat_att(mscam, loc, glob, tr):
    """σ(Conv1x1 -> BN of cat[local, global broadcast])."""
    proj = mscam.fuse_att
    return torch.sigmoid(_bn(_conv(torch.cat([loc, glob.expand_as(loc)], 1), proj[0]), proj[1], tr))


def reference(name, m, x, y, tr, scenario="short-skip", bottleneck=False, norm=None):
    """The module's output by AFF.md 4b's formula, from its weights; x = Y (larger receptive field), y = X."""
    Y, X = x, y  # noqa: N806
    same = scenario == "same-layer"
    if name in ("add", "add_bn"):
        return Y + X
    if name == "concat":
        z = torch.cat([Y, X], 1)
        if norm if norm is not None else not same:
            return _conv(_bn(z, m.proj[0], tr), m.proj[1])
        return _conv(z, m.proj[0])
    if name == "ms_gau":
        return _ms_att(m.mscam, Y, tr, bottleneck) * X + Y
    if name == "ms_se":
        return X + _ms_att(m.mscam, Y, tr, bottleneck) * Y
    if name == "ms_sa":
        return _ms_att(m.mscam, Y + X, tr, bottleneck) * X + Y
    if name in ("aff", "aff_global_global", "aff_local_local"):
        a = m.mscam
        one, lr = (G1, Gr) if name == "aff_global_global" else (L1, Lr)
        two, gr = (L1, Lr) if name == "aff_local_local" else (G1, Gr)
        first = a.global_att if name == "aff_global_global" else a.local_att
        second = getattr(a, {"aff": "global_att", "aff_global_global": "global_att2",
                              "aff_local_local": "local_att2"}[name])
        t = X + Y
        if same:  # w = σ(L1 + G1)(X + Y); X·w + Y·(1 − w), no factor 2
            w = torch.sigmoid(one(t, first, tr) + two(t, second, tr))
            return X * w + Y * (1 - w)
        w = torch.sigmoid(lr(t, first, tr) + gr(t, second, tr))
        return 2 * Y * w + 2 * X * (1 - w)
    if name == "iaff":
        if same:
            w1 = _ms_att(m.mscam1, X + Y, tr, False)
            z = X * w1 + Y * (1 - w1)
            w2 = _ms_att(m.mscam2, z, tr, False)
            return X * w2 + Y * (1 - w2)
        w1 = _ms_att(m.mscam1, Y + X, tr, True)
        z = Y * w1 + X * (1 - w1)
        w2 = _ms_att(m.mscam2, z, tr, True)
        return Y * w2 + X * (1 - w2)
    t = Y + X
    if name == "half_aff":
        a = m.mscam
        w = _concat_att(a, _half(t, a.local_att, 0, tr), _half(_gap(t), a.global_att, 1, tr), tr)
        return 2 * Y * w + 2 * X * (1 - w)
    if name == "concat_aff":
        a = m.mscam
        w = _concat_att(a, torch.relu(Lr(t, a.local_att, tr)), torch.relu(Gr(t, a.global_att, tr)), tr)
        return 2 * Y * w + 2 * X * (1 - w)
    if name == "recursive_aff":
        l, g = Lr(t, m.mscam1.local_att, tr), Gr(t, m.mscam1.global_att, tr)  # noqa: E741
        w2 = _ms_att(m.mscam2, l + g, tr, True)
        w = torch.sigmoid(l * w2 + g * (1 - w2))
        return Y * w + X * (1 - w)
    raise KeyError(name)


ZOO = ("add", "add_bn", "aff", "aff_global_global", "aff_local_local", "concat", "concat_aff", "half_aff", "iaff",
       "ms_gau", "ms_sa", "ms_se", "recursive_aff")
# Every type in the two scenarios that differ (long skip builds the short-skip modules: tested below),
# plus the paper's versions selected by an option.
CASES = [(n, dict(scenario=s)) for n in ZOO for s in ("short-skip", "same-layer")] + [
    ("ms_gau", dict(bottleneck=True)), ("ms_se", dict(bottleneck=True)), ("ms_sa", dict(bottleneck=True)),
    ("concat", dict(norm=False)), ("concat", dict(scenario="same-layer", norm=True)),
]
CASE_IDS = [f"{n}-" + "-".join(f"{k}={v}" for k, v in o.items()) for n, o in CASES]


def test_every_registered_type_has_a_reference():
    assert set(ZOO) <= set(fusion_names())
    assert set(fusion_names()) - {"test_max"} == set(ZOO)  # test_max: registered by a test below


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_zoo_matches_the_code_formulas(name, options, training):
    # float64, random weights and BN statistics; batch statistics in training.
    m = create_fusion(name, 8, r=2, **options).double().train(training)
    randomize(m)
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    y = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    want = reference(name, m, x, y, training, **options)
    out = m(x, y)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_same_layer_aff_weights_the_undilated_input_without_factor_two():
    m = AFF(8, scenario="same-layer").double().eval()
    randomize(m)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x, x), x, rtol=1e-12, atol=1e-12)  # the weights sum to 1
    with torch.no_grad():
        m.mscam.global_att[2].bias.fill_(50.0)  # w = 1: all of y (X), nothing of x (Y)
    y = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x, y), y, rtol=1e-12, atol=1e-12)
    assert m.mscam.local_att[0].out_channels == 8 and len(m.mscam.local_att) == 2  # single layer, no r


@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_gradients_reach_every_parameter(name, options):
    m, x, y = _fusion_pair(name, **options)
    m.train()
    m(x, y).square().sum().backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("size", [4, 1])
@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_zoo_trains_with_batch_of_one(name, options, size):
    # At 1 x 1 even the full-size BatchNorms see one value per channel: running statistics then.
    m = create_fusion(name, 8, r=2, **options).train()
    x, y = torch.randn(1, 8, size, size, requires_grad=True), torch.randn(1, 8, size, size)
    out = m(x, y)
    out.sum().backward()
    assert torch.isfinite(out).all() and x.grad is not None and torch.isfinite(x.grad).all()


def _conv_params(i, o):
    return i * o + o


def _bn_params(c):
    return 2 * c


def test_parameter_counts_by_hand():
    c, q = 64, 16  # C = 64, r = 4
    bottleneck = _conv_params(c, q) + _bn_params(q) + _conv_params(q, c) + _bn_params(c)
    single = _conv_params(c, c) + _bn_params(c)
    half = _conv_params(c, q) + _bn_params(q)
    expected = {
        ("aff", "short-skip"): (2 * bottleneck, 4576),
        ("aff_global_global", "short-skip"): (2 * bottleneck, 4576),
        ("aff", "same-layer"): (2 * single, 8576),
        ("iaff", "short-skip"): (4 * bottleneck, 9152),
        ("iaff", "same-layer"): (4 * single, 17152),
        ("ms_sa", "short-skip"): (2 * single, 8576),
        ("concat", "short-skip"): (_bn_params(2 * c) + _conv_params(2 * c, c), 8512),
        ("concat", "same-layer"): (_conv_params(2 * c, c), 8256),
        ("half_aff", "short-skip"): (2 * half + _conv_params(2 * q, c) + _bn_params(c), 4384),
        ("concat_aff", "short-skip"): (2 * bottleneck + _conv_params(2 * c, c) + _bn_params(c), 12960),
        ("recursive_aff", "short-skip"): (4 * bottleneck, 9152),
        ("add", "same-layer"): (0, 0),
    }
    for (name, scenario), (by_hand, number) in expected.items():
        m = create_fusion(name, c, 4, scenario=scenario)
        assert by_hand == number, name
        assert sum(p.numel() for p in m.parameters()) == number, (name, scenario)
    paper_ms_sa = create_fusion("ms_sa", c, 2, bottleneck=True)  # the paper's MS-CAM with r = 2
    by_hand = 2 * (_conv_params(c, 32) + _bn_params(32) + _conv_params(32, c) + _bn_params(c))
    assert sum(p.numel() for p in paper_ms_sa.parameters()) == by_hand == 8768


def test_weight_names_of_aff_and_iaff_stay_the_authors():
    # The MXNet converter and the authors' files map onto exactly these names.
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    branch = {f"local_att.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")} | {
        f"local_att.{i}.{p}" for i in (1, 4) for p in bn} | {
        f"global_att.{i}.{p}" for i in (1, 4) for p in ("weight", "bias")} | {
        f"global_att.{i}.{p}" for i in (2, 5) for p in bn}
    for scenario in ("short-skip", "long-skip"):
        assert set(create_fusion("aff", 16, 4, scenario=scenario).state_dict()) == {f"mscam.{k}" for k in branch}
        assert set(create_fusion("iaff", 16, 4, scenario=scenario).state_dict()) == {
            f"mscam{i}.{k}" for i in (1, 2) for k in branch}
    gg = create_fusion("aff_global_global", 16, 4)
    assert {k.split(".")[1] for k in gg.state_dict()} == {"global_att", "global_att2"}
    single = create_fusion("ms_sa", 16)
    assert set(single.state_dict()) == {f"mscam.local_att.0.{p}" for p in ("weight", "bias")} | {
        f"mscam.local_att.1.{p}" for p in bn} | {f"mscam.global_att.1.{p}" for p in ("weight", "bias")} | {
        f"mscam.global_att.2.{p}" for p in bn}


@pytest.mark.parametrize("name", ZOO)
def test_scenario_contract(name):
    built = {s: create_fusion(name, 16, 4, scenario=s) for s in FUSION_SCENARIOS}
    assert all(m.scenario == s for s, m in built.items())
    # Long skip is the short-skip module (AFF with its factor 2, Concat with its BN).
    shapes = {s: {k: v.shape for k, v in m.state_dict().items()} for s, m in built.items()}
    assert shapes["long-skip"] == shapes["short-skip"]
    assert "scenario" in fusion_options(name)
    assert create_fusion(name, 16, 4, scenario="Short_Skip").scenario == "short-skip"
    with pytest.raises(ValueError, match=r"unknown scenario 'middle'; choose one of short-skip, same-layer, long-skip"):
        create_fusion(name, 16, 4, scenario="middle")
    with pytest.raises(ValueError, match=rf"fusion type '{name}' has no option 'depth'; its options: scenario"):
        create_fusion(name, 16, 4, depth=2)


def test_scenarios_that_differ():
    for name in ("aff", "iaff", "aff_global_global", "aff_local_local", "concat"):
        short = {k: v.shape for k, v in create_fusion(name, 16, 4).state_dict().items()}
        same = {k: v.shape for k, v in create_fusion(name, 16, 4, scenario="same-layer").state_dict().items()}
        assert short != same, name
    for name in ("add", "ms_gau", "ms_se", "ms_sa", "half_aff", "concat_aff", "recursive_aff"):
        a, b = create_fusion(name, 16, 4), create_fusion(name, 16, 4, scenario="same-layer")
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_bad_options_give_one_clear_error():
    assert fusion_options("ms_sa") == ["scenario", "bottleneck"]
    assert fusion_options("concat") == ["scenario", "norm"]
    assert fusion_options("aff") == ["scenario"]
    for call, message in [
        (lambda: create_fusion("ms_sa", 8, bottleneck="yes"), "ms_sa: bottleneck must be True or False, got 'yes'"),
        (lambda: create_fusion("concat", 8, norm=1), "concat: norm must be True, False or None, got 1"),
        (lambda: create_fusion("aff", 8, 4, scenario=3), "unknown scenario 3"),
        (lambda: create_fusion("nope", 8), "unknown fusion type 'nope'; choose one of add, add_bn, aff"),
        (lambda: MSCAM(8, branches=("local",)), r"branches must be two of \('local', 'global'\)"),
        (lambda: MSCAM(8, branches=("local", "pixel")), "branches must be two of"),
        (lambda: MSCAM(8, layers="deep"), "layers must be one of bottleneck, single, half, got 'deep'"),
        (lambda: MSCAM(8, combine="mul"), "combine must be one of add, concat, got 'mul'"),
        (lambda: MSCAM(8, layers="half"), "layers='half' .* needs combine='concat'"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


def test_mscam_options_build_what_they_say():
    m = MSCAM(16, 4, branches=("global", "local"))  # order does not matter: the default MS-CAM
    assert [n for n, _ in m.named_children()] == ["local_att", "global_att"]
    ll = MSCAM(16, 4, branches=("local", "local"))
    assert [n for n, _ in ll.named_children()] == ["local_att", "local_att2"]
    assert not any(isinstance(t, torch.nn.AdaptiveAvgPool2d) for t in ll.modules())
    gg = MSCAM(16, 4, branches=("global", "global"), layers="single")
    assert [type(t).__name__ for t in gg.global_att2] == ["GlobalAvgPool2d", "Conv2d", "ContextBatchNorm2d"]
    x = torch.randn(2, 16, 3, 3)
    assert gg(x).shape == (2, 16, 1, 1) and ll(x).shape == x.shape  # the fusions broadcast a global weight
    half = MSCAM(16, 4, layers="half", combine="concat")
    assert half.fuse_att[0].in_channels == 8 and half(x).shape == x.shape


def test_short_skip_families_take_every_fusion_by_name():
    x = torch.randn(2, 1, 12, 12)
    for name in ZOO:
        model = timm.create_model("cifar_resnet8", fusion=name, width_mult=0.125, in_chans=1, num_classes=3)
        assert type(model.layer2[0].fusion) is type(create_fusion(name, 8))
        assert model(x).shape == (2, 3)
    model = timm.create_model("cifar_resnext11_32x4d", fusion="recursive_aff", num_classes=3)
    assert type(model.layer1[0].fusion).__name__ == "RecursiveAFF"
    with torch.device("meta"):
        for name in ("ms_sa", "half_aff", "aff_local_local"):
            model = timm.create_model("aff_resnet50", fusion=name, layers=(1, 1, 1, 1))
            assert type(model.layer4[0].fusion) is type(create_fusion(name, 8))
    with pytest.raises(ValueError, match="unknown fusion type 'ms_xx'"):
        timm.create_model("cifar_resnet8", fusion="ms_xx")


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
    # A type without scenarios refuses one by name (the same-layer family asks fusion_options first).
    assert fusion_options("test_max") == []
    with pytest.raises(ValueError, match="fusion type 'test_max' has no option 'scenario'; its options: none"):
        create_fusion("test_max", 4, scenario="same-layer")
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


def assert_fx_is_eager(module: torch.nn.Module, *inputs: torch.Tensor, concrete_args=None) -> torch.fx.GraphModule:
    """timm's FX check and beyond: a graph traced once (in evaluation) gives ``module``'s outputs bit for bit, in
    evaluation and in training, with and without autograd, and the same BatchNorm statistics after a training
    pass; every parameter of the graph gets a gradient (timm's FX backward). Returns the graph."""
    traced = torch.fx.symbolic_trace(copy.deepcopy(module).eval(), concrete_args=concrete_args)
    for training in (False, True):
        for grad in (False, True):
            eager, graph = copy.deepcopy(module).train(training), copy.deepcopy(traced).train(training)
            xe, xg = ([x.detach().clone().requires_grad_(grad) for x in inputs] for _ in range(2))
            with torch.set_grad_enabled(grad):
                want, got = eager(*xe), graph(*xg)
            assert torch.equal(got, want), (type(module).__name__, training, grad)
            if grad:
                got.square().sum().backward()
                assert all(p.grad is not None for p in graph.parameters())
            buffers = dict(graph.named_buffers())
            assert all(torch.equal(buffers[n], b) for n, b in eager.named_buffers())
    return traced


def _fusion_pair(name: str, **options):
    m = create_fusion(name, 8, r=2, **options).double()
    randomize(m)
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 8, 5, 4, dtype=torch.float64, requires_grad=True)
    return m, x, y


@pytest.mark.parametrize("mode", ["eval_no_grad", "eval_grad", "train", "train_recompute"])
@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_formula_path_matches_fast_path(name, options, mode):
    # Scripted and traced models compute `formula` (written-out equations); eager ones the fused
    # blend, with BatchNorm folded on the fly when no gradient is needed (and, with recompute, the
    # attention run again in the backward pass). Same numbers, gradients and BatchNorm updates, up to
    # float64 rounding.
    fast, x, y = _fusion_pair(name, **options)
    if mode == "train_recompute":
        if not hasattr(fast, "recompute"):
            return  # add and concat: nothing to recompute
        fast.recompute = True
    mode = mode.removesuffix("_recompute")
    plain = copy.deepcopy(fast)
    fast.train(mode == "train")
    plain.train(mode == "train")
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        out = fast(x, y)
        want = plain.formula(x, y) if hasattr(plain, "formula") else plain(x, y)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if mode == "eval_no_grad":
        return
    if not hasattr(plain, "formula"):
        return  # add and concat have one path
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
@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_every_fusion_scripts_and_traces(name, options):
    m, x, y = _fusion_pair(name, **options)
    x, y = x.detach(), y.detach()
    assert_fx_is_eager(m, x, y)  # FX: the eager bits (float32: tests/test_fusion_nd.py)
    scripted = torch.jit.script(m)
    for training in (True, False):
        for module in (m, scripted):
            module.train(training)
        state = copy.deepcopy(m.state_dict())
        want = m(x, y)
        m.load_state_dict(state)  # the training passes update the shared BatchNorm statistics
        # TorchScript runs the MS-CAM branches unfolded: the same function, rounded differently.
        torch.testing.assert_close(scripted(x, y), want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels", [4, 12])
def test_context_batchnorm_channels_last_path_is_batchnorm(momentum, channels):
    # Few channels in channels_last take openaff.layers.channels_last_norm (PyTorch's kernel is a scalar
    # loop there): the same outputs, gradients, running statistics and counter as BatchNorm2d.
    from openaff.layers.channels_last_norm import use_channels_last_batch_norm

    ours = ContextBatchNorm2d(channels, momentum=momentum).double()
    ref = torch.nn.BatchNorm2d(channels, momentum=momentum).double()
    randomize(ours)
    ref.load_state_dict(ours.state_dict())
    for _ in range(2):
        x = torch.randn(3, channels, 5, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        assert use_channels_last_batch_norm(x)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, want = ours(xa), ref(xb)
        assert out.is_contiguous(memory_format=torch.channels_last) and out._base is None
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        go = torch.randn_like(want)
        got = torch.autograd.grad(out, (xa, ours.weight, ours.bias), go)
        exp = torch.autograd.grad(want, (xb, ref.weight, ref.bias), go)
        for a, b in zip(got, exp, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    for (n, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=n)
    # bf16 (autocast's dtype): float32 statistics, bf16 output, as PyTorch's kernel.
    xb16 = torch.randn(8, channels, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    ours.float(), ref.float()
    torch.testing.assert_close(ours(xb16), ref(xb16), rtol=2e-2, atol=2e-2)
    assert ours(xb16).dtype == torch.bfloat16
    # An in-place ReLU after it (the MS-CAM's branch) is allowed, and the recompute of a fusion does not
    # update the statistics a second time.
    torch.relu_(ours(xb16.float().requires_grad_()))
    before = ours.running_mean.clone()
    from openaff.layers.fused_ops import _recomputing

    with _recomputing():
        ours(xb16.float())
    torch.testing.assert_close(ours.running_mean, before, rtol=0, atol=0)


def test_aff_trains_alike_in_both_layouts():
    # The channels_last fast paths (pool gradient, widened broadcast, few-channel BatchNorm) change no number.
    torch.manual_seed(0)
    m = AFF(16, 4).double()
    randomize(m)
    x, y = torch.randn(4, 16, 6, 5, dtype=torch.float64), torch.randn(4, 16, 6, 5, dtype=torch.float64)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        mm = copy.deepcopy(m).to(memory_format=fmt)
        xa, ya = (t.contiguous(memory_format=fmt).requires_grad_() for t in (x, y))
        out = mm(xa, ya)
        grads = torch.autograd.grad(out.square().sum(), (xa, ya, *mm.parameters()))
        results.append((out, grads, [b.clone() for b in mm.buffers()]))
    (o1, g1, b1), (o2, g2, b2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    for a, b in zip((*g1, *b1), (*g2, *b2), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
