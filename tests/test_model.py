"""Model building, ImageNet weights from the torch hub cache (offline), and the device probe."""

from __future__ import annotations

import time

import pytest
import torch
from torchvision import models

from catdog_glm.device import resolve_device, resolve_precision
from catdog_glm.errors import ConfigError, WeightsUnavailableError
from catdog_glm.vision import model as vm


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_head_is_replaced(arch):
    m = vm.build_model(arch, 2)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown --arch"):
        vm.build_model("resnet9000", 2)


def test_imagenet_weights_come_from_the_hub_cache(tmp_path):
    path, url = vm.imagenet_weights_file("resnet18")
    assert path.name in url and path.is_relative_to(tmp_path.parent.parent)  # inside the test's TORCH_HOME
    torch.manual_seed(1)
    reference = models.resnet18()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), path)
    model = vm.build_model("resnet18", 2)
    assert "ImageNet" in vm.load_pretrained(model, "resnet18", "imagenet")
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 2
    path.unlink()


def test_missing_imagenet_weights_fail_fast_with_the_fix(monkeypatch):
    monkeypatch.setattr(vm, "_reachable", lambda url: "network unreachable")
    path, _ = vm.imagenet_weights_file("resnet50")
    with pytest.raises(WeightsUnavailableError) as err:
        vm.load_imagenet_state("resnet50")
    message = str(err.value)
    assert path.name == "resnet50-11ad3fa6.pth"  # IMAGENET1K_V2, the book's weights
    assert str(path) in message and "--pretrained none" in message


def test_reachability_probe_does_not_hang():
    started = time.perf_counter()
    assert vm._reachable("http://127.0.0.1:9/x", timeout=2) is not None  # nothing listens on port 9
    assert time.perf_counter() - started < 3


def test_pretrained_path_loads_matching_weights(tmp_path):
    torch.manual_seed(2)
    source = models.resnet18()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = vm.build_model("resnet18", 2)
    vm.load_pretrained(model, "resnet18", str(tmp_path / "w.pth"))
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_device_resolution():
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_precision(torch.device("cpu"), amp=False).autocast_dtype is None
