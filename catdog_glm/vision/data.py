"""Finding a dataset on disk and turning it into labelled samples.

Three layouts are understood under one root:
  * ImageFolder: ROOT/train/<class>/*, ROOT/val/<class>/* (ROOT/test optional), or ROOT/<class>/* split by
    `val_split` with a fixed seed;
  * the book's CSV lists: ROOT/train.csv and ROOT/val.csv with rows `relative/path.jpg,label` (paths relative
    to the CSV's folder; the label an index or a class name);
  * Kaggle-style flat folders: ROOT/cat.123.jpg, ROOT/dog.456.jpg (label = filename prefix), also as ROOT/train/.
"""

from __future__ import annotations

import csv
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from catdog_glm.errors import DataError
from catdog_glm.vision.images import is_image_file

SPLITS = ("train", "val", "test")
_FLAT_LABEL = re.compile(r"^([A-Za-z][A-Za-z0-9-]*?)[._]")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class Dataset:
    """Where the data came from and its labelled splits; `classes[i]` names label i."""

    root: Path
    layout: str
    classes: list[str]
    splits: dict[str, list[Sample]] = field(default_factory=dict)

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise DataError(f"{self.root} has no {name!r} split (it has: {have})")
        return self.splits[name]

    def class_counts(self, name: str) -> dict[str, int]:
        counts = Counter(s.label for s in self.split(name))
        return {c: counts.get(i, 0) for i, c in enumerate(self.classes)}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_in(d))


def _flat_labelled(folder: Path) -> list[tuple[Path, str]]:
    """Kaggle-style `cat.123.jpg` files directly in `folder`, with the label taken from the prefix."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_image_file(p):
            m = _FLAT_LABEL.match(p.name)
            if m:
                found.append((p, m.group(1).lower()))
    return found


def _read_folder_split(folder: Path) -> list[tuple[Path, str]]:
    """A split folder is either <class>/ subfolders or a flat Kaggle folder."""
    dirs = _class_dirs(folder)
    if dirs:
        return [(p, d.name) for d in dirs for p in _images_in(d)]
    return _flat_labelled(folder)


def _read_csv(csv_path: Path) -> list[tuple[Path, str]]:
    rows: list[tuple[Path, str]] = []
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise DataError(f"{csv_path}:{lineno}: expected `relative/path.jpg,label`, got {','.join(row)!r}")
            rel, label = row[0].strip(), row[1].strip()
            if lineno == 1 and label.lower() in ("label", "label_index", "class", "target"):
                continue  # a header row
            rows.append((csv_path.parent / rel, label))
    missing = [p for p, _ in rows if not p.is_file()]
    if missing:
        raise DataError(
            f"{csv_path} lists {len(missing)} file(s) that do not exist, e.g. {missing[0]}; "
            "paths must be relative to the CSV's folder"
        )
    return rows


def _csv_class_names(root: Path, labels: set[str], rows: list[tuple[Path, str]]) -> list[str]:
    """Names for integer CSV labels: classes.txt if present, else the folder or filename prefix they share."""
    if not all(label.isdigit() for label in labels):
        return sorted(labels)
    n = max(int(label) for label in labels) + 1
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) < n:
            raise DataError(f"{names_file} names {len(names)} classes but the CSV uses labels up to {n - 1}")
        return names
    names = []
    for i in range(n):
        paths = [p for p, label in rows if int(label) == i]
        guesses = {p.parent.name.lower() for p in paths}
        if len(guesses) != 1:
            guesses = {m.group(1).lower() for p in paths if (m := _FLAT_LABEL.match(p.name))}
        names.append(guesses.pop() if len(guesses) == 1 else f"class_{i}")
    if len(set(names)) != len(names):
        names = [f"class_{i}" for i in range(n)]
    return names


def _split_stratified(items: list[tuple[Path, str]], val_split: float, seed: int):
    if not 0 < val_split < 1:
        raise DataError(f"--val-split must be between 0 and 1, got {val_split}")
    by_class: dict[str, list[Path]] = {}
    for p, label in items:
        by_class.setdefault(label, []).append(p)
    train, val = [], []
    rng = random.Random(seed)
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        rng.shuffle(paths)
        n_val = max(1, round(len(paths) * val_split)) if len(paths) > 1 else 0
        val += [(p, label) for p in paths[:n_val]]
        train += [(p, label) for p in paths[n_val:]]
    return train, val


def discover(root: str | Path, *, val_split: float = 0.2, seed: int = 42) -> Dataset:
    """Find the layout under `root` and return its labelled splits. Raises DataError with the fix."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass the dataset's root folder with --data")

    raw: dict[str, list[tuple[Path, str]]] = {}
    if (root / "train.csv").is_file():
        layout = "csv"
        for split in SPLITS:
            if (root / f"{split}.csv").is_file():
                raw[split] = _read_csv(root / f"{split}.csv")
    elif (root / "train").is_dir():
        layout = "imagefolder-splits"
        for split in SPLITS:
            if (root / split).is_dir():
                raw[split] = _read_folder_split(root / split)
        if raw.get("train") and not _class_dirs(root / "train"):
            layout = "kaggle-flat"
    elif _class_dirs(root):
        layout = "imagefolder"
        raw["train"] = _read_folder_split(root)
    else:
        layout = "kaggle-flat"
        raw["train"] = _flat_labelled(root)

    if not raw.get("train"):
        raise DataError(
            f"no labelled images found under {root}: expected train/<class>/*.jpg, <class>/*.jpg, "
            "train.csv + val.csv, or Kaggle-style files like cat.1.jpg"
        )
    if not raw.get("val"):
        raw["train"], raw["val"] = _split_stratified(raw["train"], val_split, seed)

    labels = {label for rows in raw.values() for _, label in rows}
    if layout == "csv":
        classes = _csv_class_names(root, labels, [r for rows in raw.values() for r in rows])
        index = {str(i): i for i in range(len(classes))} if all(x.isdigit() for x in labels) else None
    else:
        classes = sorted(labels)
        index = None
    if index is None:
        index = {c: i for i, c in enumerate(classes)}
    train_classes = {label for _, label in raw["train"]}
    if len(train_classes) < 2:
        only = next(iter(train_classes))
        raise DataError(f"{root} has a single class ({only!r}); a classifier needs at least two")

    splits = {name: [Sample(p, index[label]) for p, label in rows] for name, rows in raw.items()}
    if not splits["val"]:
        raise DataError(f"the validation split of {root} is empty; add images to val/ or use --val-split")
    return Dataset(root=root, layout=layout, classes=classes, splits=splits)


def subsample(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A class-balanced, seeded subset of at most `limit` samples (all of them when limit is None)."""
    if not limit or limit >= len(samples):
        return samples
    by_label: dict[int, list[Sample]] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    for group in by_label.values():
        rng.shuffle(group)
    picked: list[Sample] = []
    # Round-robin over classes keeps the subset balanced.
    while len(picked) < limit:
        for label in sorted(by_label):
            if by_label[label] and len(picked) < limit:
                picked.append(by_label[label].pop())
    return sorted(picked, key=lambda s: str(s.path))
