"""The single source of preprocessing, shared by training, evaluation and prediction.

It reproduces the book's `Resize((S, S)) + ToTensor + Normalize(ImageNet)` exactly, split in two halves so the
expensive one runs once: `load_resized` decodes and resizes to a uint8 tensor (what the RAM cache keeps), and
`normalize_batch` turns a uint8 batch into the normalized float tensor the model sees (cheap, on the device).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from catdog_glm.vision.images import open_image

if TYPE_CHECKING:
    import torch

    from catdog_glm.config import TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 256


def resize_to_uint8(img, image_size: int) -> torch.Tensor:
    """Resize an RGB PIL image to image_size x image_size (bilinear, as torchvision's Resize on PIL) -> uint8 CHW."""
    import numpy as np
    import torch
    from PIL import Image

    resized = img.resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def load_resized(source, image_size: int, **open_kwargs) -> torch.Tensor:
    """Decode a file or bytes (EXIF-upright RGB, JPEG draft decoding for big photos), resize -> uint8 CHW tensor."""
    return resize_to_uint8(open_image(source, draft_size=image_size, **open_kwargs), image_size)


def normalization_for(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) `arch`'s weights were trained with: ImageNet's for torchvision networks, the backbone's own
    for timm ones (the embedded efficientnet_lite0: 0.5, 0.5). Training records it in every checkpoint, so
    eval, predict, serve and export read it from there."""
    from catdog_glm.vision.backbones import normalization

    return normalization(arch) or (IMAGENET_MEAN, IMAGENET_STD)


def normalize_batch(batch, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 (N, 3, H, W) -> float32 normalized, the same arithmetic as ToTensor + Normalize."""
    import torch

    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return batch.to(torch.float32).div_(255).sub_(mean_t).div_(std_t)


def progressive_size(epoch: int, epochs: int, start: int, end: int) -> int:
    """Progressive resizing (after fast.ai and FFCV): the training image size of `epoch` (0-based), growing linearly
    from `start` to `end` over the first three quarters of the run, in steps of 16 px, then `end` to the finish."""
    if not start or start >= end:
        return end
    ramp = max(1, round(epochs * 0.75) - 1)
    if epochs <= 1 or epoch >= ramp:
        return end
    size = start + (end - start) * epoch / ramp
    return min(end, max(16, int(round(size / 16)) * 16))


@dataclass
class TrainAugment:
    """Training-time augmentation of uint8 CHW tensors, a pure function of (image, epoch) given the torch RNG.

    Random resized crop to the epoch's training size (`train_size`, growing from `progressive_from` when resizing
    progressively) and horizontal flip, then optionally TrivialAugmentWide or RandAugment and random erasing, all
    from torchvision's transforms v2. Without `crop`, images are only resized to the epoch's size.
    """

    image_size: int  # the size of the (cached) images coming in
    epochs: int = 1
    crop: bool = True
    crop_scale: float = 0.6
    auto_augment: str = "none"
    random_erasing: float = 0.0
    progressive_from: int = 0
    train_size: int = 0  # the size training ends at (0: image_size)
    _pipelines: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> TrainAugment | None:
        """What a training config asks for, or None when it asks for no augmentation (the book's way)."""
        resizes = cfg.progressive_from or cfg.final_train_size != cfg.image_size
        if not (cfg.augment or cfg.auto_augment != "none" or cfg.random_erasing or resizes):
            return None
        return cls(
            cfg.image_size,
            cfg.epochs,
            cfg.augment,
            cfg.crop_scale,
            cfg.auto_augment,
            cfg.random_erasing,
            cfg.progressive_from,
            cfg.train_size,
        )

    def size_at(self, epoch: int) -> int:
        return progressive_size(epoch, self.epochs, self.progressive_from, self.train_size or self.image_size)

    def _pipeline(self, size: int):
        from torchvision.transforms import v2

        if size not in self._pipelines:
            steps = []
            if self.crop:
                steps += [
                    v2.RandomResizedCrop((size, size), scale=(self.crop_scale, 1.0), antialias=True),
                    v2.RandomHorizontalFlip(),
                ]
            elif size != self.image_size:
                steps.append(v2.Resize((size, size), antialias=True))
            if self.auto_augment == "trivial":
                steps.append(v2.TrivialAugmentWide())
            elif self.auto_augment == "randaugment":
                steps.append(v2.RandAugment())
            if self.random_erasing:
                steps.append(v2.RandomErasing(p=self.random_erasing, value=0))
            self._pipelines[size] = v2.Compose(steps) if steps else v2.Identity()
        return self._pipelines[size]

    def __call__(self, image, epoch: int = 0):
        return self._pipeline(self.size_at(epoch))(image)


class BatchMixer:
    """Mixup and/or CutMix on a training batch (torchvision's v2.MixUp / v2.CutMix; one of the two, at random, per
    batch when both are on; a batch is mixed with probability `prob`, as timm's mixup_prob), returning soft
    targets. Unmixed labels come back one-hot, so the loss is always the same soft-target cross-entropy."""

    def __init__(self, num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0):
        from torchvision.transforms import v2

        self.num_classes, self.prob = num_classes, prob
        mixers = []
        if mixup:
            mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix:
            mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self._mix = None if not mixers else mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def __call__(self, images, labels):
        import torch
        import torch.nn.functional as F

        # torch.rand is drawn every batch, mixed or not, so the RNG stream (and an exact resume) does not depend on it.
        mix = self._mix is not None and len(labels) >= 2 and float(torch.rand(())) < self.prob
        return self._mix(images, labels) if mix else (images, F.one_hot(labels, self.num_classes).float())
