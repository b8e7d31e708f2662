"""What every model hub shares: the id (`ModelRef`), the `Hub` interface and its registry, which files of a
repository a chat model needs, and the one-line errors (mapped by catdog_glm.hub_errors) in a model's words."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import re
import shutil
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
from catdog_glm.hub_errors import HubErrorTypes, HubTarget, hub_error

log = logging.getLogger(__name__)

# Files a chat model needs besides the *.json configs and the weights (tokenizers of the common families).
TOKENIZER_FILES = ("*.model", "tokenizer.json", "*.tiktoken", "vocab.*", "merges.txt", "*.jinja")
_NAME = r"\w(?:[\w.-]*\w)?"
_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s@]+))?", re.ASCII)
MODEL_ERRORS = HubErrorTypes(
    access=ModelAccessError,
    not_found=ModelNotFoundError,
    offline=ModelOfflineError,
    failed=HubError,
    disk_full=DiskFullError,
)


@dataclass(frozen=True)
class ModelRef:
    """A model id: which hub (a `Hub.source`), which repository, which revision (None = the default branch)."""

    source: str
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        prefix = "" if self.hub is default_hub() else f"{self.hub.prefix}:"
        return prefix + self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def hub(self) -> Hub:
        return HUBS[self.source]


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


class Hub:
    """One model hub, through its own client library and that library's cache. A subclass names its ids' prefix
    and implements the library calls; `download` (which files, disk space, errors) is the same for every hub."""

    source: str = ""  # as `catdog models` lists it: "huggingface"
    prefix: str = ""  # how an id names it: "hf:owner/name"
    name: str = ""  # as a person names it: "the Hugging Face Hub"
    token_variable: str = ""  # the environment variable its client reads a token from
    cache_variable: str = ""  # the one that moves its cache to a bigger disk

    def parse(self, text: str) -> ModelRef | None:
        """`owner/name[@revision]` (without the prefix) -> ModelRef; None if it is not one."""
        match = _ID.fullmatch(text.strip())
        return ModelRef(self.source, match["repo"], match["revision"]) if match else None

    def endpoint(self) -> str:
        raise NotImplementedError

    def cache_dir(self) -> Path:
        """Where the client library keeps models."""
        raise NotImplementedError

    def cache_entry(self, ref: ModelRef) -> str:
        """The folder of `ref` inside `cache_dir()`, as the offline hint tells a user to copy it."""
        raise NotImplementedError

    def cached(self, ref: ModelRef, *, trust_remote_code: bool = False) -> Path | None:
        """The complete cached folder of `ref`, found without any network request; None if not (fully) cached."""
        raise NotImplementedError

    def offline_reason(self) -> str | None:
        """Why this hub must not be asked at all (the user's own offline setting), or None."""
        return None

    def remote_files(self, ref: ModelRef) -> tuple[dict[str, int], Path]:
        """Ask the hub: every file of `ref` with its size, and the snapshot folder they will be written to."""
        raise NotImplementedError

    def fetch(self, ref: ModelRef, files: list[str]) -> Path:
        """Download exactly `files` of `ref` into the cache (the library resumes and shows progress)."""
        raise NotImplementedError

    def list_cached(self) -> list[CachedModel]:
        """Every cached model revision."""
        raise NotImplementedError

    def download(self, ref: ModelRef, *, trust_remote_code: bool = False, announce: bool = True) -> Path:
        """Download what a chat model needs of `ref`; `announce` logs it as a warning (a load that reaches the
        network is news)."""
        reason = self.offline_reason()
        if reason:
            raise ModelOfflineError(not_cached_message(ref, reason))
        with hub_errors(ref):
            sizes, snapshot = self.remote_files(ref)
            wanted = {f: sizes[f] for f in select_files(sizes, trust_remote_code=trust_remote_code)}
            check_disk_space(ref, wanted, snapshot)
            level = logging.WARNING if announce else logging.INFO
            size = _gb(sum(wanted.values()))
            log.log(
                level,
                "downloading %s (%d files, %s) from %s into %s",
                ref,
                len(wanted),
                size,
                self.name,
                self.cache_dir(),
            )
            return self.fetch(ref, list(wanted))


# Every hub, by its `source`; ids written `prefix:owner/name` go to it, a bare owner/name to the first registered.
HUBS: dict[str, Hub] = {}


def register_hub(hub: Hub) -> None:
    """Add a hub (or replace one) under its `source`: ids written `prefix:...` go to it."""
    HUBS[hub.source] = hub


def default_hub() -> Hub:
    """The hub of an id written without a prefix (the Hugging Face Hub)."""
    return next(iter(HUBS.values()))


def hub_by_prefix(prefix: str) -> Hub | None:
    return next((h for h in HUBS.values() if h.prefix == prefix.lower()), None)


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


def exact_patterns(names: list[str]) -> list[str]:
    """File names as allow patterns that match only themselves."""
    return [glob.escape(n) for n in names]


def folder_complete(folder: Path) -> bool:
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


def check_disk_space(ref: ModelRef, sizes: Mapping[str, int], snapshot: Path) -> None:
    """Fail before downloading when the files not yet in `snapshot` do not fit on the cache's disk."""
    needed = sum(size for name, size in sizes.items() if not (snapshot / name).is_file())
    existing = next((p for p in [snapshot, *snapshot.parents] if p.exists()), None)
    if not needed or existing is None:
        return
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise DiskFullError(disk_full_message(ref, f"it needs {_gb(needed)} and the disk has {_gb(free)} free"))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def disk_full_message(ref: ModelRef, detail: str) -> str:
    return (
        f"not enough disk space to download {ref} into {ref.hub.cache_dir()} ({detail}): free some space or "
        f"set {ref.hub.cache_variable} to a folder on a bigger disk"
    )


def not_cached_message(ref: ModelRef, reason: str) -> str:
    hub = ref.hub
    cache = hub.cache_dir()
    return (
        f"{ref} is not in the model cache ({cache}) and {hub.name} cannot be reached ({reason}): run "
        f"`catdog pull {ref}` on a machine with network and copy its {hub.cache_entry(ref)} folder into {cache} "
        "(cp -a), or copy a downloaded model folder here and pass its path: --model PATH"
    )


def _error_target(ref: ModelRef) -> HubTarget:
    hub = ref.hub
    return HubTarget(
        ref=str(ref),
        name=ref.repo_id,
        revision=ref.revision,
        what="model",
        hub=hub.name,
        endpoint=hub.endpoint(),
        page=f"{hub.endpoint()}/{ref.repo_id}",
        token_hint=f"set {hub.token_variable} to a token of an account that can read it",
        pull=f"catdog pull {ref}",
        errors=MODEL_ERRORS,
        not_cached=lambda reason: not_cached_message(ref, reason),
        disk_full=lambda: disk_full_message(ref, "no space left on device"),
        id_hint="the id (owner/name)",
    )


@contextlib.contextmanager
def hub_errors(ref: ModelRef) -> Iterator[None]:
    """Whatever a hub's client raises -> one typed, one-line error that names the model and says what to do."""
    try:
        yield
    except CatdogError as e:  # select_files, disk-space check: add which model
        if isinstance(e, HubError):
            raise
        raise type(e)(f"{ref}: {e}") from e
    except Exception as e:
        raise hub_error(_error_target(ref), e) from e
