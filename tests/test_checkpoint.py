"""Checkpoints: self-describing round trip, atomic writes, the book's bare state_dict, no code execution."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torchvision import models

from catdog_glm.errors import CheckpointError
from catdog_glm.vision import checkpoint as ck
from catdog_glm.vision import state_dict as sd


def _resnet18_state(num_classes=2):
    torch.manual_seed(0)
    m = models.resnet18(num_classes=num_classes)
    return m, m.state_dict()


def test_round_trip_is_self_describing(tmp_path):
    _, state = _resnet18_state(3)
    path = tmp_path / "best.pt"
    ck.save_checkpoint(
        path,
        arch="resnet18",
        classes=["a", "b", "c"],
        model_state=state,
        image_size=96,
        config={"lr": 0.1},
        metrics={"val_acc": 0.5},
        epoch=4,
    )
    loaded = ck.load_checkpoint(path)
    assert (loaded.arch, loaded.classes, loaded.image_size, loaded.epoch) == ("resnet18", ["a", "b", "c"], 96, 4)
    assert loaded.metrics == {"val_acc": 0.5} and loaded.config == {"lr": 0.1}
    assert loaded.raw["versions"]["torch"] == str(torch.__version__)
    model = ck.build_model_from_checkpoint(loaded)
    torch.testing.assert_close(model.state_dict()["fc.weight"], state["fc.weight"])


def test_atomic_save_keeps_the_old_file_when_a_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    sd.save_atomic({"v": torch.tensor([1])}, path)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        sd.save_atomic({"v": torch.tensor([2])}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "latest_checkpoint.pth"
    with path.open("wb") as f:
        pickle.dump({"fc.weight": _Exploit(marker)}, f)
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Exploit(marker)}, tmp_path / "evil.pt")
    for bad in (path, tmp_path / "evil.pt"):
        with pytest.raises(CheckpointError, match="refused to load .*not a plain weights file"):
            ck.load_checkpoint(bad)
    assert not marker.exists()


@pytest.mark.parametrize(("builder", "arch"), [(models.resnet18, "resnet18"), (models.resnet50, "resnet50")])
def test_book_bare_state_dict_loads(tmp_path, builder, arch):
    torch.manual_seed(0)
    model = builder()
    model.fc = torch.nn.Linear(model.fc.in_features, 2)  # exactly what the book does
    path = tmp_path / "latest_checkpoint.pth"
    torch.save(model.state_dict(), path)
    loaded = ck.load_checkpoint(path)
    assert (loaded.arch, loaded.classes, loaded.image_size) == (arch, ["cat", "dog"], 256)
    rebuilt = ck.build_model_from_checkpoint(loaded)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    _, state = _resnet18_state()
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}}, path)
    assert ck.load_checkpoint(path).arch == "resnet18"


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="refused to load .*junk.pt"):
        ck.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not of a torchvision ResNet"):
        ck.load_checkpoint(tmp_path / "other.pt")


def test_find_checkpoint_prefers_best(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ck.find_checkpoint(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"x")
    assert ck.find_checkpoint(tmp_path).name == "last.pt"
    (tmp_path / "best.pt").write_bytes(b"x")
    assert ck.find_checkpoint(tmp_path).name == "best.pt"
