"""The backbone arguments timm and smp users rely on: output_stride, norm_layer, act_layer; smp's DeepLabV3,
DeepLabV3+ and PAN on ``tu-aff_*`` encoders."""

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from torch import nn

import openaff  # noqa: F401  (registers the models)
from openaff.folding import fuse_for_inference

# One block per stage: the layouts of the ResNet-50-D and ResNet-18-D, in a fraction of the time.
TINY = dict(layers=(1, 1, 1, 1))
TINY_BASIC = dict(block="basic", layers=(1, 1, 1, 1))


def _randomise_norms(model: nn.Module) -> None:
    # Non-trivial affine and running statistics, so that a wrongly placed norm shows in the outputs.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("timm_name, ours_kwargs, kwargs", [
    ("resnet50d", TINY, dict(output_stride=16)),
    ("resnet50d", TINY, dict(output_stride=8)),
    ("resnet18d", TINY_BASIC, dict(output_stride=8)),
    ("resnext50d_32x4d", dict(TINY, stem_width=32, cardinality=32, base_width=4), dict(output_stride=8)),
    ("resnet50d", TINY, dict(act_layer="silu")),
    ("resnet50d", TINY, dict(norm_layer="groupnorm", output_stride=16)),
    ("resnet18d", TINY_BASIC, dict(norm_layer=nn.BatchNorm2d, act_layer=nn.LeakyReLU)),
])
def test_add_fusion_is_timms_resnet_with_the_same_arguments(timm_name, ours_kwargs, kwargs, training):
    # With fusion="add" the family is timm's ResNet-D: the dilations, shortcuts and layers that these
    # arguments change must be timm's to the bit, with timm's state_dict.
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, layers=ours_kwargs["layers"], **kwargs).train(training)
    _randomise_norms(ref)
    ours = timm.create_model("aff_resnet50", fusion="add", **ours_kwargs, **kwargs).train(training)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    assert ours.feature_info == ref.feature_info


@pytest.mark.parametrize("name, params", [("aff_resnet50", 30_373_192), ("iaff_resnext50_32x4d", 34_750_632)])
def test_output_stride_changes_no_weight(name, params):
    with torch.device("meta"):
        models = {os: timm.create_model(name, output_stride=os) for os in (32, 16, 8)}
    for model in models.values():
        assert sum(p.numel() for p in model.parameters()) == params
        assert {k: v.shape for k, v in model.state_dict().items()} == \
            {k: v.shape for k, v in models[32].state_dict().items()}


