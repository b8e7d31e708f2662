"""Finding a dataset on disk and turning it into labelled samples.

Three layouts are understood under one root:
  * ImageFolder: split folders ROOT/train/<class>/*, ROOT/val/<class>/*, ROOT/test/<class>/* (any combination),
    or ROOT/<class>/* with no split folders;
  * the book's CSV lists: ROOT/train.csv, ROOT/val.csv, ROOT/test.csv (any combination) with rows
    `relative/path.jpg,label` (paths relative to the CSV's folder; the label an index or a class name);
  * Kaggle-style flat folders: ROOT/cat.123.jpg, ROOT/dog.456.jpg (label = filename prefix), also inside split
    folders.

Training (`discover`) needs a train split and holds back a seeded `val_split` share of it when there is no val
split. Evaluation (`select_eval_images`) scores what it is given: the run's own val split when the folder is the
training run's dataset, else a split folder (test, then val, then train) or, without split folders, every image.
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
    held_out: float | None = None  # the share of train/ held out as val (seeded) when there is no val split

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


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass the dataset's root folder with --data")


def _read_layout(root: Path) -> tuple[str, dict[str, list[tuple[Path, str]]]]:
    """The layout under `root` and its (path, label) rows by split: the split folders or CSV lists it has, or
    every image under the key "all" when it has neither."""
    raw: dict[str, list[tuple[Path, str]]] = {}
    if any((root / f"{split}.csv").is_file() for split in SPLITS):
        for split in SPLITS:
            if (root / f"{split}.csv").is_file():
                raw[split] = _read_csv(root / f"{split}.csv")
        return "csv", raw
    if any((root / split).is_dir() for split in SPLITS):
        for split in SPLITS:
            if (root / split).is_dir():
                raw[split] = _read_folder_split(root / split)
        flat = not any(_class_dirs(root / split) for split in raw)
        return ("kaggle-flat" if flat and any(raw.values()) else "imagefolder-splits"), raw
    if _class_dirs(root):
        return "imagefolder", {"all": _read_folder_split(root)}
    return "kaggle-flat", {"all": _flat_labelled(root)}


def _no_images(root: Path) -> DataError:
    return DataError(
        f"no labelled images found under {root}: expected train/<class>/*.jpg, <class>/*.jpg, "
        "train.csv + val.csv, or Kaggle-style files like cat.1.jpg"
    )


def _label_index(layout: str, root: Path, raw: dict[str, list[tuple[Path, str]]]) -> tuple[list[str], dict]:
    """Class names (label i is classes[i]) and how each raw label maps to its index."""
    labels = {label for rows in raw.values() for _, label in rows}
    if layout == "csv":
        classes = _csv_class_names(root, labels, [r for rows in raw.values() for r in rows])
        if all(x.isdigit() for x in labels):
            return classes, {str(i): i for i in range(len(classes))}
    else:
        classes = sorted(labels)
    return classes, {c: i for i, c in enumerate(classes)}


def read_labelled(root: str | Path) -> tuple[str, dict[str, list[tuple[Path, str]]]]:
    """The layout under `root` and its (path, class name) rows by split folder or CSV list ("all" when there are no
    splits): what `discover` reads, before any split is held out. Used to import downloaded archives."""
    root = Path(root).expanduser()
    _check_folder(root)
    return _read_layout(root)


def split_stratified(items: list[tuple[Path, str]], val_split: float, seed: int):
    """(train, val): the seeded, per-class split that `discover` makes when a dataset has no val split."""
    return _split_stratified(items, val_split, seed)


def discover(root: str | Path, *, val_split: float = 0.2, seed: int = 42) -> Dataset:
    """Find the layout under `root` and return its labelled splits for training. Raises DataError with the fix."""
    root = Path(root).expanduser()
    _check_folder(root)
    layout, raw = _read_layout(root)
    if "all" in raw:
        raw = {"train": raw.pop("all")}
    if not raw.get("train"):
        present = [f"{split}/" if layout != "csv" else f"{split}.csv" for split, rows in raw.items() if rows]
        if present:
            where = f"{root}/train/<class>/" if layout != "csv" else f"{root}/train.csv"
            raise DataError(
                f"{root} has {' and '.join(present)} but no training split; put training images in {where} "
                "(`catdog eval` scores a folder like this one as it is)"
            )
        raise _no_images(root)
    held_out = None
    if not raw.get("val"):
        raw["train"], raw["val"] = _split_stratified(raw["train"], val_split, seed)
        held_out = val_split

    classes, index = _label_index(layout, root, raw)
    train_classes = {label for _, label in raw["train"]}
    if len(train_classes) < 2:
        only = next(iter(train_classes))
        raise DataError(f"{root} has a single class ({only!r}); a classifier needs at least two")

    splits = {name: [Sample(p, index[label]) for p, label in rows] for name, rows in raw.items()}
    if not splits["val"]:
        raise DataError(f"the validation split of {root} is empty; add images to val/ or use --val-split")
    return Dataset(root=root, layout=layout, classes=classes, splits=splits, held_out=held_out)


EVAL_SPLITS = (*SPLITS, "all")


@dataclass
class EvalImages:
    """The images an evaluation scores, labelled by class name, and a sentence that says which they are."""

    root: Path
    split: str  # train | val | test | all
    samples: list[tuple[Path, str]]
    description: str


def same_folder(a: str | Path | None, b: str | Path | None) -> bool:
    if not a or not b:
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def _percent(share: float) -> str:
    return f"{share * 100:.3g}%"


def select_eval_images(
    root: str | Path,
    *,
    split: str | None = None,
    training: dict | None = None,
    val_split: float | None = None,
    seed: int | None = None,
) -> EvalImages:
    """The images to score under `root`.

    `training` describes the run that made the checkpoint (its config: data, val_split, seed, val_limit, ...).
    When `root` is that run's dataset, the default is the run's own val split, made exactly as training made it
    (its share, seed and subset); `val_split`/`seed` override. Any other folder is scored as it is: a split
    folder (default test, then val, then train) or, without split folders, every image (`split` val or train
    then holds back a seeded share, 20% with seed 42 unless given).
    """
    root = Path(root).expanduser()
    _check_folder(root)
    if split is not None and split not in EVAL_SPLITS:
        raise DataError(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    training = training or {}
    if same_folder(root, training.get("data")) or same_folder(root, training.get("data_root")):
        return _training_split(root, split or "val", training, val_split, seed)

    layout, raw = _read_layout(root)
    if not any(raw.values()):
        raise _no_images(root)
    classes, index = _label_index(layout, root, raw)
    named = {name: [(p, classes[index[label]]) for p, label in rows] for name, rows in raw.items()}
    if "all" in named:
        if split in (None, "all"):
            return EvalImages(root, "all", named["all"], f"every image in {root} (it has no split folders)")
        share, sd = val_split if val_split is not None else 0.2, seed if seed is not None else 42
        train, val = _split_stratified(named["all"], share, sd)
        description = f"the {split} share of {root} ({_percent(share)} held out for val with seed {sd})"
        return EvalImages(root, split, val if split == "val" else train, description)
    unit = "{}.csv" if layout == "csv" else "{}/"
    present = [name for name in SPLITS if named.get(name)]
    if split == "all":
        rows = [r for name in present for r in named[name]]
        return EvalImages(root, "all", rows, f"every image in {root} ({' + '.join(map(unit.format, present))})")
    if split is None:
        split = next(name for name in ("test", "val", "train") if named.get(name))
    if not named.get(split):
        if split in ("val", "train") and named.get("train"):
            share, sd = val_split if val_split is not None else 0.2, seed if seed is not None else 42
            train, val = _split_stratified(named["train"], share, sd)
            description = (
                f"the {split} share of {root}/{unit.format('train')} ({_percent(share)} held out with seed {sd})"
            )
            return EvalImages(root, split, val if split == "val" else train, description)
        have = ", ".join(map(unit.format, present))
        raise DataError(f"{root} has no {unit.format(split)} split to score (it has: {have}); pick another --split")
    return EvalImages(root, split, named[split], f"the {unit.format(split)} split of {root}")


def _training_split(root: Path, split: str, training: dict, val_split: float | None, seed: int | None) -> EvalImages:
    """The run's own split of its training data, exactly as `catdog train` made it."""
    share = val_split if val_split is not None else float(training.get("val_split", 0.2))
    sd = seed if seed is not None else int(training.get("seed", 42))
    dataset = discover(root, val_split=share, seed=sd)
    if split == "all":
        rows = [s for name in SPLITS for s in dataset.splits.get(name, [])]
        how = "train and val splits" + (" and test/" if "test" in dataset.splits else "")
        samples = [(s.path, dataset.classes[s.label]) for s in rows]
        return EvalImages(root, "all", samples, f"every image of the training run's data {root} ({how})")
    rows = dataset.split(split)
    made_by_seed = dataset.held_out is not None and split in ("train", "val")
    limit = int(training.get(f"{split}_limit") or 0) if split in ("train", "val") else 0
    if limit and val_split is None and seed is None:
        rows = subsample(rows, limit, sd)
    how = f"{_percent(share)} held out for val with seed {sd}" if made_by_seed else "as the dataset splits it"
    if limit and len(rows) == limit:
        how += f", the {limit}-image subset the run used"
    description = f"the training run's {split} split of {root} ({how})"
    return EvalImages(root, split, [(s.path, dataset.classes[s.label]) for s in rows], description)


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
