"""``fashion-mnist-scenes``: real Fashion-MNIST items in larger cluttered grey scenes, made on the fly.

Scene ``i`` of a split shows Fashion-MNIST image ``i`` of that split (its label is the scene's
label), resized to a random square side (default 14-44 px on a 64 x 64 canvas) and pasted fully
inside the canvas at a random position, over a random grey level with pixel noise, among 2-5
*fragments*: random crops (30-55 % of the side in each direction) of other random items of the same
split at about the item's scale (0.8-1.25 x), which may stick out of the canvas and, in front of the
item, cover part of it; their cut edges fade over 3 px, so that they are not told apart from the item
by hard rectangular edges alone. The canvas has a grey level of 0-48 and pixel noise of sigma 0-8;
the item and each fragment have a contrast of 0.6-1. The task is harder than Fashion-MNIST (small
items, scale and position unknown, distractors made of the same real textures, occlusion, varying
contrast) yet well defined: the scene holds exactly one whole item, every fragment is at most about
half its size in each direction, and fragments in front never hide more than ``max_occlusion``
(25 %) of its foreground pixels (otherwise they all go behind).

Compositing treats a Fashion-MNIST image as light on black: a pixel of resized intensity ``I`` has
opacity ``a = min(I / 64, 1)`` and adds ``I * contrast``, so ``out = under * (1 - a) + I * contrast``
layer by layer (fragments behind, the item, fragments in front). The item's *visible weight* at a
pixel is its ``a`` times ``(1 - a)`` of every fragment in front. Foreground (mask ``label + 1``, box)
is where that weight is at least 0.5, i.e. where at least half of the pixel comes from the item;
unoccluded, that is a resized intensity of 32 or more (12.5 % of white). Clutter is background (0).
The box ``(x0, y0, x1, y1)`` is tight around the foreground with exclusive ends, so
``mask[y0:y1, x0:x1]`` holds every foreground pixel (the continuous pixel-edge coordinates, as
torchvision's xyxy boxes).

Every random number is a hash of ``(seed, split, index, draw)`` (SplitMix64), so a scene is the same
whichever batch, worker or process makes it; nothing is written to disk. A batch is made at once:
the items and fragment sources of each size are resized in one ``F.interpolate`` call (antialiased),
then the pixels of every layer's window, for all scenes together, are listed, looked up and blended
onto the flat ``B x H x W`` canvases with vectorised numpy indexing (about 30 ms per 128 scenes on
one CPU thread). The scene's own draws come before the fragments', so the same scene with
``clutter=(0, 0)`` has the item at the same place: its mask is the unoccluded foreground.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, check_int, check_number
from .datasets import FASHION_MNIST_DIR, InMemoryImages, SeededTransform, check_limit, load_fashion_mnist

__all__ = ["FASHION_MNIST_CLASSES", "FashionMNISTScenes", "boxes_from_masks", "save_sample_grid", "side_bins"]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
# name -> (Fashion-MNIST split, hash id); "holdout": scenes of training items kept out of training (validation)
_SPLITS = {"train": ("train", 0), "val": ("test", 1), "test": ("test", 1), "holdout": ("train", 2)}
OPAQUE = 64.0  # resized intensity from which a pixel is fully opaque
FOREGROUND = 0.5  # minimum visible weight of a foreground pixel
FEATHER = 3  # fragments fade out over this many pixels at their cut edges: no hard rectangles to spot
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Draws per scene: 8 of the scene, then 10 per fragment slot.
_SCENE_DRAWS, _FRAG_DRAWS = 8, 10


def _mix(x: np.ndarray) -> np.ndarray:
    # SplitMix64's finaliser: a bijection of uint64 whose outputs pass BigCrush for consecutive inputs.
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(keys: np.ndarray, n: int, salt: int) -> np.ndarray:
    """``len(keys) x n`` uint64 hashes of ``(key, salt, 0..n-1)``."""
    with np.errstate(over="ignore"):
        base = _mix(keys.astype(np.uint64) ^ _mix(np.full(len(keys), salt, dtype=np.uint64)))
        ctr = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN
        return _mix(base[:, None] + ctr[None, :])


def _uniform(keys: np.ndarray, n: int, salt: int) -> np.ndarray:
    """``len(keys) x n`` floats in [0, 1), the top 53 bits of the hashes."""
    return (_hash(keys, n, salt) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight ``(x0, y0, x1, y1)`` boxes (exclusive ends) of the non-zero pixels of ``B x H x W`` masks.

    An empty mask gives ``(0, 0, 0, 0)`` (an augmentation can crop an item away entirely).

    Args:
        masks: ``B x H x W`` label masks (0 = background).
    """
    fg = masks != 0
    b, h, w = fg.shape
    rows, cols = fg.any(2), fg.any(1)
    ar_h, ar_w = torch.arange(h, device=masks.device), torch.arange(w, device=masks.device)
    big = torch.tensor(max(h, w), device=masks.device)
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(1)
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1)
    return torch.where(fg.flatten(1).any(1, keepdim=True), boxes, 0).long()


