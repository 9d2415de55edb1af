"""Samplers, loaders and the on-device batch pipeline.

The data order is a function of ``(seed, epoch)`` only and the batch-level augmentation a
function of ``(seed, epoch, step, rank)``, so a run resumed in the middle of an epoch sees
exactly the batches the interrupted run would have seen. Batches travel as uint8 (a quarter of
the bytes of float32) in pinned memory and are augmented and normalised on the device, which
keeps an accelerator busy with few loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, Sampler

from .scenes import boxes_from_masks

__all__ = ["PCA_EIGVAL", "PCA_EIGVEC", "BatchPipeline", "EvalSampler", "TrainSampler", "collate", "lighting_shift",
           "make_loader", "seed_key"]

# AlexNet's PCA of ImageNet RGB pixels ("lighting" augmentation of the authors' recipe).
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def seed_key(*parts: int) -> int:
    """A reproducible 63-bit seed from small integers (Python's ``hash()`` of ints is not mixed enough)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0x7FFFFFFFFFFFFFFF
    return h


def lighting_shift(n: int, std: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """AlexNet's PCA lighting: one RGB shift per image (``n x 3 x 1 x 1``, pixel scale 0-255).

    Args:
        n: images in the batch.
        std: standard deviation of the eigenvalue weights (the recipe's ``lighting``).
        g: the batch's generator, on ``device``.
        device: where the batch is.
    """
    alpha = torch.randn(n, 3, generator=g, device=device) * std
    return ((alpha * PCA_EIGVAL.to(device)) @ PCA_EIGVEC.to(device).T * 255).view(n, 3, 1, 1)


class TrainSampler(Sampler[list[int]]):
    """Per-rank index batches of a seeded per-epoch permutation; the last partial global batch is dropped.

    Global batch ``k`` is ``perm[k*G:(k+1)*G]`` (``G = batch_size * world_size``) and rank ``r`` takes
    its ``r``-th slice, so N processes see together exactly the batches of one process with the
    global batch.

    Args:
        n: data set size.
        batch_size: per-rank batch size.
        rank: this process's rank.
        world_size: number of processes.
        seed: base seed of the permutation.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate over ``epoch``'s batches from batch ``start`` on (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(seed_key(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)
        gb = self.batch_size * self.world_size
        for k in range(self.start, self.batches_per_epoch):
            lo = k * gb + self.rank * self.batch_size
            yield perm[lo: lo + self.batch_size].tolist()


class EvalSampler(Sampler[list[int]]):
    """Rank ``r`` evaluates images ``r, r + W, r + 2W, ...`` in order; nothing is padded or repeated."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i: i + self.batch_size]


def collate(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(uint8 images, int64 labels, number of skipped unreadable images)``.

    Accepts a batch already stacked by ``InMemoryImages.__getitems__`` or a list of samples in
    which unreadable images are None (``--skip-corrupt``).
    """
    if isinstance(batch, tuple):
        return batch[0], batch[1], 0
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), len(batch)
    images = torch.stack([torch.as_tensor(img) for img, _ in kept])
    return images, torch.tensor([t for _, t in kept], dtype=torch.int64), len(batch) - len(kept)


def make_loader(dataset: Dataset, sampler: Sampler, workers: int, pin_memory: bool, seed: int = 0,
                collate_fn: Callable = collate) -> DataLoader:
    """A DataLoader over ``sampler``'s index batches (workers are restarted every epoch, see SeededTransform).

    Its own generator keeps the loader from drawing its worker base seed from the global RNG,
    which would shift the global RNG stream of a resumed run against an uninterrupted one.
    ``collate_fn`` makes ``(images, targets, skipped)`` batches (segmentation: images and masks).
    """
    extra = dict(prefetch_factor=4) if workers > 0 else {}
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed), **extra)


class BatchPipeline:
    """uint8 host batch -> augmented, normalised float batch on the device.

    Args:
        device: the training device.
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units.
        channels_last: return NHWC-strided batches.
        crop_padding: zero padding of the random crop (0: no crop).
        hflip: horizontal flip probability.
        lighting: PCA lighting noise std (RGB only).
        erasing: random-erasing probability (timm's RandomErasing; it draws from the global RNGs,
            which the checkpoint saves).
        seed: base seed; each batch's augmentation is seeded from (seed, epoch, step, rank).
    """

    def __init__(self, device: torch.device, mean: Sequence[float], std: Sequence[float], channels_last: bool = False,
                 crop_padding: int = 0, hflip: float = 0.0, lighting: float = 0.0, erasing: float = 0.0,
                 seed: int = 0) -> None:
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.channels_last, self.crop_padding, self.hflip, self.lighting = channels_last, crop_padding, hflip, lighting
        self.seed = seed
        self.erase = RandomErasing(erasing, mode="pixel", device=str(device)) if erasing else None

    def __call__(self, images: torch.Tensor, key: tuple[int, ...] | None = None) -> torch.Tensor:
        """Normalise ``images``; with a ``key`` (training) augment them first, seeded by the key."""
        x = images.to(self.device, non_blocking=True)
        if key is not None and (self.crop_padding or self.hflip or self.lighting):
            g = torch.Generator(device=self.device).manual_seed(seed_key(self.seed, *key))
            x = self._augment(x, g)
        x = (x.float() - self.mean) / self.std
        if key is not None and self.erase is not None:
            x = self.erase(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batch(self, images: torch.Tensor, targets: torch.Tensor, key: tuple[int, ...] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(images, key), targets on the device)``: what the loops call (segmentation moves masks too)."""
        return self(images, key), targets.to(self.device, non_blocking=True)

    def augment_masks(self, masks: torch.Tensor, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The crop and flip that ``self(images, key)`` applies to the images, applied to their masks.

        Masks are moved, never resampled; the padding is background (0). Returns the masks on the
        device and their tight boxes (``scenes.boxes_from_masks``), as segmentation and
        localisation targets of the augmented batch.

        Args:
            masks: ``B x H x W`` label masks of the batch.
            key: the key the images were augmented with.
        """
        m = masks.to(self.device, non_blocking=True).unsqueeze(1)
        if self.crop_padding or self.hflip:
            g = torch.Generator(device=self.device).manual_seed(seed_key(self.seed, *key))
            m = self._crop_flip(m, *self._crop_flip_draws(m.shape[0], g, m.device))
        m = m.squeeze(1)
        return m, boxes_from_masks(m)

    def _crop_flip_draws(self, b: int, g: torch.Generator, dev: torch.device):
        # Drawn first, in this order, for images and masks alike: the same key gives the same moves.
        dy = dx = flip = None
        if self.crop_padding:
            p = self.crop_padding
            dy = torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=dev)
            dx = torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=dev)
        if self.hflip:
            flip = torch.rand(b, generator=g, device=dev) < self.hflip
        return dy, dx, flip

    def _crop_flip(self, x: torch.Tensor, dy: torch.Tensor | None, dx: torch.Tensor | None,
                   flip: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        dev = x.device
        if dy is not None:
            p = self.crop_padding
            xp = F.pad(x, (p, p, p, p))
            rows = (dy + torch.arange(h, device=dev)).view(b, 1, h, 1).expand(b, c, h, w + 2 * p)
            x = xp.gather(2, rows)
            cols = (dx + torch.arange(w, device=dev)).view(b, 1, 1, w).expand(b, c, h, w)
            x = x.gather(3, cols)
        if flip is not None:
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        return x

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, c = x.shape[:2]
        dev = x.device
        x = self._crop_flip(x, *self._crop_flip_draws(b, g, dev))
        if self.lighting and c == 3:
            x = (x.float() + lighting_shift(b, self.lighting, g, dev)).clamp_(0, 255)
        return x
