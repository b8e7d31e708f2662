"""The cache of converted chat models: the quantized weights of a model, kept as safetensors so that the next load
reads 3.5 GB of ready int4 weights instead of converting 12.5 GB of fp16 again.

An entry is keyed by the source weight files (name, size, modification time), the bits, the int4 group size, the
compute dtype, torch's version (the int4 packing is torch's own) and this format's version; it is written to a temp
folder and renamed, so a killed process never leaves half an entry. A damaged entry is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from catdog_glm.chat.cache_paths import cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: catdog's int4 layout (chat/kernels) beside torch's
SHARD_BYTES = 512 << 20  # safetensors' writer holds one shard's bytes in memory: keep that small beside the model
META_FILE = "catdog-conversion.json"


def conversion_key(files: list[Path], bits: int, dtype) -> str:
    import torch

    from catdog_glm.chat.quantize import INT4_GROUP, catdog_kernels

    layout = "catdog-q4" if catdog_kernels() else "torch-int4pack"  # which int4 layers the shell will be made of
    parts = [f"v{FORMAT_VERSION}", f"int{bits}", f"g{INT4_GROUP}", layout, str(dtype), torch.__version__]
    for f in sorted(files):
        stat = f.stat()
        parts.append(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def conversions_root() -> Path:
    return cache_dir() / "converted"


def entry_dir(name: str, bits: int, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)  # owner/name ids hold a slash
    return conversions_root() / f"{safe}-int{bits}-{key}"


def save_conversion(model, folder: Path, meta: dict) -> Path | None:
    """Write the model's weights to `folder` in shards, atomically. Returns the folder, or None when the disk
    refused (a read-only or full cache only costs speed next time)."""
    from safetensors.torch import save_file

    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        shard: dict = {}
        size = index = 0
        for name, tensor in model.state_dict().items():
            shard[name] = tensor.contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= SHARD_BYTES:
                save_file(shard, str(tmp / f"weights-{index:05d}.safetensors"))
                shard, size, index = {}, 0, index + 1
        if shard:
            save_file(shard, str(tmp / f"weights-{index:05d}.safetensors"))
        meta = dict(meta, format=FORMAT_VERSION, created=time.time(), bytes=_folder_bytes(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder
    except OSError as e:
        log.warning("could not keep the converted model in %s (%s); the next load converts again", folder, e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return None


def load_conversion(model, folder: Path) -> bool:
    """Fill a shell model (quantized modules on the meta device) from a cache entry. False when the entry is
    missing, damaged or does not fit the shell, so the caller converts again."""
    from safetensors import SafetensorError, safe_open

    shards = sorted(folder.glob("weights-*.safetensors"))
    if not (folder / META_FILE).is_file() or not shards:
        return False
    from catdog_glm.chat.quantize import expect_optional_buffers

    loaded: set[str] = set()
    try:
        names: set[str] = set()
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                names.update(f.keys())
        expect_optional_buffers(model, names)
        expected = set(model.state_dict())
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                part = {name: _aligned(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118 - not a dict
            unknown = set(part) - expected
            if unknown:
                raise ValueError(f"unexpected weight {sorted(unknown)[0]}")
            model.load_state_dict(part, strict=False, assign=True)
            loaded |= set(part)
            del part
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        log.warning("ignoring a damaged converted-model cache at %s (%s)", folder, e)
        return False
    if loaded != expected:
        log.warning("ignoring an incomplete converted-model cache at %s", folder)
        return False
    return True


def _aligned(tensor):
    """safetensors hands tensors at the file's 8-byte data offsets; torch's packed int8 kernel reads its weight with
    aligned vector loads and crashes (SIGSEGV) on such a tensor, so copy any that is not 64-byte aligned."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def list_conversions() -> list[dict]:
    """Every cache entry: {"id", "source", "bits", "bytes", "path"}."""
    entries = []
    root = conversions_root()
    for meta_file in sorted(root.glob(f"*/{META_FILE}")) if root.is_dir() else []:
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        entries.append(
            {
                "id": meta.get("name", meta_file.parent.name),
                "source": meta.get("source", ""),
                "bits": meta.get("bits"),
                "bytes": meta.get("bytes", _folder_bytes(meta_file.parent)),
                "path": str(meta_file.parent),
            }
        )
    return entries


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
