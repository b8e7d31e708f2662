"""Preprocessing equals the book's torchvision pipeline, bit for bit on the float tensors."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms

from catdog_glm.vision.transforms import IMAGENET_MEAN, IMAGENET_STD, load_resized, normalize_batch
from tests.conftest import SHARED_CATDOG, requires_shared_data


def _book_transform(size):
    return transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def test_matches_book_pipeline_on_generated_image(tmp_path):
    img = Image.effect_mandelbrot((300, 220), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    path = tmp_path / "m.png"
    img.save(path)
    ours = normalize_batch(load_resized(path, 128).unsqueeze(0))[0]
    book = _book_transform(128)(Image.open(path).convert("RGB"))
    torch.testing.assert_close(ours, book, atol=1e-6, rtol=0)


@requires_shared_data
def test_matches_book_pipeline_on_real_photos():
    paths = sorted((SHARED_CATDOG / "val" / "cat").glob("*.jpg"))[:5]
    for path in paths:
        ours = normalize_batch(load_resized(path, 256).unsqueeze(0))[0]
        book = _book_transform(256)(Image.open(path).convert("RGB"))
        torch.testing.assert_close(ours, book, atol=1e-6, rtol=0)
