"""`lddpm serve`: a local web page to generate images from trained runs (needs the `serve` extra).

`load_runs(paths)` loads the runs once; `create_app(runs)` is the Starlette application (page + JSON
API; see lddpm.serve.app); `serve_forever(app, bind_socket(host, port))` serves it with Uvicorn.
"""

from __future__ import annotations

from lddpm.serve.app import bind_socket, create_app, is_loopback, serve_forever, server_url  # noqa: F401
from lddpm.serve.jobs import JobQueue, JobRequest, ServedRun, check_request, load_runs, reproduce_command  # noqa: F401
