"""`lddpm serve`: a local web page to generate images from runs (docs/serving.md)."""

from __future__ import annotations

import argparse
import sys

from lddpm.commands.train import add_bf16_argument
from lddpm.errors import LddpmError


def register(subparsers) -> None:
    """Add `serve` to the `lddpm` parser."""
    p = subparsers.add_parser(
        "serve", help="a local web page to generate images from runs",
        description="Serve a web page (and a JSON API) that generates image grids from the given runs: choose a run, "
                    "a class or a prompt, the sampler, steps, guidance scale, seed and number of images; each grid "
                    "comes with the `lddpm sample` command that writes the same pixels. Only these runs are served. "
                    "Needs the serve extra (pip install 'lddpm[serve]').")
    p.add_argument("runs", nargs="+", metavar="RUN", help="diffusion run folders or checkpoints to serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; anything else lets other "
                        "machines use the page, without a login)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = cuda when available)")
    add_bf16_argument(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Check the arguments, load every run, bind the port, print the address and serve until Ctrl-C."""
    from lddpm import checks
    from lddpm.distributed import bf16_flag, resolve_device

    checks.int_in_range("--port", args.port, 0, 65535)
    bf16 = bf16_flag(args.bf16)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LddpmError("lddpm serve needs the serve extra (starlette and uvicorn): pip install 'lddpm[serve]' "
                         "(make setup installs it)") from None
    from lddpm.serve import bind_socket, create_app, is_loopback, load_runs, serve_forever, server_url

    device = resolve_device(args.device)
    sock = bind_socket(args.host, args.port)  # a busy port or an unknown host is refused before the runs load
    try:
        runs = load_runs(args.runs, device=device, bf16=bf16,
                         device_flag=None if args.device == "auto" else args.device,
                         bf16_flag=None if str(args.bf16).strip().lower() == "false" else args.bf16)
    except BaseException:
        sock.close()
        raise
    local = is_loopback(args.host)
    if not local:
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the page and its "
              "CPU/GPU (there is no login); use --host 127.0.0.1 to keep it to this machine", file=sys.stderr)
    hosts = ["127.0.0.1", "localhost", "::1", "[::1]"] if local else None
    app = create_app(runs, allowed_hosts=hosts)
    url = server_url(sock)
    names = ", ".join(f"{r.index}: {r.path.name} ({r.kind})" for r in runs)
    print(f"lddpm serve: {url}  (runs {names}; device {device}; Ctrl-C to stop)", flush=True)
    serve_forever(app, sock)
    print("lddpm serve: stopped", flush=True)
    return 0
