"""`catdog train`'s options come from TrainConfig's fields: each written once; --calibrate/--no-calibrate."""

from __future__ import annotations

import dataclasses

import pytest
from typer.main import get_command

from catdog_glm.cli import app
from catdog_glm.config import TrainConfig
from catdog_glm.vision.checkpoint import load_checkpoint
from tests.test_cli import run

# `catdog train`'s options before they were derived from the config: none may go missing or change its name.
OPTIONS_BEFORE = {
    "data", "epochs", "batch_size", "lr", "image_size", "arch", "pretrained", "output", "tracker", "swanlab_mode",
    "project", "experiment", "description", "device", "seed", "resume", "overwrite", "val_split", "train_limit",
    "val_limit", "cache", "workers", "augment", "precision", "amp", "channels_last", "schedule", "patience", "recipe",
    "optimizer", "weight_decay", "warmup_epochs", "ema", "crop_scale", "auto_augment", "random_erasing", "train_size",
    "progressive_from", "mixup", "cutmix", "mix_prob", "label_smoothing", "tta", "progress", "verbose",
}  # fmt: skip


def _train_params() -> dict:
    return {p.name: p for p in get_command(app).commands["train"].params}


def test_every_config_field_with_help_is_an_option_named_and_defaulted_as_the_field():
    params = _train_params()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    options = {name for name, f in fields.items() if "help" in f.metadata}
    assert set(params) == options | {"amp", "verbose"}  # the two that are about the invocation, not the run
    assert OPTIONS_BEFORE <= set(params) and set(params) - OPTIONS_BEFORE == {"int8"}
    assert "log_images" not in params  # a field without help stays out of the CLI
    for name in options:
        f, p = fields[name], params[name]
        assert p.help == f.metadata["help"]
        assert p.default == f.metadata.get("cli_default", f.default), name
        assert p.opts[0] == (
            f.metadata["flags"][0].split("/")[0] if f.metadata["flags"] else "--" + name.replace("_", "-")
        )
    assert (params["resume"].opts, params["resume"].secondary_opts) == (["--resume"], [])
    assert (params["augment"].opts, params["augment"].secondary_opts) == (["--augment"], ["--no-augment"])
    assert (params["int8"].opts, params["int8"].secondary_opts) == (["--calibrate"], ["--no-calibrate"])
    assert params["recipe"].default == "auto" and TrainConfig().recipe == "book"


@pytest.mark.parametrize(("args", "expected"), [([], True), (["--no-calibrate"], False), (["--calibrate"], True)])
def test_the_options_reach_the_config(monkeypatch, tmp_path, args, expected):
    from typer.testing import CliRunner

    from catdog_glm.vision import trainer

    seen = []
    monkeypatch.setattr(trainer, "train", lambda cfg, callbacks: seen.append(cfg))
    argv = ["train", "--output", str(tmp_path / "run"), "--epochs", "3", "--no-tta", "--resume", *args]
    out = CliRunner().invoke(app, argv)
    assert out.exit_code == 0, out.output
    (cfg,) = seen
    assert cfg.int8 is expected and cfg.epochs == 3 and cfg.tta is False and cfg.resume is True
    assert cfg.output == str(tmp_path / "run") and cfg.recipe == "book" and cfg.batch_size == TrainConfig().batch_size


def test_no_calibrate_skips_the_step_after_training(synthetic_data, tmp_path):
    out = run(
        "train", "--data", synthetic_data, "--output", tmp_path / "run", "--arch", "resnet18", "--pretrained", "none",
        "--image-size", "32", "--epochs", "1", "--tracker", "none", "--workers", "0", "--no-progress", "--no-calibrate",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "checking fp32" not in out.stdout and "CPU inference" not in out.stdout
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best.calibration is None and not {"val_acc_fp32", "val_acc_int8"} & set(best.metrics)
    assert best.config["int8"] is False

    from catdog_glm.vision.predictor import Predictor

    assert Predictor(best, device="cpu").mode in ("bf16", "fp32")  # nothing measured: no int8
