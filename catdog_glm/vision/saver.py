"""A run folder's checkpoints: `CheckpointSaver` decides what is best and owns best.pt and last.pt (after timm's
CheckpointSaver). Every file is written atomically; the best weights are also kept in memory, so the end of a run
(final evaluation, int8 calibration) never reads best.pt back."""

from __future__ import annotations

from pathlib import Path

from catdog_glm.vision.checkpoint import BEST_NAME, LAST_NAME, checkpoint_payload
from catdog_glm.vision.state_dict import safe_load, save_atomic


class CheckpointSaver:
    """best.pt (weights and metadata of the best epoch) and last.pt (the same plus the training state to resume).

    `meta` holds what every checkpoint of the run shares (arch, classes, image_size, mean, std, config, dataset).
    With `write=False` (torchrun ranks other than 0) it keeps score and the best weights but writes nothing.
    """

    def __init__(self, folder: str | Path, meta: dict, *, write: bool = True):
        self.folder = Path(folder)
        self.best_path, self.last_path = self.folder / BEST_NAME, self.folder / LAST_NAME
        self.meta = meta
        self.write = write
        self.best_acc, self.best_epoch, self.bad_epochs = -1.0, 0, 0
        self._best: dict | None = None  # best.pt's payload, weights on the CPU

    # ---- the score --------------------------------------------------------------------------------------------
    def observe(self, accuracy: float, epoch: int) -> bool:
        """Record epoch `epoch`'s validation accuracy; True when it is the best so far."""
        if accuracy > self.best_acc:
            self.best_acc, self.best_epoch, self.bad_epochs = accuracy, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def state_dict(self) -> dict:
        return {"best_acc": self.best_acc, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best_acc, self.best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])

    # ---- the files --------------------------------------------------------------------------------------------
    def save(self, model, *, epoch: int, metrics: dict, improved: bool, training_state: dict) -> None:
        """After an epoch: best.pt when `improved`, then last.pt with `training_state`."""
        metrics = {**metrics, **self.state_dict()}
        metrics.pop("bad_epochs")
        state = model.state_dict()
        if improved:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
            self._best = checkpoint_payload(**self.meta, model_state=weights, metrics=metrics, epoch=epoch)
            if self.write:
                save_atomic(self._best, self.best_path)
        if self.write:
            payload = checkpoint_payload(
                **self.meta, model_state=state, metrics=metrics, epoch=epoch, training_state=training_state
            )
            save_atomic(payload, self.last_path)

    def best_weights(self) -> dict | None:
        """The best epoch's state dict (CPU); read from best.pt only when an earlier process wrote it (a resume)."""
        if self._best is None and self.best_path.is_file():
            self._best = safe_load(self.best_path)
        return None if self._best is None else self._best["model"]

    def add_to_best(self, *, metrics: dict, calibration=None) -> None:
        """Write best.pt once more with the post-training metrics and int8 calibration images added."""
        if self._best is None or not self.write:
            return
        self._best["metrics"] = {**self._best.get("metrics", {}), **metrics}
        if calibration is not None:
            self._best["calibration"] = calibration
        save_atomic(self._best, self.best_path)
