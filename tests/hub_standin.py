"""A stand-in model hub for tests: just the endpoints that `huggingface_hub.snapshot_download` (and ModelScope's
`snapshot_download`) call, served from memory by a threaded `http.server` on 127.0.0.1.

Hugging Face (HF_ENDPOINT=url):
  GET  /api/models/{id}[/revision/{rev}]   model info: sha, siblings (sizes with ?blobs=True)
  GET  /api/models/{id}/tree/{rev}          the recursive file list
  HEAD /{id}/resolve/{rev}/{file}           ETag, X-Repo-Commit, Content-Length
  GET  /{id}/resolve/{rev}/{file}           the bytes; `Range: bytes=N-` answers 206
ModelScope (MODELSCOPE_ENDPOINT=url):
  GET  /api/v1/models/{id}/revisions, /api/v1/models/{id}, /api/v1/models/{id}/repo/files, /api/v1/models/{id}/repo
Hugging Face datasets: the same under /api/datasets/{id} and /datasets/{id}/resolve/{rev}/{file} (`add(...,
repo_type="dataset")`; cardData read from the README's YAML). ModelScope datasets: GET /api/v1/datasets/{id}/repo/tree
and /api/v1/datasets/{id}/repo?FilePath=. Kaggle (reached as an HTTP proxy for http://localhost, the kagglesdk's
local endpoint): POST /api/v1/competitions.CompetitionApiService/DownloadDataFile with basic auth, answered by a
redirect to /files/kaggle/{competition}/{file}. Plain files (archive URLs): GET /files/{name}, Range too.
Errors as the hubs send them: 404 + X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound, 401 for a repo
that needs a token (`Authorization: Bearer TOKEN`), 403 GatedRepo. `cut` makes the next GETs of a file send half
of it and close the connection."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    token: str | None = None  # private: needs this bearer token
    gated: bool = False

    def commit_for(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class StandinHub:
    """Repos in memory, a request log, and per-file connection cuts. Use as a context manager."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, dict]] = []  # (method, path, headers with lower-case names)
        self.cuts: dict[str, int] = {}  # file name -> how many more GETs to cut short
        self.datasets: dict[str, Repo] = {}  # Hugging Face / ModelScope dataset repos
        self.files: dict[str, bytes] = {}  # plain downloads at /files/{name}
        self.kaggle: dict[str, dict[str, bytes]] = {}  # competition -> {file name: bytes}
        self.kaggle_auth: tuple[str, str] = ("kaggle-user", "kaggle-key")
        self._server: ThreadingHTTPServer | None = None

    def add(
        self, repo_id: str, files: dict[str, bytes], *, refs=("main",), repo_type: str = "model", **repo_options
    ) -> str:
        """Add (or add a commit to) a repo; `refs` point at the new commit. Returns its 40-hex sha."""
        store = self.datasets if repo_type == "dataset" else self.repos
        repo = store.setdefault(repo_id, Repo(**repo_options))
        digest = hashlib.sha1(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        for ref in refs:
            repo.refs[ref] = sha
        return sha

    def cut(self, filename: str, times: int = 1) -> None:
        self.cuts[filename] = times

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, dict]]:
        return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StandinHub:
        hub = self

        class Handler(_Handler):
            standin = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StandinHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    standin: StandinHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # --- plumbing -------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str = "", head: bool = False) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message or code, "Content-Type": "application/json"}
        body = json.dumps({"error": message or code}).encode()
        self._send(status, body, headers, head=head)

    def _repo(self, repo_id: str, head: bool = False, store: dict | None = None) -> Repo | None:
        """The repo, or None after sending the 404/401/403 the hub would send."""
        repo = (self.standin.repos if store is None else store).get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(401, "RepoNotFound", "Invalid username or password.", head)
            return None
        if repo.gated and self.headers.get("Authorization") is None:
            self._error(403, "GatedRepo", "Access to this model is restricted", head)
            return None
        return repo

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_POST(self) -> None:
        self.standin.log.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._kaggle(unquote(urlsplit(self.path).path), json.loads(body or b"{}"))

    def _route(self, head: bool) -> None:
        self.standin.log.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        parts = urlsplit(self.path)  # an absolute URL when asked as a proxy
        path, query = unquote(parts.path), parse_qs(parts.query)
        if path.startswith("/files/"):
            return self._plain_file(path[len("/files/") :], head)
        if path.startswith("/api/v1/datasets/"):
            return self._modelscope_dataset(path[len("/api/v1/datasets/") :], query, head)
        if path.startswith("/api/datasets/"):
            return self._hf_api(path[len("/api/datasets/") :], query, self.standin.datasets)
        if path.startswith("/datasets/") and "/resolve/" in path:
            repo_id, rest = path[len("/datasets/") :].split("/resolve/", 1)
            revision, filename = rest.split("/", 1)
            return self._hf_file(repo_id, revision, filename, head, self.standin.datasets)
        if path.startswith("/api/v1/models/"):
            return self._modelscope(path[len("/api/v1/models/") :], query, head)
        if path.startswith("/api/models/"):
            return self._hf_api(path[len("/api/models/") :], query)
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            revision, filename = rest.split("/", 1)
            return self._hf_file(repo_id, revision, filename, head)
        self._error(404, "NotFound", f"no route for {path}", head)

    # --- Hugging Face ---------------------------------------------------------------------------------------
    def _hf_api(self, rest: str, query: dict, store: dict | None = None) -> None:
        owner, name, *tail = rest.split("/", 3)
        repo = self._repo(f"{owner}/{name}", store=store)
        if repo is None:
            return
        kind, revision = (tail + ["", ""])[:2] if tail else ("revision", "main")
        sha = repo.commit_for(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[sha]
        if kind == "tree":
            entries, folders = [], set()
            for p, data in sorted(files.items()):
                for i in range(1, p.count("/") + 1):
                    folders.add(p.rsplit("/", i)[0])
                entries.append({"type": "file", "oid": _etag(data), "size": len(data), "path": p})
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(folders)]
            return self._json(200, entries)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [{"rfilename": p} | ({"size": len(d)} if blobs else {}) for p, d in sorted(files.items())]
        info = {"id": f"{owner}/{name}", "sha": sha, "siblings": siblings, "private": bool(repo.token)}
        self._json(200, info | ({"cardData": _card_data(files)} if store is not None else {}))

    def _hf_file(self, repo_id: str, revision: str, filename: str, head: bool, store: dict | None = None) -> None:
        repo = self._repo(repo_id, head, store)
        if repo is None:
            return
        sha = repo.commit_for(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        data = repo.commits[sha].get(filename)
        if data is None:
            self.send_response(404)
            for k, v in {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha, "Content-Length": "0"}.items():
                self.send_header(k, v)
            return self.end_headers()
        headers = {"ETag": f'"{_etag(data)}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        self._file(data, filename, headers, head)

    def _file(self, data: bytes, filename: str, headers: dict, head: bool) -> None:
        """Serve bytes with Range support; a pending cut sends half the body and closes the connection."""
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged[len("bytes=") :].split("-")[0] or 0)
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers = headers | {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        if head:
            return self._send(200, b"", headers | {"Content-Length": str(len(data))}, head=True)
        name = filename.rsplit("/", 1)[-1]
        if self.standin.cuts.get(name, 0) > 0:
            self.standin.cuts[name] -= 1
            self.send_response(status)
            for k, v in (headers | {"Content-Length": str(len(body))}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(status, body, headers | {"Content-Length": str(len(body))})

    # --- ModelScope -----------------------------------------------------------------------------------------
    def _modelscope(self, rest: str, query: dict, head: bool) -> None:
        owner, name, *tail = rest.split("/")
        repo = self.standin.repos.get(f"{owner}/{name}")
        if repo is None:  # ModelScope answers 200 with a failure envelope as often as a 404
            return self._json(404, {"Code": 10010205001, "Message": "model not found", "Success": False})
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._json(401, {"Code": 10010103001, "Message": "unauthorized", "Success": False})
        revision = query.get("Revision", ["master"])[0]
        sha = repo.commit_for("main" if revision == "master" else revision)  # ModelScope's default branch
        route = "/".join(tail)
        if route == "revisions":
            tags = [{"Revision": r, "CommitId": s} for r, s in repo.refs.items() if r != "master"]
            data = {"RevisionMap": {"Tags": tags, "Branches": [{"Revision": "master"}]}}
            return self._json(200, {"Code": 200, "Data": data, "Success": True})
        if route == "":
            data = {"Path": owner, "Name": name, "Id": 1, "LatestRevision": "master"}
            return self._json(200, {"Code": 200, "Data": data, "Success": True})
        if sha is None:
            return self._json(404, {"Code": 10010205001, "Message": f"revision {revision} not found", "Success": False})
        files = repo.commits[sha]
        if route == "repo/files":
            entries = [
                {"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": len(d), "Sha256": _etag(d)}
                for p, d in sorted(files.items())
            ]
            return self._json(200, {"Code": 200, "Data": {"Files": entries}, "Success": True})
        if route == "repo":
            file_path = query.get("FilePath", [""])[0]
            data = files.get(file_path)
            if data is None:
                return self._json(404, {"Code": 10010205001, "Message": "file not found", "Success": False})
            return self._file(data, file_path, {"Accept-Ranges": "bytes"}, head)
        self._json(404, {"Code": 404, "Message": f"no route {route}", "Success": False})

    # --- ModelScope datasets, Kaggle, plain files ------------------------------------------------------------
    def _modelscope_dataset(self, rest: str, query: dict, head: bool) -> None:
        owner, name, *tail = rest.split("/")
        repo = self.standin.datasets.get(f"{owner}/{name}")
        if repo is None:
            return self._json(404, {"Code": 10010205001, "Message": "dataset not found", "Success": False})
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._json(401, {"Code": 10010103001, "Message": "unauthorized", "Success": False})
        revision = query.get("Revision", ["master"])[0]
        sha = repo.commit_for("main" if revision == "master" else revision)
        if sha is None:
            return self._json(404, {"Code": 10010205001, "Message": f"revision {revision} not found", "Success": False})
        files = repo.commits[sha]
        if tail == ["repo", "tree"]:
            entries = [
                {"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": len(d), "Sha256": _etag(d)}
                for p, d in sorted(files.items())
            ]
            return self._json(200, {"Code": 200, "Data": {"Files": entries}, "Success": True})
        if tail == ["repo"] and query.get("FilePath", [""])[0] in files:
            file_path = query["FilePath"][0]
            return self._file(files[file_path], file_path, {"Accept-Ranges": "bytes"}, head)
        self._json(404, {"Code": 10010205001, "Message": "file not found", "Success": False})

    def _kaggle(self, path: str, body: dict) -> None:
        import base64

        if not path.endswith("/competitions.CompetitionApiService/DownloadDataFile"):
            return self._json(404, {"code": 404, "message": f"no route {path}"})
        user, key = self.standin.kaggle_auth
        if self.headers.get("Authorization") != "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode():
            return self._json(401, {"code": 401, "message": "Unauthenticated"})
        competition = body.get("competitionName") or body.get("competition_name")
        file_name = body.get("fileName") or body.get("file_name")
        if file_name not in self.standin.kaggle.get(competition, {}):
            return self._json(404, {"code": 404, "message": "Competition or file not found"})
        self._send(302, b"", {"Location": f"http://localhost/files/kaggle/{competition}/{file_name}"})

    def _plain_file(self, name: str, head: bool) -> None:
        if name.startswith("kaggle/"):
            _, competition, file_name = name.split("/", 2)
            data = self.standin.kaggle.get(competition, {}).get(file_name)
        else:
            data = self.standin.files.get(name)
        if data is None:
            return self._send(404, b"not found", head=head)
        self._file(data, name, {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}, head)


def _card_data(files: dict[str, bytes]) -> dict:
    """A dataset's cardData as the Hub sends it: the YAML block at the top of its README.md."""
    import yaml

    text = files.get("README.md", b"").decode()
    if not text.startswith("---"):
        return {}
    return yaml.safe_load(text.split("---", 2)[1]) or {}


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
