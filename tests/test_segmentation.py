"""Segmentation models, metrics and data: FPN shapes for every encoder family, gradients in every merge,
mIoU against a hand-computed example, VOC folders (palette and index PNGs), joint augmentation, smp interop,
and one clear line for each kind of bad mask."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from _seg_utils import write_voc
from _train_utils import write_fashion_mnist
from PIL import Image

import openaff.segmentation as seg
from openaff.cli import main
from openaff.layers import fusion_names
from openaff.segmentation.data import JointTransform, SceneMasks, SegmentationPipeline, VOCSegmentation, read_mask
from openaff.training import DataError

# Tiny members of every encoder family (ImageNet families with one block per stage).
ENCODERS = [
    ("cifar_resnet8", dict(width_mult=0.25)),
    ("aff_cifar_resnext11_32x4d", dict(width_mult=0.25)),
    ("iaff_cifar_inception_resnet8", dict(width_mult=0.25)),
    ("aff_resnet50", dict(layers=(1, 1, 1, 1))),
    ("iaff_resnext50_32x4d", dict(layers=(1, 1, 1, 1))),
    ("resnet50d", dict(layers=(1, 1, 1, 1))),  # timm's own
]


@pytest.mark.parametrize(("encoder", "kwargs"), ENCODERS, ids=[e for e, _ in ENCODERS])
def test_decoder_output_has_the_input_size_for_every_encoder_family_and_odd_sizes(encoder, kwargs):
    model = seg.create_segmenter("aff_fpn", encoder=encoder, num_classes=5, encoder_kwargs=kwargs).eval()
    feats = timm.create_model(encoder, features_only=True, **kwargs).feature_info
    # the last map of every reduction, the deepest four; one merge fewer than levels
    assert [feats.reduction()[i] for i in model.levels] == sorted(set(feats.reduction()))[-4:]
    assert len(model.merges) == len(model.levels) - 1
    with torch.no_grad():
        for h, w in ((37, 45), (32, 33), (64, 64)):
            assert model(torch.randn(2, 3, h, w)).shape == (2, 5, h, w)
    strict = seg.create_segmenter("fpn", encoder=encoder, num_classes=5, encoder_kwargs=kwargs, pad_to_stride=False)
    with pytest.raises(ValueError, match=f"37x45 is not a multiple of the encoder's stride {model.stride}"):
        strict.eval()(torch.randn(1, 3, 37, 45))


def test_padding_does_not_change_what_the_image_region_sees_at_a_multiple_of_the_stride():
    model = seg.create_segmenter("aff_fpn_cifar_resnet8", num_classes=4, in_chans=1, width_mult=0.25).eval()
    x = torch.randn(1, 1, 36, 40)  # multiples of 4: no padding, the same numbers as a direct forward
    with torch.no_grad():
        direct = model.head(model.forward_features(x))
        direct = torch.nn.functional.interpolate(direct, size=x.shape[-2:], mode="bilinear", align_corners=False)
        assert torch.equal(model(x), direct)


@pytest.mark.parametrize("fusion", fusion_names())
def test_every_fusion_type_of_the_factory_merges_and_gets_gradients_in_every_merge(fusion):
    model = seg.create_segmenter("fpn_cifar_resnet8", num_classes=3, in_chans=1, width_mult=0.25, fusion=fusion)
    assert len(model.merges) == 2
    for merge in model.merges:
        assert merge.fuse.fusion_name == fusion
        if "scenario" in vars(merge.fuse):
            assert merge.fuse.scenario == "long-skip"
    out = model(torch.randn(2, 1, 20, 24))
    assert out.shape == (2, 3, 20, 24)
    out.square().mean().backward()
    for k, merge in enumerate(model.merges):
        params = [(n, p) for n, p in merge.fuse.named_parameters() if p.requires_grad]
        if fusion in ("add", "add_bn"):
            assert not params
            continue
        assert params, f"merge {k}: {fusion} has no parameters"
        unreached = [n for n, p in params if p.grad is None]
        assert not unreached, f"merge {k} ({fusion}): no gradient reaches {unreached}"
        zero = [n for n, p in params if not p.grad.abs().sum() > 0]
        # A bias right before a training-mode BatchNorm can get exactly 0 (BN removes a constant shift;
        # concat_aff's global branch); AFF and iAFF, the paper's, get a gradient in every tensor.
        assert len(zero) <= (0 if fusion in ("aff", "iaff") else 1), f"merge {k} ({fusion}): zero gradient in {zero}"


def test_the_merge_puts_the_high_level_map_in_x_and_follows_the_papers_layout():
    merge = seg.FPNMerge(8, 4, "aff", r=4).eval()
    conv1, bn1, _ = merge.project
    conv3, bn3, _ = merge.smooth
    assert (conv1.kernel_size, conv1.in_channels, conv1.out_channels, conv1.bias is not None) == ((1, 1), 8, 4, True)
    assert (conv3.kernel_size, conv3.in_channels, conv3.out_channels, conv3.bias is not None) == ((3, 3), 4, 4, True)
    high, low = torch.randn(1, 8, 3, 5), torch.randn(1, 4, 6, 10)
    up = torch.nn.functional.interpolate(high, size=(6, 10), mode="bilinear", align_corners=False)
    xh = merge.project(up)
    w = merge.fuse.mscam(xh + low)
    expected = merge.smooth(2 * xh * w + 2 * low * (1 - w))  # AFF: x = the projected high-level map
    with torch.no_grad():
        torch.testing.assert_close(merge(high, low), expected, rtol=1e-5, atol=1e-5)


def test_registered_names_build_the_papers_small_models():
    m = timm.create_model("aff_fpn_cifar_resnet20", num_classes=11, in_chans=1)
    assert m.fusion == "aff" and m.encoder_name == "cifar_resnet8" and m.r == 4
    assert sum(1 for n, _ in m.encoder.named_children() if n.startswith("layer")) == 3
    assert len(m.encoder.layer1) == 3  # b = 3: ResNet-20-b
    assert [merge.fuse.fusion_name for merge in m.merges] == ["aff", "aff"]
    plain = timm.create_model("fpn_cifar_resnet8", fusion="iaff", b=2, width_mult=0.5)
    assert plain.fusion == "iaff" and len(plain.encoder.layer2) == 2 and plain.num_features == 32
    assert seg.is_segmenter("iaff_fpn") and not seg.is_segmenter("aff_resnet50")
    with pytest.raises(ValueError, match="unknown segmenter 'aff_fnp'.*did you mean aff_fpn"):
        seg.create_segmenter("aff_fnp")
    with pytest.raises(ValueError, match="unknown encoder 'nope'"):
        seg.create_segmenter("fpn", encoder="nope")
    with pytest.raises(ValueError, match="unknown fusion type 'bogus'"):
        seg.create_segmenter("fpn", encoder="cifar_resnet8", fusion="bogus", encoder_kwargs=dict(width_mult=0.25))


# --- metrics -------------------------------------------------------------------------------------------

def test_confusion_matrix_and_miou_against_a_hand_computed_example():
    # 4 classes; class 3 is in neither target nor prediction (absent: no IoU, not in the mean);
    # class 2 is predicted once but never true (IoU 0, counts). 255 pixels are not counted at all.
    target = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 255], [1, 1, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 3, 2, 0], [1, 0, 0, 0]])
    cm = seg.confusion_matrix(pred, target, 4)
    expected = torch.tensor([[4, 1, 0, 0],   # true 0: five pixels, one predicted 1
                             [1, 3, 1, 0],   # true 1: five pixels (the 3 under 255 is ignored)
                             [0, 0, 0, 0],
                             [0, 0, 0, 0]])
    assert torch.equal(cm, expected)
    s = seg.scores(cm)
    iou0, iou1, iou2 = 4 / (5 + 5 - 4), 3 / (5 + 4 - 3), 0 / (0 + 1 - 0)
    assert s["class_iou"][:3] == pytest.approx([100 * iou0, 100 * iou1, 100 * iou2])
    assert math.isnan(s["class_iou"][3])
    assert s["miou"] == pytest.approx(100 * (iou0 + iou1 + iou2) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 7 / 10)
    assert s["mean_acc"] == pytest.approx(100 * (4 / 5 + 3 / 5) / 2)  # classes with ground truth only
    with pytest.raises(ValueError, match="target value 7 is neither a class"):
        seg.confusion_matrix(pred, torch.full_like(target, 7), 4)
    halves = seg.confusion_matrix(pred[:1], target[:1], 4) + seg.confusion_matrix(pred[1:], target[1:], 4)
    assert torch.equal(halves, cm)  # sums: batches (and processes) add up


# --- data ----------------------------------------------------------------------------------------------

@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return write_voc(tmp_path / "voc")


def test_voc_folder_reads_palette_and_index_masks(voc: Path):
    ds = VOCSegmentation(voc, "train")
    assert len(ds) == 8 and ds.classes == ["background", "thing1", "thing2"]
    assert Image.open(voc / "SegmentationClass" / "train_000.png").mode == "P"
    assert Image.open(voc / "SegmentationClass" / "train_001.png").mode == "L"
    for i in (0, 1):
        img, mask = ds[i]
        assert img.shape == (3, 30, 40) and img.dtype == torch.uint8 and mask.shape == (30, 40)
        assert set(mask.unique().tolist()) == {0, 255, 1 + i % 2}  # the palette index is the class
        # the class's rectangle is bright in the image, the rest dark
        assert img[:, mask == 1 + i % 2].float().mean() > 100 > img[:, mask == 0].float().mean()
    assert len(VOCSegmentation(voc, "val")) == 4
    assert len(ds.subset(3)) == 3


def test_joint_transform_moves_masks_with_images_and_never_blends_labels(voc: Path):
    ds = VOCSegmentation(voc, "train")
    img, mask = ds[0]
    t = JointTransform(24, scale=(0.5, 2.0), hflip=0.5, seed=3)
    seen_flip = False
    for index in range(12):
        a, m = t(img, mask, index)
        assert a.shape == (3, 24, 24) and m.shape == (24, 24)
        assert set(m.unique().tolist()) <= {0, 1, 255}  # nearest lookups only: no value in between
        b, m2 = t(img, mask, index)
        assert torch.equal(a, b) and torch.equal(m, m2)  # seeded by (seed, epoch, index)
        inside = m == 1
        if inside.any() and (m == 0).any():
            assert a[:, inside].float().mean() > a[:, m == 0].float().mean() + 40  # the label sits on its object
        seen_flip |= not torch.equal(t(img, mask, index)[1], JointTransform(24, (0.5, 2.0), 0.0, seed=3)(
            img, mask, index)[1])
    assert seen_flip
    t.epoch = 1
    assert not all(torch.equal(t(img, mask, i)[1], JointTransform(24, (0.5, 2.0), 0.5, seed=3)(img, mask, i)[1])
                   for i in range(6))


def test_scene_masks_and_the_batched_joint_augmentation(tmp_path: Path):
    from openaff.data.scenes import FashionMNISTScenes

    fm = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=16)
    scenes = SceneMasks(FashionMNISTScenes(fm, "train", 32))
    images, masks = scenes.__getitems__(list(range(8)))
    assert images.shape == (8, 1, 32, 32) and masks.shape == (8, 32, 32)
    labels = scenes.scenes.labels[:8]
    for k in range(8):
        assert set(masks[k].unique().tolist()) <= {0, int(labels[k]) + 1}
    for kw in (dict(crop_padding=4, hflip=0.5), dict(hflip=0.5, scale=(0.5, 2.0))):
        pipe = SegmentationPipeline(torch.device("cpu"), (0.0,), (1 / 255,), seed=1, **kw)  # x = pixel value
        x, y = pipe.batch(images, masks, key=(0, 0, 0))
        assert x.shape == (8, 1, 32, 32) and y.dtype == torch.int64
        for k in range(8):
            assert set(y[k].unique().tolist()) <= {0, int(labels[k]) + 1}
        # the moved mask still covers the moved item: its pixels are brighter than the background's
        fg = y > 0
        assert x[:, 0][fg].mean() > x[:, 0][~fg].mean()
        x2, y2 = pipe.batch(images, masks, key=(0, 0, 0))
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert not torch.equal(y, pipe.batch(images, masks, key=(0, 1, 0))[1])
    plain = SegmentationPipeline(torch.device("cpu"), (0.0,), (1 / 255,))
    x, y = plain.batch(images, masks)
    assert torch.equal(x, images.float()) and torch.equal(y, masks.long())


# --- bad input: one clear line each -----------------------------------------------------------------------

def _train_voc(root: Path, tmp_path: Path, capsys) -> str:
    rc = main(["train", "--model", "fpn_cifar_resnet8", "--model-kwargs", "width_mult=0.25", "--data", "voc",
               "--data-dir", str(root), "--img-size", "24", "--batch-size", "4", "--epochs", "1", "--workers", "0",
               "--threads", "1", "--no-progress", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("openaff train: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_image_and_mask_of_different_sizes(voc: Path, tmp_path: Path, capsys):
    Image.fromarray(np.zeros((30, 39), np.uint8), "L").save(voc / "SegmentationClass" / "train_002.png")
    err = _train_voc(voc, tmp_path, capsys)
    assert "train_002.png is 39x30 but its image" in err and "train_002.jpg is 40x30" in err


def test_a_mask_value_that_is_no_class_and_not_255(voc: Path, tmp_path: Path, capsys):
    mask = np.zeros((30, 40), np.uint8)
    mask[3, 3] = 7
    Image.fromarray(mask, "L").save(voc / "SegmentationClass" / "train_001.png")
    err = _train_voc(voc, tmp_path, capsys)
    assert "train_001.png has the value 7, which is neither a class (0-2) nor 255 (ignore)" in err
    with pytest.raises(DataError, match="value 7"):
        read_mask(voc / "SegmentationClass" / "train_001.png", 3)
    assert read_mask(voc / "SegmentationClass" / "train_001.png", 8)[3, 3] == 7  # with 8 classes it is one


def test_a_missing_mask_file(voc: Path, tmp_path: Path, capsys):
    (voc / "SegmentationClass" / "train_005.png").unlink()
    err = _train_voc(voc, tmp_path, capsys)
    assert f"mask file {voc / 'SegmentationClass' / 'train_005.png'} is missing" in err
    assert "1 of the 8 train images" in err


def test_an_rgb_mask_that_is_not_a_palette(voc: Path, tmp_path: Path, capsys):
    rgb = seg.data.voc_palette()[np.asarray(Image.open(voc / "SegmentationClass" / "train_000.png"))]
    Image.fromarray(rgb, "RGB").save(voc / "SegmentationClass" / "train_000.png")
    err = _train_voc(voc, tmp_path, capsys)
    assert "train_000.png is a RGB image, not a palette (P) or single-channel index PNG" in err


def test_classifier_data_and_settings_that_cannot_segment(voc: Path, tmp_path: Path, capsys):
    fm = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=16)
    rc = main(["train", "--model", "fpn_cifar_resnet8", "--data", "fashion-mnist", "--data-dir", str(fm),
               "--no-progress", "--output", str(tmp_path / "o1")])
    err = capsys.readouterr().err
    assert rc == 2 and "fashion-mnist has no per-pixel masks" in err and err.count("\n") == 1
    rc = main(["train", "--model", "fpn_cifar_resnet8", "--data", "fashion-mnist-scenes", "--data-dir", str(fm),
               "--mixup", "0.2", "--no-progress", "--output", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "mixup/cutmix" in err and "not supported for segmentation" in err
    rc = main(["train", "--model", "cifar_resnet8", "--data", "voc", "--data-dir", str(voc), "--no-progress",
               "--output", str(tmp_path / "o3")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a VOC-style segmentation folder" in err and err.count("\n") == 1


# --- segmentation_models_pytorch ---------------------------------------------------------------------------

def test_smp_builds_fpn_and_unet_on_our_encoders():
    import segmentation_models_pytorch as smp  # the seg extra, which make test installs

    fpn = smp.FPN("tu-aff_resnet50", encoder_weights=None, classes=3).eval()
    unet = smp.Unet("tu-iaff_resnext50_32x4d", encoder_weights=None, classes=2).eval()
    assert any(n.endswith("layer3.0.fusion.mscam.local_att.0.weight") for n, _ in fpn.encoder.named_parameters())
    with torch.no_grad():
        assert fpn(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
        assert unet(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    n = sum(p.numel() for p in timm.create_model("aff_resnet50", features_only=True).parameters())
    assert sum(p.numel() for p in fpn.encoder.parameters()) == n  # the whole AFF-ResNet-50 trunk


def test_the_segment_command(tmp_path: Path, capsys):
    assert main(["segment", "models"]) == 0
    out = capsys.readouterr().out
    assert "| `aff_fpn_cifar_resnet20` |" in out and "| `iaff_fpn` |" in out
    assert main(["segment", "train", "--model", "cifar_resnet8", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("openaff segment train: error: cifar_resnet8 is a classifier") and err.count("\n") == 1
    assert main(["segment", "train", "--print-config"]) == 0  # the default recipe: segment-cpu
    assert "model: aff_fpn_cifar_resnet20" in capsys.readouterr().out
    assert main(["segment", "predict", "--weights", str(tmp_path / "none"), "--output", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("openaff segment predict: error: ") and "does not exist" in err and err.count("\n") == 1
    from openaff.study import SCENARIOS

    assert SCENARIOS["long-skip"].metric == "val_miou"
    assert SCENARIOS["long-skip"].families["resnet"].pattern.startswith("fpn_cifar_resnet")
