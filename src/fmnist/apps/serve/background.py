"""Run the real HTTP server (uvicorn) on a background thread: for tests, notebooks and the browser check.

    with serve_in_thread(create_app(run)) as url:
        requests.get(url + "/api/health")

The socket is bound here, on 127.0.0.1 and a free port, before the thread starts, so there is no race for
the port; the context waits until the application has started (model loaded) and stops it on exit. The
server runs with the same protocol and limits as ``fmnist serve`` (``config``: uvicorn settings to change).
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", startup_timeout: float = 30.0, **config):
    """Yield the base URL (``http://127.0.0.1:PORT``) of ``app`` served by uvicorn on a thread."""
    import uvicorn

    from fmnist.apps.serve.protocol import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn_config(app, host, port, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fmnist-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server stopped during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {startup_timeout:g} s")
            time.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