def test_default_is_output_stride_32_and_batchnorm_relu():
    # The defaults build today's model: the same weights from the same seed, the same outputs.
    torch.manual_seed(0)
    default = timm.create_model("aff_resnet50", **TINY_BASIC, fusion_stages=(1, 2, 3, 4))
    torch.manual_seed(0)
    explicit = timm.create_model("aff_resnet50", **TINY_BASIC, fusion_stages=(1, 2, 3, 4), output_stride=32,
                                 norm_layer="batchnorm", act_layer="relu")
    assert repr(default) == repr(explicit)
    for (k, a), (j, b) in zip(default.state_dict().items(), explicit.state_dict().items(), strict=True):
        assert k == j and torch.equal(a, b)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(default(x), explicit(x))
    assert not any(m.dilation != (1, 1) for m in default.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("output_stride, reductions, dilations", [
    (32, [2, 4, 8, 16, 32], (1, 1, 1, 1)),
    (16, [2, 4, 8, 16, 16], (1, 1, 1, 2)),
    (8, [2, 4, 8, 8, 8], (1, 1, 2, 4)),
])
def test_output_stride_dilates_the_last_stages(output_stride, reductions, dilations):
    torch.manual_seed(0)
    model = timm.create_model("aff_resnet50", features_only=True, output_stride=output_stride,
                              layers=(1, 1, 2, 2)).eval()
    assert model.feature_info.reduction() == reductions
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [64 // r for r in reductions]
    previous = 1
    for stage, dilation in zip(("layer1", "layer2", "layer3", "layer4"), dilations, strict=True):
        first, last = getattr(model, stage)[0], getattr(model, stage)[-1]
        # A stage's first 3x3 convolution keeps the previous stage's dilation (timm's first_dilation).
        assert first.conv2.dilation == (previous, previous) and last.conv2.dilation == (dilation, dilation)
        assert first.conv2.stride == ((2, 2) if stage != "layer1" and dilation == 1 else (1, 1))
        previous = dilation


def test_weights_of_output_stride_32_load_at_8_and_keep_the_fusion_stages():
    # The authors' converted weights are output-stride-32 state dicts: they load into a dilated model as they are.
    torch.manual_seed(0)
    trained = timm.create_model("iaff_resnet50", **TINY)
    dilated = timm.create_model("iaff_resnet50", **TINY, output_stride=8)
    dilated.load_state_dict(trained.state_dict())
    assert type(dilated.layer4[0].fusion).__name__ == "IAFF" and type(dilated.layer2[0].fusion).__name__ == "AddFusion"


def test_norm_layer_reaches_every_backbone_norm_but_not_the_fusions():
    model = timm.create_model("aff_resnet50", **TINY, norm_layer="frozenbatchnorm2d")
    kinds = {type(m).__name__ for name, m in model.named_modules() if "fusion" not in name
             and ("bn" in name.rsplit(".", 1)[-1] or name.endswith(("conv1.1", "conv1.4", "downsample.2")))}
    assert kinds == {"FrozenBatchNorm2d"}
    # The MS-CAMs keep their own BatchNorm (batch-of-one training, eval-time folding).
    assert all(not isinstance(m, nn.BatchNorm2d) or type(m).__name__ != "FrozenBatchNorm2d"
               for m in model.layer4[0].fusion.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.layer4[0].fusion.modules())


def test_dilated_model_scripts_traces_and_exports():
    torch.manual_seed(0)
    model = timm.create_model("aff_resnet50", **TINY_BASIC, output_stride=8, num_classes=5).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
        with pytest.warns(FutureWarning):
            scripted = torch.jit.script(model)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(traced(x), ref, rtol=1e-4, atol=1e-5)
        # torch.export keeps the eager fast path: the same bits.
        assert torch.equal(torch.export.export(model, (x,)).module()(x), ref)


def test_dilated_model_folds_for_inference():
    torch.manual_seed(0)
    model = timm.create_model("aff_resnet50", **TINY, output_stride=8, num_classes=5).eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        folded = fuse_for_inference(model, inplace=False)
        assert not any(isinstance(m, nn.BatchNorm2d) for name, m in folded.named_modules() if "fusion" not in name)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(output_stride=4), "output_stride must be 32, 16 or 8"),
    (dict(norm_layer="no_such_norm"), "norm_layer must be a layer class or a timm layer name"),
    (dict(act_layer=3), "act_layer must be a layer class or a timm layer name"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("aff_resnet50", **TINY, **kwargs)


@pytest.mark.parametrize("decoder, kwargs, size", [
    (smp.DeepLabV3, dict(), 64),  # its default encoder_output_stride is 8
    (smp.DeepLabV3Plus, dict(encoder_output_stride=16), 64),
    (smp.DeepLabV3Plus, dict(encoder_output_stride=8), 64),
    (smp.PAN, dict(encoder_output_stride=16), 128),  # PAN's pyramid attention pools the last map 3 times
])
def test_smp_decoder_on_an_aff_encoder_trains(decoder, kwargs, size):
    torch.manual_seed(0)
    # smp hands the extra keywords to timm.create_model: a one-block-per-stage AFF-ResNet fusing everywhere.
    model = decoder("tu-aff_resnet50", encoder_weights=None, classes=3, fusion_stages=(1, 2, 3, 4), **TINY_BASIC,
                    **kwargs)
    encoder = model.encoder.model
    assert encoder.feature_info.reduction()[-1] == kwargs.get("encoder_output_stride", 8)
    # A learnable target: 16x16 blocks of a class, which the image shows as a brighter channel.
    y = torch.randint(0, 3, (2, size // 16, size // 16)).repeat_interleave(16, 1).repeat_interleave(16, 2)
    x = 0.5 * torch.randn(2, 3, size, size) + 2 * F.one_hot(y, 3).permute(0, 3, 1, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        logits = model(x)
        assert logits.shape == (2, 3, size, size)
        loss = F.cross_entropy(logits, y)
        losses.append(loss.item())
        if step == 2:
            break
        opt.zero_grad()
        loss.backward()
        if step == 0:
            fusions = [m for name, m in encoder.named_modules() if name.endswith(".fusion")]
            assert len(fusions) == 4
            for m in fusions:  # the gradient reaches the attention of every block's fusion
                assert sum(p.grad.abs().sum() for p in m.parameters()) > 0
        opt.step()
    assert losses[2] < losses[0]


def test_smp_deeplabv3_on_the_full_aff_resnet50():
    # The call, as printed there: the full AFF-ResNet-50 (default output stride of DeepLabV3: 8).
    model = smp.DeepLabV3("tu-aff_resnet50", encoder_weights=None, classes=2).eval()
    encoder = model.encoder.model
    assert sum(p.numel() for p in encoder.parameters()) == 30_373_192 - 2048 * 1000 - 1000  # no classifier
    assert encoder.feature_info.reduction() == [2, 4, 8, 8, 8]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
