"""The web server: a JSON API and a page that classify garment images (``fmnist serve RUN``).

``create_app(run_dir, ...)`` builds the FastAPI application (see :mod:`fmnist.apps.serve.app`). FastAPI is an
optional dependency (``pip install fmnist[serve]``), so it is imported only when an app is created.
"""


def create_app(run_dir, **kwargs):
    from fmnist.apps.serve.app import create_app as _create_app

    return _create_app(run_dir, **kwargs)


__all__ = ["create_app"]
