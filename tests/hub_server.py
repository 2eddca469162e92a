"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only, 127.0.0.1 only).

It implements the part of the Hub HTTP API that the real ``huggingface_hub`` client (2.x) and ``transformers`` use
to create repos, push commits (``create_commit``, ``upload_file``/``upload_folder``, ``push_to_hub``) and download
them again (``hf_hub_download``, ``snapshot_download``, ``from_pretrained``), with git-like revisions: every commit
gets a 40-hex id, branches / tags / ``refs/pr/N`` point at commits, and any of them (or a commit id, full or a
unique prefix of 7+ characters) can be downloaded.

Two listeners share one state. The *hub* (``url``) serves the API, ``/resolve`` and the git-LFS batch API. The
*storage* listener (``storage_url``, another port, hence another origin) plays the LFS bucket/CDN: LFS uploads go
there (single PUT or multipart), and ``/resolve`` of an LFS file answers ``302`` to it with ``X-Linked-Etag`` /
``X-Linked-Size``, exactly like the Hub, so the client takes its "signed CDN URL" path and must not forward the
``Authorization`` header there (``stats["storage_requests_with_auth"]`` counts violations).

Xet: ``huggingface_hub`` uploads through Xet whenever ``hf_xet`` is importable, decided on the client side only
(``utils._runtime.is_xet_available``: the package is installed and ``HF_HUB_DISABLE_XET`` is not set). No server
answer makes it fall back, so clients that *upload* here must set ``HF_HUB_DISABLE_XET=1`` (or, in-process,
``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``). The ``xet-*-token`` routes answer 501 with that advice.
Downloads need nothing: the server never sends ``X-Xet-Hash`` nor ``xetHash``, so the client uses plain HTTP.

Routes (``{t}`` = model/dataset/space, ``{repo}`` = ``namespace/name``; dataset/space file routes carry the
``datasets/`` / ``spaces/`` prefix)::

    GET  /api/whoami-v2                         POST /api/repos/create | /api/repos/delete
    POST /api/validate-yaml                     PUT  /api/{t}s/{repo}/settings
    GET  /api/{t}s/{repo}[/revision/{rev}]      (repo info: sha, siblings, cardData, config, safetensors)
    GET  /api/{t}s/{repo}/tree/{rev}[/{path}]   (?recursive, ?expand, Link-header pagination)
    POST /api/{t}s/{repo}/paths-info/{rev}      GET /api/{t}s/{repo}/refs | /commits/{rev}
    POST|DELETE /api/{t}s/{repo}/branch/{name}  POST /api/{t}s/{repo}/tag/{rev}, DELETE .../tag/{name}
    POST /api/{t}s/{repo}/preupload/{rev}       POST /api/{t}s/{repo}/commit/{rev}  (ndjson; ?create_pr=1)
    POST /{repo}.git/info/lfs/objects/batch     POST /{repo}.git/info/lfs/objects/verify
    HEAD|GET /{repo}/resolve/{rev}/{path}       (regular: 200 + ETag/X-Repo-Commit; LFS: 302 to storage)
    storage: PUT /lfs/{oid}, PUT /lfs-part/{upload}/{n}, POST /lfs-complete/{upload}, HEAD|GET /lfs/{oid} (+Range)

Anything else answers 404 and is recorded in ``stats["unhandled"]`` so a test can assert that a client used
nothing this server does not implement. Writes need ``Authorization: Bearer <token>`` (any non-empty token, or
exactly ``token=`` when given); private repos are invisible (404) without it. Bounded: request bodies are
capped (``max_body_bytes``), at most ``max_connections`` connections are served at once, idle keep-alive
connections time out.

    url, stop = start_hub_server()        # or: with HubServer() as hub: hub.url, hub.stats, hub.state
"""

from __future__ import annotations

import base64
import collections
import fnmatch
import hashlib
import hmac
import io
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

try:  # only used to read README.md metadata; pyyaml is a dependency of transformers and huggingface_hub
    import yaml
except ImportError:  # pragma: no cover
    yaml = None


__all__ = ["HubServer", "HubState", "start_hub_server"]

REPO_TYPES = ("model", "dataset", "space")
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
COMMIT_RE = re.compile(r"[0-9a-f]{7,40}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
REGULAR_MAX_BYTES = 10 * 1024 * 1024  # the Hub sends bigger files to LFS

# The .gitattributes the Hub writes into every new repo (LFS patterns).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
)


class HubError(Exception):
    """An HTTP error answered the way the Hub does (JSON body + X-Error-Code / X-Error-Message headers)."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _attr_match(pattern: str, path: str) -> bool:
    """gitattributes / gitignore style: a pattern without '/' matches the basename anywhere."""
    pattern = pattern.strip().rstrip("/")
    if not pattern:
        return False
    if "/" not in pattern:
        return fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern)
    pattern = pattern.lstrip("/")
    if pattern.endswith("/**/*") and path.startswith(pattern[: -len("/**/*")] + "/"):
        return True
    return fnmatch.fnmatch(path, pattern)


class Entry:
    """One file of a commit: content address (sha256), size, LFS or regular, and its git blob oid."""

    __slots__ = ("sha256", "size", "lfs", "git_oid")

    def __init__(self, sha256: str, size: int, lfs: bool, git_oid: str):
        self.sha256, self.size, self.lfs, self.git_oid = sha256, size, lfs, git_oid

    def tree_json(self, path: str) -> dict:
        out = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            out["lfs"] = {
                "oid": self.sha256,
                "size": self.size,
                "pointerSize": len(lfs_pointer(self.sha256, self.size)),
            }
        return out


