"""`catdog export classifier` -> ONNX / TorchScript, and `catdog predict --model FILE.onnx` on ONNX Runtime."""

from __future__ import annotations

import json
import warnings

import httpx
import numpy as np
import pytest
import torch

from catdog_glm.vision.checkpoint import build_model_from_checkpoint, load_checkpoint
from catdog_glm.vision.export import export_classifier, read_onnx_metadata
from catdog_glm.vision.predictor import OnnxPredictor, Predictor, load_predictor
from tests.conftest import SHARED_CATDOG, requires_shared_data, start_catdog
from tests.test_cli import run

TOLERANCE = 1e-4  # the bound on |ONNX Runtime - PyTorch fp32| per probability


def real_photos(per_class: int) -> list:
    return [p for c in ("cat", "dog") for p in sorted((SHARED_CATDOG / "val" / c).glob("*.jpg"))[:per_class]]


def torch_probabilities(checkpoint, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return build_model_from_checkpoint(load_checkpoint(checkpoint))(x).softmax(1).numpy()


@pytest.fixture(scope="module")
def tiny_onnx(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported through the real CLI: (path, the command's result)."""
    out = tmp_path_factory.mktemp("onnx") / "catdog.onnx"
    done = run("export", "classifier", "--checkpoint", tiny_checkpoint, "--out", out)
    return out, done


@pytest.fixture(scope="module")
def photo_model(real_checkpoint, tmp_path_factory):
    """The session's resnet18 trained on the real photos (it skips without them) and its ONNX export."""
    return real_checkpoint, export_classifier(real_checkpoint, tmp_path_factory.mktemp("photo") / "model.onnx").path


def test_cli_writes_one_onnx_file_with_metadata_and_a_dynamic_batch(tiny_onnx, tiny_checkpoint):
    import onnx
    import onnxruntime

    path, done = tiny_onnx
    assert done.returncode == 0, done.stderr
    assert f"Wrote {path}" in done.stdout and f"catdog predict --model {path}" in done.stdout
    assert [p.name for p in path.parent.iterdir()] == ["catdog.onnx"]  # no external data, no temp file left
    meta, ckpt = read_onnx_metadata(path), load_checkpoint(tiny_checkpoint)
    assert (meta.classes, meta.image_size, meta.mean, meta.std) == (ckpt.classes, 32, ckpt.mean, ckpt.std)
    assert meta.arch == "resnet18" and meta.source_checkpoint == str(tiny_checkpoint) and meta.val_acc == 0.5
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(props["classes"]) == ["cat", "dog"] and "resize to 32x32" in props["preprocessing"]

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [image], [probabilities] = session.get_inputs(), session.get_outputs()
    assert image.name == "image" and isinstance(image.shape[0], str) and image.shape[1:] == [3, 32, 32]
    assert probabilities.name == "probabilities"
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        (got,) = session.run(["probabilities"], {"image": x.numpy()})
        assert got.shape == (n, 2) and np.allclose(got.sum(1), 1, atol=1e-5)
        assert np.abs(got - torch_probabilities(tiny_checkpoint, x)).max() <= TOLERANCE


@requires_shared_data
def test_onnx_runtime_matches_pytorch_fp32_on_real_photos(photo_model):
    checkpoint, onnx_path = photo_model
    photos = real_photos(32)
    fp32 = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    ort = load_predictor(onnx_path, device="cpu")
    assert isinstance(ort, OnnxPredictor) and ort.info()["precision"] == "onnxruntime"
    assert ort.info() | {"precision": "fp32", "checkpoint": None} == fp32.info() | {"checkpoint": None}
    assert ort.info()["val_acc"] > 0.5  # a trained model: its probabilities are not all near 0.5
    batch = torch.stack([fp32.load(p) for p in photos])
    diff = (ort.probabilities(batch) - fp32.probabilities(batch)).abs().max().item()
    assert diff <= TOLERANCE, diff
    # and through the shared batching/labelling, with a batch size that leaves a ragged last batch
    ours = list(ort.predict_files(photos, batch_size=24))
    theirs = list(fp32.predict_files(photos, batch_size=24))
    assert [p.label for p in ours] == [p.label for p in theirs]


def test_predict_with_an_onnx_model_gives_the_pytorch_labels(tiny_onnx, tiny_checkpoint, synthetic_data):
    path, _ = tiny_onnx
    files = sorted((synthetic_data / "val").rglob("*.jpg"))
    if (SHARED_CATDOG / "val").is_dir():
        files += real_photos(4)
    out = run("predict", *files, "--model", path, "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    expected = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32").predict_files(files)
    assert len(rows) == len(files)
    for row, want in zip(rows, expected, strict=True):
        assert row["file"] == want.file and row["label"] == want.label
        assert row["probabilities"] == pytest.approx(want.probabilities, abs=TOLERANCE)


def test_torchscript_export_loads_with_torch_jit_and_matches(tiny_checkpoint, tmp_path):
    out = tmp_path / "catdog.pt"
    result = export_classifier(tiny_checkpoint, out, fmt="torchscript")
    assert result.format == "torchscript" and result.bytes == out.stat().st_size > 0
    export_classifier(tiny_checkpoint, out, fmt="torchscript", overwrite=True)  # replaced in place
    assert [p.name for p in tmp_path.iterdir()] == ["catdog.pt"]
    extra = {"catdog.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch flags torch.jit as deprecated
        model = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["catdog.json"])
    assert meta["classes"] == ["cat", "dog"] and meta["image_size"] == 32 and meta["format"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x).numpy()
    assert np.abs(got - torch_probabilities(tiny_checkpoint, x)).max() <= TOLERANCE


def _onnx_without_catdog_metadata(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["probabilities"])], "plain", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(
    "case",
    [
        "out exists",
        "unknown format",
        "missing checkpoint",
        "missing onnx",
        "eval onnx",
        "text as onnx",
        "foreign onnx",
        "precision",
        "torchscript",
    ],
)
def test_bad_inputs_exit_1_with_one_error_line(case, tiny_onnx, tiny_checkpoint, synthetic_data, tmp_path):
    onnx_path, _ = tiny_onnx
    image = synthetic_data / "val" / "cat" / "cat_0000.jpg"
    before = onnx_path.stat().st_mtime_ns
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    export = ["export", "classifier", "--checkpoint", tiny_checkpoint]
    cases = {  # case -> (the command's arguments, made only for that case; what its error must say)
        "out exists": (
            lambda: [*export, "--out", onnx_path],
            "already exists; choose another --out or pass --overwrite",
        ),
        "unknown format": (
            lambda: [*export, "--out", tmp_path / "m.tflite", "--format", "tflite"],
            "onnx, torchscript",
        ),
        "missing checkpoint": (
            lambda: ["export", "classifier", "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "m.onnx"],
            "does not exist",
        ),
        "missing onnx": (
            lambda: ["predict", image, "--model", tmp_path / "gone.onnx"],
            "export one with `catdog export classifier",
        ),
        "eval onnx": (
            lambda: ["eval", "--checkpoint", onnx_path, "--data", synthetic_data],
            "is an exported ONNX model, not a training checkpoint",
        ),
        "text as onnx": (lambda: ["predict", image, "--model", text], "is not an ONNX model"),
        "foreign onnx": (
            lambda: ["predict", image, "--model", _onnx_without_catdog_metadata(tmp_path / "plain.onnx")],
            "no catdog metadata",
        ),
        "precision": (lambda: ["predict", image, "--model", onnx_path, "--precision", "int8"], "leave --precision out"),
        "torchscript": (
            lambda: [
                "predict",
                image,
                "--model",
                export_classifier(tiny_checkpoint, tmp_path / "m.pt", fmt="torchscript").path,
            ],
            "is a TorchScript archive",
        ),
    }
    make_args, message = cases[case]
    args = make_args()
    out = run(*args)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    assert message in lines[0]
    assert onnx_path.stat().st_mtime_ns == before  # the existing export is untouched
    assert not list(tmp_path.glob("m.onnx*")) and not list(tmp_path.glob("*.tflite"))


@pytest.mark.slow
def test_serve_classifier_serves_an_onnx_model(tiny_onnx, synthetic_data):
    path, _ = tiny_onnx
    proc, url = start_catdog(["serve-classifier", "--model", str(path)], timeout=120)
    try:
        info = httpx.get(f"{url}/api/info").json()
        assert info["precision"] == "onnxruntime" and info["classes"] == ["cat", "dog"] and info["image_size"] == 32
        photo = synthetic_data / "val" / "dog" / "dog_0000.jpg"
        response = httpx.post(f"{url}/api/classify", files={"file": (photo.name, photo.read_bytes())}, timeout=60)
        assert response.status_code == 200, response.text
        assert sum(response.json()["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
