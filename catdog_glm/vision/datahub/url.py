"""A plain archive URL (`https://host/path/cats.zip`, .tar.gz too) of an ImageFolder or of Kaggle-style
cat.1.jpg files, downloaded with the standard library: into a .part file that a later attempt continues with an
HTTP Range request (and a few retries within one attempt), then checked against `--sha256` when given."""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from catdog_glm.errors import DataError, DatasetHubError
from catdog_glm.vision.datahub.base import DataRef, Fetched, PullProgress, Source, check_disk_space, hub_errors
from catdog_glm.vision.datahub.build import ARCHIVES

CHUNK = 1 << 20
RETRIES = 3  # resumed requests within one attempt after a connection is cut


class ArchiveSource(Source):
    key = "url"
    hub = "the server"
    token_hint = "use a URL that needs no login"

    def parse(self, text: str) -> DataRef | None:
        parts = urlsplit(text.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return None
        return DataRef(self.key, text.strip())

    def page(self, ref: DataRef) -> str:
        return ref.name  # the archive's own address

    def fetch(self, ref: DataRef, raw: Path, progress: PullProgress, *, sha256: str | None, cache: Path) -> Fetched:
        self.endpoint = "{0.scheme}://{0.netloc}".format(urlsplit(ref.name))
        name = PurePosixPath(urlsplit(ref.name).path).name or "download"
        if not name.lower().endswith(ARCHIVES):
            name += ".zip"  # what an extension-less link most often serves; a tar is detected by its content too
        target = raw / name
        for stale in raw.iterdir():  # an earlier attempt's extraction, or files from another URL's name
            if stale.name not in (name, name + ".part"):
                _remove(stale)
        if not target.is_file():
            with hub_errors(ref, self, cache):
                self._download(ref, target, progress)
        if sha256:
            digest = _sha256(target)
            if digest != sha256.lower().strip():
                target.unlink()
                raise DataError(
                    f"{ref} does not match --sha256: expected {sha256.lower().strip()}, downloaded {digest}; the "
                    "file was deleted (check the URL and the checksum)"
                )
        return Fetched(page=ref.name, folder=raw)

    def _download(self, ref: DataRef, target: Path, progress: PullProgress) -> None:
        part = target.with_name(target.name + ".part")
        for attempt in range(RETRIES + 1):
            have = part.stat().st_size if part.is_file() else 0
            request = urllib.request.Request(ref.name, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    if have and response.status != 206:  # the server ignores ranges: start over
                        have = 0
                    total = response.headers.get("Content-Length")
                    total = int(total) + have if total is not None else None
                    if have == 0 and total:
                        check_disk_space(ref, 2 * total, target.parent)
                    with part.open("ab" if have else "wb") as f:
                        done = have
                        while chunk := response.read(CHUNK):
                            f.write(chunk)
                            done += len(chunk)
                            progress.on_bytes(total, done)
                    if total is not None and done < total:
                        raise http.client.IncompleteRead(b"", total - done)
                part.replace(target)
                return
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # asked past the end: the .part was complete or stale; start over
                    part.unlink()
                    continue
                raise
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:
                if attempt == RETRIES:
                    raise DatasetHubError(
                        f"the download of {ref} was interrupted ({type(e).__name__}): run `catdog data pull {ref}` "
                        "again; what was downloaded is kept and the download resumes"
                    ) from e
                time.sleep(0.2 * (attempt + 1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