class Commit:
    __slots__ = ("oid", "parents", "files", "title", "message", "date", "author")

    def __init__(self, oid, parents, files, title, message, date, author):
        self.oid, self.parents, self.files = oid, parents, files
        self.title, self.message, self.date, self.author = title, message, date, author


class Repo:
    def __init__(self, repo_type: str, repo_id: str, private: bool, author: str):
        self.type, self.id, self.private, self.author = repo_type, repo_id, private, author
        self.created_at = _now_iso()
        self.branches: dict[str, str] = {}  # "main", "v2", "refs/pr/1" -> commit oid
        self.tags: dict[str, str] = {}
        self.commits: dict[str, Commit] = {}
        self.num_prs = 0

    def resolve(self, revision: str) -> str:
        rev = revision
        for prefix in ("refs/heads/", "refs/tags/"):
            if rev.startswith(prefix) and rev[len(prefix) :] in (self.branches if "heads" in prefix else self.tags):
                rev = rev[len(prefix) :]
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if COMMIT_RE.fullmatch(rev):
            found = [oid for oid in self.commits if oid.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubState:
    """Repositories (metadata in memory, mirrored to ``<root>/repos/**/repo.json``) and a content-addressed blob
    store (``<root>/blobs``). All methods are thread-safe."""

    def __init__(self, root: str | os.PathLike, user: str = "tester"):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self._counter = 0

    # blobs ------------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_blob_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{sha}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def adopt_blob_file(self, tmp_path: Path, sha256: str) -> None:
        path = self.blob_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, path)

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    def new_upload_path(self) -> Path:
        with self.lock:
            self._counter += 1
            return self.root / "uploads" / f"{os.getpid()}-{self._counter}-{os.urandom(4).hex()}"

    # repos ------------------------------------------------------------------------------------------------
    def get_repo(self, repo_type: str, repo_id: str, authorized: bool = True) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": None})
            repo = Repo(repo_type, repo_id, private, author=repo_id.split("/")[0])
            self.repos[(repo_type, repo_id)] = repo
            attributes = DEFAULT_GITATTRIBUTES.encode()
            sha = self.put_blob_bytes(attributes)
            files = {".gitattributes": Entry(sha, len(attributes), False, git_blob_oid(attributes))}
            self._add_commit(repo, "main", [], files, "initial commit", "")
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            if self.repos.pop((repo_type, repo_id), None) is None:
                raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
            shutil.rmtree(self.root / "repos" / repo_type / repo_id, ignore_errors=True)

    def _add_commit(self, repo: Repo, branch: str, parents: list[str], files: dict, title: str, message: str) -> Commit:
        self._counter += 1
        material = json.dumps(
            [
                repo.type,
                repo.id,
                parents,
                sorted((p, e.git_oid) for p, e in files.items()),
                title,
                message,
                time.time_ns(),
                self._counter,
            ]
        )
        oid = hashlib.sha1(material.encode()).hexdigest()
        commit = Commit(oid, parents, files, title, message, _now_iso(), self.user)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        self._save(repo)
        return commit

    def _save(self, repo: Repo) -> None:
        folder = self.root / "repos" / repo.type / repo.id
        folder.mkdir(parents=True, exist_ok=True)
        data = {
            "type": repo.type,
            "id": repo.id,
            "private": repo.private,
            "branches": repo.branches,
            "tags": repo.tags,
            "commits": {
                c.oid: {
                    "parents": c.parents,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "files": {
                        p: {"sha256": e.sha256, "size": e.size, "lfs": e.lfs, "oid": e.git_oid}
                        for p, e in c.files.items()
                    },
                }
                for c in repo.commits.values()
            },
        }
        (folder / "repo.json").write_text(json.dumps(data, indent=1))

    def is_lfs_path(self, files: dict[str, Entry], path: str, size: int, sample: bytes) -> bool:
        if size > REGULAR_MAX_BYTES or b"\0" in sample:
            return True
        attributes = files.get(".gitattributes")
        if attributes is None:
            return False
        for line in self.read_blob(attributes.sha256).decode(errors="replace").splitlines():
            parts = line.split()
            if (
                len(parts) >= 2
                and not parts[0].startswith("#")
                and "filter=lfs" in parts[1:]
                and _attr_match(parts[0], path)
            ):
                return True
        return False

    def commit(
        self, repo: Repo, revision: str, header: dict, ops: list[tuple[str, dict]], create_pr: bool, url: str
    ) -> dict:
        with self.lock:
            if create_pr:
                base = repo.resolve(revision)
                repo.num_prs += 1
                branch = f"refs/pr/{repo.num_prs}"
                repo.branches[branch] = base
            else:
                branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
                if branch not in repo.branches:
                    if revision in repo.tags or COMMIT_RE.fullmatch(revision):
                        raise HubError(400, f"Can only commit to a branch, not to '{revision}'")
                    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent and not create_pr and not head.startswith(parent):
                raise HubError(412, f"A commit has happened since {parent}: the head of {branch} is {head}")
            files = dict(repo.commits[head].files)
            for key, value in ops:
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                    data = base64.b64decode(value.get("content", ""))
                    files[path] = Entry(self.put_blob_bytes(data), len(data), False, git_blob_oid(data))
                elif key == "lfsFile":
                    oid = value.get("oid", "")
                    if value.get("algo", "sha256") != "sha256" or not self.has_blob(oid):
                        raise HubError(422, f"LFS object {oid} for '{path}' was not uploaded")
                    size = self.blob_path(oid).stat().st_size
                    if value.get("size") not in (None, size):
                        raise HubError(422, f"LFS object {oid}: size {value.get('size')} != {size}")
                    files[path] = Entry(oid, size, True, git_blob_oid(lfs_pointer(oid, size)))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
                if key in ("file", "lfsFile"):
                    self._check_path(path)
            commit = self._add_commit(
                repo, branch, [head], files, header.get("summary") or "Update", header.get("description") or ""
            )
            out = {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{url}/{URL_PREFIX[repo.type]}{repo.id}/commit/{commit.oid}",
                "hookOutput": "",
            }
            if create_pr:
                out["pullRequestUrl"] = f"{url}/{URL_PREFIX[repo.type]}{repo.id}/discussions/{repo.num_prs}"
            return out

    @staticmethod
    def _check_path(path: str) -> None:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or ".git" in parts:
            raise HubError(400, f"Invalid path in commit: {path!r}")


