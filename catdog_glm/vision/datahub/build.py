"""Downloaded files -> the ImageFolder layout the trainer reads (train/<class>/, val/<class>/, test/<class>/).

Parquet shards (an image column of {bytes, path} and an integer label column whose class names come from the
dataset's metadata) and archives or folders of images (ImageFolder, CSV lists or Kaggle-style cat.1.jpg files) both
become a stream of `Item`s. Each is fully decoded by the decoder training uses (`vision.images.open_image`, the one
`catdog data check` uses): unreadable files are skipped and listed, never written. Names that repeat (across
shards, or across splits) get a -2, -3... suffix instead of overwriting each other. When the source has no val
split, a seeded per-class share of train becomes val: the same split `catdog train` would make."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from catdog_glm.errors import DataError, ImageError
from catdog_glm.hub_errors import first_line
from catdog_glm.vision.data import SPLITS, read_labelled, split_stratified
from catdog_glm.vision.datahub.base import Fetched, PullProgress
from catdog_glm.vision.images import is_image_file, open_image

log = logging.getLogger(__name__)

ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_SPLIT_IN_PATH = re.compile(r"(?:^|[/_.-])(train|training|validation|valid|val|dev|test|testing)(?=[/_.-]|$)", re.I)
_SPLIT_NAMES = {"training": "train", "validation": "val", "valid": "val", "dev": "val", "testing": "test"}
_POOL = "_pool"  # images from a source without split folders, before the seeded split
_MAGIC = ((b"\xff\xd8", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"))
BATCH = 64


@dataclass
class Item:
    """One image as the source has it: its split (None: the source has none), class name, wanted file name, and
    its bytes or local file; `where` names it in the list of skipped files."""

    split: str | None
    label: str
    name: str
    where: str
    data: bytes | None = None
    path: Path | None = None


@dataclass
class Built:
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}
    split_from: str = "source"  # source | seeded
    bytes: int = 0

    @property
    def images(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


def split_of(path: str) -> str | None:
    """train / val / test from a shard's path (data/train-00000-of-00002.parquet, default/validation/0000.parquet)."""
    found = _SPLIT_IN_PATH.findall(path)
    if not found:
        return None
    name = found[-1].lower()
    return _SPLIT_NAMES.get(name, name)


def build_imagefolder(
    fetched: Fetched,
    out: Path,
    *,
    what: str,
    limit: int = 0,
    val_split: float = 0.2,
    seed: int = 42,
    progress: PullProgress | None = None,
    threads: int = 4,
) -> Built:
    """Write the images of `fetched` under `out` (an empty temp folder) as ImageFolder splits; `what` names the
    dataset in errors. `limit` keeps at most N images per class and split (the first N the source lists)."""
    progress = progress or PullProgress()
    skipped: list[dict[str, str]] = []
    written: dict[tuple[str, str], int] = {}  # (split dir, class) -> images
    names: dict[str, set[str]] = {}  # class -> names taken (unique across splits: val is drawn from train)
    total_bytes = 0

    def full(split: str | None, label: str) -> bool:
        return bool(limit) and written.get((split or _POOL, label), 0) >= limit

    def shard_done(split: str | None) -> bool:  # every known class of this split at its limit: skip the shard
        return bool(limit and fetched.classes) and all(full(split, c) for c in fetched.classes)

    items = _items(fetched, what, skipped, shard_done)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for batch in _batches(items, BATCH):
            batch = [i for i in batch if not full(i.split, i.label)]
            for item, error in zip(batch, pool.map(_decode_error, batch), strict=True):
                if error:
                    skipped.append({"file": item.where, "reason": error})
                    continue
                if full(item.split, item.label):
                    continue
                folder = out / (item.split or _POOL) / item.label
                folder.mkdir(parents=True, exist_ok=True)
                dest = folder / _unique(names.setdefault(item.label, set()), _file_name(item))
                if item.data is not None:
                    dest.write_bytes(item.data)
                elif "_extracted" in item.path.parts:  # unpacked from an archive that is still there: move
                    shutil.move(item.path, dest)
                else:  # a downloaded file itself: keep it, so that a failed attempt need not download it again
                    shutil.copyfile(item.path, dest)
                total_bytes += dest.stat().st_size
                key = (item.split or _POOL, item.label)
                written[key] = written.get(key, 0) + 1
            progress.on_images(len(batch))
    built = _arrange(out, written, val_split, seed, what)
    built.skipped, built.bytes = skipped, total_bytes
    return built


def _decode_error(item: Item) -> str | None:
    try:
        open_image(item.data if item.data is not None else item.path, name=item.where)
    except ImageError as e:
        return str(e)
    return None


