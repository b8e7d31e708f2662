"""The process's random state (after timm's utils/random.py): seeded once at the start of a run, saved in last.pt
after every epoch and restored on --resume, so a resumed run draws what the uninterrupted one would have drawn."""

from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (numpy's is not used by the trainer)."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python's and torch's generator states, as plain data torch.load reads back without code execution."""
    import torch

    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": list(internal), "python_version": version, "python_gauss": gauss}


def restore_rng(state: dict) -> None:
    """Put back what `rng_state` saved."""
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
