"""``fmnist serve RUN``: serve a run's model over HTTP (JSON API at /api, a page at /, OpenAPI at /openapi.json)."""
from __future__ import annotations

import argparse

from fmnist.apps.cli.flags import add_backend_flag
from fmnist.apps.serve.settings import (
    DEFAULTS,
    FIELDS,
    Settings,
    body_bytes,
    default_allowed_hosts,
    is_loopback,
)
from fmnist.core.errors import FmnistError, InputError

HOST, PORT = "127.0.0.1", 8000


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("run", help="run folder holding model.safetensors and model.json")
    p.add_argument("--host", default=HOST,
                   help=f"address to listen on; 0.0.0.0 exposes the server to the network (default: {HOST})")
    p.add_argument("--port", type=int, default=PORT, help=f"TCP port (default: {PORT})")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help="refuse answers under this confidence, 0-1 (default: the run's own, shown by "
                        "GET /api/model)")
    p.add_argument("--ood-threshold", type=float, default=d.ood_threshold,
                   help="refuse images whose out-of-distribution score is above this, for runs with an OOD "
                        "detector, on the run's own scale (GET /api/model shows its threshold) (default: the run's own)")
    _add_budget_flags(p, d)
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"images per /api/predict/batch request (default: {d.max_batch})")
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"inference worker threads, each running the model on one thread (default: {d.threads})")
    add_backend_flag(p)
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help=f"seconds a client has to send a request's headers, from connecting or from the "
                        f"request's first byte; then 408 and the connection is closed "
                        f"(default: {d.header_timeout:g})")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help=f"seconds a client has to send a request's body once its headers are in; then 408 "
                        f"(default: {d.body_timeout:g})")
    p.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_timeout,
                   help=f"seconds an idle keep-alive connection stays open (default: {d.keep_alive_timeout:g})")
    p.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST...]",
                   help="Host header values the server answers (any port), against DNS rebinding; '*' for any "
                        "(default: the --host address and localhost, 127.0.0.1, [::1]; with --host 0.0.0.0, "
                        "the machine's names instead of the address)")
    p.add_argument("--docs", action="store_true",
                   help="serve Swagger UI at /docs; it loads its script from cdn.jsdelivr.net (default: off; "
                        "the OpenAPI description is always at /openapi.json)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: info)")
    p.add_argument("--access-log", default=True, action=argparse.BooleanOptionalAction,
                   help="log one line per request (default: on)")


