"""Chat models by name: the real huggingface_hub (and modelscope) clients against a stand-in hub on 127.0.0.1,
driven through the real CLI (`catdog pull`, `catdog models`, `catdog chat --model ID`, `catdog export chat`) with
HF_HOME / MODELSCOPE_CACHE in temp folders. No test reaches the internet."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from catdog_glm import errors
from catdog_glm.chat.hub import (
    HUGGINGFACE,
    MODELSCOPE,
    ModelRef,
    parse_model_ref,
    resolve_model,
    select_files,
)
from catdog_glm.errors import ModelError
from tests.chatglm_tiny import make_tiny_chatglm3
from tests.conftest import catdog_env
from tests.hub_standin import StandinHub, read_folder

REPO_ID = "THUDM/chatglm3-6b"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
NEEDED = {"config.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json", *SHARDS}
HAS_MODELSCOPE = importlib.util.find_spec("modelscope") is not None


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny ChatGLM3 repo as the hub has it: safetensors and the same weights as .bin, remote code, a README
    and a subfolder that chat does not need."""
    root = tmp_path_factory.mktemp("repo")
    files = read_folder(make_tiny_chatglm3(root / "st", "safetensors"))
    bins = read_folder(make_tiny_chatglm3(root / "bin", "bin"))
    files |= {k: v for k, v in bins.items() if ".bin" in k}
    auto_map = {"AutoTokenizer": "tokenization_chatglm.ChatGLMTokenizer"}
    files["tokenizer_config.json"] = json.dumps({"auto_map": auto_map}).encode()
    files["tokenization_chatglm.py"] = b"raise RuntimeError('remote code must never run')\n"
    files["README.md"] = b"# tiny chatglm3\n"
    files["onnx/model.onnx"] = b"not needed"
    return files


@pytest.fixture(scope="module")
def local_copy(repo_files, tmp_path_factory) -> Path:
    """The same model as a plain local folder, for comparing replies."""
    folder = tmp_path_factory.mktemp("local") / "chatglm3-tiny"
    for name in NEEDED:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(repo_files[name])
    return folder


@pytest.fixture
def hub(repo_files):
    with StandinHub() as server:
        server.add(REPO_ID, repo_files)
        server.add(REPO_ID, repo_files | {"generation_config.json": b'{"note": "v1"}'}, refs=("v1",))
        server.add("private/chatglm3", repo_files, token="hf_secret")
        server.add("gated/chatglm3", repo_files, gated=True)
        yield server


