"""Datasets by name: `owner/name[@rev]` (Hugging Face Hub), `modelscope:owner/name[@rev]`, `kaggle:competition`
(or `kaggle:owner/dataset`) and `https://.../file.zip` become an ImageFolder in catdog's cache, once.

A finished pull is found by its folder alone (dataset.json written last, the folder renamed into place), so a
cached dataset resolves with no network request and no hub library imported. Downloads go to a `.downloads`
folder that survives a failed attempt (a cut download resumes) and is removed when the pull completes."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from catdog_glm import __version__
from catdog_glm.config import TrainConfig
from catdog_glm.errors import DataError, DatasetAccessError, DatasetNotFoundError
from catdog_glm.paths import cache_dir
from catdog_glm.vision.datahub.base import DataRef, PullProgress, Source, disk_full_message
from catdog_glm.vision.datahub.build import build_imagefolder
from catdog_glm.vision.datahub.huggingface import HuggingFaceSource
from catdog_glm.vision.datahub.kaggle import KaggleSource
from catdog_glm.vision.datahub.modelscope import ModelScopeSource
from catdog_glm.vision.datahub.url import ArchiveSource

log = logging.getLogger(__name__)

# Every source, by the prefix of its ids; a bare owner/name is a Hugging Face id.
SOURCES: dict[str, Source] = {
    s.key: s for s in (HuggingFaceSource(), ModelScopeSource(), KaggleSource(), ArchiveSource())
}
# the split `catdog train` makes itself when data has no val split: a pull with these is the one --data ID finds
DEFAULT_VAL_SPLIT, DEFAULT_SEED = TrainConfig.val_split, TrainConfig.seed
MANIFEST = "dataset.json"


@dataclass
class PulledDataset:
    """A dataset on disk: its id, folder, images, bytes, and whether this call downloaded it."""

    ref: DataRef
    path: Path
    manifest: dict
    downloaded: bool
    seconds: float = 0.0


@dataclass
class CachedDataset:
    id: str
    source: str
    images: int
    size: int
    path: str

    def to_dict(self) -> dict:
        return asdict(self)


def datasets_dir() -> Path:
    """Where pulled datasets live: <catdog cache>/datasets (CATDOG_CACHE_DIR, else ~/.cache/catdog-glm)."""
    return cache_dir() / "datasets"


def register_source(source: Source) -> None:
    """Add a source (or replace one) under its `key`: ids written `key:...` go to it."""
    SOURCES[source.key] = source


def parse_data_ref(text: str) -> DataRef | None:
    """An id any source understands, or None (then it is meant as a folder)."""
    text = text.strip()
    if "://" in text:
        return SOURCES["url"].parse(text)
    prefix, colon, rest = text.partition(":")
    if colon and prefix.lower() in SOURCES:
        return SOURCES[prefix.lower()].parse(rest)
    return None if colon else SOURCES["hf"].parse(text)


def _folder_name(ref: DataRef, limit: int, val_split: float, seed: int) -> str:
    """One cache folder per id and per way of cutting it (a --limit or another split is another folder)."""
    name = ref.slug
    if limit:
        name += f"-limit{limit}"
    if val_split != DEFAULT_VAL_SPLIT or seed != DEFAULT_SEED:
        name += f"-val{val_split:g}-seed{seed}"
    return name


def cached_dataset(ref: DataRef, *, limit: int = 0, val_split: float = DEFAULT_VAL_SPLIT, seed: int = DEFAULT_SEED):
    """The finished pull of `ref` in the cache (no network), or None."""
    folder = datasets_dir() / _folder_name(ref, limit, val_split, seed)
    return folder if (folder / MANIFEST).is_file() else None


def pull_dataset(
    spec: str,
    *,
    out: Path | None = None,
    limit: int = 0,
    val_split: float = DEFAULT_VAL_SPLIT,
    seed: int = DEFAULT_SEED,
    sha256: str | None = None,
    force: bool = False,
    progress: PullProgress | None = None,
) -> PulledDataset:
    """Download `spec` (if not already pulled) and write it as an ImageFolder with a dataset.json beside it."""
    ref = parse_data_ref(spec)
    if ref is None:
        raise DataError(
            f"{spec} is not a dataset id: pass owner/name[@revision] (Hugging Face), modelscope:owner/name, "
            "kaggle:competition, kaggle:owner/dataset or an https:// URL of a .zip or .tar.gz"
        )
    if limit < 0:
        raise DataError(f"--limit must be 0 (all) or a positive number of images per class, got {limit}")
    if not 0 < val_split < 1:
        raise DataError(f"--val-split must be between 0 and 1, got {val_split}")
    if sha256 and ref.source != "url":
        raise DataError("--sha256 checks an archive URL's download; hub datasets are checked by their hub")
    progress = progress or PullProgress()
    target = Path(out).expanduser() if out else datasets_dir() / _folder_name(ref, limit, val_split, seed)
    if (target / MANIFEST).is_file() and not force:
        return PulledDataset(ref, target, _read_manifest(target), downloaded=False)
    if out and target.exists() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise DataError(f"{target} exists and is not a pulled dataset; choose a new --out folder")
    source = SOURCES[ref.source]
    downloads = datasets_dir() / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    # one pull of an id at a time (the ranks of a torchrun job, two shells): the others wait, then find it pulled
    with FileLock(str(downloads / f"{ref.slug}.lock")):
        if (target / MANIFEST).is_file() and not force:
            return PulledDataset(ref, target, _read_manifest(target), downloaded=False)
        started = time.perf_counter()
        manifest = _pull(ref, source, target, downloads / ref.slug, limit, val_split, seed, sha256, progress)
    return PulledDataset(ref, target, manifest, downloaded=True, seconds=time.perf_counter() - started)


def _pull(ref, source, target, raw, limit, val_split, seed, sha256, progress) -> dict:
    """Download into `raw`, write the ImageFolder into a temp folder beside `target`, then rename it into place."""
    raw.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a pull that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        fetched = source.fetch(ref, raw, progress, sha256=sha256, cache=target)
        tmp.mkdir(parents=True)
        built = build_imagefolder(
            fetched, tmp, what=str(ref), limit=limit, val_split=val_split, seed=seed, progress=progress
        )
        manifest = {
            "id": str(ref),
            "source": ref.source,
            "name": ref.name,
            "revision": fetched.revision,
            "license": fetched.license,
            "page": fetched.page,
            "classes": built.classes,
            "counts": built.counts,
            "images": built.images,
            "bytes": built.bytes,
            "split": {"from": built.split_from, "val_split": val_split, "seed": seed},
            "limit": limit or None,
            "skipped": built.skipped,
            "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "catdog_version": __version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _swap_in(tmp, target)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DataError(disk_full_message(ref, target.parent)) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(raw, ignore_errors=True)  # complete: the downloads are not needed any more
    return manifest


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished folder into place; an older pull there (--force) is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{folder / MANIFEST} is unreadable ({e}); pull again with --force") from e


def resolve_data(
    spec: str,
    *,
    val_split: float = DEFAULT_VAL_SPLIT,
    seed: int = DEFAULT_SEED,
    progress: PullProgress | None = None,
) -> str:
    """A --data value as a folder: an existing path passes through (a path always wins over an id written without
    a prefix); a dataset id comes from the cache, else is pulled. Anything else passes through unchanged, so that
    a missing folder gets the data layer's own error."""
    if Path(spec).expanduser().exists():
        return spec
    ref = parse_data_ref(spec)
    if ref is None:
        return spec
    cached = cached_dataset(ref, val_split=val_split, seed=seed)
    if cached is not None:
        log.info("%s found in the dataset cache at %s", ref, cached)
        return str(cached)
    log.warning("pulling %s into %s", ref, datasets_dir())
    try:
        return str(pull_dataset(spec, val_split=val_split, seed=seed, progress=progress).path)
    except (DatasetNotFoundError, DatasetAccessError) as e:
        if ":" in spec or ref.revision:  # only a bare owner/name may have been meant as a relative folder
            raise
        raise type(e)(f"there is no local folder {spec}, and {e}") from e


def list_datasets() -> list[CachedDataset]:
    """Every finished pull in the cache, sorted by id."""
    found = []
    root = datasets_dir()
    for manifest in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []:
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        size = sum(p.stat().st_size for p in manifest.parent.rglob("*") if p.is_file())
        found.append(
            CachedDataset(
                id=data.get("id", manifest.parent.name),
                source=data.get("source", "?"),
                images=int(data.get("images", 0)),
                size=size,
                path=str(manifest.parent),
            )
        )
    return sorted(found, key=lambda d: (d.id, d.path))