def _batches(items: Iterable[Item | None], n: int) -> Iterator[list[Item]]:
    """Lists of up to `n` items; a None (the end of a shard) ends a list early, so that a --limit reached in one
    shard is known before the next shard is downloaded."""
    batch: list[Item] = []
    for item in items:
        if item is not None:
            batch.append(item)
        if len(batch) == n or (item is None and batch):
            yield batch
            batch = []
    if batch:
        yield batch


def _file_name(item: Item) -> str:
    name = PurePosixPath(item.name.replace("\\", "/")).name or "image"
    if not is_image_file(Path(name)):
        head = item.data[:8] if item.data is not None else item.path.open("rb").read(8)
        name += next((ext for magic, ext in _MAGIC if head.startswith(magic)), ".jpg")
    return name


def _unique(taken: set[str], name: str) -> str:
    """`name`, or name-2.ext, name-3.ext... when a file of that name was already written for this class."""
    stem, dot, ext = name.rpartition(".")
    candidate, k = name, 1
    while candidate.lower() in taken:
        k += 1
        candidate = f"{stem}-{k}.{ext}" if dot else f"{name}-{k}"
    taken.add(candidate.lower())
    return candidate


def _arrange(out: Path, written: dict, val_split: float, seed: int, what: str) -> Built:
    """Move the pooled images into train/ and val/ (seeded, per class) when the source had no val split."""
    splits = {s for s, _ in written}
    split_from = "source"
    if "val" not in splits:
        rows = [
            (p, p.parent.name) for s in (_POOL, "train") if (out / s).is_dir() for p in sorted((out / s).rglob("*"))
        ]
        rows = [(p, label) for p, label in rows if p.is_file()]
        train, val = split_stratified(rows, val_split, seed)
        for split, part in (("train", train), ("val", val)):
            for p, label in part:
                (out / split / label).mkdir(parents=True, exist_ok=True)
                if p.parent != out / split / label:
                    p.rename(out / split / label / p.name)
        split_from = "seeded"
    elif (out / _POOL).is_dir():  # images without a split beside a source's val split: they train
        for p in sorted((out / _POOL).rglob("*")):
            if p.is_file():
                (out / "train" / p.parent.name).mkdir(parents=True, exist_ok=True)
                p.rename(out / "train" / p.parent.name / p.name)
    shutil.rmtree(out / _POOL, ignore_errors=True)
    counts = {}
    for split in SPLITS:
        if (out / split).is_dir():
            counts[split] = {d.name: sum(1 for _ in d.iterdir()) for d in sorted((out / split).iterdir()) if d.is_dir()}
    classes = sorted({c for per in counts.values() for c in per})
    for per in counts.values():
        for c in classes:
            per.setdefault(c, 0)
    train_classes = [c for c, n in counts.get("train", {}).items() if n]
    if len(train_classes) < 2 or not sum(counts.get("val", {}).values()):
        have = ", ".join(f"{s}: {sum(c.values())}" for s, c in counts.items()) or "no readable images"
        raise DataError(
            f"{what} gave too few readable images to train on ({have}; at least two classes in train and one "
            "image in val are needed)"
        )
    return Built(classes=classes, counts={s: dict(sorted(c.items())) for s, c in counts.items()}, split_from=split_from)


# --- where items come from ----------------------------------------------------------------------------------


def _items(fetched: Fetched, what: str, skipped: list, shard_done) -> Iterator[Item | None]:
    if fetched.shards:
        yield from _parquet_items(fetched, what, skipped, shard_done)
    if fetched.folder is not None:
        parquets = sorted(p for p in fetched.folder.rglob("*.parquet") if p.is_file())
        if parquets:
            local = Fetched(classes=fetched.classes, shards=[str(p) for p in parquets], open_shard=Path)
            yield from _parquet_items(local, what, skipped, shard_done)
        else:
            yield from _folder_items(fetched.folder, what, skipped)