def hub_env(tmp_path: Path, hub: StandinHub | None = None, **extra) -> dict:
    env = catdog_env()
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "MODELSCOPE_API_TOKEN"):
        env.pop(name, None)
    env |= {
        "HF_HOME": str(tmp_path / "hf"),
        "CATDOG_CACHE_DIR": str(tmp_path / "catdog-cache"),
        "MODELSCOPE_CACHE": str(tmp_path / "ms"),
        "MODELSCOPE_HOME": str(tmp_path / "ms-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_ENDPOINT": hub.url if hub else "http://127.0.0.1:9",  # port 9 (discard): nothing listens
        "MODELSCOPE_ENDPOINT": hub.url if hub else "http://127.0.0.1:9",
    }
    return env | extra


def catdog(*args, env: dict, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "catdog_glm", *map(str, args)],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    assert (done.returncode == 0) == ok, out
    return done


def error_line(done: subprocess.CompletedProcess) -> str:
    """The CLI's one error line (rich may soft-wrap nothing: COLUMNS is wide in catdog_env)."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def snapshot_files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


# --- ids ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("THUDM/chatglm3-6b", ModelRef(HUGGINGFACE, "THUDM/chatglm3-6b")),
        ("THUDM/chatglm3-6b@v1.0", ModelRef(HUGGINGFACE, "THUDM/chatglm3-6b", "v1.0")),
        ("hf:Qwen/Qwen2.5-0.5B-Instruct@refs/pr/1", ModelRef(HUGGINGFACE, "Qwen/Qwen2.5-0.5B-Instruct", "refs/pr/1")),
        ("modelscope:ZhipuAI/chatglm3-6b", ModelRef(MODELSCOPE, "ZhipuAI/chatglm3-6b")),
        ("ModelScope:ZhipuAI/chatglm3-6b@master", ModelRef(MODELSCOPE, "ZhipuAI/chatglm3-6b", "master")),
        ("chatglm3-6b", None),
        ("/models/chatglm3-6b", None),
        ("./THUDM/chatglm3-6b", None),
        ("a/b/c", None),
        ("s3:bucket/key", None),
        ("THUDM/chatglm3-6b@", None),
    ],
)
def test_parse_model_ref(text, expected):
    assert parse_model_ref(text) == expected
    if expected is not None:
        assert parse_model_ref(str(expected)) == expected  # str() writes the id back


def test_select_files_prefers_safetensors_and_skips_code(repo_files):
    assert set(select_files(repo_files)) == NEEDED
    with_code = select_files(repo_files, trust_remote_code=True)
    assert set(with_code) == NEEDED | {"modeling_chatglm.py", "tokenization_chatglm.py"}
    only_bin = [f for f in repo_files if not f.endswith("safetensors") and "safetensors.index" not in f]
    assert set(select_files(only_bin)) == {
        "config.json",
        "pytorch_model.bin.index.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    }
    with pytest.raises(ModelError, match="no .safetensors or .bin weights.*gguf"):
        select_files(["config.json", "model-q4_0.gguf", "README.md"])


def test_local_path_always_wins_and_bad_specs_say_what_they_accept(tmp_path, monkeypatch):
    folder = tmp_path / REPO_ID
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(REPO_ID) == REPO_ID  # a folder named like an id: no hub is asked
    assert resolve_model(None) is None
    with pytest.raises(ModelError, match="does not exist, and it is not a model id either.*modelscope:owner/name"):
        resolve_model("no-such-folder")


def test_a_registered_hub_takes_ids_with_its_prefix(tmp_path, monkeypatch):
    """A hub plugs in as the built-in ones do: a Hub subclass, registered; its cached copy needs no network."""
    from catdog_glm.chat.hub import HUBS, Hub

    class LocalHub(Hub):
        source, prefix, name = "local", "local", "a local mirror"

        def cached(self, ref, *, trust_remote_code=False):
            return tmp_path / ref.repo_id

    (tmp_path / "owner" / "model").mkdir(parents=True)
    monkeypatch.setitem(HUBS, "local", LocalHub())  # register_hub, undone after the test
    ref = parse_model_ref("local:owner/model@v2")
    assert ref == ModelRef("local", "owner/model", "v2") and str(ref) == "local:owner/model@v2"
    assert resolve_model("local:owner/model") == str(tmp_path / "owner" / "model")
    assert parse_model_ref("owner/model").source == HUGGINGFACE  # a bare id is still the first hub's


SAME_KIND = {
    errors.ModelAccessError: errors.DatasetAccessError,
    errors.ModelNotFoundError: errors.DatasetNotFoundError,
    errors.ModelOfflineError: errors.DatasetOfflineError,
    errors.HubError: errors.DatasetHubError,
    errors.DiskFullError: errors.DataError,
}


class _Named(Exception):
    """An exception whose class name (and base names) are a client library's, with an optional HTTP response."""

    def __init__(self, message="boom", status=None):
        super().__init__(message)
        self.response = type("Response", (), {"status_code": status})() if status else None


def _named(*names, status=None, message="boom"):
    bases = tuple(type(n, (_Named,), {}) for n in names[1:]) or (_Named,)
    return type(names[0], bases, {})(message, status)


@pytest.mark.parametrize(
    "error, model_words, dataset_words",
    [
        (_named("GatedRepoError"), ["gated model", "HF_TOKEN"], ["gated dataset", "HF_TOKEN"]),
        (_named("HfHubHTTPError", status=401), ["401", "HF_TOKEN"], ["401", "HF_TOKEN"]),
        (_named("HfHubHTTPError", status=403), ["403", "request access"], ["403", "request access"]),
        (_named("RepositoryNotFoundError"), ["(404)", "check the id (owner/name)"], ["(404)", "check the id"]),
        (_named("LocalEntryNotFoundError", "EntryNotFoundError"), ["cannot be reached"], ["cannot be reached"]),
        (_named("ChunkedEncodingError"), ["interrupted", "catdog pull o/m"], ["interrupted", "catdog data pull o/m"]),
        (_named("ReadTimeout", "Timeout"), ["interrupted"], ["interrupted"]),
        (_named("HTTPError", "URLError", status=503), ["answered 503"], ["answered 503"]),
        (_named("ConnectError"), ["cannot connect to", "catdog pull o/m"], ["cannot connect to", "data pull o/m"]),
        (OSError(28, "No space left on device"), ["not enough disk space", "HF_HOME"], ["disk filled up"]),
        (ValueError("odd"), ["downloading o/m failed: ValueError: odd"], ["downloading o/m failed: ValueError"]),
    ],
)
def test_models_and_datasets_share_one_hub_error_map(error, model_words, dataset_words, tmp_path):
    """catdog_glm.hub_errors maps a client's exception once; chat and vision only word the message."""
    from catdog_glm.chat.hub.base import hub_errors
    from catdog_glm.vision.datahub import SOURCES, parse_data_ref
    from catdog_glm.vision.datahub.base import hub_error

    with pytest.raises(ModelError) as model_error, hub_errors(parse_model_ref("o/m")):
        raise error
    dataset_error = hub_error(parse_data_ref("o/m"), SOURCES["hf"], error, tmp_path)
    for words, found in ((model_words, model_error.value), (dataset_words, dataset_error)):
        assert "\n" not in str(found)
        assert all(w in str(found) for w in words), str(found)
    assert SAME_KIND[type(model_error.value)] is type(dataset_error)


# --- Hugging Face Hub through the CLI ------------------------------------------------------------------------


def test_pull_downloads_only_what_chat_needs_then_lists_it(hub, tmp_path):
    env = hub_env(tmp_path, hub)
    done = catdog("pull", REPO_ID, env=env)
    assert f"Pulled {REPO_ID}: 6 files" in done.stdout
    downloaded = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests("GET", "/resolve/")}
    assert downloaded == NEEDED  # no .bin duplicates, no .py, no README, no subfolder
    snapshot = next((tmp_path / "hf" / "hub" / "models--THUDM--chatglm3-6b" / "snapshots").iterdir())
    assert snapshot_files(snapshot) == NEEDED

    listed = json.loads(catdog("models", "--json", env=env).stdout)
    assert listed == [
        {
            "id": REPO_ID,
            "source": "huggingface",
            "revision": "main",
            "size": sum(len(hub.repos[REPO_ID].commits[snapshot.name][f]) for f in NEEDED),
            "path": str(snapshot),
        }
    ]
    table = catdog("models", env=env).stdout
    assert REPO_ID in table and "huggingface" in table and str(snapshot) in table


