"""Chat models by name: `owner/name[@revision]` on the Hugging Face Hub (through `huggingface_hub`) and
`modelscope:owner/name[@revision]` on ModelScope (through the `modelscope` package), each kept in its library's
own cache. A cached model resolves with no network at all; a missing one is downloaded once (only the config,
tokenizer and one weight format; `.py` files only with trust_remote_code), with the libraries' resume and
progress bars. Tokens, mirrors and cache folders come from the libraries' environment variables (HF_TOKEN,
HF_ENDPOINT, HF_HOME; MODELSCOPE_API_TOKEN, MODELSCOPE_ENDPOINT, MODELSCOPE_CACHE)."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path

from catdog_glm.errors import (
    CatdogError,
    DiskFullError,
    HubError,
    ModelAccessError,
    ModelError,
    ModelNotFoundError,
    ModelOfflineError,
)

log = logging.getLogger(__name__)

HUGGINGFACE, MODELSCOPE = "huggingface", "modelscope"
PREFIXES = {"hf": HUGGINGFACE, "modelscope": MODELSCOPE}
HUB_NAMES = {HUGGINGFACE: "the Hugging Face Hub", MODELSCOPE: "ModelScope"}
# no square brackets in messages: the CLI prints them through rich, which reads [...] as markup
MODELSCOPE_HINT = "ModelScope ids need the optional modelscope package: pip install modelscope"
# Files a chat model needs besides the *.json configs and the weights (tokenizers of the common families).
TOKENIZER_FILES = ("*.model", "tokenizer.json", "*.tiktoken", "vocab.*", "merges.txt", "*.jinja")
_NAME = r"\w(?:[\w.-]*\w)?"
_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s@]+))?", re.ASCII)


@dataclass(frozen=True)
class ModelRef:
    """A model id: which hub, which repository, which revision (None = the default branch)."""

    source: str
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        prefix = "modelscope:" if self.source == MODELSCOPE else ""
        return prefix + self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def hub(self) -> str:
        return HUB_NAMES[self.source]


@dataclass
class PulledModel:
    """What `pull_model` fetched: the id, the local folder, how many files and bytes, and how long it took."""

    ref: ModelRef
    path: Path
    files: int
    bytes: int
    seconds: float
    downloaded: bool = True  # False when the hub was unreachable and the cached copy was kept


@dataclass
class CachedModel:
    """One cached revision of a model: the id to pass to --model, its hub, size on disk and folder."""

    id: str
    source: str
    revision: str
    size: int
    path: str

    def to_dict(self) -> dict:
        return asdict(self)


def parse_model_ref(text: str) -> ModelRef | None:
    """`owner/name[@rev]`, `hf:owner/name[@rev]` or `modelscope:owner/name[@rev]` -> ModelRef; None otherwise."""
    text = text.strip()
    source = HUGGINGFACE
    prefix, colon, rest = text.partition(":")
    if colon:
        if prefix.lower() not in PREFIXES:
            return None
        source, text = PREFIXES[prefix.lower()], rest
    match = _ID.fullmatch(text)
    return ModelRef(source, match["repo"], match["revision"]) if match else None


def resolve_model(spec: str | None, *, trust_remote_code: bool = False) -> str | None:
    """Turn a --model value into a local path: None and existing paths pass through (a path always wins over an
    id, unless the id is written hf:... or modelscope:...); an id comes from the cache, else is downloaded."""
    _freeze_hf_offline_flag()  # first, even for local paths: a later call in this process may get an id
    if spec is None:
        return None
    explicit = spec.partition(":")[0].lower() in PREFIXES
    if not explicit and Path(spec).expanduser().exists():
        return spec
    ref = parse_model_ref(spec)
    if ref is None:
        raise ModelError(
            f"model {spec} does not exist, and it is not a model id either: pass a ChatGLM3 or Hugging Face model "
            "folder, a .gguf file, a Hugging Face Hub id (owner/name or owner/name@revision) or a ModelScope id "
            "(modelscope:owner/name)"
        )
    try:
        return str(fetch_model(ref, trust_remote_code=trust_remote_code))
    except (ModelNotFoundError, ModelAccessError) as e:
        if explicit or ref.revision:  # only a bare owner/name may have been meant as a relative folder
            raise
        raise type(e)(f"there is no local folder {spec}, and {e}") from e


def fetch_model(ref: ModelRef, *, trust_remote_code: bool = False) -> Path:
    """The local folder of `ref`: the cached copy with no network at all, else a download."""
    _freeze_hf_offline_flag()
    cached = cached_model_path(ref, trust_remote_code=trust_remote_code)
    if cached is not None:
        log.info("%s found in the cache at %s", ref, cached)
        return cached
    return _download(ref, trust_remote_code, announce=True)


def pull_model(spec: str, *, trust_remote_code: bool = False) -> PulledModel:
    """Download (or update) a model by id ahead of time, like `ollama pull`; keeps a cached copy when offline."""
    ref = parse_model_ref(spec)
    if ref is None:
        raise ModelError(
            f"{spec} is not a model id: pass owner/name, owner/name@revision or modelscope:owner/name (a local folder "
            "needs no pull: pass it to --model)"
        )
    _freeze_hf_offline_flag()
    started = time.perf_counter()
    downloaded = True
    try:
        path = _download(ref, trust_remote_code, announce=False)
    except ModelOfflineError:
        path = cached_model_path(ref, trust_remote_code=trust_remote_code)
        if path is None:
            raise
        log.warning("%s cannot be reached; keeping the cached copy of %s", ref.hub, ref)
        downloaded = False
    files = [p for p in path.iterdir() if p.is_file()]
    return PulledModel(
        ref=ref,
        path=path,
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),
        seconds=time.perf_counter() - started,
        downloaded=downloaded,
    )


def select_files(files: Iterable[str], *, trust_remote_code: bool = False) -> list[str]:
    """The files of a repo that catdog loads: top-level configs, tokenizer files and one weight format
    (safetensors when the repo has both); `.py` files only with trust_remote_code."""
    top = sorted(f for f in files if "/" not in f)
    safetensors = [f for f in top if f.endswith(".safetensors")]
    weights = safetensors or [f for f in top if f.endswith(".bin") and f != "training_args.bin"]
    if not weights:
        raise ModelError(
            "the repository has no .safetensors or .bin weights at its top level (for a GGUF repository, download "
            "the .gguf file and pass it with --model FILE.gguf)"
        )
    other_index = "pytorch_model.bin.index.json" if safetensors else "model.safetensors.index.json"
    keep = {f for f in top if f.endswith(".json") and f != other_index}
    keep |= {f for f in top if any(fnmatch(f, p) for p in TOKENIZER_FILES)}
    keep |= set(weights)
    if trust_remote_code:
        keep |= {f for f in top if f.endswith(".py")}
    return sorted(keep)


def cache_dir(source: str) -> Path:
    """Where a hub's library keeps models: HF_HUB_CACHE (HF_HOME/hub) or MODELSCOPE_CACHE."""
    if source == HUGGINGFACE:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope").expanduser()