def side_bins(smallest: int, largest: int, n: int = 4) -> list[tuple[int, int]]:
    """``n`` bins of whole pixel sides covering ``smallest .. largest`` (inclusive), as equal as whole pixels allow.

    The lower bins get the extra pixel: ``side_bins(14, 33)`` is 14-18, 19-23, 24-28, 29-33 (the 48-pixel
    canvas), ``side_bins(14, 44)`` 14-21, 22-29, 30-37, 38-44.

    Args:
        smallest: the smallest pasted side.
        largest: the largest.
        n: number of bins (fewer when there are fewer sides).
    """
    if smallest > largest or n < 1:
        raise ValueError(f"side bins need smallest <= largest and n >= 1, got {smallest}, {largest}, {n}")
    parts = np.array_split(np.arange(smallest, largest + 1), min(n, largest - smallest + 1))
    return [(int(p[0]), int(p[-1])) for p in parts]


def _check_int(value: object, what: str, lo: int, hi: int | None = None) -> int:
    bound = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
    return int(check_int(value, f"fashion-mnist-scenes: {what} must be {bound}", lo=lo, hi=hi))


def _check_range(value: object, what: str, lo: int, hi: int) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"fashion-mnist-scenes: {what} must be a pair (smallest, largest), got {value!r}")
    a, b = (_check_int(v, what, lo, hi) for v in value)
    if a > b:
        raise ConfigError(f"fashion-mnist-scenes: {what} {tuple(value)} has its smallest value above its largest")
    return a, b


