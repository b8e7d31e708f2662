"""A torch Dataset over samples with a shared-memory RAM cache and corrupt-file skipping, and its DataLoader.

The cache is one uint8 tensor in shared memory, so images decoded by DataLoader worker processes during the
first epoch are visible to every later epoch (a per-worker dict would be lost when workers restart).
A per-sample status byte, also shared, records which files failed to decode so they are skipped, counted
and listed at the end instead of crashing an epoch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from catdog_glm.errors import ImageError
from catdog_glm.vision.data import Sample
from catdog_glm.vision.transforms import load_resized

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

UNKNOWN, CACHED, CORRUPT, DECODED = 0, 1, 2, 3


def available_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_bytes(n_images: int, image_size: int) -> int:
    return n_images * 3 * image_size * image_size


def cache_fits(n_images: int, image_size: int, fraction: float = 0.5) -> bool:
    """Whether a RAM cache of n images would use at most `fraction` of the memory available now."""
    return cache_bytes(n_images, image_size) <= fraction * available_memory_bytes()


class ImageDataset:
    """Yields (uint8 CHW image, label, index), or None for a file that cannot be decoded.

    With `substitute_corrupt` (training) an unreadable file is replaced by the next readable sample instead.
    """

    def __init__(
        self,
        samples: list[Sample],
        image_size: int,
        *,
        cache: bool = False,
        augment: Callable | None = None,  # augment(image, epoch) -> image, e.g. transforms.TrainAugment
        seed: int = 0,
        substitute_corrupt: bool = False,
    ):
        import torch

        self.samples = samples
        self.seed = seed
        self.substitute_corrupt = substitute_corrupt
        # Shared so persistent worker processes see the epoch the main process is in.
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.image_size = image_size
        self.augment = augment
        self.status = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()
        self.cache = (
            torch.empty((len(samples), 3, image_size, image_size), dtype=torch.uint8).share_memory_() if cache else None
        )
        self.errors: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> torch.Tensor | None:
        state = int(self.status[i])
        if state == CORRUPT:
            return None
        if state == CACHED and self.cache is not None:
            return self.cache[i]
        try:
            image = load_resized(self.samples[i].path, self.image_size)
        except ImageError as e:
            self.status[i] = CORRUPT
            self.errors[i] = str(e)
            log.warning("skipping unreadable image %s", e)
            return None
        if self.cache is not None:
            self.cache[i].copy_(image)
            self.status[i] = CACHED
        else:
            self.status[i] = DECODED
        return image

    def fill_cache(self, threads: int, on_progress=None) -> None:
        """Decode every sample into the RAM cache up front, in threads (Pillow releases the GIL while decoding).

        On a CPU box this beats decoding inside the training loop: the cores decode in parallel once, and
        every epoch after that, the first included, runs at cached speed.
        """
        from concurrent.futures import ThreadPoolExecutor

        if self.cache is None:
            return
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for _ in pool.map(self.load, range(len(self.samples))):
                if on_progress:
                    on_progress(1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __getitem__(self, i: int):
        import torch

        image = self.load(i)
        if image is None and self.substitute_corrupt:
            # Stand in the next readable sample so every batch keeps its size: a batch of one breaks
            # BatchNorm, and ranks with different step counts would deadlock DistributedDataParallel.
            for step in range(1, len(self.samples)):
                j = (i + step) % len(self.samples)
                image = self.load(j)
                if image is not None:
                    i = j
                    break
        if image is None:
            return None
        if self.augment is not None:
            # Augmentation is a pure function of (seed, epoch, index): identical with any number of
            # workers and after a resume, which restarts workers with fresh RNGs.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + int(self.epoch) * 100_003 + i) % 2**63)
                image = self.augment(image, int(self.epoch))
        return image, self.samples[i].label, i

    def corrupt_files(self) -> list[str]:
        """Paths (with reasons where known in this process) of every sample that failed to decode so far."""
        bad = (self.status == CORRUPT).nonzero().flatten().tolist()
        return [self.errors.get(i, f"{self.samples[i].path}: cannot decode") for i in bad]


def collate_skipping_corrupt(items):
    """Stack the good samples of a batch; a batch of only corrupt files becomes None."""
    import torch

    items = [x for x in items if x is not None]
    if not items:
        return None
    images = torch.stack([x[0] for x in items])
    labels = torch.tensor([x[1] for x in items], dtype=torch.long)
    indices = torch.tensor([x[2] for x in items], dtype=torch.long)
    return images, labels, indices


def build_loader(
    dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    sampler=None,
    generator=None,
    pin_memory: bool = False,
    drop_last: bool = False,
):
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping_corrupt,
        persistent_workers=workers > 0,
        generator=generator,
        pin_memory=pin_memory,
        drop_last=drop_last,
    )