def cached_model_path(ref: ModelRef, *, trust_remote_code: bool = False) -> Path | None:
    """The complete cached folder of `ref`, found without any network request; None if not (fully) cached."""
    if ref.source == HUGGINGFACE:
        return _hf_cached(ref, trust_remote_code)
    return _modelscope_cached(ref)


def list_cached_models() -> list[CachedModel]:
    """Every cached model revision of both hubs, sorted by id (like `ollama list`)."""
    return sorted(_hf_list() + _modelscope_list(), key=lambda m: (m.id, m.source))


# --- Hugging Face Hub ---------------------------------------------------------------------------------------


def _freeze_hf_offline_flag() -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import. load_chat_model sets HF_HUB_OFFLINE=1 for its own
    local loads; importing the library's constants before that keeps the user's own setting in force here."""
    import huggingface_hub.constants  # noqa: F401


def _hf_cached(ref: ModelRef, trust_remote_code: bool) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    files = _hf_cached_file_list(ref)
    try:
        patterns = _exact(select_files(files, trust_remote_code=trust_remote_code)) if files is not None else None
        folder = Path(
            snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True, allow_patterns=patterns)
        )
    except (LocalEntryNotFoundError, ModelError):
        return None
    # with the cached file list, snapshot_download checked every file; without it, check the folder ourselves
    return folder if files is not None or _folder_complete(folder) else None


def _hf_cached_file_list(ref: ModelRef) -> list[str] | None:
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # huggingface_hub before the cached tree listing
        return None
    try:
        return [f.path for f in get_cached_repo_tree(ref.repo_id, revision=ref.revision)]
    except CachedRepoTreeNotFoundError:
        return None


def _hf_download(ref: ModelRef, trust_remote_code: bool, announce: bool) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    if constants.HF_HUB_OFFLINE:
        raise ModelOfflineError(_not_cached_message(ref, "HF_HUB_OFFLINE=1 is set"))
    with _hub_errors(ref):
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        wanted = select_files(sizes, trust_remote_code=trust_remote_code)
        snapshot = cache_dir(HUGGINGFACE) / repo_folder_name(repo_id=ref.repo_id, repo_type="model") / "snapshots"
        _check_disk_space(ref, {f: sizes[f] for f in wanted}, snapshot / str(info.sha))
        _log_download(ref, {f: sizes[f] for f in wanted}, announce)
        # the branch or tag itself (not info.sha), so the library records refs/<revision> for offline look-ups
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=_exact(wanted)))


def _hf_list() -> list[CachedModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir(HUGGINGFACE))
    except CacheNotFound:
        return []
    models = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            for name in sorted(revision.refs) or [revision.commit_hash]:
                models.append(
                    CachedModel(
                        id=repo.repo_id if name == "main" else f"{repo.repo_id}@{name}",
                        source=HUGGINGFACE,
                        revision=name,
                        size=revision.size_on_disk,
                        path=str(revision.snapshot_path),
                    )
                )
    return models


# --- ModelScope ---------------------------------------------------------------------------------------------


def _modelscope():
    """(snapshot_download, HubApi) of the optional modelscope package, or a one-line hint to install it."""
    try:
        from modelscope.hub.api import HubApi
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as e:
        raise ModelError(f"{MODELSCOPE_HINT} ({e})") from e
    return snapshot_download, HubApi


def _modelscope_cached(ref: ModelRef) -> Path | None:
    snapshot_download, _ = _modelscope()
    with contextlib.suppress(Exception):  # its cache misses raise CacheNotFound and friends
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True))
        return folder if _folder_complete(folder) else None
    return None


def _modelscope_download(ref: ModelRef, trust_remote_code: bool, announce: bool) -> Path:
    snapshot_download, HubApi = _modelscope()
    with _hub_errors(ref):
        listing = HubApi().get_model_files(ref.repo_id, revision=ref.revision, recursive=True)
        sizes = {f["Path"]: int(f.get("Size") or 0) for f in listing if f.get("Type", "blob") != "tree"}
        wanted = select_files(sizes, trust_remote_code=trust_remote_code)
        folder = cache_dir(MODELSCOPE) / "models" / ref.repo_id.replace("/", "--") / "snapshots"
        _check_disk_space(ref, {f: sizes[f] for f in wanted}, folder / (ref.revision or "master"))
        _log_download(ref, {f: sizes[f] for f in wanted}, announce)
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=_exact(wanted)))


def _modelscope_list() -> list[CachedModel]:
    models = []
    for snapshot in sorted((cache_dir(MODELSCOPE) / "models").glob("*/snapshots/*")):
        if not snapshot.is_dir() or not _folder_complete(snapshot):
            continue
        repo_id = snapshot.parent.parent.name.replace("--", "/", 1)
        revision = snapshot.name
        models.append(
            CachedModel(
                id=f"modelscope:{repo_id}" + ("" if revision == "master" else f"@{revision}"),
                source=MODELSCOPE,
                revision=revision,
                size=sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file()),
                path=str(snapshot),
            )
        )
    return models


# --- both hubs ----------------------------------------------------------------------------------------------


def _download(ref: ModelRef, trust_remote_code: bool, announce: bool) -> Path:
    """Download `ref`; `announce` logs it as a warning (a load that reaches the network is news)."""
    if ref.source == HUGGINGFACE:
        return _hf_download(ref, trust_remote_code, announce)
    return _modelscope_download(ref, trust_remote_code, announce)


def _log_download(ref: ModelRef, sizes: Mapping[str, int], announce: bool) -> None:
    level = logging.WARNING if announce else logging.INFO
    size = _gb(sum(sizes.values()))
    log.log(
        level, "downloading %s (%d files, %s) from %s into %s", ref, len(sizes), size, ref.hub, cache_dir(ref.source)
    )


def _exact(names: list[str]) -> list[str]:
    """File names as allow patterns that match only themselves."""
    return [glob.escape(n) for n in names]


def _folder_complete(folder: Path) -> bool:
    """config.json plus every weight file its index names (or a single weight file)."""
    if not (folder / "config.json").is_file():
        return False
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return False
            return all((folder / s).is_file() for s in shards)
    return (folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file()


def _check_disk_space(ref: ModelRef, sizes: Mapping[str, int], snapshot: Path) -> None:
    """Fail before downloading when the files not yet in `snapshot` do not fit on the cache's disk."""
    needed = sum(size for name, size in sizes.items() if not (snapshot / name).is_file())
    existing = next((p for p in [snapshot, *snapshot.parents] if p.exists()), None)
    if not needed or existing is None:
        return
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise DiskFullError(_disk_full_message(ref, f"it needs {_gb(needed)} and the disk has {_gb(free)} free"))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _disk_full_message(ref: ModelRef, detail: str) -> str:
    variable = "HF_HOME" if ref.source == HUGGINGFACE else "MODELSCOPE_CACHE"
    return (
        f"not enough disk space to download {ref} into {cache_dir(ref.source)} ({detail}): free some space or "
        f"set {variable} to a folder on a bigger disk"
    )


