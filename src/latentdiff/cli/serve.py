"""`latentdiff serve`: the HTTP API and web UI (extra `serve`) on loopback by default.

A thin layer: options -> :func:`latentdiff.serve.app.create_app` -> uvicorn. Any address other than
loopback needs a token (`--token` or the environment variable LATENTDIFF_TOKEN), and then every API
route requires `Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import ipaddress
import os

import click

from latentdiff.cli.options import POSITIVE, Bounded, command, device_option, with_namespace
from latentdiff.errors import ConfigError

TOKEN_ENV = "LATENTDIFF_TOKEN"
PORT = Bounded(int, 0, 65535, requirement="must be between 0 and 65535")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, token: str | None) -> str | None:
    """The token to require (None: none), refusing to open a non-loopback address without one."""
    if token is not None and len(token) < 16:
        raise ConfigError("the token must be at least 16 characters (e.g. `python -c \"import secrets; "
                          "print(secrets.token_urlsafe())\"`)")
    if not is_loopback(host) and token is None:
        raise ConfigError(f"--host {host} is reachable from other machines: give a token with --token or "
                          f"{TOKEN_ENV}, or serve on 127.0.0.1")
    return token


@command("serve", help="Serve models over HTTP: a JSON API with a job queue (OpenAPI at /docs) and a web UI. Binds "
                       "127.0.0.1 unless --host says otherwise; any other address needs a token.")
@click.option("--model", "models", multiple=True, required=True, metavar="MODEL",
              help="model directory or pretrained:NAME; repeat for several")
@click.option("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
@click.option("--port", type=PORT, default=8000, help="port (default: 8000; 0 picks a free one)")
@click.option("--token", default=None, help=f"bearer token the API requires (default: ${TOKEN_ENV}; needed "
                                             "unless the host is loopback)")
@click.option("--out", default="latentdiff-serve", metavar="DIR",
              help="folder for jobs and images; kept across restarts (default: latentdiff-serve)")
@click.option("--max-queue", type=POSITIVE, default=64, help="queued jobs before 429 (default: 64)")
@click.option("--no-batching", is_flag=True, help="run every job alone instead of batching compatible ones")
@click.option("--no-watermark", is_flag=True,
              help="do not put the invisible watermark into generated images (recorded in their metadata)")
@device_option()
@with_namespace
def serve(opts):
    try:
        import uvicorn

        from latentdiff.serve.app import create_app
    except ImportError as e:
        raise ConfigError(f"serving needs the `serve` extra ({e.name} is missing): pip install 'latentdiff[serve]'") \
            from None
    from latentdiff.pipeline import LatentDiffusion, resolve_device
    from latentdiff.utils.files import check_output_dir

    token = check_exposure(opts.host, opts.token if opts.token is not None else os.environ.get(TOKEN_ENV) or None)
    check_output_dir(opts.out, option="--out")
    device = resolve_device(opts.device)
    models = {}
    for name in opts.models:
        if name in models:
            raise ConfigError(f"--model {name} is given twice")
        models[name] = LatentDiffusion.load(name, device)
    app = create_app(models, opts.out, token=token, max_queued=opts.max_queue, batching=not opts.no_batching,
                     watermark=not opts.no_watermark)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    _announce(server, opts, token)
    server.run()


def _announce(server, opts, token):
    """Print the address once the socket is bound (port 0 means a free one, known only then)."""
    started = server.startup

    async def startup(sockets=None):
        await started(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"latentdiff serving {', '.join(opts.models)} at http://{shown}:{port}/ "
                      f"(API docs: /docs; {'token required' if token else 'no token: loopback only'})", flush=True)
                return

    server.startup = startup
