"""Decoding one image file into an RGB PIL image, whatever its format, mode or orientation."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import BinaryIO

from catdog_glm.errors import ImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)

# Refuse images above this many pixels before decoding them (a decompression bomb guard).
DEFAULT_MAX_PIXELS = 64_000_000

_heif_registered = False


def register_heif() -> None:
    """Teach Pillow HEIC/HEIF (phone photos) once, when pillow-heif is installed."""
    global _heif_registered
    if _heif_registered:
        return
    _heif_registered = True
    try:
        from pillow_heif import register_heif_opener

        register_heif_opener()
    except ImportError:  # optional: without it HEIC files are reported as unreadable
        pass


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def to_rgb(img):
    """Convert any Pillow mode to 8-bit RGB: transparency onto white, 16-bit scaled (not clipped), CMYK converted."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size else 0.0
        # 16-bit data spans 0..65535; scale it into 0..255 instead of letting convert() clip it to white.
        if peak > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def open_image(
    source: str | Path | bytes | BinaryIO,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
):
    """Open an image (a path, bytes or a binary file object) as upright RGB.

    `draft_size` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding when the picture is at least
    twice that size on both sides: much less work for big photos, and the result is still >= draft_size.
    The pixel count is checked from the header, before any pixel is decoded.
    Raises ImageError with the reason when the image cannot be decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    register_heif()
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    label = name or (str(source) if isinstance(source, (str, Path)) else "upload")
    try:
        if isinstance(source, (str, Path)):
            source = Path(source)
            if source.stat().st_size == 0:
                raise ImageError(f"{label}: empty file (0 bytes)")
        elif source.seek(0, io.SEEK_END) == 0:
            raise ImageError(f"{label}: empty file (0 bytes)")
        else:
            source.seek(0)
        with Image.open(source) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} pixels is over the limit of {max_pixels:,} "
                    "(possible decompression bomb)"
                )
            if draft_size and img.format == "JPEG":
                img.draft(None, (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{label}: file not found") from e
    except IsADirectoryError as e:
        raise ImageError(f"{label}: is a folder, not an image") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{label}: not an image Pillow can read") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{label}: cannot decode ({e})") from e
