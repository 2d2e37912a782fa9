"""A small Hugging Face-compatible file server for tests (the Hub is unreachable here).

It answers what ``huggingface_hub`` really calls, with the Hub's headers:

* ``GET /api/models/{repo}[/revision/{rev}]`` → ``id``, ``sha``, ``siblings`` with
  ``rfilename``, ``size`` and ``lfs {size, sha256, pointerSize}`` (``?blobs=true``)
* ``HEAD|GET /{repo}/resolve/{rev}/{file}`` → ``X-Repo-Commit``, ``ETag`` (the
  sha256, as the Hub does for LFS files), ``Content-Length``, ``Range`` → 206
* errors as the Hub sends them: 401 ``GatedRepo`` without a valid token, 404 with
  ``X-Error-Code`` ``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``

``olah`` (the PyPI Hub mirror) was evaluated first: it gives no LFS sha256, no
size in siblings and ignores ``Range`` (see ``shared/testhost-notes.md``), which
are exactly the behaviours the tests need, hence this server. Starlette and
uvicorn do the HTTP.

Faults for tests, per file: ``corrupt`` (same size, one byte flipped) and
``drop_once`` (the first GET is cut off halfway; later ones, with ``Range``, work).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llamadeploy.artifacts import file_sha256


@dataclass
class Repo:
    files: dict[str, Path]
    gated: bool = False
    commit: str = ""
    faults: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)


class HubServer:
    """Serve ``repos`` on ``host:port`` in a background thread; ``stop()`` ends it."""

    def __init__(self, repos: dict[str, Repo], token: str, host: str = "0.0.0.0", port: int = 18090):
        self.repos = repos
        self.token = token
        self.host, self.port = host, port
        self.gets: list[tuple[str, str | None]] = []  # (path, Range header) of file GETs
        self.lock = threading.Lock()
        for repo_id, repo in repos.items():
            repo.commit = repo.commit or hashlib.sha1(repo_id.encode()).hexdigest()
            for name, path in repo.files.items():
                repo.sha256[name] = file_sha256(str(path))
        app = Starlette(routes=[
            Route("/api/models/{repo:path}/revision/{rev}", self.info),
            Route("/api/models/{repo:path}", self.info),
            Route("/{repo:path}/resolve/{rev}/{file:path}", self.resolve, methods=["GET", "HEAD"]),
        ])
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> HubServer:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    # -- helpers -------------------------------------------------------
    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> Response:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def _lookup(self, request: Request, rev: str | None) -> tuple[Repo | None, Response | None]:
        repo_id = request.path_params["repo"]
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        if repo.gated and request.headers.get("authorization") != f"Bearer {self.token}":
            return None, self._error(
                401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it."
            )
        if rev not in (None, "main", repo.commit):
            return None, self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, None

    # -- endpoints -----------------------------------------------------
    async def info(self, request: Request) -> Response:
        repo, err = self._lookup(request, request.path_params.get("rev"))
        if err:
            return err
        siblings = []
        for name, path in repo.files.items():
            size = path.stat().st_size
            siblings.append({"rfilename": name, "size": size, "blobId": repo.sha256[name][:40],
                             "lfs": {"size": size, "sha256": repo.sha256[name], "pointerSize": 134}})
        return JSONResponse({"id": request.path_params["repo"], "modelId": request.path_params["repo"],
                             "sha": repo.commit, "private": False, "gated": "manual" if repo.gated else False,
                             "siblings": siblings})

    async def resolve(self, request: Request) -> Response:
        repo, err = self._lookup(request, request.path_params["rev"])
        if err:
            return err
        name = request.path_params["file"]
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist", commit=repo.commit)
        path = repo.files[name]
        size = path.stat().st_size
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.sha256[name]}"'}
        fault = repo.faults.get(name)
        if request.method == "GET":
            with self.lock:
                self.gets.append((f"{request.path_params['repo']}/{name}", request.headers.get("range")))
        if request.method == "HEAD":
            return Response(status_code=200, headers={**headers, "Content-Length": str(size), "Accept-Ranges": "bytes"})
        if fault == "corrupt":
            def corrupted():
                with open(path, "rb") as f:
                    first = True
                    while chunk := f.read(1 << 20):
                        if first:
                            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                            first = False
                        yield chunk
            return StreamingResponse(corrupted(), headers={**headers, "Content-Length": str(size)})
        if fault == "drop_once" and "range" not in request.headers:
            repo.faults.pop(name)

            def cut_off():
                with open(path, "rb") as f:
                    sent = 0
                    while sent < size // 2:
                        chunk = f.read(1 << 20)
                        sent += len(chunk)
                        yield chunk
                raise ConnectionResetError("test fault: connection dropped halfway")
            return StreamingResponse(cut_off(), headers={**headers, "Content-Length": str(size)})
        return FileResponse(path, headers=headers)