def _endpoint(source: str) -> str:
    if source == HUGGINGFACE:
        from huggingface_hub import constants

        return constants.ENDPOINT
    return os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "https://modelscope.cn"


def _not_cached_message(ref: ModelRef, reason: str) -> str:
    cache = cache_dir(ref.source)
    name = ref.repo_id.replace("/", "--")
    folder = f"models--{name}" if ref.source == HUGGINGFACE else f"models/{name}"
    return (
        f"{ref} is not in the model cache ({cache}) and {ref.hub} cannot be reached ({reason}): run "
        f"`catdog pull {ref}` on a machine with network and copy its {folder} folder into {cache} (cp -a), or copy "
        "a downloaded model folder here and pass its path: --model PATH"
    )


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


# Matched by class name (with base classes), so that httpx/httpx2/requests/urllib3 and both hubs' own
# exception types are all recognised without importing any of them.
_OFFLINE = {"ConnectError", "ConnectTimeout", "OfflineModeIsEnabled", "NetworkError", "ConnectionError", "Timeout"}
_OFFLINE |= {"TimeoutException", "NewConnectionError", "MaxRetryError", "ProxyError"}
_CUT = {"RemoteProtocolError", "ReadError", "ChunkedEncodingError", "IncompleteRead", "ProtocolError"}
_CUT |= {"FileDownloadError", "FileIntegrityError"}


