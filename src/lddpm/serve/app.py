"""The web application of `lddpm serve` (Starlette, an ASGI framework; served by Uvicorn) and its server.

Routes (nothing else is served; no request names a file):

    GET  /                          the page (static/index.html, read once from this package)
    GET  /api/runs                  the served runs (by index), samplers, limits
    POST /api/jobs                  queue a generation (JSON body; checked field by field) -> 202 {id, ...}
    GET  /api/jobs                  the gallery: finished jobs, newest first
    GET  /api/jobs/{id}             a job: queued (position) / running (step of steps) / done / failed
    GET  /api/jobs/{id}/grid.png    the finished grid          GET /api/jobs/{id}/preview.png  the latest preview

A request that is not answered by these routes gets 404. POST bodies must be `application/json`
(a cross-site form cannot send that without the browser asking first, which is refused), and the
Host header must name the address the server listens on (a DNS-rebinding page cannot reach it).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from lddpm.errors import LddpmError
from lddpm.sampling import SAMPLERS
from lddpm.serve.jobs import (MAX_GUIDANCE, MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, JobQueue, ServedRun,
                              check_request)

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = ("index.html",)  # the page: read once, when the app is created
MAX_BODY_BYTES = 16 * 1024
SECURITY_HEADERS = {
    # Everything the page uses comes from this server: no CDN, no fonts, no scripts from elsewhere.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def read_static(name: str, folder: Path | None = None) -> bytes:
    """A file of the package's static folder, by one of the known names; never a symlink or a path outside it."""
    folder = (folder or STATIC_DIR).resolve()
    if name not in STATIC_FILES:
        raise LddpmError(f"{name!r} is not one of the page's files ({', '.join(STATIC_FILES)})")
    path = folder / name
    if path.is_symlink() or path.resolve().parent != folder or not path.is_file():
        raise LddpmError(f"{path} is not a plain file inside {folder}; reinstall lddpm")
    return path.read_bytes()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=SECURITY_HEADERS)


def create_app(runs: list[ServedRun], *, allowed_hosts: list[str] | None = None, jobs: JobQueue | None = None,
               static_dir: Path | None = None) -> Starlette:
    """The application over already loaded runs; `allowed_hosts` (None: any) are the Host headers answered."""
    jobs = jobs or JobQueue(runs)
    page = read_static("index.html", static_dir)

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    async def list_runs(request: Request) -> Response:
        samplers = {name: {"default_steps": spec.default_steps} for name, spec in SAMPLERS.items()}
        limits = {"max_images": MAX_IMAGES, "max_guidance_scale": MAX_GUIDANCE, "max_seed": MAX_SEED,
                  "max_prompt_chars": MAX_PROMPT_CHARS}
        return _json({"runs": [run.describe() for run in runs], "samplers": samplers, "limits": limits})

    async def submit(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _error(415, "send the request as JSON (Content-Type: application/json)")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"the request is {len(body)} bytes; at most {MAX_BODY_BYTES}")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        try:
            job = jobs.submit(check_request(data, runs))
        except LddpmError as exc:
            status = 503 if "already waiting" in str(exc) else 400
            return _error(status, str(exc))
        return _json(jobs.view(job), status=202)

    async def gallery(request: Request) -> Response:
        return _json({"jobs": jobs.gallery()})

    def _job(request: Request):
        job = jobs.jobs.get(request.path_params["job_id"])
        if job is None:
            raise HTTPException(404, f"no job {request.path_params['job_id']}")
        return job

    async def job_status(request: Request) -> Response:
        return _json(jobs.view(_job(request)))

    async def job_grid(request: Request) -> Response:
        job = _job(request)
        if job.grid is None:
            return _error(404, f"job {job.id} has no grid ({job.status}"
                               + (", dropped from the gallery)" if job.status == "done" else ")"))
        return Response(job.grid, media_type="image/png", headers=SECURITY_HEADERS)

    async def job_preview(request: Request) -> Response:
        job = _job(request)
        if job.preview is None:
            return _error(404, f"job {job.id} has no preview ({job.status})")
        return Response(job.preview, media_type="image/png", headers=SECURITY_HEADERS)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            detail = exc.detail if str(exc.detail).startswith("no job") else \
                f"not found: {request.url.path!r} (this server answers / and /api/...)"
            return _error(404, detail)
        return _error(exc.status_code, str(exc.detail))

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/runs", list_runs, methods=["GET"]),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs", gallery, methods=["GET"]),
        Route("/api/jobs/{job_id:int}", job_status, methods=["GET"]),
        Route("/api/jobs/{job_id:int}/grid.png", job_grid, methods=["GET"]),
        Route("/api/jobs/{job_id:int}/preview.png", job_preview, methods=["GET"]),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})
    app.state.jobs = jobs
    return app


# ----------------------------------------------------------------------------- the server


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) (port 0: a free one); one clear LddpmError when that cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise LddpmError(f"--host {host!r} is not an address or a known host name; use 127.0.0.1 (this machine "
                         "only) or an address of this machine") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise LddpmError(f"port {port} on {host} is already in use; choose another --port (0 picks a free one)") \
                from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise LddpmError(f"no permission to listen on port {port}; use a port above 1023 (or 0 for a free one)") \
                from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise LddpmError(f"--host {host} is not an address of this machine; use 127.0.0.1 or one of its "
                             "addresses") from None
        raise
    return sock


def server_url(sock: socket.socket) -> str:
    """The page's address for a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def serve_forever(app: Starlette, sock: socket.socket) -> None:
    """Serve until Ctrl-C (Uvicorn's graceful shutdown); then let the worker stop."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Uvicorn shuts down on Ctrl-C, then raises the signal again: that is the way to stop
        pass
    finally:
        app.state.jobs.stop()
        sock.close()
