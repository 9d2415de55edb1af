"""Sample photos and image files: scikit-image's sample photos, the file suffixes read as images, RGB to grey.

``openaff export`` checks its files on the photos, ``openaff cam`` draws on them (``--data photos``) and reads
image folders, ``openaff segment predict`` reads image folders.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import ConfigError, DataError

__all__ = ["IMAGE_SUFFIXES", "LUMA", "PHOTOS", "per_channel", "photo"]

PHOTOS = ("astronaut", "chelsea", "coffee")  # scikit-image's sample photos
# What torchvision's ImageFolder reads (training's image folders), and GIF, which PIL decodes too. timm's
# get_img_extensions() is narrower (.png, .jpg, .jpeg) and would pass over the others.
IMAGE_SUFFIXES = (*IMG_EXTENSIONS, ".gif")
# ITU-R BT.709 luma weights (skimage.color.rgb2gray's).
LUMA = (0.2125, 0.7154, 0.0721)


def photo(name: str) -> np.ndarray:
    """scikit-image's sample photo ``name`` (e.g. one of :data:`PHOTOS`) as ``H x W x C`` uint8, C = 1 or 3.

    Raises:
        ImportError: scikit-image is not installed (each command says which extra installs it).
        DataError: ``name`` is not one of scikit-image's 8-bit grey or colour photos.
    """
    import skimage.data

    fn = getattr(skimage.data, str(name), None)
    if not callable(fn) or str(name).startswith("_"):
        raise DataError(f"unknown photo {name!r}: scikit-image's are e.g. {', '.join(PHOTOS)}")
    arr = np.asarray(fn())
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.dtype != np.uint8:
        raise DataError(f"skimage.data.{name} is not an 8-bit grey or colour photo")
    return np.ascontiguousarray(arr[:, :, :3])


def per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    """Normalisation statistics with one value per input channel.

    One value is repeated; an RGB mean or std for a one-channel model (timm keeps the RGB statistics of a
    model built with ``in_chans=1``) becomes the grey image's, weighted with :data:`LUMA`.

    Args:
        values: the mean or std as given.
        channels: the model's input channels.
        what: ``"mean"`` or ``"std"``, for the message.

    Raises:
        ConfigError: any other number of values.
    """
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3:
        return (sum(w * v for w, v in zip(LUMA, values, strict=True)),)
    raise ConfigError(f"the model's {what} has {len(values)} values but its input has {channels} channels")