def _hub_error(ref: ModelRef, error: BaseException) -> CatdogError:
    """One exception of a hub library -> one typed, one-line error that says what to do."""
    chain = list(_error_chain(error))
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    statuses = [getattr(getattr(e, "response", None), "status_code", None) for e in chain]
    status = next((s for s in statuses if isinstance(s, int)), None)
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        return DiskFullError(_disk_full_message(ref, "no space left on device"))
    token = "HF_TOKEN" if ref.source == HUGGINGFACE else "MODELSCOPE_API_TOKEN"
    page = f"{_endpoint(ref.source)}/{ref.repo_id}"
    if "GatedRepoError" in names:
        return ModelAccessError(
            f"{ref} is a gated model: accept its conditions at {page} while logged in, then set {token} to a token "
            "of that account"
        )
    if status == 401 or "AuthenticationError" in names:
        return ModelAccessError(
            f"{ref}: {ref.hub} answered 401 (not authorized): the repository is private or gated, or the id is "
            f"wrong; check the id and set {token} to a token that can read it"
        )
    if status == 403 or "PermissionDeniedError" in names:
        return ModelAccessError(
            f"{ref}: {ref.hub} answered 403 (forbidden): your token cannot read this repository; request access at "
            f"{page} or set {token} to a token that can"
        )
    if "RevisionNotFoundError" in names:
        return ModelNotFoundError(
            f"{ref.repo_id} has no revision {ref.revision!r} on {ref.hub} (404): pass an existing branch, tag or commit"
        )
    if status == 404 or names & {"RepositoryNotFoundError", "NotExistError"}:
        what = "the id and the revision" if ref.revision else "the id (owner/name)"
        return ModelNotFoundError(f"{ref} was not found on {ref.hub} at {_endpoint(ref.source)} (404): check {what}")
    if names & _CUT or "Consistency check failed" in str(error):
        return HubError(
            f"the download of {ref} was interrupted ({_first_line(error)}): run `catdog pull {ref}` again; "
            "finished files are kept"
        )
    if names & _OFFLINE:
        return ModelOfflineError(_not_cached_message(ref, f"cannot connect to {_endpoint(ref.source)}"))
    if status is not None and status >= 500:
        return HubError(f"{ref}: {ref.hub} answered {status}; try again later")
    return HubError(f"downloading {ref} failed: {type(error).__name__}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


@contextlib.contextmanager
def _hub_errors(ref: ModelRef) -> Iterator[None]:
    try:
        yield
    except CatdogError as e:  # select_files, disk-space check: add which model
        if isinstance(e, HubError):
            raise
        raise type(e)(f"{ref}: {e}") from e
    except Exception as e:
        raise _hub_error(ref, e) from e
