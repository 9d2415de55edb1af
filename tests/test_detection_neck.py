"""The AFF feature pyramid for torchvision's detectors: torchvision's FPN exactly with fusion="add", its checkpoints,
the long-skip merge written out, TorchScript, and a Faster R-CNN training step on fashion-mnist-scenes boxes."""

from collections import OrderedDict

import pytest
import torch
from _train_utils import write_fashion_mnist
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

import openaff
from openaff import FusionFeaturePyramidNetwork, FusionFPNBackbone, create_fusion
from openaff.data.datasets import DATASET_STATS
from openaff.data.scenes import FashionMNISTScenes

IN_CHANNELS = [8, 16, 32]


def _maps(dtype: torch.dtype = torch.float32) -> OrderedDict:
    # Odd sizes: nearest upsampling to the lateral map's size, not a plain factor of 2.
    torch.manual_seed(1)
    return OrderedDict(c2=torch.randn(2, 8, 15, 17, dtype=dtype), c3=torch.randn(2, 16, 8, 9, dtype=dtype),
                       c4=torch.randn(2, 32, 3, 5, dtype=dtype))


@pytest.mark.parametrize("extra, norm_layer", [
    (None, None),
    (LastLevelMaxPool, None),
    (lambda: LastLevelP6P7(16, 16), nn.BatchNorm2d),
])
def test_add_fusion_is_torchvisions_fpn(extra, norm_layer):
    torch.manual_seed(0)
    ref = FeaturePyramidNetwork(IN_CHANNELS, 16, extra() if extra else None, norm_layer)
    torch.manual_seed(0)
    ours = FusionFeaturePyramidNetwork(IN_CHANNELS, 16, extra() if extra else None, norm_layer, fusion="add")
    # The same names, and the same initialisation from the same seed (the fusions come after torchvision's layers).
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True))
    with torch.no_grad():
        for m in ref.modules():  # non-trivial weights, loaded into ours
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:  # no bias before a norm layer
                m.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    for training in (False, True):
        x = _maps()
        want, got = ref.train(training)(x), ours.train(training)(x)
        assert list(got) == list(want)
        for k in want:
            assert torch.equal(got[k], want[k])


