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


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep torch hub, SwanLab and matplotlib state out of the user's home."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("SWANLAB_ROOT", str(home / "swanlab"))
    monkeypatch.setenv("MPLCONFIGDIR", str(home / "mpl"))
    monkeypatch.setenv("SWANLAB_MODE", "local")


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
    return env