def read_class_names(schema_metadata: dict | None, column: str) -> list[str] | None:
    """ClassLabel names from the `huggingface` key that `datasets` writes into every parquet shard's metadata."""
    raw = (schema_metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
        names = features[column].get("names")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return [str(n) for n in names] if names else None


def _columns(schema, what: str, shard: str) -> tuple[str, str]:
    import pyarrow as pa

    image = next((f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0), None)
    labels = [f.name for f in schema if pa.types.is_integer(f.type)]
    label = next((n for n in ("labels", "label") if n in labels), labels[0] if labels else None)
    if image is None or label is None:
        raise DataError(
            f"{shard} of {what} has no image column of {{bytes, path}} and integer label column (columns: "
            f"{', '.join(schema.names)}); catdog reads image classification datasets"
        )
    return image, label


def _parquet_items(fetched: Fetched, what: str, skipped: list, shard_done) -> Iterator[Item | None]:
    import pyarrow.parquet as pq

    for shard in fetched.shards:
        split = split_of(shard)
        if shard_done(split):
            log.info("skipping %s: --limit reached for every class of %s", shard, split)
            continue
        local = fetched.open_shard(shard)
        try:
            handle = pq.ParquetFile(local)
            image, label = _columns(handle.schema_arrow, what, shard)
            names = read_class_names(handle.schema_arrow.metadata, label) or fetched.classes
            row = 0
            for batch in handle.iter_batches(batch_size=BATCH, columns=[image, label]):
                images = batch.column(0)
                data, paths = images.field("bytes").to_pylist(), images.field("path").to_pylist()
                for blob, path, value in zip(data, paths, batch.column(1).to_pylist(), strict=True):
                    where = f"{shard} row {row}" + (f" ({path})" if path else "")
                    row += 1
                    if value is None or value < 0 or (names and value >= len(names)):
                        skipped.append({"file": where, "reason": f"no class for label {value}"})
                        continue
                    if not blob:
                        skipped.append({"file": where, "reason": "empty file (no image bytes)"})
                        continue
                    name = path or f"{split or 'image'}-{Path(shard).stem}-{row - 1:06d}"
                    cls = (names[value] if names else str(value)).lower()
                    yield Item(split=split, label=cls, name=name, where=where, data=blob)
            yield None  # the end of a shard
        except DataError:
            raise
        except Exception as e:  # pyarrow's ArrowInvalid, OSError on a truncated file
            if local != Path(shard):  # a downloaded shard: drop it so the next pull downloads it anew
                Path(local).unlink(missing_ok=True)
            raise DataError(
                f"{shard} of {what} is not a readable parquet file ({type(e).__name__}: {first_line(e)}); it was "
                f"deleted: run `catdog data pull` again to download it anew"
            ) from e


def extract_archives(folder: Path) -> Path:
    """Unpack every archive in `folder` into folder/_extracted (anew each time) and return that folder; refuses
    members that would land outside it."""
    target = folder / "_extracted"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for archive in sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(ARCHIVES)):
        into = target / archive.name  # not its stem: train.zip must not read as a split folder named train
        try:
            if zipfile.is_zipfile(archive):  # by content: a link without an extension may serve either kind
                with zipfile.ZipFile(archive) as z:
                    for member in z.namelist():
                        if member.startswith("/") or ".." in PurePosixPath(member).parts:
                            raise DataError(f"{archive.name} holds a file outside its folder ({member}); not unpacked")
                    z.extractall(into)
            else:
                with tarfile.open(archive) as t:  # any compression; "data" refuses links and paths outside `into`
                    if hasattr(tarfile, "data_filter"):
                        t.extractall(into, filter="data")
                    else:  # Python before 3.10.12 / 3.11.4
                        for member in t.getmembers():
                            if not (member.isfile() or member.isdir()) or ".." in PurePosixPath(member.name).parts:
                                raise DataError(f"{archive.name} holds {member.name}, a link or outside path")
                        t.extractall(into)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
            archive.unlink(missing_ok=True)
            raise DataError(
                f"{archive.name} is not a readable archive ({type(e).__name__}: {first_line(e)}); it was deleted: pull "
                "again to download it anew"
            ) from e
    return target


def dataset_root(folder: Path) -> Path:
    """Descend through folders that only wrap one folder (PetImages/, train/ inside train.zip stays)."""
    current = folder
    while True:
        entries = [p for p in current.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        subdirs = [p for p in entries if p.is_dir()]
        images = [p for p in entries if p.is_file() and is_image_file(p)]
        if images or any(d.name in SPLITS for d in subdirs) or len(subdirs) != 1:
            return current
        current = subdirs[0]


def _folder_items(folder: Path, what: str, skipped: list) -> Iterator[Item]:
    has_archives = any(p.is_file() and p.name.lower().endswith(ARCHIVES) for p in folder.iterdir())
    root = dataset_root(extract_archives(folder) if has_archives else folder)
    _, rows = read_labelled(root)
    listed = {p for split_rows in rows.values() for p, _ in split_rows}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p not in listed and not p.name.lower().endswith((*ARCHIVES, ".csv", ".txt", ".md")):
            skipped.append({"file": p.relative_to(root).as_posix(), "reason": "not an image file (ignored)"})
    for split, split_rows in rows.items():
        for p, label in split_rows:
            yield Item(
                split=None if split == "all" else split,
                label=label.lower(),
                name=p.name,
                where=p.relative_to(root).as_posix(),
                path=p,
            )
