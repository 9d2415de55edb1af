"""k-input AFF and iAFF (issue 21): the soft selection over k inputs against its written-out formula, and k = 2
exactly today's two-input modules (the same state_dict, the same outputs and gradients); FX graphs give their
bits; every new module of issue 21 compiles (one compilation)."""

import copy

import pytest
import torch
from _nd_utils import randomize_nd
from test_fusion import G1, L1, Gr, Lr, assert_fx_is_eager, reference
from test_fusion_nd import EveryType
from torch.fx._symbolic_trace import PH

from openaff.layers import AFF, IAFF, MSCAMAttention, MultiInputAFF, MultiInputIAFF, create_fusion


def _select(w_logits, xs, scale, reference_first=False):
    """softmax over the k inputs of (s_1, ..., s_{k-1}, 0), by hand: exp(s_i) / (1 + sum_j exp(s_j))."""
    k, c = len(xs), xs[0].shape[1]
    s = [w_logits[:, i * c:(i + 1) * c] for i in range(k - 1)]
    e = [torch.exp(t) for t in s]
    denom = 1 + sum(e)
    p = [t / denom for t in e]
    p = [1 / denom, *p] if reference_first else [*p, 1 / denom]
    return scale * sum(pi * x for pi, x in zip(p, xs, strict=True))


def _logits(mscam, t, training):
    """L(t) + G(t), written out (test_fusion's branches): bottleneck, or single layer in the same-layer scenario."""
    if len(mscam.local_att) == 5:
        return Lr(t, mscam.local_att, training) + Gr(t, mscam.global_att, training)
    return L1(t, mscam.local_att, training) + G1(t, mscam.global_att, training)


def _inputs(k, shape=(3, 8, 5, 4)):
    return [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(k)]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("scenario", ["short-skip", "same-layer"])
@pytest.mark.parametrize("k", [3, 4])
def test_k_input_aff_is_the_formula(k, scenario, training):
    m = create_fusion("aff", 8, 2, inputs=k, scenario=scenario).double().train(training)
    assert type(m) is MultiInputAFF and m.inputs == k
    randomize_nd(m)
    xs = _inputs(k)
    same = scenario == "same-layer"
    want = _select(_logits(m.mscam, sum(xs), training), xs, 1.0 if same else float(k), reference_first=same)
    torch.testing.assert_close(m(*xs), want, rtol=1e-12, atol=1e-12)
    assert m.mscam.local_att[-2 if not same else 0].out_channels == (k - 1) * 8


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("k", [3, 4])
def test_k_input_iaff_is_the_formula(k, training):
    m = create_fusion("iaff", 8, 2, inputs=k).double().train(training)
    assert type(m) is MultiInputIAFF
    randomize_nd(m)
    xs = _inputs(k)
    z = _select(_logits(m.mscam1, sum(xs), training), xs, 1.0)
    want = _select(_logits(m.mscam2, z, training), xs, 1.0)
    torch.testing.assert_close(m(*xs), want, rtol=1e-12, atol=1e-12)


def test_equal_inputs_give_k_times_the_input():
    # The weights sum to k, like a plain x1 + ... + xk (AFF's factor 2 for two inputs).
    m = create_fusion("aff", 8, 2, inputs=3).double().eval()
    randomize_nd(m)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x, x, x), 3 * x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["eval_no_grad", "eval", "train", "train_recompute"])
@pytest.mark.parametrize("scenario", ["short-skip", "same-layer"])
@pytest.mark.parametrize("two, multi", [(AFF, MultiInputAFF), (IAFF, MultiInputIAFF)])
def test_two_inputs_are_exactly_todays_module(two, multi, scenario, mode):
    old = two(8, 2, scenario=scenario).double()
    randomize_nd(old)
    new = multi(8, 2, inputs=2, scenario=scenario).double()
    assert {k: v.shape for k, v in new.state_dict().items()} == {k: v.shape for k, v in old.state_dict().items()}
    new.load_state_dict(old.state_dict())  # a converted (authors') AFF weight file loads as it is
    if mode == "train_recompute":
        new.recompute = old.recompute = True
    training = mode.startswith("train")
    old.train(training), new.train(training)
    x, y = _inputs(2)
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        a, b = old(x, y), new(x, y)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    if mode == "eval_no_grad":
        return
    g = torch.randn_like(a)
    for u, v in zip(torch.autograd.grad(b, [x, y, *new.parameters()], g),
                    torch.autograd.grad(a, [x, y, *old.parameters()], g), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-11, atol=1e-12)
    for (n, u), v in zip(new.state_dict().items(), old.state_dict().values(), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12, msg=n)  # the BatchNorm updates too
    # And both are the paper's two-input formula (test_fusion's reference, x = residual, y = shortcut).
    name = "aff" if two is AFF else "iaff"
    torch.testing.assert_close(b, reference(name, old, x, y, training, scenario=scenario), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["aff", "iaff"])
def test_k_inputs_train_with_batch_of_one(name):
    for size in (3, 1):
        m = create_fusion(name, 8, 2, inputs=3).train()
        xs = [torch.randn(1, 8, size, size, requires_grad=True) for _ in range(3)]
        out = m(*xs)
        out.sum().backward()
        assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in xs)
        assert all(p.grad is not None for p in m.parameters())


