"""Recipes and configuration: every recipe parses and builds; flags override recipes."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _train_utils import write_cifar, write_fashion_mnist
from PIL import Image
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from openaff.cli import build_parser
from openaff.data.datasets import DATASET_STATS
from openaff.training import ConfigError, load_recipe, make_config, recipe_names
from openaff.training.config import config_from_args, dump_yaml, to_yaml
from openaff.training.data import build_data, build_transforms
from openaff.training.distributed import DistInfo
from openaff.training.factory import build_training

IMAGENET = [n for n in recipe_names() if n.startswith("imagenet-")]


def test_shipped_recipes() -> None:
    names = recipe_names()
    assert {"fashion-mnist-cpu", "fashion-mnist-gpu", "cifar-study"} <= set(names)
    assert {"imagenet-aff-resnet50", "imagenet-iaff-resnet50", "imagenet-aff-resnext50",
            "imagenet-iaff-resnext50"} <= set(IMAGENET)


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_recipe_builds(name: str) -> None:
    """The authors' recipe: Nesterov, lr 0.075 per 512, no decay on BN/bias, warm-up, mixup 0.2 off at the end."""
    cfg = make_config(name, batch_size=256)
    assert cfg.recipe == name and cfg.aug == "imagenet" and cfg.amp == "fp16" and cfg.label_smoothing == 0.1
    facts = SimpleNamespace(num_classes=1000, in_chans=3, batches_per_epoch=100)  # no data needed
    state, crit = build_training(cfg, facts, DistInfo())
    opt = state.optimizer
    assert type(opt).__name__ == "SGD" and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert len(decayed) == 1 and decayed[0]["weight_decay"] == 1e-4
    assert all(p.ndim > 1 for p in decayed[0]["params"])  # BN gamma/beta and biases are exempt
    base_lr = 0.075 * 256 / 512
    assert opt.param_groups[0]["lr"] == 0.0  # warm-up from 0
    state.scheduler.step_update(250)
    assert opt.param_groups[0]["lr"] == pytest.approx(base_lr / 2)
    state.scheduler.step_update(12000)  # after the warm-up, a cosine per step over the other 235 epochs
    assert opt.param_groups[0]["lr"] == pytest.approx(base_lr / 2 * (1 + math.cos(math.pi * 115 / 235)), rel=1e-6)
    state.scheduler.step_update(24000)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert crit.mixup.mixup_alpha == 0.2 and isinstance(crit.loss_fn, SoftTargetCrossEntropy)
    assert cfg.mixup_off_epochs == 5 and state.scaler.is_enabled()  # fp16 with loss scaling
    # zero-gamma: the last BN of every block starts at 0
    assert all(not b.bn3.weight.detach().any() for stage in (state.model.layer1, state.model.layer4)
               for b in stage)
    train_tf, eval_tf = build_transforms(cfg, "imagefolder", 224, *DATASET_STATS["imagefolder"])
    img = Image.new("RGB", (300, 260), (120, 30, 200))
    assert train_tf(img).shape == (3, 224, 224) and train_tf(img).dtype == torch.uint8
    assert eval_tf(img).shape == (3, 224, 224)
    assert any(type(t).__name__ == "ColorJitter" for t in train_tf.transforms)


def test_cifar_recipes_build(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100", n_train=256, n_test=32)
    for name, classes in (("cifar-study", 20), ("cifar-autoaugment", 100)):
        cfg = make_config(name, data_dir=str(tmp_path), model_kwargs=dict(width_mult=0.125))
        data = build_data(cfg, DistInfo())
        state, crit = build_training(cfg, data, DistInfo())
        assert data.num_classes == classes and state.model.fc.out_features == classes
        x, y, _ = next(iter(data.train_loader(0)))
        assert x.shape == (128, 3, 32, 32)
        assert data.train_pipeline(x, key=(0, 0, 0)).shape == (128, 3, 32, 32)
    study = make_config("cifar-study")
    assert (study.lr, study.decay_milestones, study.epochs, study.opt) == (0.2, [300, 350], 400, "sgd")


@pytest.mark.parametrize("name", ["fashion-mnist-cpu", "fashion-mnist-gpu"])
def test_fashion_mnist_recipes_build(name: str, tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=256, n_test=64)
    cfg = make_config(name, data_dir=str(tmp_path), batch_size=64)
    data = build_data(cfg, DistInfo())
    state, crit = build_training(cfg, data, DistInfo())
    assert (data.num_classes, data.in_chans) == (10, 1) and isinstance(crit.loss_fn, LabelSmoothingCrossEntropy)
    x, y, _ = next(iter(data.train_loader(0)))
    assert x.shape == (64, 1, 28, 28)
    assert state.model(data.train_pipeline(x[:4], key=(0, 0, 0))).shape == (4, 10)


def test_flags_override_recipe() -> None:
    parser = build_parser()
    args = parser.parse_args(["train", "--recipe", "fashion-mnist-cpu", "--lr", "0.5", "--epochs", "3",
                              "--model-kwargs", "drop_path_rate=0.1", "--no-channels-last", "--limit-train", "none",
                              "--cpu-alloc", "system"])
    cfg = config_from_args(args)
    recipe = load_recipe("fashion-mnist-cpu")
    assert (cfg.lr, cfg.epochs, cfg.channels_last, cfg.limit_train) == (0.5, 3, False, None)
    assert cfg.cpu_alloc == "system" and make_config("fashion-mnist-cpu").cpu_alloc == "retain"
    assert cfg.model_kwargs == {**recipe["model_kwargs"], "drop_path_rate": 0.1}
    assert cfg.batch_size == recipe["batch_size"] and cfg.recipe == "fashion-mnist-cpu"


def test_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown recipe"):
        make_config("no-such-recipe")
    with pytest.raises(ConfigError, match="unknown setting"):
        make_config(dict(learning_rate=0.1))
    with pytest.raises(ConfigError, match="amp"):
        make_config(amp="fp8")
    with pytest.raises(ConfigError, match="cpu_alloc"):
        make_config(cpu_alloc="jemalloc")
    bad = tmp_path / "r.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="YAML"):
        make_config(str(bad))
    bad.write_text("model: aff_cifar_resnet8\nepochs: 2\n")
    assert make_config(str(bad)).epochs == 2


def test_a_string_that_reads_as_a_number_round_trips_through_the_printed_recipe(tmp_path):
    # The recipe loader reads 1e5 as a number (YAML 1.2); the printed recipe must quote such a string, or
    # a folder named "1e5" would come back as the float 100000.0 and be refused.
    cfg = make_config(None, data="imagefolder", data_dir="1e5")
    path = tmp_path / "printed.yaml"
    path.write_text(to_yaml(cfg))
    assert make_config(str(path)).data_dir == "1e5"
    assert dump_yaml({"data": "0E0", "lr": 1e-4}) == "data: '0E0'\nlr: 0.0001\n"
