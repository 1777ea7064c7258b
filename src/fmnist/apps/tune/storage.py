"""The Optuna storage of a study, and the locks its workers share.

By default a journal file in the study folder: safe for several processes on one machine (not on a network file
system). ``--storage sqlite:///FILE`` keeps the study in one SQLite file on this machine (what optuna-dashboard
opens); ``--storage postgresql://...`` uses Optuna's database storage for workers on several machines. Both
databases run with heartbeats. Workers claim trials under one lock: ``flock`` on a file in the study folder with
the journal or SQLite, a PostgreSQL advisory lock with PostgreSQL. Both are freed when their holder dies, however
it dies.
"""
from __future__ import annotations

import fcntl
import os
import warnings
import zlib
from pathlib import Path

from fmnist.core.errors import InputError

JOURNAL = "journal.log"
LOCK_FILE = ".study.lock"
LOCK_DIR = ".locks"
MAX_RETRY = 3        # a trial whose workers keep dying is queued again at most this often
DB_SCHEMES = ("postgresql://", "postgresql+psycopg2://", "postgresql+psycopg://")
SQLITE = "sqlite:///"


def is_sqlite(url: str | None) -> bool:
    return url is not None and url.startswith(SQLITE)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://")[0] + "://..."


def _first_line(e: BaseException) -> str:
    e = getattr(e, "orig", None) or e
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def engine_url(url: str) -> str:
    """A plain postgresql:// URL with the driver fmnist's extra installs (SQLAlchemy 2.1 would pick psycopg 3)."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_storage(s):
    """The Optuna storage of the study; a ValueError of one line when the database cannot be used."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if s.storage is None:
        from optuna.storages.journal import JournalFileBackend

        (s.study_dir / LOCK_DIR).mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(s.study_dir / JOURNAL)))
    if not s.storage.startswith(DB_SCHEMES) and not is_sqlite(s.storage):
        raise InputError(f"--storage {redact(s.storage)}: give postgresql://USER:PASSWORD@HOST:PORT/DATABASE "
                         "or sqlite:///FILE, or leave it out for a journal file in the study folder")
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use
        heartbeat = dict(heartbeat_interval=s.heartbeat, grace_period=3 * s.heartbeat,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    if is_sqlite(s.storage):
        path = Path(s.storage[len(SQLITE):]).expanduser()
        if not path.parent.is_dir():
            raise InputError(f"--storage {s.storage}: the folder {path.parent} does not exist")
        s.study_dir.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(s.study_dir / LOCK_FILE), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(s.storage, engine_kwargs={"connect_args": {"timeout": 60}}, **heartbeat)
        except Exception as e:
            raise InputError(f"cannot use --storage {s.storage}: {_first_line(e)}") from None

    lock = None
    try:
        # Workers started together on a fresh database would each create Optuna's tables, and all but one fail
        # on PostgreSQL's catalogue ("duplicate key value ... pg_type"): one at a time.
        lock = AdvisoryLock(s.storage, "(tables)")
        with lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use
            return RDBStorage(engine_url(s.storage),
                              engine_kwargs={"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}},
                              **heartbeat)
    except ImportError:
        raise InputError("--storage postgresql:// needs the PostgreSQL driver: pip install 'fmnist[postgres]'") from None
    except Exception as e:  # SQLAlchemy and the driver raise many kinds; all mean 'cannot use this database'
        raise InputError(f"cannot use --storage {redact(s.storage)}: {_first_line(e)}") from None
    finally:
        if lock is not None:
            lock.close()


class FileLock:
    """An exclusive ``flock`` on a file: released by the kernel when its process ends, even by SIGKILL."""

    def __init__(self, path):
        self.path, self.fd = Path(path), None

    def acquire(self, blocking: bool = True) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def close(self) -> None:
        self.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class AdvisoryLock:
    """A PostgreSQL session advisory lock, on its own connection: freed when the holder's connection drops."""

    def __init__(self, url: str, name: str):
        import sqlalchemy

        self.key = zlib.crc32(f"fmnist tune {name}".encode())
        self.engine = sqlalchemy.create_engine(engine_url(url), poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT",
                                               connect_args={"connect_timeout": 10})
        self.conn, self.held = None, False

    def _run(self, sql: str) -> None:
        import sqlalchemy

        if self.conn is None:
            self.conn = self.engine.connect()
        self.conn.execute(sqlalchemy.text(sql), {"k": self.key})

    def acquire(self) -> bool:
        self._run("SELECT pg_advisory_lock(:k)")
        self.held = True
        return True

    def release(self) -> None:
        if self.held:
            self._run("SELECT pg_advisory_unlock(:k)")
            self.held = False

    def close(self) -> None:
        self.release()
        if self.conn is not None:
            self.conn.close()
        self.engine.dispose()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def make_lock(s):
    if s.storage is None or is_sqlite(s.storage):
        return FileLock(s.study_dir / LOCK_FILE)
    return AdvisoryLock(s.storage, s.study)
