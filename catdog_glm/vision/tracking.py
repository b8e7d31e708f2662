"""Experiment tracking behind a small interface: SwanLab (local dashboard by default) or nothing.

Training must never fail because the tracker does: every SwanLab call is guarded, and a tracker that breaks
is switched off with one warning. The CSV log and the plots are written by the trainer either way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class Tracker:
    """No-op base: the interface the trainer talks to."""

    logdir: Path | None = None

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, key: str, images: list, captions: list[str], step: int) -> None: ...

    def finish(self, state: str = "success") -> None:
        """End the run as success, crashed or aborted (Ctrl-C); later calls do nothing."""


def _swanlab_logged_in() -> bool:
    if os.environ.get("SWANLAB_API_KEY"):
        return True
    root = Path(os.environ.get("SWANLAB_ROOT") or os.environ.get("SWANLAB_SAVE_DIR") or Path.home() / ".swanlab")
    return (root / ".netrc").is_file()


class SwanLabTracker(Tracker):
    def __init__(
        self,
        *,
        project: str,
        experiment: str,
        description: str,
        config: dict,
        logdir: Path,
        mode: str,
        resume_id: str | None = None,
    ):
        import swanlab

        if mode == "online" and not _swanlab_logged_in():
            # Online mode would stop and ask for an API key on stdin; a training run must not hang on that.
            log.warning("SwanLab online mode needs `swanlab login` (or SWANLAB_API_KEY); logging locally instead")
            mode = "local"
        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir = logdir
        self._swanlab = swanlab
        kwargs = dict(
            project=project,
            experiment_name=experiment or None,
            description=description or None,
            config=config,
            logdir=str(logdir),
            mode=mode,
        )
        try:
            self.run = swanlab.init(**kwargs)
        except Exception as e:
            if mode != "online":
                raise
            log.warning("SwanLab could not reach its server (%s); logging locally instead", e)
            kwargs["mode"] = "local"
            self.run = swanlab.init(**kwargs)
        self.mode = kwargs["mode"]

    def _guard(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # a tracker failure must not end training
            log.warning("SwanLab %s failed (%s); tracking switched off for this run", what, e)
            self.run = None

    def log(self, metrics, step):
        self._guard("log", lambda: self._swanlab.log(metrics, step=step))

    def log_images(self, key, images, captions, step):
        def send():
            self._swanlab.log(
                {key: [self._swanlab.Image(im, caption=c) for im, c in zip(images, captions, strict=True)]}, step=step
            )

        self._guard("image log", send)

    def finish(self, state: str = "success"):
        self._guard("finish", lambda: self._swanlab.finish(state=state))
        self.run = None  # finished: later calls (the trainer's cleanup) do nothing


def build_tracker(
    name: str, *, mode: str, logdir: Path, project: str, experiment: str, description: str, config: dict
) -> Tracker:
    if name == "none" or mode == "disabled":
        return Tracker()
    try:
        return SwanLabTracker(
            project=project, experiment=experiment, description=description, config=config, logdir=logdir, mode=mode
        )
    except Exception as e:
        log.warning("SwanLab could not start (%s); training continues without it", e)
        return Tracker()