def test_chat_by_id_downloads_once_then_loads_with_no_network(hub, tmp_path, local_copy):
    env = hub_env(tmp_path, hub)
    args = ["chat", "--temperature", "0", "--max-new-tokens", "5", "--dtype", "fp32", "--model"]
    first = catdog(*args, REPO_ID, env=env, stdin="hello\n")
    assert hub.requests("GET", "/resolve/"), "the first chat downloads the model"
    reference = catdog(*args, local_copy, env=env, stdin="hello\n")
    assert first.stdout == reference.stdout and first.stdout.strip()  # the same model, the same greedy reply

    requests_before = len(hub.log)
    again = catdog(*args, REPO_ID, env=env, stdin="hello\n")
    assert len(hub.log) == requests_before, hub.log[requests_before:]  # a cache hit makes no request at all
    hub.stop()
    offline = catdog(*args, REPO_ID, env=env, stdin="hello\n")  # HF_ENDPOINT now points at nothing
    assert again.stdout == offline.stdout == first.stdout


def test_revision_pins_a_commit(hub, tmp_path):
    env = hub_env(tmp_path, hub)
    catdog("pull", f"{REPO_ID}@v1", env=env)
    catdog("pull", REPO_ID, env=env)
    models = {m["id"]: m for m in json.loads(catdog("models", "--json", env=env).stdout)}
    assert set(models) == {REPO_ID, f"{REPO_ID}@v1"}
    v1 = Path(models[f"{REPO_ID}@v1"]["path"])
    assert v1.name == hub.repos[REPO_ID].refs["v1"] != Path(models[REPO_ID]["path"]).name
    assert (v1 / "generation_config.json").read_text() == '{"note": "v1"}'
    hub.stop()
    args = ["chat", "--temperature", "0", "--max-new-tokens", "3", "--dtype", "fp32", "--model", f"{REPO_ID}@v1"]
    catdog(*args, env=env, stdin="hi\n")  # the pinned revision loads offline too


