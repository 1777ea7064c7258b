"""The server's settings: every default and every check, in one place for ``fmnist serve`` and ``create_app``.

Each field is the Python name of a command-line flag (``max_concurrency`` is ``--max-concurrency``), except
``max_body`` (bytes), which the command line takes in MB (``--max-body-mb``). A bad value raises
``ValueError`` naming the flag, before anything starts.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from pathlib import Path

from fmnist.core.errors import InputError
from fmnist.core.images import MAX_DECODE_WORK, MAX_FRAMES, MAX_PIXELS
from fmnist.core.values import is_finite_number
from fmnist.core.verdict import check_probability, finite_threshold

#: Host names every server answers to (a server bound to another address answers to that one too).
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Settings:
    run_dir: Path | None = None
    max_body: int = 8_000_000  # bytes per request body
    max_pixels: int = MAX_PIXELS  # width*height per image, checked before decoding
    max_decode_work: int = MAX_DECODE_WORK  # pixels times passes (progressive scans) per image, before decoding
    max_frames: int = MAX_FRAMES  # frames or pages an upload may declare (only the first is decoded)
    max_request_pixels: int = 4 * MAX_PIXELS  # pixels decoded for one request, all its images together
    decode_timeout: float = 5.0  # seconds one image may take to decode and prepare; then its worker is killed
    decode_workers: int = 1  # decoding processes (0: decode on the inference threads, with no deadline)
    large_image_work: int = 4_000_000  # pixel-passes over which an image is decoded by the low-priority process
    max_concurrency: int = 32  # predict requests with their body received, in flight before 503
    max_uploads: int = 64  # predict requests receiving their body at once, before 503
    max_connections: int = 256  # open connections; more are answered 503 and closed
    max_connections_per_client: int = 32  # open connections from one client address
    max_uploads_per_client: int = 8  # predict requests receiving their body at once from one client address
    trusted_proxies: tuple[str, ...] = ()  # peer addresses whose X-Forwarded-For names the client
    threshold: float | None = None  # confidence under which answers are refused (None: the run's own)
    ood_threshold: float | None = None  # OOD score above which images are refused (None: the run's own)
    threads: int = 1  # inference worker threads
    max_batch: int = 32  # images per /api/predict/batch request
    header_timeout: float = 10.0  # seconds to receive a request's headers (from connecting, or its first byte)
    body_timeout: float = 30.0  # seconds to receive a request's body once its headers are in
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_header_bytes: int = 16_384  # request line and headers
    max_headers: int = 100  # header fields per request
    allowed_hosts: tuple[str, ...] = LOCAL_HOSTS  # Host header values answered ("*": any)
    docs: bool = False  # serve Swagger UI at /docs
    backend: str = "auto"  # inference engine: torch, onnx or auto (fmnist.core.backends)

    def __post_init__(self):
        for name in ("max_body", "max_pixels", "max_concurrency", "max_uploads", "max_connections", "threads",
                     "max_batch", "max_header_bytes", "max_headers", "max_decode_work", "max_frames",
                     "max_request_pixels", "max_connections_per_client", "max_uploads_per_client",
                     "large_image_work"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{_flag(name)} must be a whole number >= 1, got {value!r}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "decode_timeout"):
            _check_positive(getattr(self, name), _flag(name))
        workers = self.decode_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 64:
            raise InputError(f"--decode-workers must be a whole number from 0 to 64, got {workers!r}")
        proxies = []
        for proxy in ((self.trusted_proxies,) if isinstance(self.trusted_proxies, str) else self.trusted_proxies):
            try:
                proxies.append(str(ipaddress.ip_address(normalize_host(proxy))))
            except ValueError:
                raise InputError(f"--trusted-proxies takes IP addresses, got {proxy!r}") from None
        object.__setattr__(self, "trusted_proxies", tuple(proxies))
        if self.threshold is not None:
            check_probability(self.threshold, "--threshold")
        if self.ood_threshold is not None:
            finite_threshold(self.ood_threshold, "--ood-threshold")
        from fmnist.core.backends import BACKENDS

        if self.backend not in BACKENDS:
            raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        hosts = tuple(normalize_host(h) for h in self.allowed_hosts)
        if not hosts or not all(hosts):
            raise InputError(f"--allowed-hosts needs at least one host name, got {self.allowed_hosts!r}")
        object.__setattr__(self, "allowed_hosts", hosts)
        if self.run_dir is not None:
            object.__setattr__(self, "run_dir", Path(self.run_dir))


def _flag(name: str) -> str:
    return "--max-body-mb (max_body)" if name == "max_body" else "--" + name.replace("_", "-")


def _check_positive(value, flag: str) -> float:
    if not is_finite_number(value) or value <= 0:
        raise InputError(f"{flag} must be a finite number > 0, got {value!r}")
    return float(value)


def body_bytes(mb: float) -> int:
    """``--max-body-mb`` (MB, 10^6 bytes) -> bytes; inf, NaN and values <= 0 are refused."""
    return max(1, int(_check_positive(mb, "--max-body-mb") * 1_000_000))


def normalize_host(host: str) -> str:
    """Lower case, no brackets around IPv6 addresses, no trailing dot: how Host values are compared."""
    host = str(host).strip().lower().rstrip(".")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_of(header: str) -> str:
    """The host part of a Host header value (``name``, ``name:port``, ``[v6]:port``), normalized."""
    header = header.strip()
    if header.startswith("["):
        return normalize_host(header[:header.find("]") + 1])
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return normalize_host(header)


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """What a server bound to ``bind_host`` answers to by default: that address and the local names.

    A server bound to every interface (0.0.0.0, ::) cannot know the names its users type; it adds the
    machine's host names, and others are given with ``--allowed-hosts``.
    """
    import socket

    extra = [bind_host]
    if normalize_host(bind_host) in _WILDCARDS:
        extra = [socket.gethostname(), socket.getfqdn()]
    hosts = []
    for h in (*extra, *LOCAL_HOSTS):
        h = normalize_host(h)
        if h and h not in _WILDCARDS and h not in hosts:
            hosts.append(h)
    return tuple(hosts)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(normalize_host(host)).is_loopback
    except ValueError:
        return normalize_host(host) == "localhost"


#: The defaults, for the command line's help.
DEFAULTS = Settings()
FIELDS = tuple(f.name for f in fields(Settings) if f.name != "run_dir")
