"""The single source of preprocessing, shared by training, evaluation and prediction.

It reproduces the book's `Resize((S, S)) + ToTensor + Normalize(ImageNet)` exactly, split in two halves so the
expensive one runs once: `load_resized` decodes and resizes to a uint8 tensor (what the RAM cache keeps), and
`normalize_batch` turns a uint8 batch into the normalized float tensor the model sees (cheap, on the device).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from catdog_glm.vision.images import open_image

if TYPE_CHECKING:
    import torch

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


def build_augment(image_size: int):
    """Training-time augmentation on uint8 tensors: random resized crop and horizontal flip."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop((image_size, image_size), scale=(0.6, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )
