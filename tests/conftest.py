"""Shared fixtures: images the tests draw themselves, tiny datasets, the shared real photos, a quiet home."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CATDOG = REPO.parent / "shared" / "data" / "catdog"

requires_shared_data = pytest.mark.skipif(
    not (SHARED_CATDOG / "train").is_dir(),
    reason=f"real photos not found at {SHARED_CATDOG} (present in CI; a user's clone may not have them)",
)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Keep torch hub, SwanLab, matplotlib and the model cache out of the user's home, for the whole session
    (session- and module-scoped fixtures load models before any function-scoped fixture could run)."""
    from catdog_glm.chat.kernels import kernels_root

    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        # the CPU kernels `make install` built stay in use (subprocesses too): building them takes half a minute
        mp.setenv("CATDOG_KERNELS_DIR", str(kernels_root()))
        mp.setenv("TORCH_HOME", str(home / "torch"))
        mp.setenv("SWANLAB_ROOT", str(home / "swanlab"))
        mp.setenv("MPLCONFIGDIR", str(home / "mpl"))
        mp.setenv("SWANLAB_MODE", "local")
        mp.setenv("CATDOG_CACHE_DIR", str(home / "catdog-cache"))
        yield


def save_image(path: Path, size=(64, 48), color=(200, 40, 40), mode="RGB", fmt=None, **save_kwargs) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt, **save_kwargs)
    return path


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A drawn cat/dog ImageFolder with train/ and val/ (48 px, 16 images per class)."""
    from catdog_glm.vision.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), per_class=16, image_size=48, seed=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def catdog_env() -> dict:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["COLUMNS"] = "250"  # rich tables would fold long temp paths at the default 80 columns
    return env


def make_bad_inputs(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """Every awkward input the issue lists: name -> (path, None if it must predict, else an error fragment)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[Path, str | None]] = {}
    text = folder / "notes.jpg"
    text.write_text("this is not an image")
    cases["non-image"] = (text, "not an image")
    good = save_image(folder / "good.jpg", size=(120, 90), color=(90, 120, 200))
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    cases["truncated jpeg"] = (truncated, "cannot decode")
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    cases["0-byte"] = (empty, "empty file")
    cases["over pixel limit"] = (save_image(folder / "huge.png", size=(9000, 8000), mode="L", color=0), "pixel")
    gif = folder / "anim.gif"
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    cases["animated gif"] = (gif, None)
    cases["rgba png"] = (save_image(folder / "rgba.png", mode="RGBA", color=(10, 200, 10, 128)), None)
    cases["palette png"] = (save_image(folder / "pal.png", mode="P", color=5), None)
    cases["grayscale png"] = (save_image(folder / "gray.png", mode="L", color=77), None)
    deep = folder / "deep16.png"
    Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16)).save(deep)
    cases["16-bit png"] = (deep, None)
    cases["cmyk jpeg"] = (save_image(folder / "cmyk.jpg", mode="CMYK", color=(0, 200, 200, 0)), None)
    rotated = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 60), (200, 200, 0)).save(rotated, exif=exif)
    cases["exif-rotated"] = (rotated, None)
    cases["webp"] = (save_image(folder / "photo.webp", fmt="WEBP"), None)
    try:  # phone photos: pillow-heif both writes and reads HEIC where its wheel has the codecs
        from pillow_heif import register_heif_opener

        register_heif_opener()
        cases["heic"] = (save_image(folder / "phone.heic", size=(90, 120), fmt="HEIF"), None)
    except (ImportError, OSError, KeyError, ValueError):
        pass
    return cases


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight resnet18 checkpoint (cat, dog) at 32 px: for tests about plumbing, not accuracy."""
    import torch

    from catdog_glm.vision.checkpoint import save_checkpoint
    from catdog_glm.vision.model import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-ckpt") / "best.pt"
    save_checkpoint(
        path,
        arch="resnet18",
        classes=["cat", "dog"],
        model_state=build_model("resnet18", 2).state_dict(),
        image_size=32,
        metrics={"best_acc": 0.5},
    )
    return path


@pytest.fixture(scope="session")
def real_checkpoint(tmp_path_factory) -> Path:
    """A resnet18 trained in this session on real photos (64 px, 2 epochs on 400 images); skips without them."""
    if not (SHARED_CATDOG / "train").is_dir():
        pytest.skip(f"real photos not found at {SHARED_CATDOG}")
    from catdog_glm.config import TrainConfig
    from catdog_glm.vision.trainer import train

    out = tmp_path_factory.mktemp("real-ckpt")
    train(
        TrainConfig(
            data=str(SHARED_CATDOG),
            output=str(out),
            arch="resnet18",
            pretrained="none",
            epochs=2,
            image_size=64,
            train_limit=400,
            tracker="none",
            progress=False,
            patience=0,
            lr=1e-3,
        )
    )
    return out / "best.pt"


CHROMIUM = "/usr/bin/chromium"
requires_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (apt-get install chromium)"
)
# Debian's Chromium, driven by Playwright without `playwright install`; no background traffic off this machine.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def open_page(playwright, url: str):
    """(browser, page) with the page loaded and its network idle."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(url, wait_until="networkidle")
    return browser, page


def screenshot_dir(tmp_path: Path) -> Path:
    """CATDOG_SCREENSHOTS=DIR keeps the browser tests' screenshots; else the test's temp folder."""
    return Path(os.environ.get("CATDOG_SCREENSHOTS", tmp_path))


def start_catdog(args: list[str], *, health: str = "/health", env_extra: dict | None = None, timeout: float = 240):
    """Start `python -m catdog_glm ARGS --port FREE` and wait for `health` to answer 200 -> (process, base url)."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "catdog_glm", *args, "--port", str(port)],
        env=catdog_env() | (env_extra or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + health, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"`catdog {' '.join(args)}` did not start: {proc.stdout.read()[-3000:]}")
        time.sleep(0.3)
