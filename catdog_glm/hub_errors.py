"""What a hub client's exception means, as one typed, one-line error that says what to do: shared by chat models
(chat/hub) and datasets (vision/datahub), whose clients (huggingface_hub, modelscope, kagglehub, urllib) fail the
same ways under different names. Exceptions are matched by class name (with base classes, along the cause chain)
and by the HTTP status they carry, so that no client library is imported here."""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from catdog_glm.errors import CatdogError

# the hub could not be reached at all
_OFFLINE = {"ConnectError", "ConnectTimeout", "OfflineModeIsEnabled", "NetworkError", "ConnectionError", "Timeout"}
_OFFLINE |= {"TimeoutException", "NewConnectionError", "MaxRetryError", "ProxyError", "NameResolutionError"}
_OFFLINE |= {"URLError", "ConnectionRefusedError", "LocalEntryNotFoundError"}
# it was reached, and a transfer stopped half-way
_CUT = {"RemoteProtocolError", "ReadError", "ChunkedEncodingError", "IncompleteRead", "ProtocolError", "ReadTimeout"}
_CUT |= {"FileDownloadError", "FileIntegrityError"}
_NOT_FOUND = {"RepositoryNotFoundError", "NotExistError", "EntryNotFoundError"}


@dataclass(frozen=True)
class HubErrorTypes:
    """Which CatdogError each kind of failure raises (models and datasets have their own families)."""

    access: type[CatdogError]  # 401, 403, gated
    not_found: type[CatdogError]  # 404: no such repository, revision or file
    offline: type[CatdogError]  # cannot connect, and nothing cached
    failed: type[CatdogError]  # a cut transfer, a 5xx, anything else
    disk_full: type[CatdogError]


@dataclass(frozen=True)
class HubTarget:
    """What was being downloaded, from where, and the words its errors use."""

    ref: str  # the id as a user writes it: modelscope:owner/name@rev
    name: str  # the repository (or URL) at the hub
    revision: str | None
    what: str  # "model" | "dataset"
    hub: str  # as a person names it: "the Hugging Face Hub"
    endpoint: str
    page: str  # where access is requested
    token_hint: str  # "set HF_TOKEN to a token of an account that can read it"
    pull: str  # the command that downloads it again: "catdog pull ID"
    errors: HubErrorTypes
    not_cached: Callable[[str], str]  # a reason it cannot be reached -> what to do instead
    disk_full: Callable[[], str]
    id_hint: str = "the id"  # what to check after a 404 (besides the revision)


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """The error, then its causes (and the errors it was raised while handling), each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def http_status(chain: list[BaseException]) -> int | None:
    """The HTTP status an error carries: a response's (requests, httpx), urllib's `code`, or modelscope's
    "[E3020] [404] ..." in the message."""
    for e in chain:
        for status in (getattr(getattr(e, "response", None), "status_code", None), getattr(e, "code", None)):
            if isinstance(status, int) and 100 <= status < 600:
                return status
        status = getattr(e, "status", None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
    coded = re.search(r"\[(40[134])\]", str(chain[0])) if chain else None
    return int(coded[1]) if coded else None


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def hub_error(target: HubTarget, error: BaseException) -> CatdogError:
    """One exception of a hub client -> one typed, one-line error that says what to do."""
    if isinstance(error, CatdogError):
        return error
    chain = list(error_chain(error))
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    status = http_status(chain)
    kinds, ref, hub = target.errors, target.ref, target.hub
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        return kinds.disk_full(target.disk_full())
    if "GatedRepoError" in names:
        return kinds.access(
            f"{ref} is a gated {target.what}: accept its conditions at {target.page} while logged in, then "
            f"{target.token_hint}"
        )
    if status == 401 or "AuthenticationError" in names:
        return kinds.access(
            f"{ref}: {hub} answered 401 (not authorized): the {target.what} is private or gated, the credentials "
            f"are wrong, or the id is wrong; check the id and {target.token_hint}"
        )
    if status == 403 or "PermissionDeniedError" in names:
        return kinds.access(
            f"{ref}: {hub} answered 403 (forbidden): these credentials cannot read it; request access at "
            f"{target.page}, or {target.token_hint}"
        )
    if "RevisionNotFoundError" in names:
        return kinds.not_found(
            f"{target.name} has no revision {target.revision!r} on {hub} (404): pass an existing branch, tag or commit"
        )
    # huggingface_hub's LocalEntryNotFoundError (an EntryNotFoundError) means: not cached, and the hub not asked
    if status == 404 or (names & _NOT_FOUND and "LocalEntryNotFoundError" not in names):
        what = f"{target.id_hint} and the revision" if target.revision else target.id_hint
        return kinds.not_found(f"{ref} was not found on {hub} at {target.endpoint} (404): check {what}")
    if names & _CUT or "Consistency check failed" in str(error):
        return kinds.failed(
            f"the download of {ref} was interrupted ({first_line(error)}): run `{target.pull}` again; what was "
            "downloaded is kept and the download resumes"
        )
    if status is not None and status >= 500:
        return kinds.failed(f"{ref}: {hub} answered {status}; try again later")
    if names & _OFFLINE:
        return kinds.offline(target.not_cached(f"cannot connect to {target.endpoint}"))
    return kinds.failed(f"downloading {ref} failed: {type(error).__name__}: {first_line(error)}")
