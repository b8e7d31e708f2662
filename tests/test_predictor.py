"""The one predictor: same tensors as training, batched results, bad inputs reported per file."""

from __future__ import annotations

import pytest
import torch

from catdog_glm.vision.checkpoint import load_checkpoint
from catdog_glm.vision.data import discover
from catdog_glm.vision.loader import ImageDataset
from catdog_glm.vision.predictor import Predictor, resolve_inputs
from tests.conftest import SHARED_CATDOG, make_bad_inputs


def test_preprocessing_is_the_training_one(synthetic_data, tiny_checkpoint, tmp_path):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    samples = discover(synthetic_data).split("val")[:4]
    dataset = ImageDataset(samples, predictor.image_size)
    for i, sample in enumerate(samples):
        assert torch.equal(predictor.load(sample.path), dataset.load(i))
    # the same bytes arriving as an upload give the same tensor
    assert torch.equal(predictor.load(samples[0].path.read_bytes()), dataset.load(0))


def test_cpu_inference_in_chunks_equals_one_forward(tiny_checkpoint):
    from catdog_glm.device import Precision, inference_chunk_size
    from catdog_glm.vision.checkpoint import build_model_from_checkpoint
    from catdog_glm.vision.evaluate import InferenceSpec, infer_logits, run_model

    cpu = torch.device("cpu")
    model = build_model_from_checkpoint(load_checkpoint(tiny_checkpoint)).eval()
    batch = torch.randint(0, 256, (2 * inference_chunk_size(cpu) + 1, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        spec = InferenceSpec(cpu, Precision(None, False), channels_last=True)
        chunked = infer_logits(model, batch, spec)
        whole = run_model(model, batch, spec)
    assert chunked.shape == (len(batch), 2)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)


def test_batched_equals_one_at_a_time(synthetic_data, tiny_checkpoint):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")
    paths = [s.path for s in discover(synthetic_data).split("val")]
    batched = list(predictor.predict_files(paths, batch_size=3))
    single = [predictor.predict_sources([p])[0] for p in paths]
    assert [b.label for b in batched] == [s.label for s in single]
    for b, s in zip(batched, single, strict=True):
        assert b.probabilities == pytest.approx(s.probabilities, abs=1e-5)
        assert sum(b.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_every_bad_input_gets_a_prediction_or_a_clear_error(tiny_checkpoint, tmp_path):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", max_pixels=50_000_000)
    cases = make_bad_inputs(tmp_path)
    results = {r.file: r for r in predictor.predict_files([p for p, _ in cases.values()], batch_size=4)}
    for name, (path, expected_error) in cases.items():
        result = results[str(path)]
        if expected_error is None:
            assert result.ok and result.label in ("cat", "dog"), (name, result.error)
        else:
            assert not result.ok and expected_error in result.error and path.name in result.error, (name, result)


def test_resolve_inputs_files_folders_globs_and_misses(synthetic_data, tmp_path):
    val = synthetic_data / "val"
    files, missing = resolve_inputs(
        [
            str(val / "cat"),
            str(val / "dog" / "*.jpg"),
            str(val / "cat" / "cat_0000.jpg"),
            str(tmp_path / "nope.jpg"),
            str(tmp_path / "*.png"),
        ]
    )
    assert len(files) == 8  # the folder's 4 cats, the glob's 4 dogs; the repeated file once
    assert [m.error for m in missing] == [
        f"{tmp_path / 'nope.jpg'}: file not found",
        f"{tmp_path / '*.png'}: no file matches this pattern",
    ]


def test_bf16_accuracy_stays_within_half_a_point_of_fp32(real_checkpoint):
    """bf16 is the default on CPUs with native bf16 only because this holds on the real validation photos."""
    fp32 = Predictor.from_checkpoint(real_checkpoint, device="cpu", precision="fp32")
    bf16 = Predictor.from_checkpoint(real_checkpoint, device="cpu", precision="bf16")
    samples = discover(SHARED_CATDOG).split("val")
    paths = [s.path for s in samples]
    truth = [fp32.classes[s.label] for s in samples]

    def accuracy(predictor):
        labels = [p.label for p in predictor.predict_files(paths, batch_size=32)]
        return sum(a == b for a, b in zip(labels, truth, strict=True)) / len(truth)

    acc32, acc16 = accuracy(fp32), accuracy(bf16)
    assert abs(acc32 - acc16) <= 0.005, (acc32, acc16)
    assert acc32 > 0.55  # the model learned something, so the comparison means something


def test_checkpoint_metadata_reaches_info(tiny_checkpoint):
    info = Predictor.from_checkpoint(tiny_checkpoint, device="cpu").info()
    assert info["arch"] == "resnet18" and info["classes"] == ["cat", "dog"] and info["val_acc"] == 0.5
    assert load_checkpoint(tiny_checkpoint).image_size == info["image_size"] == 32


def test_precision_choice_follows_the_checkpoints_own_validation(tiny_checkpoint, synthetic_data):
    import dataclasses

    from catdog_glm.device import cpu_supports_bf16
    from catdog_glm.errors import ConfigError
    from catdog_glm.vision.quantize import int8_supported

    base = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ConfigError, match="calibration images"):
        Predictor(base, device="cpu", precision="int8")
    calibration = torch.stack(
        [Predictor(base, device="cpu").load(s.path) for s in discover(synthetic_data).split("train")]
    )
    good = {"val_acc_fp32": 0.90, "val_acc_bf16": 0.898, "val_acc_int8": 0.896}
    ckpt = dataclasses.replace(base, calibration=calibration, metrics=good)
    expected = "int8" if int8_supported() else ("bf16" if cpu_supports_bf16() else "fp32")
    assert Predictor(ckpt, device="cpu").mode == expected
    worse_int8 = dataclasses.replace(ckpt, metrics={**good, "val_acc_int8": 0.88})  # 2 points lower: not used
    assert Predictor(worse_int8, device="cpu").mode == ("bf16" if cpu_supports_bf16() else "fp32")
    worse_bf16 = dataclasses.replace(ckpt, metrics={**good, "val_acc_int8": 0.8, "val_acc_bf16": 0.88})
    assert Predictor(worse_bf16, device="cpu").mode == "fp32"
    if int8_supported():  # int8 predictions are real predictions of the same model
        int8 = Predictor(ckpt, device="cpu", precision="int8")
        fp32 = Predictor(ckpt, device="cpu", precision="fp32")
        paths = [s.path for s in discover(synthetic_data).split("val")]
        for a, b in zip(int8.predict_files(paths), fp32.predict_files(paths), strict=True):
            assert a.probabilities["cat"] == pytest.approx(b.probabilities["cat"], abs=0.1)
