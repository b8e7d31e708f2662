"""A small drawn cat/dog dataset, so `make demo` and first-time users can train with no download.

Cats get pointed ears and whiskers, dogs floppy ears and a tongue; colours, sizes, positions and backgrounds
vary. It is a smoke-test dataset, not a substitute for photos.
"""

from __future__ import annotations

import random
from pathlib import Path


def _draw_face(kind: str, rng: random.Random, size: int):
    from PIL import Image, ImageDraw, ImageFilter

    bg = tuple(rng.randint(40, 230) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 8)):  # background clutter
        x, y, r = rng.randint(0, size), rng.randint(0, size), rng.randint(4, size // 5)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    fur = tuple(rng.randint(60, 250) for _ in range(3))
    cx, cy = rng.randint(size * 2 // 5, size * 3 // 5), rng.randint(size * 9 // 20, size * 3 // 5)
    r = rng.randint(size // 5, size // 4)
    if kind == "cat":
        for side in (-1, 1):  # pointed ears above the head
            base = cx + side * r * 0.55
            draw.polygon(
                [
                    (base - r * 0.35, cy - r * 0.6),
                    (base + r * 0.35, cy - r * 0.6),
                    (base + side * r * 0.15, cy - r * 1.5),
                ],
                fill=fur,
            )
    else:
        for side in (-1, 1):  # floppy ears hanging beside the head
            ex = cx + side * r * 0.95
            draw.ellipse((ex - r * 0.35, cy - r * 0.6, ex + r * 0.35, cy + r * 0.8), fill=tuple(c // 2 for c in fur))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fur)
    eye = max(2, r // 6)
    for side in (-1, 1):
        ex, ey = cx + side * r * 0.4, cy - r * 0.15
        draw.ellipse((ex - eye, ey - eye, ex + eye, ey + eye), fill=(20, 20, 20))
    draw.ellipse((cx - eye, cy + r * 0.2 - eye * 0.7, cx + eye, cy + r * 0.2 + eye * 0.7), fill=(30, 10, 10))
    if kind == "cat":
        for side in (-1, 1):
            for dy in (-3, 0, 3):
                draw.line(
                    (cx + side * r * 0.2, cy + r * 0.3, cx + side * r * 1.2, cy + r * 0.3 + dy * r / 12),
                    fill=(250, 250, 250),
                    width=max(1, size // 128),
                )
    else:
        draw.ellipse((cx - r * 0.2, cy + r * 0.45, cx + r * 0.2, cy + r * 0.95), fill=(230, 80, 110))
    angle = rng.uniform(-20, 20)
    return img.rotate(angle, fillcolor=bg).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def make_synthetic_dataset(
    root: str | Path, *, per_class: int = 60, val_fraction: float = 0.25, image_size: int = 128, seed: int = 0
) -> Path:
    """Write ROOT/{train,val}/{cat,dog}/*.jpg and return ROOT."""
    root = Path(root)
    rng = random.Random(seed)
    n_val = max(1, int(per_class * val_fraction))
    for kind in ("cat", "dog"):
        for i in range(per_class):
            split = "val" if i < n_val else "train"
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            _draw_face(kind, rng, image_size).save(folder / f"{kind}_{i:04d}.jpg", quality=90)
    return root