def test_aff_fpn_takes_a_torchvision_checkpoint_but_its_fusions():
    ref = FeaturePyramidNetwork(IN_CHANNELS, 16, LastLevelMaxPool())
    ours = FusionFeaturePyramidNetwork(IN_CHANNELS, 16, LastLevelMaxPool())
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith(("fusions.0.", "fusions.1.")) for k in result.missing_keys)
    # (BatchNorm fills in a missing num_batches_tracked itself, so those are not reported)
    assert set(result.missing_keys) == {f"fusions.{k}" for k in ours.fusions.state_dict()
                                        if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("fusion", ["aff", "iaff", "ms_gau"])
def test_every_merge_is_the_long_skip_fusion_of_the_upsampled_map_and_the_lateral(fusion):
    # Written out in float64: p_k = layer_k(fuse_k(up(m_{k+1}), inner_k(c_k))), with m_top = inner_top(c_top).
    torch.manual_seed(0)
    fpn = FusionFeaturePyramidNetwork(IN_CHANNELS, 16, fusion=fusion, r=4).double().eval()
    assert len(fpn.fusions) == len(IN_CHANNELS) - 1
    for module in fpn.fusions:
        reference = create_fusion(fusion, 16, 4, scenario="long-skip")
        assert type(module) is type(reference)
        assert {k: v.shape for k, v in module.state_dict().items()} == \
            {k: v.shape for k, v in reference.state_dict().items()}
    with torch.no_grad():
        for m in fpn.modules():  # calibrated-looking statistics: the attention is not a constant
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
        x = _maps(torch.float64)
        feats = list(x.values())
        merged = fpn.inner_blocks[-1](feats[-1])
        want = [fpn.layer_blocks[-1](merged)]
        for k in range(len(feats) - 2, -1, -1):
            lateral = fpn.inner_blocks[k](feats[k])
            up = nn.functional.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            merged = fpn.fusions[k](up, lateral)
            want.insert(0, fpn.layer_blocks[k](merged))
        got = fpn(x)
    assert list(got) == list(x)
    for g, w in zip(got.values(), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # The fusion really weighs its two inputs: swapping them changes the merge.
    up = nn.functional.interpolate(fpn.inner_blocks[2](feats[2]), size=feats[1].shape[-2:], mode="nearest")
    lateral = fpn.inner_blocks[1](feats[1])
    with torch.no_grad():
        assert not torch.allclose(fpn.fusions[1](up, lateral), fpn.fusions[1](lateral, up))


def test_fusion_fpn_scripts_exports_and_trains_with_a_batch_of_one():
    torch.manual_seed(0)
    fpn = FusionFeaturePyramidNetwork(IN_CHANNELS, 16, LastLevelMaxPool()).eval()
    with pytest.warns(FutureWarning):
        scripted = torch.jit.script(fpn)
    x = _maps()
    with torch.no_grad():
        want, got = fpn(x), scripted(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    exported = torch.export.export(fpn, (x,)).module()
    with torch.no_grad():
        got = exported(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    one = OrderedDict((k, v[:1]) for k, v in x.items())
    sum(v.sum() for v in fpn.train()(one).values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fpn.fusions.parameters())


def test_exported_from_the_package():
    assert openaff.FusionFeaturePyramidNetwork is FusionFeaturePyramidNetwork
    assert {"FusionFeaturePyramidNetwork", "FusionFPNBackbone"} <= set(openaff.__all__)


def test_backbone_refuses_a_module_without_feature_info():
    with pytest.raises(ValueError, match="features_only=True"):
        FusionFPNBackbone(nn.Conv2d(1, 8, 3))


def test_faster_rcnn_with_the_aff_neck_trains_on_scene_boxes(tmp_path):
    scenes = FashionMNISTScenes(write_fashion_mnist(tmp_path / "fmnist", n_train=16, n_test=8), "train")
    batch = scenes.batch(range(4))
    images = [img.float() / 255 for img in batch["image"]]
    targets = [dict(boxes=box.float()[None], labels=label[None] + 1)  # 0 is torchvision's background
               for box, label in zip(batch["box"], batch["label"], strict=True)]

    torch.manual_seed(0)
    # A one-block-per-stage AFF-ResNet (grey input, AFF in stages 3-4) under the AFF pyramid.
    backbone = FusionFPNBackbone("aff_resnet50", out_channels=32,
                                 encoder_kwargs=dict(in_chans=1, block="basic", layers=(1, 1, 1, 1)))
    (mean,), (std,) = DATASET_STATS["fashion-mnist-scenes"]
    # Anchors for 14-44 px items on a 64 px canvas, one size per pyramid level.
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5)
    # Fewer proposals than torchvision's defaults (2000/1000): four 64 px scenes hold four boxes.
    model = FasterRCNN(backbone, num_classes=11, min_size=64, max_size=64, image_mean=[mean], image_std=[std],
                       rpn_anchor_generator=anchors, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                       rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64)
    with torch.no_grad():
        feats = backbone(torch.randn(1, 1, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"] and {f.shape[1] for f in feats.values()} == {32}

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    fusions = [*backbone.fpn.fusions] + [m for name, m in backbone.body.named_modules()
                                         if name.endswith(".fusion") and name.startswith(("layer3", "layer4"))]
    assert len(fusions) == 3 + 2
    for m in fusions:  # the detection losses reach every fusion of the neck and of the encoder
        assert sum(p.grad.abs().sum() for p in m.parameters()) > 0
    opt.step()
    detections = model.eval()(images)
    assert len(detections) == 4 and all(d["boxes"].shape[1] == 4 for d in detections)


def test_drops_into_torchvisions_own_backbone_with_fpn():
    # torchvision's BackboneWithFPN (ResNet-18 here) with its FPN swapped for ours: fusion="add" with the
    # FPN's weights leaves the whole detector's output unchanged; an AFF pyramid runs in the same place.
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64, rpn_pre_nms_top_n_test=100,
                       rpn_post_nms_top_n_test=50).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    with torch.no_grad():
        want = model(images)
        assert all(len(w["boxes"]) > 0 for w in want)  # something to compare
        tv_fpn = backbone.fpn
        backbone.fpn = FusionFeaturePyramidNetwork([64, 128, 256, 512], 256, LastLevelMaxPool(), fusion="add")
        backbone.fpn.load_state_dict(tv_fpn.state_dict())
        got = model.eval()(images)
        for g, w in zip(got, want, strict=True):
            assert all(torch.equal(g[k], w[k]) for k in w)
        backbone.fpn = FusionFeaturePyramidNetwork([64, 128, 256, 512], 256, LastLevelMaxPool())
        assert isinstance(backbone.fpn, FeaturePyramidNetwork)
        assert all(d["boxes"].shape[1] == 4 for d in model.eval()(images))
