"""What every dataset source shares: the id (`DataRef`), what a source hands the builder (`Fetched`), the `Source`
interface, and the one-line errors for what hubs answer (404, 401/403, offline, a cut, a full disk)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from catdog_glm.errors import (
    CatdogError,
    DataError,
    DatasetAccessError,
    DatasetHubError,
    DatasetNotFoundError,
    DatasetOfflineError,
)

_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
# exception class names (of huggingface_hub, modelscope, requests, httpx, urllib) that mean "cannot connect"
_OFFLINE = {
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "URLError",
    "ConnectionRefusedError",
    "NameResolutionError",
    "MaxRetryError",
}
_CUT = {"ChunkedEncodingError", "ProtocolError", "RemoteProtocolError", "ReadTimeout", "ReadError", "IncompleteRead"}


@dataclass(frozen=True)
class DataRef:
    """A dataset id: its source (a key of SOURCES), the name there, and a revision (None = the default)."""

    source: str
    name: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.source == "url":
            return self.name
        prefix = "" if self.source == "hf" else f"{self.source}:"
        return prefix + self.name + (f"@{self.revision}" if self.revision else "")

    @property
    def slug(self) -> str:
        """A folder name for this id in the dataset cache."""
        text = self.name.split("://", 1)[-1] if self.source == "url" else self.name
        base = f"{self.source}--{_SLUG.sub('--', text).strip('-')}"
        return base + (f"@{_SLUG.sub('-', self.revision)}" if self.revision else "")


@dataclass
class Fetched:
    """What a source downloaded (or will download shard by shard) for the builder to turn into an ImageFolder."""

    revision: str | None = None  # the commit or version actually fetched
    license: str | None = None
    page: str | None = None  # where a person can read about the dataset
    classes: list[str] | None = None  # class names the source's metadata states (parquet ClassLabel)
    shards: list[str] = field(default_factory=list)  # parquet files, read in this order
    open_shard: Callable[[str], Path] | None = None  # downloads one shard (resumably) and returns its local path
    folder: Path | None = None  # downloaded archives and/or image files


class Source:
    """One place datasets come from. `fetch` downloads into `raw` (kept across attempts so a cut download resumes)."""

    key: str = ""
    hub: str = ""  # as a person names it: "the Hugging Face Hub"
    token_hint: str = ""  # how to give credentials
    endpoint: str = ""

    def parse(self, text: str) -> DataRef | None:
        raise NotImplementedError

    def fetch(self, ref: DataRef, raw: Path, progress: PullProgress, *, sha256: str | None, cache: Path) -> Fetched:
        """Download what `ref` needs into `raw` (or arrange to, shard by shard); `cache` is the folder the finished
        dataset will have, named in the offline message."""
        raise NotImplementedError


class PullProgress:
    """Callbacks a front end implements to show a pull: bytes downloaded and images written. No-ops by default."""

    def on_bytes(self, total: int | None, done: int) -> None: ...

    def on_images(self, n: int) -> None: ...

    def on_message(self, text: str) -> None: ...


def not_cached_message(ref: DataRef, hub: str, reason: str, folder: Path) -> str:
    return (
        f"{ref} is not in the dataset cache and {hub} cannot be reached ({reason}): connect and run "
        f"`catdog data pull {ref}`, or copy its images in as train/<class>/*.jpg and val/<class>/*.jpg under "
        f"{folder} (or pass that folder to --data)"
    )


def check_disk_space(ref: DataRef, need: int, folder: Path) -> None:
    """Raise a DataError when the disk under `folder` has less than `need` bytes free (plus 5% and 100 MB)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need and free < need * 1.05 + 100e6:
        raise DataError(
            f"not enough disk space for {ref}: it needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free "
            f"under {probe}; free some space, or set CATDOG_CACHE_DIR (or --out) to a bigger disk"
        )


def disk_full_message(ref: DataRef, folder: Path) -> str:
    return (
        f"the disk filled up while writing {ref} under {folder}; nothing was kept as complete: free some space, "
        "or set CATDOG_CACHE_DIR (or --out) to a bigger disk, and pull again"
    )


def hub_error(ref: DataRef, source: Source, error: BaseException, cache: Path) -> CatdogError:
    """One line for what a hub client raised, from its exception class names and HTTP status."""
    if isinstance(error, CatdogError):
        return error
    names = {c.__name__ for c in type(error).__mro__}
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None) or getattr(error, "code", None) or getattr(error, "status", None)
    status = status if isinstance(status, int) else None
    if status is None and (coded := re.search(r"\[(40[134])\]", str(error))):  # modelscope: "[E3020] [404] ..."
        status = int(coded[1])
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return DataError(disk_full_message(ref, cache))
    if "GatedRepoError" in names:
        return DatasetAccessError(
            f"{ref} is a gated dataset: accept its conditions at {source.endpoint}/datasets/{ref.name} while logged "
            f"in, then {source.token_hint}"
        )
    if status == 401 or "AuthenticationError" in names:
        return DatasetAccessError(
            f"{ref}: {source.hub} answered 401 (not authorized): the dataset is private or gated, the credentials "
            f"are wrong, or the id is wrong; check the id and {source.token_hint}"
        )
    if status == 403 or "PermissionDeniedError" in names:
        return DatasetAccessError(
            f"{ref}: {source.hub} answered 403 (forbidden): these credentials cannot read it; request access, or "
            f"{source.token_hint}"
        )
    if "RevisionNotFoundError" in names:
        return DatasetNotFoundError(
            f"{ref.name} has no revision {ref.revision!r} on {source.hub} (404): pass an existing branch, tag or commit"
        )
    if status == 404 or names & {"RepositoryNotFoundError", "NotExistError", "EntryNotFoundError"}:
        what = "the URL" if ref.source == "url" else "the id and the revision" if ref.revision else "the id"
        return DatasetNotFoundError(f"{ref} was not found on {source.hub} at {source.endpoint} (404): check {what}")
    if names & _CUT or "Consistency check failed" in str(error):
        return DatasetHubError(
            f"the download of {ref} was interrupted ({first_line(error)}): run `catdog data pull {ref}` again; "
            "what was downloaded is kept and the download resumes"
        )
    if names & _OFFLINE:
        return DatasetOfflineError(not_cached_message(ref, source.hub, f"cannot connect to {source.endpoint}", cache))
    if status is not None and status >= 500:
        return DatasetHubError(f"{ref}: {source.hub} answered {status}; try again later")
    return DatasetHubError(f"downloading {ref} failed: {type(error).__name__}: {first_line(error)}")


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


@contextlib.contextmanager
def hub_errors(ref: DataRef, source: Source, cache: Path) -> Iterator[None]:
    """Turn whatever a client raises into one of our one-line errors."""
    try:
        yield
    except CatdogError:
        raise
    except Exception as e:
        raise hub_error(ref, source, e, cache) from e


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