class FashionMNISTScenes(Dataset):
    """Scenes of one Fashion-MNIST item among fragments of others (see the module docstring).

    Behaves as the in-memory data sets of the batch pipeline: ``scenes[i]`` is ``(uint8 1 x H x W
    image, label)``, ``scenes.__getitems__(indices)`` a batch ``(uint8 B x 1 x H x W, int64 B)``
    made in one go (no worker processes needed; workers work too), ``subset(n)`` the first ``n``
    scenes. ``sample(i)`` and ``batch(indices)`` add the box and the mask.

    Args:
        root: directory with the Fashion-MNIST idx files (default: the Debian package).
        split: ``train`` (the official 60k training images), ``val``/``test`` (the official 10k) or ``holdout``
            (training items kept out of training, with scenes of their own: pass them as ``items``).
        canvas: side of the square canvas in pixels (at least 28).
        seed: the scene set's seed (the same seed and index always give the same scene).
        sides: smallest and largest item side in pixels (default: 14 and ``round(canvas * 11 / 16)``,
            44 on a 64 canvas; at least 10, at most ``canvas``).
        clutter: smallest and largest number of fragments per scene (0-8).
        max_occlusion: largest fraction of the item's foreground that fragments in front may hide (0-0.5).
        items: the Fashion-MNIST split already loaded (instead of reading ``root``).
    """

    def __init__(self, root: str | Path | None = FASHION_MNIST_DIR, split: str = "train", canvas: int = 64,
                 seed: int = 0, *, sides: tuple[int, int] | None = None, clutter: tuple[int, int] = (2, 5),
                 max_occlusion: float = 0.25, items: InMemoryImages | None = None) -> None:
        if split not in _SPLITS:
            raise ConfigError(f"fashion-mnist-scenes: split must be train, val, test or holdout, got {split!r}")
        self.canvas = _check_int(canvas, "canvas", 28)
        self.seed = _check_int(seed, "seed", 0, 2**32 - 1)
        default_max = max(14, round(self.canvas * 11 / 16))
        self.sides = _check_range(sides if sides is not None else (14, default_max), "sides", 10, self.canvas)
        self.clutter = _check_range(clutter, "clutter", 0, 8)
        check_number(max_occlusion, "fashion-mnist-scenes: max_occlusion must be a fraction from 0 to 0.5", lo=0,
                     hi=0.5)
        self.max_occlusion = float(max_occlusion)
        self.split = split
        if items is None:
            items = load_fashion_mnist(root if root is not None else FASHION_MNIST_DIR, _SPLITS[split][0])
        if items.images.ndim != 4 or tuple(items.images.shape[1:]) != (1, 28, 28) or len(items) < 2:
            raise DataError(f"fashion-mnist-scenes needs at least two 1 x 28 x 28 items, got "
                            f"{tuple(items.images.shape)}")
        self.items = items
        self.n = self.n_items = len(items)  # scenes kept (subset) and items of the split (fragment sources)
        self.transform: SeededTransform | None = None
        self._key = int(_mix(np.array([self.seed * 2 + _SPLITS[split][1]], dtype=np.uint64))[0])

    @property
    def labels(self) -> torch.Tensor:
        """The scenes' labels (those of their items)."""
        return self.items.labels[: self.n]

    @property
    def classes(self) -> list[str]:
        return list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return self.n

    @property
    def side_range(self) -> tuple[int, int]:
        """Smallest and largest pasted item side (pixels)."""
        return tuple(self.sides)

    def item_sides(self) -> torch.Tensor:
        """The pasted item side of every scene kept (int64; made once, in batches of 1,024, and kept)."""
        if getattr(self, "_sides", None) is None or len(self._sides) != self.n:
            self._sides = torch.cat([self.batch(range(i, min(i + 1024, self.n)))["side"]
                                     for i in range(0, self.n, 1024)]) if self.n else torch.zeros(0, dtype=torch.int64)
        return self._sides

    def subset(self, n: int | None, what: str = "limit") -> FashionMNISTScenes:
        """The first ``n`` scenes (all with None); fragments still come from the whole split.

        Args:
            n: how many scenes to keep.
            what: the setting ``n`` came from, for the error message.
        """
        n = check_limit(n, what)
        if n is None or n >= self.n:
            return self
        out = object.__new__(FashionMNISTScenes)
        out.__dict__.update(self.__dict__)
        out.n = n
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.batch([i])
        img = s["image"][0]
        if self.transform is not None:
            img = self.transform(Image.fromarray(img[0].numpy(), "L"), int(i))
        return img, int(s["label"][0])

    def __getitems__(self, indices: Sequence[int]):
        # One batched generation instead of len(indices) calls (see loader.collate).
        if self.transform is not None:
            return [self[i] for i in indices]
        s = self.batch(indices)
        return s["image"], s["label"]

    def sample(self, i: int) -> dict[str, torch.Tensor | int]:
        """Scene ``i``: ``image`` (uint8 1 x H x W), ``label``, ``box`` (int64 x0, y0, x1, y1), ``mask``
        (uint8 H x W, 0 or label + 1) and ``side`` (the item's pasted side in pixels)."""
        s = self.batch([i])
        return dict(image=s["image"][0], label=int(s["label"][0]), box=s["box"][0], mask=s["mask"][0],
                    side=int(s["side"][0]))

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Scenes ``indices`` at once: ``image`` (uint8 B x 1 x H x W), ``label`` (int64 B), ``box``
        (int64 B x 4), ``mask`` (uint8 B x H x W) and ``side`` (int64 B)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise IndexError(f"scene index out of range for {self.n} scenes")
        idx = idx % self.n if idx.size else idx
        return self._make(idx)

    # The generator ------------------------------------------------------------------------------
    def _make(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        b, hw, nf = len(idx), self.canvas, self.clutter[1]
        lo, hi = self.sides
        keys = (np.uint64(self._key) ^ idx.astype(np.uint64)) if b else idx.astype(np.uint64)
        u = _uniform(keys, _SCENE_DRAWS + _FRAG_DRAWS * nf, salt=1)
        su, fu = u[:, :_SCENE_DRAWS], u[:, _SCENE_DRAWS:].reshape(b, nf, _FRAG_DRAWS)

        side = lo + np.floor(su[:, 0] * (hi - lo + 1)).astype(np.int64)
        ty = np.floor(su[:, 1] * (hw - side + 1)).astype(np.int64)
        tx = np.floor(su[:, 2] * (hw - side + 1)).astype(np.int64)
        contrast = 0.6 + 0.4 * su[:, 3]
        level = 48.0 * su[:, 4]
        sigma = 8.0 * su[:, 5]
        n_frag = self.clutter[0] + np.floor(su[:, 6] * (self.clutter[1] - self.clutter[0] + 1)).astype(np.int64)

        # Fragment f of scene k: item src (never the scene's own), resized to fside, crop ch x cw at (py, px),
        # pasted with its top-left at (fy, fx), up to half outside the canvas.
        src = (idx[:, None] + 1 + np.floor(fu[..., 0] * (self.n_items - 1)).astype(np.int64)) % self.n_items
        fside = np.clip(np.rint(side[:, None] * (0.8 + 0.45 * fu[..., 1])), 8, hi).astype(np.int64)
        ch = np.maximum(3, np.rint(fside * (0.3 + 0.25 * fu[..., 2]))).astype(np.int64)
        cw = np.maximum(3, np.rint(fside * (0.3 + 0.25 * fu[..., 3]))).astype(np.int64)
        py = np.floor(fu[..., 4] * (fside - ch + 1)).astype(np.int64)
        px = np.floor(fu[..., 5] * (fside - cw + 1)).astype(np.int64)
        fy = np.floor(fu[..., 6] * (hw + 1)).astype(np.int64) - ch // 2
        fx = np.floor(fu[..., 7] * (hw + 1)).astype(np.int64) - cw // 2
        fy, fx = np.minimum(fy, hw - (ch + 1) // 2), np.minimum(fx, hw - (cw + 1) // 2)
        front = fu[..., 8] < 0.5
        fcontrast = 0.6 + 0.4 * fu[..., 9]
        used = np.arange(nf)[None, :] < n_frag[:, None]

        # Layer 0 is the item, layers 1..nf the fragments; all as (B, L) arrays.
        layer_src = np.concatenate([idx[:, None], src], 1)
        layer_side = np.concatenate([side[:, None], fside], 1)
        oy = np.concatenate([ty[:, None], fy - py], 1)  # canvas row of the resized patch's row 0
        ox = np.concatenate([tx[:, None], fx - px], 1)
        r0 = np.concatenate([ty[:, None], fy], 1)  # the visible window on the canvas
        c0 = np.concatenate([tx[:, None], fx], 1)
        r1 = np.concatenate([(ty + side)[:, None], np.where(used, fy + ch, fy)], 1)
        c1 = np.concatenate([(tx + side)[:, None], fx + cw], 1)

        patches, start = self._resize(layer_src.reshape(-1), layer_side.reshape(-1))
        start, gain = start.reshape(b, nf + 1), np.concatenate([contrast[:, None], fcontrast], 1).astype(np.float32)
        # Per slot (0: the item, 1..nf: the fragments): scene, flat canvas pixel, opacity and light of each
        # pixel of its window; a window holds only the pixels it covers, about 1/17 of B x L full canvases.
        win = []
        for slot in range(nf + 1):
            k, y, x, a, light = self._window(patches, start[:, slot], layer_side[:, slot], gain[:, slot], oy[:, slot],
                                             ox[:, slot], r0[:, slot], r1[:, slot], c0[:, slot], c1[:, slot],
                                             feather=FEATHER if slot else 0)
            win.append((k, (k * hw + y) * hw + x, a, light))
            if slot == 0:
                y_item, x_item = y, x

        # Fragments in front that would hide more than max_occlusion of the foreground all go behind.
        k_item, pix_item, a_item, _ = win[0]
        cover = np.ones(b * hw * hw, dtype=np.float32)
        for f in range(nf):
            k, pix, a, _ = win[f + 1]
            sel = front[k, f]
            cover[pix[sel]] *= 1 - a[sel]
        item_fg = a_item >= FOREGROUND
        visible = (a_item * cover[pix_item]) >= FOREGROUND
        n_fg = np.bincount(k_item, item_fg, minlength=b)
        hidden = 1 - np.bincount(k_item, visible, minlength=b) / np.maximum(n_fg, 1)
        keep_front = hidden <= self.max_occlusion
        front &= keep_front[:, None]
        fg = np.where(keep_front[k_item], visible, item_fg)

        out = np.repeat(level.astype(np.float32), hw * hw)
        order = [(f, False) for f in range(nf)] + [(-1, False)] + [(f, True) for f in range(nf)]
        for f, in_front in order:  # behind the item in slot order, the item, then in front
            k, pix, a, light = win[f + 1]
            if f >= 0:
                sel = front[k, f] == in_front
                pix, a, light = pix[sel], a[sel], light[sel]
            out[pix] = out[pix] * (1 - a) + light
        out = out.reshape(b, hw, hw) + self._noise(keys, hw) * sigma.astype(np.float32)[:, None, None]
        image = torch.from_numpy(np.clip(np.rint(out), 0, 255).astype(np.uint8)).unsqueeze(1)

        labels = self.items.labels[torch.from_numpy(idx)]
        mask = np.zeros(b * hw * hw, dtype=np.uint8)
        mask[pix_item[fg]] = (labels.numpy()[k_item[fg]] + 1).astype(np.uint8)
        # The box from the foreground pixels, scene by scene (the item's pixels come grouped by scene). Every
        # Fashion-MNIST item has foreground at side 10 (2 pixels at least, checked on all 70k), and occlusion
        # leaves at least half of it; an empty mask (other data in the idx format) gets the box (0, 0, 0, 0).
        k_fg, ys, xs = k_item[fg], y_item[fg], x_item[fg]
        first, end = np.searchsorted(k_fg, np.arange(b)), np.searchsorted(k_fg, np.arange(b), side="right")
        has, box = first < end, np.zeros((b, 4), dtype=np.int64)
        if has.any():
            at = first[has]
            box[has] = np.stack([np.minimum.reduceat(xs, at), np.minimum.reduceat(ys, at),
                                 np.maximum.reduceat(xs, at) + 1, np.maximum.reduceat(ys, at) + 1], 1)
        return dict(image=image, label=labels, box=torch.from_numpy(box), mask=torch.from_numpy(mask).view(b, hw, hw),
                    side=torch.from_numpy(side))

    def _resize(self, src: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Items ``src`` resized to ``sizes`` (antialiased bilinear), one F.interpolate call per size.

        Returns the patches flattened one after another and where each starts.
        """
        images, parts, start, at = self.items.images, [], np.zeros(len(src), dtype=np.int64), 0
        for s in np.unique(sizes).tolist():
            sel = np.flatnonzero(sizes == s)
            x = images[torch.from_numpy(src[sel])].float()
            if s != 28:
                x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            parts.append(x.clamp_(0, 255).numpy().reshape(-1))
            start[sel] = at + np.arange(len(sel)) * s * s
            at += len(sel) * s * s
        return np.concatenate(parts), start

    def _window(self, patches: np.ndarray, start: np.ndarray, side: np.ndarray, gain: np.ndarray, oy: np.ndarray,
                ox: np.ndarray, r0: np.ndarray, r1: np.ndarray, c0: np.ndarray, c1: np.ndarray,
                feather: int = 0) -> tuple[np.ndarray, ...]:
        """The canvas pixels of one slot's windows ``[r0, r1) x [c0, c1)`` (clipped to the canvas) in every
        scene: ``(scene, row, column, opacity, light)``; canvas pixel (y, x) shows pixel (y - oy, x - ox) of
        the scene's ``side``-square patch that begins at ``start`` in ``patches``. With ``feather``, opacity
        and light fade linearly over that many pixels towards the window's (unclipped) edges."""
        hw, b = self.canvas, len(oy)
        # int32 arithmetic: the indices stay below B x H x W, and half the bytes make it faster.
        r0, r1, c0, c1, oy, ox, side, start = (v.astype(np.int32) for v in (r0, r1, c0, c1, oy, ox, side, start))
        y0, y1, x0, x1 = (np.clip(v, 0, hw) for v in (r0, r1, c0, c1))
        nh, nw = np.maximum(y1 - y0, 0), np.maximum(x1 - x0, 0)
        cnt = nh * nw
        k = np.repeat(np.arange(b, dtype=np.int32), cnt)
        local = np.arange(int(cnt.sum()), dtype=np.int32) - np.repeat(np.cumsum(cnt, dtype=np.int32) - cnt, cnt)
        dy, dx = np.divmod(local, np.repeat(np.maximum(nw, 1), cnt))
        y, x = y0[k] + dy, x0[k] + dx
        value = patches[start[k] + (y - oy[k]) * side[k] + x - ox[k]]
        if feather:
            edge = np.minimum(np.minimum(y - r0[k], r1[k] - 1 - y), np.minimum(x - c0[k], c1[k] - 1 - x))
            value = value * np.minimum((edge + 1) * np.float32(1 / feather), np.float32(1))
        alpha = np.minimum(value * np.float32(1 / OPAQUE), np.float32(1))
        return k, y, x, alpha, value * gain[k]

    @staticmethod
    def _noise(keys: np.ndarray, hw: int) -> np.ndarray:
        """Zero-mean unit-variance triangular pixel noise, ``B x H x W``: two 8-bit uniforms per pixel."""
        n = hw * hw
        h = _hash(keys, (n + 3) // 4, salt=2).astype("<u8")  # 8 bytes: 4 pixels of two byte-uniforms each
        u = h.view(np.uint8).reshape(len(keys), -1, 2).astype(np.float32)
        tri = (u[..., 0] + u[..., 1] - np.float32(255)) * np.float32(6 ** 0.5 / 256)
        return tri[:, :n].reshape(-1, hw, hw)


def save_sample_grid(path: str | Path, n: int = 32, seed: int = 0, *, root: str | Path = FASHION_MNIST_DIR,
                     split: str = "val", canvas: int = 64, cols: int = 8, start: int = 0) -> Path:
    """A PNG grid of scenes ``start .. start + n - 1``: mask as a coloured overlay, box, class name.

    Args:
        path: the PNG file to write.
        n: number of scenes.
        seed: the scene set's seed.
        root: directory with the Fashion-MNIST idx files.
        split: ``train`` or ``val``.
        canvas: canvas side in pixels.
        cols: scenes per row.
        start: index of the first scene.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = _check_int(n, "n", 1, 1024)
    scenes = FashionMNISTScenes(root, split, canvas, seed)
    s = scenes.batch(list(range(start, start + n)))
    rows = (n + cols - 1) // cols
    palette = [plt.get_cmap("tab10")(c)[:3] for c in range(10)]
    palette[7] = (1.0, 0.0, 1.0)  # tab10's grey would vanish on the grey scenes
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        label = int(s["label"][k])
        img = s["image"][k, 0].numpy()
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        overlay = np.zeros((*img.shape, 4))
        overlay[s["mask"][k].numpy() > 0] = (*palette[label], 0.45)
        ax.imshow(overlay, interpolation="nearest")
        x0, y0, x1, y1 = s["box"][k].tolist()
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.0, ec=palette[label]))
        ax.set_title(f"{FASHION_MNIST_CLASSES[label]} ({int(s['side'][k])} px)", fontsize=7, pad=2)
    fig.suptitle(f"fashion-mnist-scenes, {split} scenes {start}-{start + n - 1} (seed {seed}, {canvas}x{canvas})",
                 fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
