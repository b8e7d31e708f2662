"""The trainer's small parts on their own: TrainState's state dict, the RNG, results.csv, the world of one."""

from __future__ import annotations

import copy
import csv
import random

import pytest
import torch

from catdog_glm.vision.distributed import DistInfo, barrier, leave_distributed, rank_device, setup_distributed
from catdog_glm.vision.results import RESULTS_FIELDS, epoch_row, write_results_csv
from catdog_glm.vision.rng import restore_rng, rng_state, seed_everything
from catdog_glm.vision.trainer import TrainState, lr_schedule

# last.pt's training_state as the trainer wrote it before TrainState.state_dict() (plus the saver's score):
# checkpoints written by earlier releases must resume, so the keys stay these.
SAVED_KEYS = {"optimizer", "scheduler", "scaler", "epoch", "epochs", "stopped_early", "step", "history", "rng"}


def _state(epochs: int = 4, ema: bool = False) -> TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    factor = lr_schedule("cosine", epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    average = None
    if ema:
        from timm.utils.model_ema import ModelEmaV3

        average = ModelEmaV3(model, decay=0.9)
    return TrainState(
        model, model, optimizer, scheduler, scaler, factor, (0.5,) * 3, (0.25,) * 3, "none", average, epochs=epochs
    )


def _train_epoch(state: TrainState) -> None:
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    loss = torch.nn.functional.cross_entropy(state.model(x), y)
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    if state.ema is not None:
        state.ema.update(state.model, step=state.step + 1)
    state.scheduler.step()
    state.step += 1
    state.epoch += 1
    state.history.append({"epoch": state.epoch, "train_loss": float(loss.detach())})


@pytest.mark.parametrize("ema", [False, True])
def test_state_dict_round_trip_continues_exactly(ema):
    a = _state(ema=ema)
    _train_epoch(a)
    saved = copy.deepcopy(a.state_dict())  # as written to last.pt: the live state goes on changing
    weights = {k: v.clone() for k, v in a.eval_model.state_dict().items()}  # last.pt's `model`
    assert set(saved) == SAVED_KEYS | ({"raw_model"} if ema else set())
    after_a = torch.rand(3)  # what the uninterrupted run draws next
    _train_epoch(a)

    b = _state(ema=ema)
    b.load_state_dict(saved, weights)
    assert (b.epoch, b.step, b.history) == (1, 1, a.history[:1])
    assert torch.equal(torch.rand(3), after_a)  # the RNG is where it was when the state was saved
    _train_epoch(b)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a.eval_model.state_dict().values(), b.eval_model.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]


def test_a_longer_run_resumes_on_the_stretched_schedule():
    a = _state(epochs=2)
    _train_epoch(a)
    _train_epoch(a)  # the end of a 2-epoch cosine: lr 0
    assert a.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    longer = _state(epochs=4)
    longer.load_state_dict(a.state_dict(), a.model.state_dict())
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * longer.lr_factor(2)) and longer.epoch == 2


def test_an_optimizer_that_does_not_fit_is_a_value_error():
    a = _state()
    other = _state()
    other.optimizer = torch.optim.SGD([{"params": [p]} for p in other.model.parameters()], lr=0.1)
    with pytest.raises(ValueError):
        other.load_state_dict(a.state_dict(), a.model.state_dict())


def test_rng_state_round_trip():
    seed_everything(5)
    state = rng_state()
    first = (random.random(), torch.rand(2))
    random.random(), torch.rand(5)
    restore_rng(state)
    assert random.random() == first[0] and torch.equal(torch.rand(2), first[1])


def test_results_csv_has_the_fields_in_order(tmp_path):
    rows = [
        epoch_row(i, train_loss=0.5, val_loss=0.25, val_acc=0.75, lr=1e-3, images_per_s=9.87654, seconds=1.234)
        for i in (1, 2)
    ]
    write_results_csv(tmp_path / "results.csv", rows)
    with open(tmp_path / "results.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == RESULTS_FIELDS and [r["epoch"] for r in read] == ["1", "2"]
    assert read[0]["images_per_s"] == "9.877" and read[0]["epoch_seconds"] == "1.23"


def test_without_torchrun_the_world_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = setup_distributed("cpu")
    assert d == DistInfo() and d.main and rank_device("cpu", d).type == "cpu"
    barrier(d)
    leave_distributed(d)  # no process group to leave: both are no-ops
