"""``fmnist serve RUN``: serve a run's model over HTTP (JSON API at /api, a page at /, OpenAPI at /docs)."""
from __future__ import annotations

import argparse
import ipaddress

DEFAULTS = {"host": "127.0.0.1", "port": 8000, "max_body_mb": 8.0, "max_concurrency": 32, "threads": 1,
            "max_batch": 32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder holding model.safetensors and model.json")
    p.add_argument("--host", default=DEFAULTS["host"],
                   help=f"address to listen on; 0.0.0.0 exposes the server to the network "
                        f"(default: {DEFAULTS['host']})")
    p.add_argument("--port", type=int, default=DEFAULTS["port"], help=f"TCP port (default: {DEFAULTS['port']})")
    p.add_argument("--threshold", type=float, default=None,
                   help="refuse answers under this confidence, 0-1 (default: the run's own, shown by "
                        "GET /api/model)")
    p.add_argument("--ood-threshold", type=float, default=None,
                   help="refuse images whose out-of-distribution score is above this, for runs with an OOD "
                        "detector (default: the run's own)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULTS["max_body_mb"],
                   help=f"largest request body in MB (10^6 bytes); larger ones get 413 "
                        f"(default: {DEFAULTS['max_body_mb']:g})")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest image in pixels (width*height), checked before decoding "
                        "(default: 40,000,000)")
    p.add_argument("--max-concurrency", type=int, default=DEFAULTS["max_concurrency"],
                   help=f"prediction requests in progress at once; more get 503 with Retry-After "
                        f"(default: {DEFAULTS['max_concurrency']})")
    p.add_argument("--max-batch", type=int, default=DEFAULTS["max_batch"],
                   help=f"images per /api/predict/batch request (default: {DEFAULTS['max_batch']})")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                   help=f"inference worker threads, each running PyTorch on one thread "
                        f"(default: {DEFAULTS['threads']})")
    from fmnist.backends import add_backend_flag

    add_backend_flag(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: info)")
    p.add_argument("--access-log", default=True, action=argparse.BooleanOptionalAction,
                   help="log one line per request (default: on)")


def register(sub, formatter_class) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: JSON API and a web page",
                       formatter_class=formatter_class,
                       description="Serve RUN's model: the page at /, the JSON API under /api, OpenAPI at /docs.")
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def check_args(args) -> None:
    """Refuse bad settings with a clear message before anything starts."""
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {args.threshold}")
    for flag in ("max_body_mb", "max_concurrency", "threads", "max_batch"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0")
    if args.max_pixels is not None and args.max_pixels <= 0:
        raise ValueError("--max-pixels must be > 0")


def check_run(run) -> None:
    """A clear error now rather than a failed start-up later (the model itself is loaded once, at start-up)."""
    from fmnist.run import Run

    Run.load(run)


def cmd_serve(args) -> int:
    check_args(args)
    check_run(args.run)
    import logging

    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")

    from fmnist.images import MAX_PIXELS
    from fmnist.serve.app import create_app

    app = create_app(args.run, max_body=int(args.max_body_mb * 1_000_000),
                     max_pixels=args.max_pixels or MAX_PIXELS, max_concurrency=args.max_concurrency,
                     threshold=args.threshold, ood_threshold=args.ood_threshold, threads=args.threads,
                     max_batch=args.max_batch, backend=args.backend)
    if not _is_loopback(args.host):
        print(f"note: listening on {args.host}: the server is reachable from other machines", flush=True)
    print(f"serving {args.run} at http://{_url_host(args.host)}:{args.port}/ (API docs at /docs)", flush=True)
    # uvicorn's own limits back ours up: idle keep-alive connections are closed after 5 s.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                timeout_keep_alive=5, timeout_graceful_shutdown=10)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv=None) -> int:
    """``python -m fmnist.serve RUN ...``: the same command without the rest of the CLI."""
    import sys

    from fmnist.checkpoint import CheckpointError

    p = argparse.ArgumentParser(prog="python -m fmnist.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_serve(args)
    except (ValueError, CheckpointError) as e:
        print(f"fmnist serve: error: {e}", file=sys.stderr)
        return 2