# ---------------------------------------------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, hub: "HubServer", role: str, host: str, port: int):
        self.hub, self.role = hub, role
        super().__init__((host, port), _Handler)

    def process_request(self, request, client_address):
        # at most `max_connections` connections are served at once (per listener)
        if not self.hub._slots[self.role].acquire(timeout=30):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.hub._slots[self.role].release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "deem-test-hub/1.0"
    timeout = 30  # idle keep-alive connections (and stalled requests) are closed after this many seconds

    # plumbing ----------------------------------------------------------------------------------------------
    def log_message(self, fmt, *args):
        self.server.hub.log.append(f"{self.server.role} {self.address_string()} {fmt % args}")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str):
        hub: HubServer = self.server.hub
        self._body_consumed = False
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        self.segments = [unquote(s) for s in split.path.split("/")[1:]]
        with hub.state.lock:
            hub.stats["requests"] += 1
            hub.stats["routes"][f"{self.server.role} {method} {self._route_name()}"] += 1
        try:
            if self.server.role == "storage":
                if self.headers.get("Authorization"):
                    with hub.state.lock:
                        hub.stats["storage_requests_with_auth"] += 1
                handled = self._storage(method)
            else:
                handled = self._hub(method)
            if not handled:
                with hub.state.lock:
                    hub.stats["unhandled"].append(f"{self.server.role} {method} {self.path}")
                raise HubError(404, f"Not implemented by the test hub: {method} {split.path}")
        except HubError as err:
            self._drain()
            body = dict(err.body or {})
            body.setdefault("error", err.message)
            headers = {"X-Error-Message": err.message.replace("\n", " ")[:500], **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send_json(err.status, body, headers, method)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - report server bugs as 500 with the message
            self._drain()
            with hub.state.lock:
                hub.stats["errors"].append(f"{method} {self.path}: {exc!r}")
            self._send_json(500, {"error": f"test hub internal error: {exc!r}"}, {}, method)

    def _route_name(self) -> str:
        s = self.segments
        if s[:1] == ["api"]:
            if len(s) > 2 and s[1] in ("models", "datasets", "spaces"):
                return f"/api/{s[1]}/*/*/{s[4]}" if len(s) > 4 else f"/api/{s[1]}/*/*"
            return "/" + "/".join(s[:3])
        if len(s) > 2 and s[-2] == "objects" and any(x.endswith(".git") for x in s):
            return "git-lfs/" + s[-1]
        for marker in ("resolve", "lfs", "lfs-part", "lfs-complete"):
            if marker in s:
                return marker
        return "/".join(s[-3:])

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            return False
        token = self.server.hub.token
        return token is None or hmac.compare_digest(auth[7:].strip(), token)

    def _require_auth(self) -> None:
        if not self._authorized():
            raise HubError(
                401,
                "Invalid credentials in Authorization header"
                if self.headers.get("Authorization")
                else "Authentication required: pass a token",
            )

    def _body_chunks(self):
        """Yields the request body (Content-Length or chunked), enforcing max_body_bytes."""
        limit = self.server.hub.max_body_bytes
        self._body_consumed = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            total = 0
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                total += size
                if total > limit:
                    self.close_connection = True
                    raise HubError(413, f"Request body larger than {limit} bytes")
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, 1 << 20))
                    if not data:
                        raise ConnectionError("client closed the connection")
                    remaining -= len(data)
                    yield data
                self.rfile.readline(65537)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > limit:
                self.close_connection = True
                raise HubError(413, f"Request body larger than {limit} bytes")
            remaining = length
            while remaining:
                data = self.rfile.read(min(remaining, 1 << 20))
                if not data:
                    raise ConnectionError("client closed the connection")
                remaining -= len(data)
                yield data

    def _body(self, limit: int = 256 * 1024 * 1024) -> bytes:
        buf = io.BytesIO()
        for data in self._body_chunks():
            buf.write(data)
            if buf.tell() > limit:
                self.close_connection = True
                raise HubError(413, f"Request body larger than {limit} bytes")
        return buf.getvalue()

    def _json_body(self):
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from None

    def _drain(self):
        if not self._body_consumed:
            try:
                for _ in self._body_chunks():
                    pass
            except HubError:
                self.close_connection = True

    def _send(self, status: int, body: bytes, headers: dict, method: str, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, payload, headers: dict | None = None, method: str = "GET"):
        self._send(status, json.dumps(payload).encode(), headers or {}, method)

    # hub routes --------------------------------------------------------------------------------------------
    def _hub(self, method: str) -> bool:
        s = self.segments
        if s[:1] == ["api"]:
            return self._api(method, s[1:])
        # optional datasets/ spaces/ prefix for file and git routes
        repo_type = "model"
        if s and s[0] in ("datasets", "spaces"):
            repo_type, s = s[0][:-1], s[1:]
        if len(s) >= 5 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{s[0]}/{s[1][:-4]}"
            if method == "POST" and s[5:] == ["batch"]:
                return self._lfs_batch(repo_type, repo_id)
            if method == "POST" and s[5:] == ["verify"]:
                return self._lfs_verify(repo_type, repo_id)
            return False
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, repo_type, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        return False

    def _api(self, method: str, s: list[str]) -> bool:
        hub, state = self.server.hub, self.server.hub.state
        if s == ["whoami-v2"] and method == "GET":
            self._require_auth()
            self._send_json(
                200,
                {
                    "type": "user",
                    "id": "0" * 24,
                    "name": state.user,
                    "fullname": state.user,
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
                },
            )
            return True
        if s == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if s[:1] == ["repos"] and method == "POST" and len(s) == 2:
            self._require_auth()
            payload = self._json_body()
            repo_type = payload.get("type") or "model"
            name, org = payload.get("name") or "", payload.get("organization") or state.user
            if (
                repo_type not in REPO_TYPES
                or not NAME_RE.fullmatch(name)
                or not NAME_RE.fullmatch(org)
                or "--" in name
                or ".." in name
            ):
                raise HubError(400, f"Invalid repo name or type: {org}/{name} ({repo_type})")
            repo_id = f"{org}/{name}"
            url = f"{hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
            if s[1] == "create":
                private = payload.get("private")
                if private is None:
                    private = payload.get("visibility") in ("private", "protected")
                try:
                    state.create_repo(repo_type, repo_id, bool(private))
                except HubError as err:
                    err.body = {"url": url}
                    raise
                self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})
                return True
            if s[1] == "delete":
                state.delete_repo(repo_type, repo_id)
                self._send_json(200, {})
                return True
            return False
        if len(s) < 3 or s[0] not in ("models", "datasets", "spaces"):
            return False
        repo_type, repo_id, rest = s[0][:-1], f"{s[1]}/{s[2]}", s[3:]
        with state.lock:
            repo = state.get_repo(repo_type, repo_id, authorized=self._authorized())
        if not rest and method == "GET":
            return self._info(repo, "main")
        if rest[:1] == ["revision"] and len(rest) >= 2 and method == "GET":
            return self._info(repo, "/".join(rest[1:]))
        if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
            return self._tree(repo, rest[1], "/".join(rest[2:]))
        if rest[:1] == ["paths-info"] and len(rest) >= 2 and method == "POST":
            return self._paths_info(repo, "/".join(rest[1:]))
        if rest == ["refs"] and method == "GET":
            return self._refs(repo)
        if rest[:1] == ["commits"] and len(rest) >= 2 and method == "GET":
            return self._commits(repo, "/".join(rest[1:]))
        if rest[:1] and re.fullmatch(r"xet-(read|write)-token", rest[0]):
            raise HubError(
                501,
                "This test hub does not implement Xet storage: upload with HF_HUB_DISABLE_XET=1 "
                "(huggingface_hub then uses the preupload + LFS + commit protocol).",
            )
        # writes
        if rest[:1] in (["preupload"], ["commit"], ["branch"], ["tag"], ["settings"]):
            self._require_auth()
        if rest[:1] == ["preupload"] and len(rest) >= 2 and method == "POST":
            return self._preupload(repo, "/".join(rest[1:]))
        if rest[:1] == ["commit"] and len(rest) >= 2 and method == "POST":
            return self._commit(repo, "/".join(rest[1:]))
        if rest[:1] == ["branch"] and len(rest) >= 2 and method in ("POST", "DELETE"):
            return self._branch(repo, "/".join(rest[1:]), method)
        if rest[:1] == ["tag"] and len(rest) >= 2 and method in ("POST", "DELETE"):
            return self._tag(repo, "/".join(rest[1:]), method)
        if rest == ["settings"] and method == "PUT":
            payload = self._json_body()
            with state.lock:
                if "private" in payload:
                    repo.private = bool(payload["private"])
                if payload.get("visibility"):
                    repo.private = payload["visibility"] != "public"
                state._save(repo)
            self._send_json(200, {})
            return True
        return False

    # -- metadata --------------------------------------------------------------------------------------------
    def _read_text(self, entry: Entry | None) -> str | None:
        if entry is None or entry.size > 1 << 20:
            return None
        return self.server.hub.state.read_blob(entry.sha256).decode("utf-8", errors="replace")

    def _card_data(self, files: dict) -> dict:
        text = self._read_text(files.get("README.md"))
        if not text or yaml is None:
            return {}
        match = re.match(r"^\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
        if not match:
            return {}
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    def _safetensors_info(self, files: dict) -> dict | None:
        params: collections.Counter = collections.Counter()
        found = False
        for path, entry in files.items():
            if not path.endswith(".safetensors"):
                continue
            try:
                with open(self.server.hub.state.blob_path(entry.sha256), "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(min(n, 100_000_000)))
            except (OSError, ValueError):
                continue
            found = True
            for name, info in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in info.get("shape", []):
                        count *= dim
                    params[info.get("dtype", "?")] += count
        return {"parameters": dict(params), "total": sum(params.values())} if found else None

    def _info(self, repo: Repo, revision: str) -> bool:
        hub = self.server.hub
        with hub.state.lock:
            oid = repo.resolve(revision)
            commit = repo.commits[oid]
            files = dict(commit.files)
        card = self._card_data(files)
        tags = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
        config = None
        if "config.json" in files:
            try:
                full = json.loads(self._read_text(files["config.json"]) or "{}")
                config = {
                    k: full[k] for k in ("architectures", "model_type", "auto_map", "tokenizer_config") if k in full
                }
            except ValueError:
                config = None
        for extra in ([card.get("library_name")] if card.get("library_name") else []) + (
            ["safetensors"] if any(p.endswith(".safetensors") for p in files) else []
        ):
            if extra not in tags:
                tags.append(extra)
        if card.get("license") and f"license:{card['license']}" not in tags:
            tags.append(f"license:{card['license']}")
        for base in [card["base_model"]] if isinstance(card.get("base_model"), str) else card.get("base_model") or []:
            tags.append(f"base_model:{base}")
        siblings = []
        for path in sorted(files):
            entry = files[path]
            sib = {"rfilename": path, "size": entry.size, "blobId": entry.git_oid}
            if entry.lfs:
                sib["lfs"] = {
                    "sha256": entry.sha256,
                    "size": entry.size,
                    "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
                }
            siblings.append(sib)
        data = {
            "_id": hashlib.sha1(f"{repo.type}/{repo.id}".encode()).hexdigest()[:24],
            "id": repo.id,
            "author": repo.author,
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
            "cardData": card or None,
            "usedStorage": sum(e.size for e in files.values()),
            "spaces": [],
        }
        if repo.type == "model":
            data.update(
                modelId=repo.id,
                library_name=card.get("library_name"),
                pipeline_tag=card.get("pipeline_tag"),
                config=config,
            )
            safetensors = self._safetensors_info(files)
            if safetensors:
                data["safetensors"] = safetensors
        self._send_json(200, data)
        return True

    def _entries(self, files: dict, oid: str, path: str, recursive: bool) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        out, folders = [], {}
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            if "/" in rest:
                parts = rest.split("/")
                for depth in range(1, len(parts) if recursive else 2):
                    folder = prefix + "/".join(parts[:depth])
                    folders.setdefault(folder, hashlib.sha1(f"{oid}:{folder}".encode()).hexdigest())
                if not recursive:
                    continue
            out.append(files[p].tree_json(p))
        out += [
            {"type": "directory", "oid": tree_oid, "size": 0, "path": folder} for folder, tree_oid in folders.items()
        ]
        return sorted(out, key=lambda e: e["path"])

    def _last_commit(self, repo: Repo, head: str, path: str) -> dict:
        """The newest first-parent commit that changed `path` (file or folder)."""

        def state_of(commit: Commit):
            if path in commit.files:
                return commit.files[path].git_oid
            return tuple(sorted((p, e.git_oid) for p, e in commit.files.items() if p.startswith(path + "/")))

        commit = repo.commits[head]
        while commit.parents and state_of(repo.commits[commit.parents[0]]) == state_of(commit):
            commit = repo.commits[commit.parents[0]]
        return {"id": commit.oid, "title": commit.title, "date": commit.date}

    def _tree(self, repo: Repo, revision: str, path: str) -> bool:
        hub = self.server.hub
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        with hub.state.lock:
            oid = repo.resolve(revision)
            files = repo.commits[oid].files
            path = path.strip("/")
            if path and path in files:
                raise HubError(400, f"'{path}' is a file, not a folder")
            if path and not any(p.startswith(path + "/") for p in files):
                raise HubError(
                    404, f"Path {path} does not exist at {revision}", "EntryNotFound", {"X-Repo-Commit": oid}
                )
            entries = self._entries(files, oid, path, recursive)
            if expand:
                for e in entries:
                    e["lastCommit"] = self._last_commit(repo, oid, e["path"])
        page = hub.tree_page_size if not expand else min(hub.tree_page_size, 50)
        start = int(self.query.get("cursor", ["0"])[0] or 0)
        headers = {"X-Repo-Commit": oid}
        if start + page < len(entries):
            query = {k: v[0] for k, v in self.query.items()}
            query["cursor"] = str(start + page)
            headers["Link"] = f'<{hub.url}{urlsplit(self.path).path}?{urlencode(query)}>; rel="next"'
        self._send_json(200, entries[start : start + page], headers)
        return True

    def _paths_info(self, repo: Repo, revision: str) -> bool:
        raw = self._body()
        if "json" in self.headers.get("Content-Type", ""):
            payload = json.loads(raw or b"{}")
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() in ("1", "true")
        with self.server.hub.state.lock:
            oid = repo.resolve(revision)
            files = repo.commits[oid].files
            out = []
            for path in paths if isinstance(paths, list) else [paths]:
                path = path.strip("/")
                if path in files:
                    entry = files[path].tree_json(path)
                elif any(p.startswith(path + "/") for p in files):
                    entry = {
                        "type": "directory",
                        "oid": hashlib.sha1(f"{oid}:{path}".encode()).hexdigest(),
                        "size": 0,
                        "path": path,
                    }
                else:
                    continue
                if expand:
                    entry["lastCommit"] = self._last_commit(repo, oid, path)
                out.append(entry)
        self._send_json(200, out, {"X-Repo-Commit": oid})
        return True

    def _refs(self, repo: Repo) -> bool:
        with self.server.hub.state.lock:
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                for b, c in repo.branches.items()
                if not b.startswith("refs/")
            ]
            prs = [
                {"name": b, "ref": b, "targetCommit": c} for b, c in repo.branches.items() if b.startswith("refs/pr/")
            ]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in repo.tags.items()]
        include_prs = self.query.get("include_prs", ["0"])[0] in ("1", "true", "True")
        self._send_json(
            200, {"branches": branches, "converts": [], "tags": tags, **({"pullRequests": prs} if include_prs else {})}
        )
        return True

    def _commits(self, repo: Repo, revision: str) -> bool:
        with self.server.hub.state.lock:
            oid = repo.resolve(revision)
            out = []
            while oid:
                c = repo.commits[oid]
                out.append(
                    {
                        "id": c.oid,
                        "title": c.title,
                        "message": c.message,
                        "authors": [{"user": c.author}],
                        "date": c.date,
                        "formatted": {"title": c.title, "message": c.message},
                    }
                )
                oid = c.parents[0] if c.parents else None
        self._send_json(200, out)
        return True

    def _validate_yaml(self) -> bool:
        payload = self._json_body()
        content = payload.get("content") or ""
        match = re.match(r"^\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", content, re.S)
        if not match:
            self._send_json(
                200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
            )
            return True
        errors = []
        if yaml is not None:
            try:
                data = yaml.safe_load(match.group(1))
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "YAML metadata must be a mapping"})
                elif data:
                    for key in ("tags", "datasets", "language"):
                        if key in data and not isinstance(data[key], (list, str)):
                            errors.append({"message": f'"{key}" must be a string or a list of strings'})
                    if "license" in data and not isinstance(data["license"], str):
                        errors.append({"message": '"license" must be a string'})
                    if "base_model" in data and not isinstance(data["base_model"], (list, str)):
                        errors.append({"message": '"base_model" must be a string or a list of strings'})
            except yaml.YAMLError as exc:
                errors.append({"message": f"Invalid YAML: {exc}"})
        if errors:
            raise HubError(400, "Invalid metadata in README.md", body={"errors": errors, "warnings": []})
        self._send_json(200, {"errors": [], "warnings": []})
        return True

    # -- writes ----------------------------------------------------------------------------------------------
    def _preupload(self, repo: Repo, revision: str) -> bool:
        state = self.server.hub.state
        payload = self._json_body()
        with state.lock:
            oid = repo.resolve(revision)
            files = repo.commits[oid].files
            gitignore = payload.get("gitIgnore")
            if gitignore is None:
                gitignore = self._read_text(files.get(".gitignore")) or ""
            patterns = [line.strip() for line in gitignore.splitlines() if line.strip() and not line.startswith("#")]
            out = []
            for f in payload.get("files", []):
                path, size = f["path"], int(f.get("size", 0))
                sample = base64.b64decode(f.get("sample", ""))
                lfs = state.is_lfs_path(files, path, size, sample)
                existing = files.get(path)
                remote_oid = None
                if existing is not None:
                    remote_oid = existing.sha256 if existing.lfs else git_blob_oid(state.read_blob(existing.sha256))
                ignore = any(_attr_match(p, path) for p in patterns if not p.startswith("!"))
                out.append(
                    {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": ignore, "oid": remote_oid}
                )
        self._send_json(200, {"files": out, "commitOid": oid})
        return True

    def _commit(self, repo: Repo, revision: str) -> bool:
        hub = self.server.hub
        raw = self._body()
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true", "True")
        header, ops = {}, []
        if "ndjson" in self.headers.get("Content-Type", "") or b"\n" in raw.strip():
            for line in raw.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item.get("key") == "header":
                    header = item.get("value") or {}
                else:
                    ops.append((item.get("key"), item.get("value") or {}))
        else:  # legacy JSON payload
            payload = json.loads(raw or b"{}")
            header = {
                "summary": payload.get("summary"),
                "description": payload.get("description"),
                "parentCommit": payload.get("parentCommit"),
            }
            ops += [("file", f) for f in payload.get("files", [])] + [
                ("lfsFile", f) for f in payload.get("lfsFiles", [])
            ]
            ops += [("deletedFile", {"path": p} if isinstance(p, str) else p) for p in payload.get("deletedFiles", [])]
        out = hub.state.commit(repo, revision, header, ops, create_pr, hub.url)
        with hub.state.lock:
            hub.stats["commits"] += 1
            hub.stats["regular_files_committed"] += sum(1 for k, _ in ops if k == "file")
            hub.stats["lfs_files_committed"] += sum(1 for k, _ in ops if k == "lfsFile")
        self._send_json(200, out)
        return True

    def _branch(self, repo: Repo, branch: str, method: str) -> bool:
        state = self.server.hub.state
        with state.lock:
            if method == "DELETE":
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                if repo.branches.pop(branch, None) is None:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                state._save(repo)
                self._send_json(200, {})
                return True
        payload = self._json_body()
        with state.lock:
            if branch in repo.branches:
                raise HubError(409, "Reference already exists")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", branch) or branch.startswith("refs/") or ".." in branch:
                raise HubError(400, f"Invalid branch name {branch!r}")
            repo.branches[branch] = repo.resolve(payload.get("startingPoint") or "main")
            state._save(repo)
        self._send_json(200, {})
        return True

    def _tag(self, repo: Repo, name: str, method: str) -> bool:
        state = self.server.hub.state
        if method == "DELETE":
            with state.lock:
                if repo.tags.pop(name, None) is None:
                    raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
                state._save(repo)
            self._send_json(200, {})
            return True
        payload = self._json_body()
        with state.lock:
            tag = payload.get("tag") or ""
            if tag in repo.tags:
                raise HubError(409, "Tag already exists")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
                raise HubError(400, f"Invalid tag name {tag!r}")
            repo.tags[tag] = repo.resolve(name)
            state._save(repo)
        self._send_json(200, {})
        return True

    # -- LFS -------------------------------------------------------------------------------------------------
    def _sign(self, *parts) -> str:
        return hmac.new(self.server.hub.secret, "|".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()[:32]

    def _lfs_batch(self, repo_type: str, repo_id: str) -> bool:
        hub, state = self.server.hub, self.server.hub.state
        authorized = self._authorized()
        payload = self._json_body()
        with state.lock:
            repo = state.get_repo(repo_type, repo_id, authorized=authorized)
        operation = payload.get("operation")
        if operation == "upload":
            self._require_auth()
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            item = {"oid": oid, "size": size}
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                item["error"] = {"code": 422, "message": "invalid oid or size"}
                item["size"] = size if isinstance(size, int) else 0
            elif operation == "download":
                if state.has_blob(oid, size):
                    item["actions"] = {
                        "download": {"href": f"{hub.storage_url}/lfs/{oid}?sig={self._sign('get', oid)}"}
                    }
                else:
                    item["error"] = {"code": 404, "message": "Object does not exist"}
            elif operation == "upload":
                if not state.has_blob(oid, size):  # already stored => no actions (the client skips the upload)
                    verify = {"href": f"{hub.url}/{URL_PREFIX[repo.type]}{repo.id}.git/info/lfs/objects/verify"}
                    chunk = hub.multipart_chunk_size
                    if chunk and size > chunk:
                        upload_id = os.urandom(8).hex()
                        with state.lock:
                            hub.multipart[upload_id] = {"oid": oid, "size": size, "chunk": chunk}
                        n = -(-size // chunk)
                        header = {"chunk_size": str(chunk)}
                        header.update(
                            {
                                f"{i:05d}": f"{hub.storage_url}/lfs-part/{upload_id}/{i}"
                                f"?sig={self._sign('part', upload_id, i)}"
                                for i in range(1, n + 1)
                            }
                        )
                        upload = {
                            "href": f"{hub.storage_url}/lfs-complete/{upload_id}"
                            f"?sig={self._sign('complete', upload_id)}",
                            "header": header,
                        }
                    else:
                        upload = {"href": f"{hub.storage_url}/lfs/{oid}?size={size}&sig={self._sign('put', oid, size)}"}
                    item["actions"] = {"upload": upload, "verify": verify}
                    item["authenticated"] = True
            else:
                raise HubError(400, f"unknown LFS operation {operation!r}")
            objects.append(item)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            {},
            "POST",
            "application/vnd.git-lfs+json",
        )
        return True

    def _lfs_verify(self, repo_type: str, repo_id: str) -> bool:
        state = self.server.hub.state
        self._require_auth()
        with state.lock:
            state.get_repo(repo_type, repo_id, authorized=True)
        payload = self._json_body()
        if not state.has_blob(str(payload.get("oid")), payload.get("size")):
            raise HubError(404, f"LFS object {payload.get('oid')} not found (or wrong size)")
        self._send_json(200, {})
        return True

    # storage routes ----------------------------------------------------------------------------------------
    def _check_sig(self, *parts) -> None:
        if not hmac.compare_digest(self.query.get("sig", [""])[0], self._sign(*parts)):
            raise HubError(403, "Invalid or missing signature")

    def _receive_to_file(self) -> tuple[Path, str, int]:
        state = self.server.hub.state
        tmp = state.new_upload_path()
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as fh:
                for data in self._body_chunks():
                    fh.write(data)
                    digest.update(data)
                    size += len(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest(), size

    def _storage(self, method: str) -> bool:
        hub, state = self.server.hub, self.server.hub.state
        s = self.segments
        if len(s) == 2 and s[0] == "lfs" and method == "PUT":
            oid = s[1]
            size = int(self.query.get("size", ["-1"])[0])
            self._check_sig("put", oid, size)
            tmp, sha, got = self._receive_to_file()
            if sha != oid or got != size:
                tmp.unlink(missing_ok=True)
                raise HubError(
                    400, f"Uploaded content does not match: sha256 {sha} size {got}, expected {oid} size {size}"
                )
            state.adopt_blob_file(tmp, oid)
            with state.lock:
                hub.stats["lfs_uploads"] += 1
            self._send(200, b"", {"ETag": f'"{oid}"'}, method)
            return True
        if len(s) == 3 and s[0] == "lfs-part" and method == "PUT":
            upload_id, part = s[1], int(s[2])
            self._check_sig("part", upload_id, part)
            with state.lock:
                upload = hub.multipart.get(upload_id)
            if upload is None:
                raise HubError(404, "Unknown multipart upload")
            tmp, sha, _ = self._receive_to_file()
            with state.lock:
                upload.setdefault("parts", {})[part] = (tmp, sha)
            self._send(200, b"", {"ETag": f'"{sha}"'}, method)
            return True
        if len(s) == 2 and s[0] == "lfs-complete" and method == "POST":
            upload_id = s[1]
            self._check_sig("complete", upload_id)
            payload = self._json_body()
            with state.lock:
                upload = hub.multipart.pop(upload_id, None)
            if upload is None:
                raise HubError(404, "Unknown multipart upload")
            parts = upload.get("parts", {})
            listed = payload.get("parts", [])
            try:
                if [p["partNumber"] for p in listed] != sorted(parts) or any(
                    p["etag"].strip('"') != parts[p["partNumber"]][1] for p in listed
                ):
                    raise HubError(400, "Multipart completion does not match the uploaded parts")
                tmp = state.new_upload_path()
                digest = hashlib.sha256()
                with open(tmp, "wb") as out:
                    for n in sorted(parts):
                        with open(parts[n][0], "rb") as fh:
                            while data := fh.read(1 << 20):
                                out.write(data)
                                digest.update(data)
                if (
                    digest.hexdigest() != upload["oid"]
                    or tmp.stat().st_size != upload["size"]
                    or payload.get("oid") != upload["oid"]
                ):
                    tmp.unlink(missing_ok=True)
                    raise HubError(400, "Multipart upload content does not match its oid / size")
                state.adopt_blob_file(tmp, upload["oid"])
            finally:
                for path, _ in parts.values():
                    path.unlink(missing_ok=True)
            with state.lock:
                hub.stats["lfs_uploads"] += 1
                hub.stats["lfs_multipart_uploads"] += 1
            self._send_json(200, {})
            return True
        if len(s) == 2 and s[0] == "lfs" and method in ("GET", "HEAD"):
            oid = s[1]
            self._check_sig("get", oid)
            if not state.has_blob(oid):
                raise HubError(404, "Object does not exist")
            name = self.query.get("name", [oid])[0]
            self._send_file(
                method,
                state.blob_path(oid),
                {"ETag": f'"{oid}"', "Content-Disposition": f'attachment; filename="{name}"'},
            )
            return True
        return False

    def _send_file(self, method: str, path: Path, headers: dict) -> None:
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and method == "GET":
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not match or (not match.group(1) and not match.group(2)):
                raise HubError(416, f"Unsupported Range {rng!r}")
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start = max(size - int(match.group(2)), 0)
            if start >= size and size > 0:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        length = max(end - start + 1, 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        if method == "HEAD":
            return
        with open(path, "rb") as fh:
            fh.seek(start)
            remaining = length
            while remaining:
                data = fh.read(min(remaining, 1 << 20))
                if not data:
                    break
                self.wfile.write(data)
                remaining -= len(data)

    # -- downloads -------------------------------------------------------------------------------------------
    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str) -> bool:
        hub, state = self.server.hub, self.server.hub.state
        with state.lock:
            repo = state.get_repo(repo_type, repo_id, authorized=self._authorized())
            oid = repo.resolve(revision)
            entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {revision}", "EntryNotFound", {"X-Repo-Commit": oid})
        with state.lock:
            hub.stats["downloads"][path] += method == "GET"
        common = {"X-Repo-Commit": oid, "Cache-Control": "no-store"}
        if entry.lfs:
            location = (
                f"{hub.storage_url}/lfs/{entry.sha256}?"
                f"{urlencode({'name': path.rsplit('/', 1)[-1], 'sig': self._sign('get', entry.sha256)})}"
            )
            headers = {
                **common,
                "Location": location,
                "ETag": f'"{entry.git_oid}"',
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": entry.size,
            }
            self._send(302, b"", headers, method, "text/plain")
            return True
        self._send_file(method, state.blob_path(entry.sha256), {**common, "ETag": f'"{entry.git_oid}"'})
        return True


# ---------------------------------------------------------------------------------------------------------------
class HubServer:
    """The test hub: ``url`` (API + files), ``storage_url`` (LFS storage), ``state``, ``stats``, ``stop()``.

    Args:
        root: folder for blobs and repo metadata (a fresh temporary folder, removed on stop, when omitted).
        user: the namespace of repos created without an organization (and ``whoami``'s name).
        token: the only accepted token (default: any non-empty bearer token).
        max_body_bytes: largest accepted request body (uploads are streamed to disk).
        max_connections: connections served at once per listener.
        multipart_chunk_size: LFS objects larger than this are uploaded in parts of this size (None: never).
        tree_page_size: entries per ``/tree`` page (the Hub's is 1000).
    """

    def __init__(
        self,
        root=None,
        *,
        user: str = "tester",
        token: str | None = None,
        host: str = "127.0.0.1",
        max_body_bytes: int = 2 * 1024**3,
        max_connections: int = 64,
        multipart_chunk_size: int | None = None,
        tree_page_size: int = 1000,
    ):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the test hub only listens on the loopback interface")
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="deem-test-hub-")) if root is None else Path(root)
        self.state = HubState(self.root, user=user)
        self.token, self.max_body_bytes = token, max_body_bytes
        self.multipart_chunk_size, self.tree_page_size = multipart_chunk_size, tree_page_size
        self.secret = os.urandom(32)
        self.multipart: dict[str, dict] = {}
        self.log: collections.deque = collections.deque(maxlen=2000)
        self.stats = {
            "requests": 0,
            "commits": 0,
            "regular_files_committed": 0,
            "lfs_files_committed": 0,
            "lfs_uploads": 0,
            "lfs_multipart_uploads": 0,
            "storage_requests_with_auth": 0,
            "downloads": collections.Counter(),
            "routes": collections.Counter(),
            "unhandled": [],
            "errors": [],
        }
        self._slots = {role: threading.BoundedSemaphore(max_connections) for role in ("hub", "storage")}
        self._servers = [_Server(self, "hub", "127.0.0.1", 0), _Server(self, "storage", "127.0.0.1", 0)]
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.storage_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        self._threads = [
            threading.Thread(
                target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True, name=f"test-hub-{s.role}"
            )
            for s in self._servers
        ]
        for thread in self._threads:
            thread.start()
        self._stopped = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, home: str | os.PathLike | None = None, token: str = "hf_test_token") -> dict:
        """Environment variables that point a fresh ``huggingface_hub`` / ``transformers`` process at this server."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": self.token or token,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
            "HF_HUB_ETAG_TIMEOUT": "30",
            "HF_HUB_DOWNLOAD_TIMEOUT": "60",
        }
        if home is not None:
            env.update(
                HF_HOME=str(home),
                HF_HUB_CACHE=str(Path(home) / "hub"),
                HF_XET_CACHE=str(Path(home) / "xet"),
                HF_MODULES_CACHE=str(Path(home) / "modules"),
            )
        return env


def start_hub_server(root=None, **kwargs):
    """Start a :class:`HubServer` in background threads; returns ``(url, stop)`` (``stop.server`` is the server)."""
    server = HubServer(root, **kwargs)

    def stop() -> None:
        server.stop()

    stop.server = server
    return server.url, stop


if __name__ == "__main__":  # manual use: python tests/hub_server.py [root]
    import sys

    hub = HubServer(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"HF_ENDPOINT={hub.url}  (storage {hub.storage_url}, data in {hub.root}); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()
