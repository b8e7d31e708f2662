"""The from-scratch recipe's parts: presets, progressive resizing, augmentation, mixup/cutmix, warmup, EMA, test-time
flip; and that a run using all of them resumes exactly and is scored the same way by eval and predict."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from catdog_glm.config import RECIPE_DEFAULTS, TrainConfig, apply_recipe
from catdog_glm.errors import ConfigError
from catdog_glm.vision.checkpoint import build_model_from_checkpoint, load_checkpoint
from catdog_glm.vision.evaluate import InferenceSpec, evaluate_checkpoint, run_model
from catdog_glm.vision.predictor import Predictor
from catdog_glm.vision.trainer import lr_schedule, train
from catdog_glm.vision.transforms import BatchMixer, TrainAugment, progressive_size
from tests.test_cli import run as run_catdog
from tests.test_trainer import _cfg, _InterruptAfterFirstEpoch, _rows


# ---- presets -------------------------------------------------------------------------------------------------
def test_pretrained_none_picks_the_scratch_recipe_and_typed_options_win():
    cfg = apply_recipe(TrainConfig(pretrained="none", epochs=5, mixup=0.0), "auto", {"pretrained", "epochs", "mixup"})
    assert cfg.recipe == "scratch"
    assert (cfg.epochs, cfg.mixup) == (5, 0.0)  # typed: kept
    assert (cfg.arch, cfg.optimizer, cfg.ema, cfg.tta) == ("resnet18", "adamw", 0.998, True)  # from the preset
    assert cfg.warmup_epochs == 0  # the preset's 3 warmup epochs would be most of a 5-epoch run
    small = apply_recipe(TrainConfig(pretrained="none", image_size=64), "auto", {"pretrained", "image_size"})
    assert (small.train_size, small.progressive_from) == (48, 32)  # the preset's 112 -> 160 of 192, at 64 px
    tiny = apply_recipe(TrainConfig(pretrained="none", image_size=32), "auto", {"pretrained", "image_size"})
    assert (tiny.train_size, tiny.progressive_from) == (0, 0)
    tiny.validate()
    smaller_crops = apply_recipe(TrainConfig(pretrained="none", train_size=96), "auto", {"pretrained", "train_size"})
    assert (smaller_crops.image_size, smaller_crops.progressive_from) == (192, 64)  # 112 of 160, at 96
    smaller_crops.validate()


def test_book_recipe_changes_nothing_and_scratch_can_be_asked_for_by_name():
    assert apply_recipe(TrainConfig(), "auto", set()) == TrainConfig(recipe="book")
    scratch = apply_recipe(TrainConfig(), "scratch", set())
    assert scratch.pretrained == "none" and scratch.epochs == RECIPE_DEFAULTS["scratch"]["epochs"]
    assert scratch.warmup_epochs == 3
    scratch.validate()


def test_bad_recipe_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="--recipe must be one of"):
        apply_recipe(TrainConfig(), "fast", set())
    for bad, message in [
        (dict(auto_augment="autoaug"), "--auto-augment must be one of"),
        (dict(progressive_from=300), "--progressive-from must be 0"),
        (dict(image_size=128, train_size=160), "--train-size must be 0"),
        (dict(image_size=128, train_size=96, progressive_from=112), "between 16 and the training size 96"),
        (dict(ema=1.0), "--ema is a decay"),
        (dict(mixup=-1.0), "--mixup/--cutmix"),
        (dict(warmup_epochs=20), "--warmup-epochs must be below"),
        (dict(warmup_epochs=-1), "--warmup-epochs must be >= 0"),
        (dict(optimizer="sgd"), "--optimizer must be one of"),
        (dict(crop_scale=0.0), "--crop-scale"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**bad).validate()


# ---- the parts -----------------------------------------------------------------------------------------------
def test_progressive_sizes_grow_in_steps_of_16_and_reach_the_full_size_for_the_last_quarter():
    sizes = [progressive_size(e, 100, 96, 128) for e in range(100)]
    assert sizes[0] == 96 and sizes[-25:] == [128] * 25
    assert sizes == sorted(sizes) and all(s % 16 == 0 for s in sizes)
    assert progressive_size(7, 10, 0, 128) == 128  # off
    assert [progressive_size(e, 8, 32, 40) for e in range(8)][-2:] == [40, 40]  # an end size off the 16-px grid


def test_train_augment_output_size_follows_the_epoch_and_repeats_under_the_same_seed():
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8)
    augment = TrainAugment(
        128, epochs=8, crop_scale=0.25, auto_augment="trivial", random_erasing=0.5, progressive_from=64
    )
    assert augment(image, epoch=0).shape == (3, 64, 64)
    assert augment(image, epoch=7).shape == (3, 128, 128)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        outs.append(augment(image, epoch=3))
    assert torch.equal(*outs) and outs[0].dtype == torch.uint8
    fixres = TrainAugment(128, epochs=8, progressive_from=64, train_size=96)  # train at 96, score at 128
    assert fixres(image, epoch=0).shape == (3, 64, 64) and fixres(image, epoch=7).shape == (3, 96, 96)
    resize_only = TrainAugment(128, epochs=8, crop=False, progressive_from=64)
    assert resize_only(image, epoch=0).shape == (3, 64, 64) and torch.equal(resize_only(image, epoch=7), image)


def test_mixer_mixes_images_and_labels_by_the_same_share():
    torch.manual_seed(0)
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    labels = torch.tensor([0, 1])
    mixed, target = BatchMixer(2, mixup=0.8)(images, labels)
    share = float(mixed[0].mean())  # image 0 took `share` of image 1 (the batch is mixed with its own reversal)
    assert 0 < share < 1
    torch.testing.assert_close(target[0], torch.tensor([1 - share, share]))
    torch.testing.assert_close(target.sum(1), torch.ones(2))
    cut, target = BatchMixer(2, cutmix=1.0)(images, labels)
    area = float(cut[0].mean())  # cutmix pastes a box of image 1: its area share is the label share
    torch.testing.assert_close(target[0], torch.tensor([1 - area, area]))
    for unmixed in (BatchMixer(2), BatchMixer(2, mixup=0.8, cutmix=1.0, prob=0.0)):
        plain, target = unmixed(images, labels)
        assert torch.equal(plain, images) and torch.equal(target, torch.eye(2))


def test_warmup_rises_linearly_then_cosine_decays():
    factor = lr_schedule("cosine", epochs=13, warmup_epochs=3)
    assert [factor(e) for e in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert factor(12) < 0.03
    assert lr_schedule("constant", 10, 2)(5) == 1.0


# ---- a run with every part on ----------------------------------------------------------------------------------
# Every part of the recipe at once, on tiny images (test_trainer's _cfg supplies the rest).
SCRATCH = dict(
    epochs=3,
    image_size=48,
    train_size=40,
    progressive_from=32,
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.05,
    warmup_epochs=1,
    augment=True,
    crop_scale=0.25,
    auto_augment="trivial",
    random_erasing=0.25,
    mixup=0.8,
    cutmix=1.0,
    mix_prob=0.5,
    label_smoothing=0.1,
    ema=0.99,
    tta=True,
    seed=4,
    recipe="scratch",
)


def _scratch_cfg(data, output, **overrides) -> TrainConfig:
    return _cfg(data, output, **{**SCRATCH, **overrides})


def test_a_scratch_run_resumes_exactly_and_saves_the_averaged_weights(synthetic_data, tmp_path):
    whole = train(_scratch_cfg(synthetic_data, tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        train(_scratch_cfg(synthetic_data, tmp_path / "split"), _InterruptAfterFirstEpoch())
    train(_scratch_cfg(synthetic_data, tmp_path / "split", resume=True))
    assert _rows(tmp_path / "split" / "results.csv") == _rows(tmp_path / "whole" / "results.csv")
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    for key, value in a.model_state.items():
        torch.testing.assert_close(b.model_state[key], value, rtol=0, atol=0)
    raw = a.raw["training_state"]["raw_model"]  # the weights being trained, kept beside their average
    assert any(not torch.equal(raw[k], v) for k, v in a.model_state.items() if v.is_floating_point())
    assert whole.history[0]["lr"] == pytest.approx(1e-3 / 2)  # warmup: half the peak in the first of 1+1 epochs


def test_eval_and_predict_score_with_the_test_time_flip_the_run_validated_with(synthetic_data, tmp_path):
    result = train(_scratch_cfg(synthetic_data, tmp_path / "run", epochs=2, int8=False, precision="fp32"))
    best = load_checkpoint(result.best_path)
    assert best.config["tta"] is True
    evaluation = evaluate_checkpoint(result.best_path, synthetic_data, precision="fp32")
    assert evaluation.tta and evaluation.result.accuracy == pytest.approx(result.test_acc)
    assert evaluation.result.loss == pytest.approx(result.test_loss, rel=1e-5)

    predictor = Predictor(best, precision="fp32", device="cpu")
    model = build_model_from_checkpoint(best)
    images = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)
    from catdog_glm.device import Precision

    spec = InferenceSpec(torch.device("cpu"), Precision(None, False), False, best.mean, best.std)
    with torch.inference_mode():
        plain = run_model(model, images, spec)
        mirrored = run_model(model, images.flip(3), spec)
    expected = ((plain + mirrored) / 2).softmax(1)
    torch.testing.assert_close(predictor.probabilities(images), expected, atol=2e-4, rtol=0)


def test_cli_pretrained_none_trains_with_the_scratch_recipe(synthetic_data, tmp_path):
    out = tmp_path / "run"
    proc = run_catdog(
        "train", "--data", str(synthetic_data), "--pretrained", "none", "--epochs", "1", "--image-size", "32",
        "--progressive-from", "0", "--mixup", "0", "--output", str(out), "--tracker", "none", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "recipe scratch" in proc.stdout
    saved = yaml.safe_load((out / "args.yaml").read_text())
    assert saved["recipe"] == "scratch" and saved["arch"] == "resnet18" and saved["optimizer"] == "adamw"
    assert (saved["epochs"], saved["image_size"], saved["mixup"], saved["progressive_from"]) == (1, 32, 0.0, 0)
    assert saved["cutmix"] == 1.0 and saved["ema"] == 0.998 and saved["tta"] is True and saved["train_size"] == 0

    # --resume needs neither --pretrained none nor the typed options again: the run goes on with its own.
    cli = ["train", "--data", synthetic_data, "--output", out, "--tracker", "none", "--no-progress"]
    proc = run_catdog(*cli, "--resume", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    resumed = yaml.safe_load((out / "args.yaml").read_text())
    assert resumed == {**saved, "epochs": 2, "resume": True}


def test_an_exported_model_keeps_the_test_time_flip(tiny_checkpoint, tmp_path):
    """ONNX Runtime on the export of a --tta checkpoint gives what `catdog predict` gives on the checkpoint."""
    from catdog_glm.vision.export import export_classifier
    from catdog_glm.vision.predictor import OnnxPredictor
    from catdog_glm.vision.state_dict import safe_load, save_atomic

    payload = safe_load(tiny_checkpoint)
    payload["config"] = {**payload["config"], "tta": True}
    flipped = tmp_path / "tta.pt"
    save_atomic(payload, flipped)
    onnx = OnnxPredictor(export_classifier(flipped, tmp_path / "tta.onnx").path)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    want = Predictor.from_checkpoint(flipped, device="cpu", precision="fp32").probabilities(images)
    plain = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32").probabilities(images)
    assert (want - plain).abs().max() > 1e-3  # the flip changes these probabilities
    torch.testing.assert_close(onnx.probabilities(images), want, atol=1e-4, rtol=0)
