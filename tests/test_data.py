"""Dataset layouts: ImageFolder (split or not), the book's CSV lists, Kaggle flat folders, and clear errors."""

from __future__ import annotations

import pytest

from catdog_glm.errors import DataError
from catdog_glm.vision.data import discover, subsample
from tests.conftest import save_image


def _folder(root, split_names=("train", "val"), classes=("cat", "dog"), n=3):
    for split in split_names:
        for c in classes:
            for i in range(n):
                save_image(root / split / c / f"{c}_{i}.jpg")
    return root


def test_imagefolder_with_splits(tmp_path):
    _folder(tmp_path, ("train", "val", "test"))
    ds = discover(tmp_path)
    assert ds.layout == "imagefolder-splits"
    assert ds.classes == ["cat", "dog"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "val": 6, "test": 6}
    assert all(ds.classes[s.label] in s.path.parent.name for s in ds.split("val"))


def test_imagefolder_without_split_is_split_with_a_fixed_seed(tmp_path):
    for c in ("cat", "dog"):
        for i in range(10):
            save_image(tmp_path / c / f"{i}.png")
    first = discover(tmp_path, val_split=0.2, seed=7)
    again = discover(tmp_path, val_split=0.2, seed=7)
    assert first.layout == "imagefolder"
    assert first.class_counts("val") == {"cat": 2, "dog": 2}  # stratified
    assert [s.path for s in first.split("val")] == [s.path for s in again.split("val")]
    assert not {s.path for s in first.split("val")} & {s.path for s in first.split("train")}


def test_book_csv_lists_with_index_labels(tmp_path):
    for split in ("train", "val"):
        rows = []
        for label, c in enumerate(("cat", "dog")):
            for i in range(2):
                save_image(tmp_path / "images" / c / f"{split}{i}.jpg")
                rows.append(f"images/{c}/{split}{i}.jpg,{label}")
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    ds = discover(tmp_path)
    assert ds.layout == "csv"
    assert ds.classes == ["cat", "dog"]  # named after the folders the labels share
    assert [ds.classes[s.label] for s in ds.split("train")] == ["cat", "cat", "dog", "dog"]


def test_csv_with_header_classes_txt_and_name_labels(tmp_path):
    save_image(tmp_path / "a.jpg")
    save_image(tmp_path / "b.jpg")
    (tmp_path / "train.csv").write_text("path,label\na.jpg,0\nb.jpg,1\n")
    (tmp_path / "val.csv").write_text("a.jpg,0\nb.jpg,1\n")
    (tmp_path / "classes.txt").write_text("kitten\npuppy\n")
    assert discover(tmp_path).classes == ["kitten", "puppy"]
    (tmp_path / "classes.txt").unlink()
    (tmp_path / "train.csv").write_text("a.jpg,tabby\nb.jpg,husky\n")
    (tmp_path / "val.csv").write_text("a.jpg,tabby\nb.jpg,husky\n")
    assert discover(tmp_path).classes == ["husky", "tabby"]


def test_csv_naming_a_missing_file_is_a_clear_error(tmp_path):
    save_image(tmp_path / "a.jpg")
    (tmp_path / "train.csv").write_text("a.jpg,0\nmissing.jpg,1\n")
    with pytest.raises(DataError, match=r"1 file\(s\) that do not exist.*missing.jpg"):
        discover(tmp_path)


@pytest.mark.parametrize("nested", [False, True])
def test_kaggle_flat_folder(tmp_path, nested):
    folder = tmp_path / "train" if nested else tmp_path
    for c in ("cat", "dog"):
        for i in range(5):
            save_image(folder / f"{c}.{i}.jpg")
    ds = discover(tmp_path, val_split=0.2)
    assert ds.layout == "kaggle-flat"
    assert ds.classes == ["cat", "dog"]
    assert ds.class_counts("val") == {"cat": 1, "dog": 1}


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no labelled images"):
        discover(tmp_path)


def test_single_class(tmp_path):
    for i in range(4):
        save_image(tmp_path / "train" / "cat" / f"{i}.jpg")
        save_image(tmp_path / "val" / "cat" / f"{i}.jpg")
    with pytest.raises(DataError, match="single class"):
        discover(tmp_path)


def test_subsample_is_balanced_and_seeded(tmp_path):
    _folder(tmp_path, n=10)
    train = discover(tmp_path).split("train")
    picked = subsample(train, 6, seed=3)
    assert len(picked) == 6
    assert sorted(s.label for s in picked) == [0, 0, 0, 1, 1, 1]
    assert picked == subsample(train, 6, seed=3)