def test_k_inputs_in_1d_and_3d():
    for dims, shape in ((1, (2, 8, 5)), (3, (2, 8, 2, 3, 2))):
        m = create_fusion("aff", 8, 2, inputs=3, dims=dims).double()
        randomize_nd(m)
        xs = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
        with torch.no_grad():
            torch.testing.assert_close(m(*xs), m.formula(*xs), rtol=1e-12, atol=1e-12)
        assert m(*xs).shape == shape


def test_k_input_errors_are_one_line_naming_what_to_use():
    with pytest.raises(ValueError, match=r"fusion type 'ms_se' has no form for 3 inputs; use 'aff' or 'iaff' "
                                         r"\(create_fusion\('aff', C, r, inputs=3\)\) or fuse pairwise"):
        create_fusion("ms_se", 8, inputs=3)
    m = create_fusion("aff", 8, inputs=3)
    with pytest.raises(ValueError, match=r"MultiInputAFF was built for 3 inputs, got 2; build it with "
                                         r"create_fusion\('aff', 8, r, inputs=2\)"):
        m(torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match="fusion inputs must have the same shape"):
        m(torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 2), torch.randn(1, 8, 3, 3))
    with pytest.raises(ValueError, match="inputs must be an integer >= 2, got 1"):
        create_fusion("aff", 8, inputs=1)
    assert type(create_fusion("aff", 8, inputs=2)) is AFF  # two inputs: the module itself


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", ["aff", "iaff"])
def test_k_input_module_traces_bit_for_bit(name, dims):
    m = create_fusion(name, 8, 2, inputs=3, dims=dims)  # float32, where two roundings would show
    randomize_nd(m)
    xs = [torch.randn(2, 8, *(4,) * dims) for _ in range(3)]
    # As the root of an FX graph a forward(*inputs) needs its arity (concrete_args); inside a model, nothing.
    assert_fx_is_eager(m, *xs, concrete_args=(PH,) * 3)


def test_k_input_module_traces_and_exports():
    m = create_fusion("aff", 8, 2, inputs=3).double()
    randomize_nd(m)
    xs = [torch.randn(2, 8, 4, 4, dtype=torch.float64) for _ in range(3)]

    class Three(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fuse = m

        def forward(self, a, b, c):
            return self.fuse(a, b, c)

    m.eval()
    assert torch.equal(torch.fx.symbolic_trace(Three())(*xs), m(*xs))
    exported = torch.export.export(m, tuple(xs))
    torch.testing.assert_close(exported.module()(*xs), m(*xs), rtol=1e-12, atol=1e-12)


class _EveryNewModule(torch.nn.Module):
    """Every new module of issue 21 in one tiny graph, for one compilation: each fusion type in 1-D and 3-D
    (test_fusion_nd's EveryType), three-input AFF and iAFF, AlignedFusion in 2-D and 3-D, MSCAMAttention in 1-D,
    2-D and 3-D."""

    def __init__(self):
        super().__init__()
        self.every_type = EveryType()
        self.three = create_fusion("aff", 4, 2, inputs=3)
        self.three_iaff = create_fusion("iaff", 4, 2, inputs=3, dims=3)
        self.aligned = create_fusion("iaff", 4, 2, in_channels=(8, 4), resize="bilinear")
        self.aligned_3d = create_fusion("aff", 4, 2, in_channels=(4, 8), dims=3)
        self.attention = MSCAMAttention(4, r=2)
        self.attention_1d = MSCAMAttention(4, r=2, dims=1)
        self.attention_3d = MSCAMAttention(4, r=2, dims=3)

    def forward(self, a, b, c, wide, x1, y1, x3, y3):
        every = self.every_type(x1, y1, x3, y3)
        s = self.every_type.fusions[0](a.flatten(2), b.flatten(2)).view_as(a)  # a 1-D AFF on the 2-D maps' rows
        out = self.attention(self.aligned(wide, self.three(s, b, c)))
        v = self.three_iaff(x3, y3, self.attention_3d(x3))
        v = self.aligned_3d(v, torch.cat([y3, x3], 1))
        return torch.cat([out.flatten(1), self.attention_1d(x1).flatten(1), v.flatten(1),
                          *(t.flatten(1) for t in every)], 1)


def test_new_modules_compile():
    # aot_eager: dynamo and AOT autograd on the CPU, no code generation (the compile tests stay cheap).
    m = _EveryNewModule().double()
    randomize_nd(m)
    xs = [torch.randn(2, 4, 4, 4, dtype=torch.float64) for _ in range(3)] + [torch.randn(2, 8, 2, 2,
                                                                                         dtype=torch.float64)]
    xs += [t.double() for t in EveryType.inputs()]
    ref = copy.deepcopy(m)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    inputs = [t.clone().requires_grad_() for t in xs]
    out = compiled(*inputs)
    out.square().sum().backward()
    want_inputs = [t.clone().requires_grad_() for t in xs]
    want = ref(*want_inputs)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(inputs, want_inputs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-11, atol=1e-12)
    for (n, a), b in zip(m.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=n)  # BatchNorm updated once, as eager