def test_trust_remote_code_also_fetches_py_files(hub, tmp_path):
    done = catdog("pull", REPO_ID, "--trust-remote-code", env=hub_env(tmp_path, hub))
    path = Path(done.stdout.split("-> ")[1].split()[0])
    assert {"modeling_chatglm.py", "tokenization_chatglm.py"} <= snapshot_files(path)


def test_resume_after_a_cut_connection(hub, repo_files, tmp_path):
    """huggingface_hub resumes a cut transfer with a Range request once 10 MB are on disk; a transfer cut again
    and again fails with one line, and the next pull finishes it without fetching finished files again."""
    big = read_folder(make_tiny_chatglm3(tmp_path / "big", "safetensors", ffn_hidden_size=32768))  # 25 MB shards
    hub.add("big/chatglm3", big)
    shard = SHARDS[0]
    assert len(big[shard]) // 2 > 10 * 2**20  # the cut comes after the client's first 10 MiB write
    env = hub_env(tmp_path, hub)
    hub.cut(shard, times=1)
    done = catdog("pull", "big/chatglm3", env=env)
    path = Path(done.stdout.split("-> ")[1].split()[0])
    assert hashlib.sha256((path / shard).read_bytes()).digest() == hashlib.sha256(big[shard]).digest()
    ranged = [h["range"] for _, p, h in hub.requests("GET", shard) if h.get("range")]
    assert ranged and ranged[0].startswith("bytes=") and ranged[0] != "bytes=0-"

    env = hub_env(tmp_path / "again", hub)
    hub.cut(SHARDS[1], times=50)  # more cuts than the client retries
    failed = catdog("pull", "big/chatglm3", env=env, ok=False)
    assert "interrupted" in error_line(failed) and "catdog pull big/chatglm3" in error_line(failed)
    hub.cut(SHARDS[1], times=0)
    config_gets = len(hub.requests("GET", "/config.json"))
    done = catdog("pull", "big/chatglm3", env=env)
    path = Path(done.stdout.split("-> ")[1].split()[0])
    assert hashlib.sha256((path / SHARDS[1]).read_bytes()).digest() == hashlib.sha256(big[SHARDS[1]]).digest()
    assert len(hub.requests("GET", "/config.json")) == config_gets  # finished files were kept


@pytest.mark.parametrize(
    "model, fragments",
    [
        ("THUDM/no-such-model", ["THUDM/no-such-model", "not found", "(404)", "check the id"]),
        (f"{REPO_ID}@v9", ["has no revision 'v9'", "(404)"]),
        ("private/chatglm3", ["private/chatglm3", "401", "HF_TOKEN"]),
        ("gated/chatglm3", ["gated", "accept its conditions", "HF_TOKEN"]),
        ("no-such-folder", ["no-such-folder", "not a model id", "owner/name@revision", "modelscope:owner/name"]),
    ],
)
def test_hub_errors_are_one_line(hub, tmp_path, model, fragments):
    env = hub_env(tmp_path, hub)
    line = error_line(catdog("pull", model, env=env, ok=False))
    assert all(f in line for f in fragments), line
    line = error_line(catdog("chat", "--model", model, env=env, stdin="hi\n", ok=False))
    assert all(f in line for f in fragments), line