def _add_budget_flags(p: argparse.ArgumentParser, d) -> None:
    """What one upload, one request and one client may cost: sizes, decoding work, deadlines, concurrency."""
    p.add_argument("--max-body-mb", type=float, default=d.max_body / 1e6,
                   help=f"largest request body in MB (10^6 bytes); larger ones get 413 "
                        f"(default: {d.max_body / 1e6:g})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"largest image in pixels (width*height), checked before decoding "
                        f"(default: {d.max_pixels:,})")
    p.add_argument("--max-decode-work", type=int, default=d.max_decode_work,
                   help=f"largest decoding work per image in pixel-passes (width*height times a progressive "
                        f"JPEG's scans), checked before decoding; more get 413 (default: {d.max_decode_work:,})")
    p.add_argument("--max-frames", type=int, default=d.max_frames,
                   help=f"most frames or pages an upload may declare (only the first is decoded); more get 413 "
                        f"(default: {d.max_frames:,})")
    p.add_argument("--max-request-pixels", type=int, default=d.max_request_pixels,
                   help=f"pixels decoded for one request, all its images together; past it 413 "
                        f"(default: {d.max_request_pixels:,})")
    p.add_argument("--decode-timeout", type=float, default=d.decode_timeout,
                   help=f"seconds one image may take to decode and prepare; then its decoding process is "
                        f"killed and the upload gets 422 (default: {d.decode_timeout:g})")
    p.add_argument("--decode-workers", type=int, default=d.decode_workers,
                   help=f"decoding processes; 0 decodes on the inference threads, with no deadline and no "
                        f"per-request budget (default: {d.decode_workers})")
    p.add_argument("--large-image-work", type=int, default=d.large_image_work,
                   help=f"pixel-passes over which an image is decoded by a separate process of lower priority, "
                        f"so that small uploads never wait behind it (default: {d.large_image_work:,})")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency,
                   help=f"prediction requests in progress at once, counted from when their body is in; more "
                        f"get 503 with Retry-After (default: {d.max_concurrency})")
    p.add_argument("--max-uploads", type=int, default=d.max_uploads,
                   help=f"prediction requests receiving their body at once; more get 503 "
                        f"(default: {d.max_uploads})")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"open connections; more are answered 503 and closed (default: {d.max_connections})")
    p.add_argument("--max-connections-per-client", type=int, default=d.max_connections_per_client,
                   help=f"open connections from one client address; more are answered 503 and closed "
                        f"(default: {d.max_connections_per_client})")
    p.add_argument("--max-uploads-per-client", type=int, default=d.max_uploads_per_client,
                   help=f"prediction requests receiving their body at once from one client address; more "
                        f"get 503 (default: {d.max_uploads_per_client})")
    p.add_argument("--trusted-proxies", default="", metavar="IP[,IP...]",
                   help="addresses of reverse proxies in front of the server: their X-Forwarded-For names the "
                        "client for the per-client limits, and their connections are not capped per client "
                        "(default: none; the header is ignored)")


def register(sub, formatter_class) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: JSON API and a web page",
                       formatter_class=formatter_class,
                       description="Serve RUN's model: the page at /, the JSON API under /api, OpenAPI at "
                                   "/openapi.json (and /docs with --docs).")
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def settings_from_args(args) -> Settings:
    """The server's settings from the command line; ``ValueError`` naming the flag for a bad value."""
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    values = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    values["max_body"] = body_bytes(args.max_body_mb)
    if hasattr(args, "trusted_proxies"):
        values["trusted_proxies"] = tuple(h.strip() for h in args.trusted_proxies.split(",") if h.strip())
    hosts = args.allowed_hosts
    values["allowed_hosts"] = (tuple(h for h in hosts.split(",") if h.strip()) if hosts is not None
                               else default_allowed_hosts(args.host))
    return Settings(run_dir=args.run, **values)


def check_run(run, backend: str = "auto") -> None:
    """A clear error now (a bad run folder, a missing engine, a damaged or non-finite model) rather than a
    failed start-up after "serving at" (the server loads the model again, once, at start-up)."""
    from fmnist.core.run import Run

    Run.load(run).backend(backend, fold_bn=True)


def cmd_serve(args) -> int:
    settings = settings_from_args(args)
    check_run(args.run, settings.backend)
    import logging

    import uvicorn

    from fmnist.apps.serve.app import create_app
    from fmnist.apps.serve.protocol import uvicorn_config

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    values = {name: getattr(settings, name) for name in FIELDS}
    app = create_app(settings.run_dir, **values)
    if not is_loopback(args.host):
        print(f"note: listening on {args.host}: the server is reachable from other machines; it answers "
              f"requests for {', '.join(settings.allowed_hosts)} (--allowed-hosts)", flush=True)
    docs = " (API docs at /docs)" if settings.docs else ""
    print(f"serving {args.run} at http://{_url_host(args.host)}:{args.port}/{docs}", flush=True)
    config = uvicorn_config(app, args.host, args.port, log_level=args.log_level, access_log=args.access_log)
    uvicorn.Server(config).run()
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv=None) -> int:
    """``python -m fmnist.apps.serve RUN ...``: the same command without the rest of the CLI."""
    import sys

    p = argparse.ArgumentParser(prog="python -m fmnist.apps.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_serve(args)
    except FmnistError as e:
        print(f"fmnist serve: error: {e}", file=sys.stderr)
        return 2
