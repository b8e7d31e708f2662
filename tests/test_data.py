"""Dataset layouts: ImageFolder (split or not), the book's CSV lists, Kaggle flat folders, and clear errors."""

from __future__ import annotations

import pytest

from catdog_glm.errors import DataError
from catdog_glm.vision.data import discover, select_eval_images, subsample
from tests.conftest import save_image


def _folder(root, split_names=("train", "val"), classes=("cat", "dog"), n=3):
    for split in split_names:  # "" for class folders right under root
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


@pytest.mark.parametrize("only", ["val", "test"])
def test_a_folder_with_only_one_split_folder_is_that_split(tmp_path, only):
    _folder(tmp_path, (only,), n=4)
    picked = select_eval_images(tmp_path)
    assert picked.split == only and len(picked.samples) == 8
    assert {c for _, c in picked.samples} == {"cat", "dog"}  # not one class named after the split
    assert f"{only}/" in picked.description
    with pytest.raises(DataError, match=f"has {only}/ but no training split"):
        discover(tmp_path)


def test_a_folder_of_class_folders_is_scored_whole(tmp_path):
    _folder(tmp_path / "photos", ("",), n=5)
    picked = select_eval_images(tmp_path / "photos")
    assert picked.split == "all" and len(picked.samples) == 10
    assert "every image" in picked.description
    held_out = select_eval_images(tmp_path / "photos", split="val", val_split=0.2, seed=1)
    assert len(held_out.samples) == 2 and "20% held out" in held_out.description


def test_split_folders_default_to_test_then_val(tmp_path):
    _folder(tmp_path, ("train", "val", "test"), n=2)
    assert select_eval_images(tmp_path).split == "test"
    assert select_eval_images(tmp_path, split="val").split == "val"
    assert len(select_eval_images(tmp_path, split="all").samples) == 12
    with pytest.raises(DataError, match="--split must be one of"):
        select_eval_images(tmp_path, split="dev")


def test_the_training_runs_own_data_gets_its_val_split(tmp_path):
    for c in ("cat", "dog"):
        for i in range(10):
            save_image(tmp_path / "pets" / c / f"{i}.png")
    run = {"data": str(tmp_path / "pets"), "val_split": 0.3, "seed": 7, "val_limit": 0}
    picked = select_eval_images(tmp_path / "pets", training=run)
    expected = discover(tmp_path / "pets", val_split=0.3, seed=7).split("val")
    assert picked.split == "val" and [p for p, _ in picked.samples] == [s.path for s in expected]
    assert "30% held out for val with seed 7" in picked.description
    limited = select_eval_images(tmp_path / "pets", training=run | {"val_limit": 4})
    assert [p for p, _ in limited.samples] == [s.path for s in subsample(expected, 4, seed=7)]
    # recognized by the absolute root the checkpoint records too, whatever the working directory
    moved = select_eval_images(tmp_path / "pets", training=run | {"data": "pets", "data_root": str(tmp_path / "pets")})
    assert moved.split == "val" and len(moved.samples) == 6