def test_a_token_opens_a_private_repo(hub, tmp_path):
    catdog("pull", "private/chatglm3", env=hub_env(tmp_path, hub, HF_TOKEN="hf_secret"))
    auth = {h.get("authorization") for _, p, h in hub.requests("GET", "private/chatglm3")}
    assert auth == {"Bearer hf_secret"}


def test_offline_and_not_cached_says_how_to_get_the_model(hub, tmp_path):
    for env, reason in (
        (hub_env(tmp_path, hub, HF_HUB_OFFLINE="1"), "HF_HUB_OFFLINE=1"),
        (hub_env(tmp_path), "cannot connect to http://127.0.0.1:9"),
    ):
        line = error_line(catdog("chat", "--model", REPO_ID, env=env, stdin="hi\n", ok=False))
        cache = tmp_path / "hf" / "hub"
        for fragment in (REPO_ID, str(cache), reason, f"catdog pull {REPO_ID}", "models--THUDM--chatglm3-6b"):
            assert fragment in line, line
        assert "--model PATH" in line
    assert not hub.log  # HF_HUB_OFFLINE=1 is respected: not even a look-up


def test_a_copied_cache_entry_loads_offline(hub, tmp_path):
    """The offline hint's recipe: `catdog pull` where there is network, `cp -a` the models--... folder over."""
    import shutil

    catdog("pull", REPO_ID, env=hub_env(tmp_path / "online", hub))
    hub.stop()
    entry = "models--THUDM--chatglm3-6b"
    shutil.copytree(tmp_path / "online" / "hf" / "hub" / entry, tmp_path / "hf" / "hub" / entry, symlinks=True)
    args = ["chat", "--temperature", "0", "--max-new-tokens", "3", "--dtype", "fp32", "--model", REPO_ID]
    assert catdog(*args, env=hub_env(tmp_path, HF_HUB_OFFLINE="1"), stdin="hi\n").stdout.strip()


LOCAL_THEN_ID_SCRIPT = """
import os, sys
import huggingface_hub.constants
from catdog_glm.chat.hub import pull_model
from catdog_glm.chat.loading import load_chat_model

for folder in sys.argv[1:]:
    print("loaded", load_chat_model(folder, dtype="fp32").kind)
assert "HF_HUB_OFFLINE" not in os.environ, os.environ["HF_HUB_OFFLINE"]
assert not huggingface_hub.constants.HF_HUB_OFFLINE
print("pulled", pull_model("THUDM/chatglm3-6b").path)
print("then", load_chat_model("THUDM/chatglm3-6b", dtype="fp32").source)
"""


