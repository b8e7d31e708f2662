"""Datasets by name (`catdog data pull`, `catdog data list`, `--data ID`): the real huggingface_hub, modelscope
and kagglehub clients and catdog's own archive download against stand-ins on 127.0.0.1 (tests/hub_standin.py),
driven through the real CLI with every cache in a temp folder. Images are drawn by the tests; a few are corrupt.
No test reaches the internet."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from catdog_glm.vision.datahub import parse_data_ref
from tests.conftest import catdog_env
from tests.hub_standin import StandinHub

DATASET = "microsoft/cats_vs_dogs"
CLASSES = ["cat", "dog"]
README = """---
license: other
task_categories:
- image-classification
dataset_info:
  features:
  - name: image
    dtype: image
  - name: labels
    dtype:
      class_label:
        names:
          '0': cat
          '1': dog
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
# Cats vs dogs (a drawn stand-in)
"""
HAS_MODELSCOPE = importlib.util.find_spec("modelscope") is not None
HAS_KAGGLEHUB = importlib.util.find_spec("kagglehub") is not None


def jpeg(label: int, i: int, size: int = 32) -> bytes:
    """A small JPEG whose colour says its class (cats red, dogs blue) and whose shade says its number."""
    from PIL import Image

    color = (200, 40 + 8 * i, 40) if label == 0 else (40, 40 + 8 * i, 200)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def parquet(rows: list[tuple[bytes, str | None, int]], pad: int = 0) -> bytes:
    """A shard as `datasets` writes it: image {bytes, path}, labels (ClassLabel names in the schema metadata); `pad`
    adds an incompressible column so that the shard is big enough for a cut to leave part of it on disk."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"image": {"_type": "Image"}, "labels": {"names": CLASSES, "_type": "ClassLabel"}}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {
        "image": pa.array([{"bytes": b, "path": p} for b, p, _ in rows], type=image_type),
        "labels": pa.array([label for _, _, label in rows], type=pa.int64()),
    }
    if pad:
        columns["padding"] = pa.array([os.urandom(pad // len(rows)) for _ in rows], type=pa.binary())
    table = pa.table(columns).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="none")
    return buffer.getvalue()


def hf_files(per_shard: int = 6, pad: int = 0) -> dict[str, bytes]:
    """Two shards of `per_shard` images per class; both shards reuse the names 0.jpg.. (duplicates), and shard 1
    holds a truncated JPEG and a text file posing as one (the real set's known defects)."""
    files = {"README.md": README.encode()}
    for shard in range(2):
        rows = [(jpeg(label, i + 10 * shard), f"{i}.jpg", label) for label in (0, 1) for i in range(per_shard)]
        if shard == 1:
            rows += [(jpeg(0, 99)[:200], "broken.jpg", 0), (b"<html>not a photo</html>", "666.jpg", 1)]
        files[f"data/train-0000{shard}-of-00002.parquet"] = parquet(rows, pad=pad if shard == 0 else 0)
    return files


def kaggle_zip(per_class: int = 5, pad: int = 0) -> bytes:
    """The competition's train.zip: train/cat.0.jpg ... train/dog.4.jpg, and one corrupt cat; `pad` adds a CSV of
    that many incompressible bytes (kagglehub writes 1 MiB at a time: a cut must leave some of it on disk)."""
    import base64
    import os

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        if pad:
            z.writestr("train/notes.csv", base64.b64encode(os.urandom(pad * 3 // 4)))
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                z.writestr(f"train/{name}.{i}.jpg", jpeg(label, i))
        z.writestr("train/cat.999.jpg", b"\xff\xd8 truncated")
    return buffer.getvalue()


def petimages_tar() -> bytes:
    """Microsoft's own layout as a .tar.gz: PetImages/Cat/*.jpg, PetImages/Dog/*.jpg, a Thumbs.db, a 0-byte jpg."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        members = {
            f"PetImages/{n.title()}/{i}.jpg": jpeg(label, i) for label, n in enumerate(CLASSES) for i in range(5)
        }
        members |= {"PetImages/Cat/Thumbs.db": b"\0" * 10, "PetImages/Dog/11702.jpg": b"", "readme.txt": b"hi"}
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def hub():
    with StandinHub() as server:
        server.add(DATASET, hf_files(), repo_type="dataset")
        server.add(DATASET, hf_files(per_shard=3), refs=("v1",), repo_type="dataset")
        server.add("private/cats", hf_files(), repo_type="dataset", token="hf_secret")
        server.add("broken/cats", {"data/train-00000-of-00001.parquet": b"PAR1 not really"}, repo_type="dataset")
        server.add("owner/cats", hf_files(), repo_type="dataset")  # ModelScope serves the same repos here
        server.files["cats.zip"] = kaggle_zip()
        server.files["petimages.tar.gz"] = petimages_tar()
        server.kaggle["dogs-vs-cats"] = {"train.zip": kaggle_zip(pad=3 * 2**20), "test1.zip": b"unlabelled"}
        yield server


def data_env(tmp_path: Path, hub: StandinHub | None = None, **extra) -> dict:
    env = catdog_env()
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "MODELSCOPE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        env.pop(name, None)
    url = hub.url if hub else "http://127.0.0.1:9"  # port 9 (discard): nothing listens
    env |= {
        "CATDOG_CACHE_DIR": str(tmp_path / "catdog-cache"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_ENDPOINT": url,
        "MODELSCOPE_CACHE": str(tmp_path / "ms"),
        "MODELSCOPE_HOME": str(tmp_path / "ms-home"),
        "MODELSCOPE_ENDPOINT": url,
        # kagglesdk's local endpoint is http://localhost; the stand-in answers it as an HTTP proxy
        "KAGGLE_API_ENVIRONMENT": "LOCALHOST",
        "HTTP_PROXY": url,
        "http_proxy": url,
        "NO_PROXY": "",
        "no_proxy": "",
        "KAGGLEHUB_CACHE": str(tmp_path / "kagglehub"),
        "KAGGLE_CONFIG_DIR": str(tmp_path / "kaggle-config"),
    }
    return env | extra


def catdog(*args, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "catdog_glm", *map(str, args)], env=env, capture_output=True, text=True, timeout=600
    )
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    assert (done.returncode == 0) == ok, out
    return done


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def pulled(tmp_path: Path) -> list[Path]:
    """The finished datasets in the cache (a folder with a dataset.json), and nothing half-written beside them."""
    root = tmp_path / "catdog-cache" / "datasets"
    if not root.is_dir():
        return []
    stray = [p.name for p in root.iterdir() if p.name != ".downloads" and not (p / "dataset.json").is_file()]
    assert not stray, f"half-written folders left in the cache: {stray}"
    return sorted(p for p in root.iterdir() if (p / "dataset.json").is_file())


def files_in(folder: Path) -> dict[str, list[str]]:
    return {d.relative_to(folder).as_posix(): sorted(p.name for p in d.iterdir()) for d in sorted(folder.glob("*/*"))}


# --- ids ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("microsoft/cats_vs_dogs", ("hf", "microsoft/cats_vs_dogs", None)),
        ("hf:microsoft/cats_vs_dogs@refs/pr/1", ("hf", "microsoft/cats_vs_dogs", "refs/pr/1")),
        ("modelscope:owner/cats@v1", ("modelscope", "owner/cats", "v1")),
        ("kaggle:dogs-vs-cats", ("kaggle", "dogs-vs-cats", None)),
        ("https://example.org/a/cats.tar.gz", ("url", "https://example.org/a/cats.tar.gz", None)),
        ("data", None),
        ("C:/photos", None),
        ("kaggle:Bad Name", None),
    ],
)
def test_dataset_ids(text, expected):
    ref = parse_data_ref(text)
    assert (ref and (ref.source, ref.name, ref.revision)) == (expected or None)


# --- Hugging Face ---------------------------------------------------------------------------------------------


def test_hf_pull_writes_imagefolder_manifest_and_then_needs_no_network(hub, tmp_path):
    env = data_env(tmp_path, hub)
    done = catdog("data", "pull", DATASET, env=env)
    assert "2 file(s) skipped" in done.stdout
    (folder,) = pulled(tmp_path)
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["id"] == DATASET and manifest["source"] == "hf"
    assert manifest["revision"] == hub.datasets[DATASET].refs["main"]  # pinned to the commit it read
    assert manifest["license"] == "other" and manifest["classes"] == CLASSES
    # 12 images per class; a seeded 20% of each class is val, the rest train; nothing else was written
    assert manifest["counts"] == {"train": {"cat": 10, "dog": 10}, "val": {"cat": 2, "dog": 2}}
    assert manifest["split"] == {"from": "seeded", "val_split": 0.2, "seed": 42} and manifest["images"] == 24
    layout = files_in(folder)
    assert set(layout) == {"train/cat", "train/dog", "val/cat", "val/dog"}
    cats = layout["train/cat"] + layout["val/cat"]
    # both shards name their images 0.jpg..5.jpg: none overwrote another
    assert len(cats) == 12 and {"0.jpg", "0-2.jpg", "5.jpg", "5-2.jpg"} <= set(cats)
    skipped = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == [
        "data/train-00001-of-00002.parquet row 12 (broken.jpg)",
        "data/train-00001-of-00002.parquet row 13 (666.jpg)",
    ]
    assert all(skipped.values())
    assert not (tmp_path / "catdog-cache" / "datasets" / ".downloads" / "hf--microsoft--cats_vs_dogs").exists()

    listed = json.loads(catdog("data", "list", "--json", env=env).stdout)
    assert [(d["id"], d["source"], d["images"], d["path"]) for d in listed] == [(DATASET, "hf", 24, str(folder))]

    hub.stop()  # a finished pull is found with no network at all
    requests_before = len(hub.log)
    again = catdog("data", "pull", DATASET, env=env)
    assert "Already pulled" in again.stdout and str(folder) in again.stdout
    assert len(hub.log) == requests_before


def test_two_pulls_at_once_download_once(hub, tmp_path):
    """As the ranks of a torchrun job do: one pulls, the other waits for it and finds the finished folder."""
    env = data_env(tmp_path, hub)
    command = [sys.executable, "-m", "catdog_glm", "data", "pull", DATASET]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outs
    assert sorted("Already pulled" in out for out, _ in outs) == [False, True]
    assert len(pulled(tmp_path)) == 1
    assert len(hub.requests("GET", "train-00000-of-00002.parquet")) == 1


def test_hf_revision_limit_and_seeded_split(hub, tmp_path):
    env = data_env(tmp_path, hub)
    catdog("data", "pull", f"{DATASET}@v1", env=env)
    (v1,) = pulled(tmp_path)
    assert json.loads((v1 / "dataset.json").read_text())["revision"] == hub.datasets[DATASET].refs["v1"]

    args = ("data", "pull", DATASET, "--limit", "4", "--val-split", "0.5", "--seed", "7")
    del hub.log[:]
    catdog(*args, env=env)
    limited = [p for p in pulled(tmp_path) if p != v1]
    assert [p.name for p in limited] == ["hf--microsoft--cats_vs_dogs-limit4-val0.5-seed7"]
    manifest = json.loads((limited[0] / "dataset.json").read_text())
    assert manifest["counts"] == {"train": {"cat": 2, "dog": 2}, "val": {"cat": 2, "dog": 2}}
    assert manifest["limit"] == 4
    # the first shard held enough of every class: the second was never downloaded
    assert hub.requests("GET", "train-00000-of-00002.parquet")
    assert not hub.requests("GET", "train-00001-of-00002.parquet")

    catdog(*args, "--out", tmp_path / "copy", env=env)  # the same seed draws the same split
    assert files_in(tmp_path / "copy") == files_in(limited[0])
    catdog(*args[:-1], "8", "--out", tmp_path / "other", env=env)
    assert files_in(tmp_path / "other") != files_in(limited[0])


def test_hf_cut_download_resumes(hub, tmp_path):
    big = hf_files(pad=24 * 2**20)  # a 24 MB shard: the client writes 10 MiB at a time, so a cut keeps part of it
    hub.add("big/cats", big, repo_type="dataset")
    shard = "train-00000-of-00002.parquet"
    hub.cut(shard, times=50)  # more cuts than the client retries within one run
    env = data_env(tmp_path, hub)
    line = error_line(catdog("data", "pull", "big/cats", env=env, ok=False))
    assert "interrupted" in line and "catdog data pull big/cats" in line
    assert pulled(tmp_path) == []
    hub.cut(shard, times=0)
    catdog("data", "pull", "big/cats", env=env)
    (folder,) = pulled(tmp_path)
    assert json.loads((folder / "dataset.json").read_text())["images"] == 24
    ranged = [h["range"] for _, p, h in hub.requests("GET", shard) if h.get("range")]
    assert ranged and ranged[-1].startswith("bytes=") and ranged[-1] != "bytes=0-"


@pytest.mark.parametrize(
    "dataset, extra_env, fragments",
    [
        ("microsoft/no-such-set", {}, ["microsoft/no-such-set", "not found", "(404)", "check the id"]),
        (f"{DATASET}@v9", {}, ["has no revision 'v9'", "(404)"]),
        ("private/cats", {}, ["private/cats", "401", "HF_TOKEN"]),
        ("broken/cats", {}, ["train-00000-of-00001.parquet", "not a readable parquet file", "pull` again"]),
        ("no such id", {}, ["no such id", "is not a dataset id", "kaggle:competition"]),
    ],
)
def test_hf_errors_are_one_line_and_leave_nothing_behind(hub, tmp_path, dataset, extra_env, fragments):
    line = error_line(catdog("data", "pull", dataset, env=data_env(tmp_path, hub, **extra_env), ok=False))
    assert all(f in line for f in fragments), line
    assert pulled(tmp_path) == []


def test_private_dataset_with_token(hub, tmp_path):
    catdog("data", "pull", "private/cats", env=data_env(tmp_path, hub, HF_TOKEN="hf_secret"))
    assert len(pulled(tmp_path)) == 1


@pytest.mark.parametrize("offline_env", [{}, {"HF_HUB_OFFLINE": "1"}])
def test_offline_and_not_cached_is_one_line(tmp_path, offline_env):
    line = error_line(catdog("data", "pull", DATASET, env=data_env(tmp_path, **offline_env), ok=False))
    cache = tmp_path / "catdog-cache" / "datasets" / "hf--microsoft--cats_vs_dogs"
    for fragment in (DATASET, "cannot be reached", str(cache), "copy its images in", "train/<class>/"):
        assert fragment in line, line


# --- archives, Kaggle, ModelScope -----------------------------------------------------------------------------


def test_archive_url_kaggle_style_zip_with_sha256(hub, tmp_path):
    env = data_env(tmp_path, hub)
    url = f"{hub.url}/files/cats.zip"
    wrong = catdog("data", "pull", url, "--sha256", "0" * 64, env=env, ok=False)
    assert "does not match --sha256" in error_line(wrong) and pulled(tmp_path) == []
    digest = hashlib.sha256(hub.files["cats.zip"]).hexdigest()
    hub.cut("cats.zip", times=1)  # cut once: the download goes on from where it stopped
    catdog("data", "pull", url, "--sha256", digest, env=env)
    ranged = [h.get("range") for _, p, h in hub.requests("GET", "/files/cats.zip")]
    assert any(r and r != "bytes=0-" for r in ranged), ranged
    (folder,) = pulled(tmp_path)
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["classes"] == CLASSES and manifest["images"] == 10
    assert [s["file"] for s in manifest["skipped"]] == ["train/cat.999.jpg"]
    assert sum(manifest["counts"]["val"].values()) == 2  # the zip has train/ only: a seeded val split

    missing = catdog("data", "pull", f"{hub.url}/files/nope.zip", env=env, ok=False)
    assert "(404)" in error_line(missing) and "check the URL" in error_line(missing)
    hub.files["junk.zip"] = b"<html>a login page, not an archive</html>"
    junk = error_line(catdog("data", "pull", f"{hub.url}/files/junk.zip", env=env, ok=False))
    assert "junk.zip is not a readable archive" in junk and "download it anew" in junk
    assert len(pulled(tmp_path)) == 1


def test_archive_url_petimages_tar(hub, tmp_path):
    catdog("data", "pull", f"{hub.url}/files/petimages.tar.gz", "--val-split", "0.4", env=data_env(tmp_path, hub))
    (folder,) = pulled(tmp_path)
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["classes"] == CLASSES  # Cat/ and Dog/ folders, named as the other sources name them
    assert manifest["counts"] == {"train": {"cat": 3, "dog": 3}, "val": {"cat": 2, "dog": 2}}
    skipped = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"Dog/11702.jpg", "Cat/Thumbs.db"} and "empty" in skipped["Dog/11702.jpg"]


@pytest.mark.skipif(not HAS_KAGGLEHUB, reason="the optional kagglehub package is not installed")
def test_kaggle_competition(hub, tmp_path):
    env = data_env(tmp_path, hub)
    line = error_line(catdog("data", "pull", "kaggle:dogs-vs-cats", env=env, ok=False))
    assert "needs Kaggle credentials" in line and "KAGGLE_USERNAME" in line and "kaggle.json" in line
    wrong = data_env(tmp_path, hub, KAGGLE_USERNAME="kaggle-user", KAGGLE_KEY="wrong")
    assert "401" in error_line(catdog("data", "pull", "kaggle:dogs-vs-cats", env=wrong, ok=False))
    env |= {"KAGGLE_USERNAME": "kaggle-user", "KAGGLE_KEY": "kaggle-key"}
    assert "(404)" in error_line(catdog("data", "pull", "kaggle:no-such-competition", env=env, ok=False))
    hub.cut("train.zip", times=1)
    cut = error_line(catdog("data", "pull", "kaggle:dogs-vs-cats", env=env, ok=False))
    assert "interrupted" in cut and "catdog data pull kaggle:dogs-vs-cats" in cut
    assert pulled(tmp_path) == []
    catdog("data", "pull", "kaggle:dogs-vs-cats", env=env)  # kagglehub goes on from where the cut left it
    ranged = [h.get("range") for _, p, h in hub.requests("GET", "train.zip")]
    assert ranged[-1].startswith("bytes=") and ranged[-1] != "bytes=0-", ranged
    (folder,) = pulled(tmp_path)
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["images"] == 10 and [s["file"] for s in manifest["skipped"]] == ["train/cat.999.jpg"]
    assert not hub.requests(contains="test1.zip")  # only the labelled train.zip is downloaded
    offline = data_env(tmp_path / "off", KAGGLE_USERNAME="kaggle-user", KAGGLE_KEY="kaggle-key")
    line = error_line(catdog("data", "pull", "kaggle:dogs-vs-cats", env=offline, ok=False))
    assert "kaggle:dogs-vs-cats" in line and "cannot be reached" in line and "copy its images in" in line


@pytest.mark.skipif(not HAS_MODELSCOPE, reason="the optional modelscope package is not installed")
def test_modelscope_dataset(hub, tmp_path):
    env = data_env(tmp_path, hub)
    hub.cut("train-00001-of-00002.parquet", times=1)  # ModelScope's client goes on from where the cut left it
    catdog("data", "pull", "modelscope:owner/cats", env=env)
    ranged = [h.get("range") for _, p, h in hub.requests("GET", "train-00001-of-00002.parquet")]
    assert ranged[0] is None and ranged[-1].startswith("bytes=") and ranged[-1] != "bytes=0-", ranged
    (folder,) = pulled(tmp_path)
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["source"] == "modelscope" and manifest["images"] == 24 and len(manifest["skipped"]) == 2
    assert hub.requests("GET", "/api/v1/datasets/owner/cats/repo")
    line = error_line(catdog("data", "pull", "modelscope:owner/nothing", env=env, ok=False))
    assert "modelscope:owner/nothing" in line and "(404)" in line
    offline = error_line(catdog("data", "pull", "modelscope:owner/cats", env=data_env(tmp_path / "off"), ok=False))
    assert "cannot be reached" in offline and "modelscope:owner/cats" in offline


# --- training on a pulled id ----------------------------------------------------------------------------------


def test_train_and_eval_by_dataset_id(hub, tmp_path):
    """`catdog train --data ID` pulls on first use; later runs find it in the cache with the hub gone."""
    env = data_env(tmp_path, hub)
    out = tmp_path / "run"
    train = ("train", "--data", DATASET, "--arch", "resnet18", "--pretrained", "none", "--epochs", "1")
    small = ("--image-size", "32", "--batch-size", "4", "--tracker", "none", "--no-progress", "--workers", "0")
    done = catdog(*train, *small, "--output", out, env=env)
    assert "20 train / 4 val images" in done.stdout and (out / "best.pt").is_file()
    hub.stop()
    catdog(*train, *small, "--output", tmp_path / "again", env=env)
    scored = json.loads(catdog("eval", "--checkpoint", out / "best.pt", "--data", DATASET, "--json", env=env).stdout)
    assert scored["split"] == "val" and scored["n"] == 4


def test_full_disk_is_one_error_and_leaves_nothing(hub, tmp_path, monkeypatch):
    """Checked before downloading (the archive's size against the free space), and a disk that fills up while
    images are written: a DataError with the fix, and no folder that looks complete."""
    import errno
    import shutil
    from collections import namedtuple

    from catdog_glm.errors import DataError
    from catdog_glm.vision.datahub import pull_dataset

    monkeypatch.setenv("CATDOG_CACHE_DIR", str(tmp_path / "catdog-cache"))
    url = f"{hub.url}/files/cats.zip"
    usage = namedtuple("usage", "total used free")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(DataError, match="not enough disk space for .*cats.zip.*CATDOG_CACHE_DIR"):
        pull_dataset(url)
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "move", full)
    with pytest.raises(DataError, match="the disk filled up while writing .*nothing was kept as complete"):
        pull_dataset(url)
    assert pulled(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setenv("CATDOG_CACHE_DIR", str(tmp_path / "catdog-cache"))
    assert pull_dataset(url).manifest["images"] == 10  # the download was kept: only the images are written now
    # one GET learnt the size for the disk check, one downloaded it; writing the images again needed none
    assert len(hub.requests("GET", "/files/cats.zip")) == 2


@pytest.mark.parametrize(
    "dataset, modules, hint",
    [
        ("kaggle:dogs-vs-cats", ["kagglehub", "kagglehub.config"], "pip install kagglehub"),
        ("modelscope:owner/cats", ["modelscope", "modelscope.hub", "modelscope.hub.snapshot_download"], "modelscope"),
    ],
)
def test_missing_optional_client_is_a_one_line_hint(tmp_path, monkeypatch, dataset, modules, hint):
    from catdog_glm.errors import DataError
    from catdog_glm.vision.datahub import pull_dataset

    monkeypatch.setenv("CATDOG_CACHE_DIR", str(tmp_path))
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DataError, match=f"need the optional .*{hint}"):
        pull_dataset(dataset)
