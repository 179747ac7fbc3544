"""A tiny in-memory Hugging Face Hub on 127.0.0.1 for tests: just the endpoints huggingface_hub calls.

Repos hold branches pointing at commits; a commit is a full {path: bytes} snapshot. Uploads follow the
real protocol: preupload decides "regular" (base64 inside the NDJSON commit) or "lfs" (LFS batch API, then
a PUT of the bytes, referenced by sha256 in the commit). Downloads answer HEAD/GET on /resolve/ with the
X-Repo-Commit / ETag headers the client caches by. Every Authorization header is recorded so tests can
check which token reached the server; writes without a token, or with a token not in ``tokens``, get 401.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # oid -> files
    messages: dict[str, str] = field(default_factory=dict)


class FakeHub:
    def __init__(self, tokens: set[str], lfs_threshold: int | None = 1024):
        self.tokens = set(tokens)
        self.lfs_threshold = lfs_threshold  # files >= this many bytes go through LFS; None: all regular
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.auth_seen: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.commit_posts = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ helpers for tests
    def add_repo(
        self, repo_id: str, files: dict[str, bytes], private: bool = False, branch: str = "main"
    ) -> str:
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        oid = _oid(files, len(repo.commits))
        repo.commits[oid] = dict(files)
        repo.branches[branch] = oid
        return oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches.get(revision, revision)]


def _oid(files: dict[str, bytes], salt: int) -> str:
    h = hashlib.sha1(str(salt).encode())
    for name in sorted(files):
        h.update(name.encode() + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        # -------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head=False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _json(self, status: int, data, headers: dict[str, str] | None = None):
            self._send(
                status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}
            )

        def _error(self, status: int, code: str, message: str, head=False):
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            if auth:
                with hub._lock:
                    hub.auth_seen.append(auth)
            return auth[7:] if auth.startswith("Bearer ") else None

        def _authorized(self) -> bool:
            return self._token() in hub.tokens

        def _record(self):
            with hub._lock:
                hub.requests.append((self.command, self.path))

        # -------------------------------------------------------------- verbs
        def do_HEAD(self):
            self._record()
            self._resolve(head=True)

        def do_GET(self):
            self._record()
            path = urlsplit(self.path).path
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path)
            if m:
                return self._api_info(m.group(1), unquote(m.group(3)), m.group(2))
            self._resolve(head=False)

        def do_PUT(self):
            self._record()
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", urlsplit(self.path).path)
            data = self._body()
            if not m:
                return self._error(404, "NotFound", "no such upload url")
            if hashlib.sha256(data).hexdigest() != m.group(1):
                return self._error(400, "BadRequest", "sha256 mismatch")
            with hub._lock:
                hub.lfs_store[m.group(1)] = data
            self._send(200)

        def do_POST(self):
            self._record()
            path = urlsplit(self.path).path
            body = self._body()
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            if not self._authorized():
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            if path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m:
                return self._lfs_batch(m.group(1), json.loads(body))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
            if not m:
                return self._error(404, "NotFound", f"unknown endpoint {path}")
            repo_id, action, rev = m.group(1), m.group(2), unquote(m.group(3))
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if action == "preupload":
                return self._preupload(json.loads(body))
            if action == "branch":
                return self._branch(repo, rev, json.loads(body or b"{}"))
            return self._commit(repo_id, repo, rev, body)

        # -------------------------------------------------------------- endpoints
        def _create_repo(self, payload):
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            with hub._lock:
                if repo_id in hub.repos:
                    return self._error(409, "Conflict", "You already created this model repo")
                private = payload.get("visibility") == "private" or bool(payload.get("private"))
                hub.repos[repo_id] = Repo(private=private)
                hub.add_repo(
                    repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
                )
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _branch(self, repo: Repo, branch: str, payload):
            if branch in repo.branches:
                return self._error(409, "Conflict", "Reference already exists")
            start = payload.get("startingPoint") or "main"
            repo.branches[branch] = repo.branches.get(start, start)
            self._send(200)

        def _preupload(self, payload):
            files = []
            for f in payload["files"]:
                lfs = hub.lfs_threshold is not None and int(f["size"]) >= hub.lfs_threshold
                files.append(
                    {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                )
            self._json(200, {"files": files, "commitOid": None})

        def _lfs_batch(self, repo_id: str, payload):
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": int(obj["size"])}
                if obj["oid"] not in hub.lfs_store:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            self._json(
                200,
                {"transfer": "basic", "objects": objects},
                {"Content-Type": "application/vnd.git-lfs+json"},
            )

        def _commit(self, repo_id: str, repo: Repo, branch: str, body: bytes):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            parent = repo.branches.get(branch)
            if parent is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            files = dict(repo.commits[parent])
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    data = hub.lfs_store.get(value["oid"])
                    if data is None:
                        return self._error(
                            422, "Unprocessable", f"LFS object {value['oid']} was never uploaded"
                        )
                    files[value["path"]] = data
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
            with hub._lock:
                hub.commit_posts += 1
                oid = _oid(files, len(repo.commits))
                repo.commits[oid] = files
                repo.messages[oid] = header["summary"]
                repo.branches[branch] = oid
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

        def _lookup(self, repo_id: str, rev: str):
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                return None, None, ("RepoNotFound", "Repository not found")
            oid = repo.branches.get(rev, rev if rev in repo.commits else None)
            if oid is None:
                return repo, None, ("RevisionNotFound", f"Invalid rev id: {rev}")
            return repo, oid, None

        def _api_info(self, repo_id: str, rev: str, what: str):
            repo, oid, err = self._lookup(repo_id, rev)
            if err:
                return self._error(404, *err)
            files = repo.commits[oid]
            if what == "tree":
                entries = [
                    {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for p, b in sorted(files.items())
                ]
                return self._json(200, entries)
            siblings = [{"rfilename": p} for p in sorted(files)]
            self._json(200, {"id": repo_id, "sha": oid, "private": repo.private, "siblings": siblings})

        def _resolve(self, head: bool):
            path = urlsplit(self.path).path
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not m:
                return self._error(404, "NotFound", "not found", head=head)
            repo_id, rev, filename = m.group(1), unquote(m.group(2)), unquote(m.group(3))
            repo, oid, err = self._lookup(repo_id, rev)
            if err:
                return self._error(404, *err, head=head)
            data = repo.commits[oid].get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist on {rev}", head=head)
            etag = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            self._send(200, data, headers, head=head)

    return Handler


def start_hub(tokens: set[str], lfs_threshold: int | None = 1024) -> FakeHub:
    return FakeHub(tokens, lfs_threshold).start()


__all__ = ["FakeHub", "start_hub", "parse_qs"]


def test_fake_hub_requires_a_known_token_for_writes():
    import urllib.error
    import urllib.request

    import pytest

    hub = start_hub({"good"})
    try:
        req = urllib.request.Request(f"{hub.url}/api/repos/create", data=b'{"name": "r"}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401 and not hub.repos
        req.add_header("Authorization", "Bearer good")
        assert urllib.request.urlopen(req, timeout=10).status == 200 and "user/r" in hub.repos
    finally:
        hub.stop()