def test_local_loads_never_reach_a_hub_nor_turn_a_later_pull_offline(hub, tmp_path, local_copy):
    """Loading is offline call by call (local_files_only), never by setting HF_HUB_OFFLINE for the process: in one
    fresh process, a ChatGLM3 folder and a Hugging Face folder load without a single request to the hub that
    HF_ENDPOINT names, the variable stays unset, and a later id is still pulled and loaded."""
    from catdog_glm.chat.export import export_chatglm3

    hf_folder = tmp_path / "chatglm3-tiny-hf"
    export_chatglm3(local_copy, hf_folder, dtype="fp32")
    done = subprocess.run(
        [sys.executable, "-c", LOCAL_THEN_ID_SCRIPT, str(local_copy), str(hf_folder)],
        env=hub_env(tmp_path, hub),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["loaded chatglm3", "loaded hf"], done.stdout
    assert "models--THUDM--chatglm3-6b/snapshots/" in lines[2] and lines[3].endswith(lines[2].split()[1])
    assert hub.requests("GET", "/resolve/")  # the id was downloaded ...
    assert all(REPO_ID in path for _, path, _ in hub.log), hub.log  # ... and nothing else was asked for


def test_export_chat_accepts_an_id(hub, tmp_path):
    env = hub_env(tmp_path, hub)
    catdog("export", "chat", "--model", REPO_ID, "--out", tmp_path / "exported", "--dtype", "fp32", env=env)
    assert (tmp_path / "exported" / "config.json").is_file()
    assert hub.requests("GET", "/resolve/")


DISK_FULL_SCRIPT = """
import errno, shutil, sys
from collections import namedtuple
from huggingface_hub import file_download
from catdog_glm.chat.hub import resolve_model
from catdog_glm.errors import DiskFullError

real_usage = shutil.disk_usage
shutil.disk_usage = lambda path: namedtuple("usage", "total used free")(10**6, 10**6 - 1000, 1000)
try:
    resolve_model(sys.argv[1])
except DiskFullError as e:
    print("before:", e)
shutil.disk_usage = real_usage

def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

file_download.http_get = full_disk
try:
    resolve_model(sys.argv[1])
except DiskFullError as e:
    print("during:", e)
"""


def test_disk_full_is_one_line_before_and_during_a_download(hub, tmp_path):
    """The free space the library sees is faked (1 kB), then a write that hits ENOSPC is simulated."""
    done = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, REPO_ID],
        env=hub_env(tmp_path, hub),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    before, during = done.stdout.splitlines()
    cache = tmp_path / "hf" / "hub"
    assert before.startswith(f"before: not enough disk space to download {REPO_ID} into {cache}")
    assert "it needs 0.5 MB and the disk has 0.0 MB free" in before and "set HF_HOME" in before
    assert "(no space left on device)" in during and "set HF_HOME" in during
    assert not hub.requests("GET", "/resolve/")  # nothing was fetched in either case


# --- ModelScope ---------------------------------------------------------------------------------------------

needs_modelscope = pytest.mark.skipif(not HAS_MODELSCOPE, reason="the optional modelscope package is not installed")


@needs_modelscope
def test_modelscope_pull_chat_offline_and_errors(hub, tmp_path):
    env = hub_env(tmp_path, hub)
    ms_id = f"modelscope:{REPO_ID}"
    done = catdog("pull", ms_id, env=env)
    assert f"Pulled {ms_id}" in done.stdout
    fetched = {p.split("FilePath=")[1] for _, p, _ in hub.requests("GET", "/repo?")}
    assert fetched == NEEDED
    listed = json.loads(catdog("models", "--json", env=env).stdout)
    assert [(m["id"], m["source"]) for m in listed] == [(ms_id, "modelscope")]
    assert snapshot_files(Path(listed[0]["path"])) == NEEDED

    line = error_line(catdog("pull", "modelscope:THUDM/no-such-model", env=env, ok=False))
    assert "not found on ModelScope" in line and "(404)" in line
    line = error_line(catdog("pull", "modelscope:private/chatglm3", env=env, ok=False))
    assert "401" in line and "MODELSCOPE_API_TOKEN" in line

    hub.stop()
    args = ["chat", "--temperature", "0", "--max-new-tokens", "3", "--dtype", "fp32", "--model", ms_id]
    assert catdog(*args, env=env, stdin="hi\n").stdout.strip()  # cached: no network needed


@needs_modelscope
def test_modelscope_offline_and_not_cached(tmp_path):
    line = error_line(catdog("pull", "modelscope:ZhipuAI/chatglm3-6b", env=hub_env(tmp_path), ok=False))
    for fragment in ("modelscope:ZhipuAI/chatglm3-6b", str(tmp_path / "ms"), "cannot connect", "--model PATH"):
        assert fragment in line, line


def test_modelscope_missing_package_is_a_one_line_hint(monkeypatch):
    for name in ("modelscope", "modelscope.hub", "modelscope.hub.api", "modelscope.hub.snapshot_download"):
        monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError, as when it is not installed
    with pytest.raises(ModelError, match="ModelScope ids need the optional modelscope package: pip install modelscope"):
        resolve_model("modelscope:ZhipuAI/chatglm3-6b")


def test_nothing_cached_lists_nothing(tmp_path):
    env = hub_env(tmp_path)
    assert json.loads(catdog("models", "--json", env=env).stdout) == []
    assert "No models cached yet" in catdog("models", env=env).stdout
