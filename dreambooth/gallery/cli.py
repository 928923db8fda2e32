"""``dreambooth gallery``: serve the gallery of a cluster's jobs or of a folder of local runs.

    dreambooth gallery runs/                      # local runs (file:// outputs of dreambooth train)
    dreambooth gallery --namespace team-a         # a cluster's jobs ($KUBECONFIG or in-cluster)

It binds 127.0.0.1 unless ``--host`` says otherwise. In a cluster (the chart) the options
come from ``DREAMBOOTH_*`` variables, as the operator's do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from dreambooth.api.exitcodes import ExitCode

DEFAULT_PORT = 8090


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"DREAMBOOTH_{name}", default)


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gallery", help="a read-only web gallery of jobs: progress, loss curves, sample grids")
    p.add_argument(
        "root",
        nargs="?",
        type=Path,
        help="a folder of local runs (e.g. runs/); without it, the DreamBoothJobs of the cluster",
    )
    p.add_argument(
        "--host",
        default=_env("GALLERY_HOST", "127.0.0.1"),
        help="address to bind (default 127.0.0.1: this machine only)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(_env("GALLERY_PORT", str(DEFAULT_PORT))),
        help=f"port (default {DEFAULT_PORT}; 0: any free one)",
    )
    p.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="a namespace to show (repeat; default: $DREAMBOOTH_NAMESPACES, else all)",
    )
    p.add_argument(
        "--output-root",
        default=_env("OUTPUT_ROOT"),
        help="where outputs are when a job's spec.output.uri is unset (the operator's)",
    )
    p.add_argument("--s3-endpoint", default=_env("S3_ENDPOINT"), help="host:port of S3/MinIO")
    p.add_argument(
        "--s3-insecure",
        action="store_true",
        default=_env("S3_SECURE", "true").lower() == "false",
        help="plain HTTP to S3",
    )
    p.add_argument(
        "--s3-credentials-dir",
        type=Path,
        default=Path(_env("S3_CREDENTIALS_DIR")) if _env("S3_CREDENTIALS_DIR") else None,
        help="folder with files AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (a mounted "
        "Secret; default: those environment variables)",
    )
    p.set_defaults(func=cmd_gallery)


async def _source(args: argparse.Namespace):
    from dreambooth.gallery.sources import KubeSource, LocalSource

    if args.root is not None:
        return LocalSource(args.root), f"local runs in {args.root}"
    from dreambooth.api.config import Defaults
    from dreambooth.gallery.kube import KubeReader
    from dreambooth.gallery.objects import S3Access

    namespaces = tuple(args.namespace or [n for n in _env("NAMESPACES").split(",") if n.strip()])
    s3 = S3Access.from_env(args.s3_endpoint, not args.s3_insecure, args.s3_credentials_dir)
    defaults = Defaults(output_root=args.output_root or "s3://unset", s3_endpoint=args.s3_endpoint or None)
    source = KubeSource(await KubeReader.connect(), namespaces=namespaces, s3=s3, defaults=defaults)
    return source, "namespaces " + ", ".join(namespaces) if namespaces else "all namespaces"


async def serve(args: argparse.Namespace, ready=None) -> None:
    from aiohttp import web

    from dreambooth.gallery.server import make_app

    source, where = await _source(args)
    runner = web.AppRunner(make_app(source, where), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    host, port = site._server.sockets[0].getsockname()[:2]  # the port chosen for --port 0
    shown = f"[{host}]" if ":" in host else host
    print(f"gallery: http://{shown}:{port}/ ({where})", flush=True)
    if ready is not None:
        ready(port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def cmd_gallery(args: argparse.Namespace) -> int:
    if args.root is not None and not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    except OSError as err:
        print(f"error: cannot serve on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    return ExitCode.OK
