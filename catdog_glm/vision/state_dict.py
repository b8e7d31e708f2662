"""State-dict input/output, one floor below the model and the checkpoint format (both use it; it uses neither).

Atomic writes, safe loading (`weights_only=True`, safetensors, clear errors for TorchScript and foreign pickles),
unwrapping the common `{"model": ...}` / `{"state_dict": ...}` wrappers and stripping DDP's `module.` and
torch.compile's `_orig_mod.` prefixes.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from catdog_glm.errors import CheckpointError

WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "model_state")
STRIP_PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(state: dict) -> dict:
    """Strip DDP's `module.` and torch.compile's `_orig_mod.` prefixes."""
    cleaned = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        cleaned[key] = value
    return cleaned


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temp file in `path`'s folder, fsync, then rename it over `path`.

    A crash or SIGKILL at any moment leaves either the old file or the new one, never half of one; an exception
    (Ctrl-C included) removes the temp file. A SIGKILL can leave one `.NAME.*.tmp` behind: `remove_stale_temp_files`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a checkpoint or export is an ordinary file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: str | Path) -> None:
    """Delete the temp files a process killed inside `write_atomic` left in `folder` (the real files are intact)."""
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically (see write_atomic)."""
    import torch

    write_atomic(path, lambda f: torch.save(obj, f))


def safe_load(path: str | Path) -> Any:
    """What a weights file holds, loaded without running code: `torch.load(weights_only=True)` or safetensors."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    if _is_torchscript(path):  # torch.load would warn, then suggest weights_only=False: say what the file is
        raise CheckpointError(
            f"{path} is a TorchScript archive (as `catdog export classifier --format torchscript` writes), not a "
            "checkpoint; load it with torch.jit.load, or pass the checkpoint or a .onnx export here"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)", str(e))
        detail = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"refused to load {path}: it is not a plain weights file{detail}; arbitrary pickles can run code, so "
            "only tensors and plain values are accepted (re-save it as a state_dict from a trusted environment)"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e})") from e


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/__torch__/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def unwrap_state_dict(obj: Any, path: str | Path) -> dict:
    """The tensors of `obj`: a state_dict itself or one inside a common wrapper key, with prefixes stripped."""
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        import torch

        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return clean_state_dict(obj)
    raise CheckpointError(f"{path} holds no model state_dict")


def read_state_dict(path: str | Path) -> dict:
    """Model weights from any supported file: a catdog checkpoint, a bare state_dict or a common wrapper."""
    return unwrap_state_dict(safe_load(path), path)
