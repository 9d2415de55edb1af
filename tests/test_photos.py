"""openaff.photos: one set of sample photos and image suffixes, and per-channel statistics for grey models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from openaff.cam import load_images
from openaff.errors import ConfigError, DataError
from openaff.photos import IMAGE_SUFFIXES, LUMA, PHOTOS, per_channel, photo


def test_per_channel_statistics() -> None:
    assert per_channel([0.5], 3, "mean") == (0.5, 0.5, 0.5)
    assert per_channel((0.1, 0.2, 0.3), 3, "mean") == (0.1, 0.2, 0.3)
    grey = per_channel((0.485, 0.456, 0.406), 1, "mean")  # timm's RGB mean on a model built with in_chans=1
    assert grey == pytest.approx((0.2125 * 0.485 + 0.7154 * 0.456 + 0.0721 * 0.406,)) and sum(LUMA) == pytest.approx(1)
    with pytest.raises(ConfigError, match="the model's std has 2 values but its input has 3 channels"):
        per_channel((1.0, 1.0), 3, "std")


def test_photos_and_image_files(tmp_path: Path) -> None:
    for name in PHOTOS:
        arr = photo(name)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.flags.c_contiguous
    assert photo("camera").shape[2] == 1  # a grey photo keeps one channel
    with pytest.raises(DataError, match="unknown photo 'nosuch'"):
        photo("nosuch")
    # Every file training's image folders read (torchvision's ImageFolder) is an image here too.
    assert set(IMG_EXTENSIONS) <= set(IMAGE_SUFFIXES)
    for suffix in (".ppm", ".gif", ".webp"):
        Image.fromarray(photo("chelsea")[:16, :16]).save(tmp_path / f"c{suffix}")
    (tmp_path / "notes.txt").write_text("not an image")
    assert sorted(s.name for s in load_images(tmp_path)) == ["c", "c", "c"]
