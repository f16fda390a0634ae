"""The scheduler lease: one scheduler (and one embedded Ray) per database.

A second `nestor serve` on the same database would reconcile the first one's jobs against
its own cluster and mark them failed. The lease is held for the life of the process by
something the operating system or the database frees when the process dies, so a killed
service never leaves a stale lease behind:

- SQLite: an exclusive ``flock`` on ``<database file>.lease``, which also records who holds it;
- PostgreSQL: a session advisory lock, held by a connection of its own whose
  ``application_name`` says who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url

# pg_try_advisory_lock(bigint): below 2**31, so pg_locks shows classid 0 and objid = KEY.
ADVISORY_KEY = 0x4E455354  # "NEST"


class LeaseHeld(RuntimeError):
    """Another scheduler holds the database; the message says which process."""

    def __init__(self, message: str, pid: int | None, host: str | None) -> None:
        super().__init__(message)
        self.pid, self.host = pid, host


def _describe(pid: object, host: object, since: float | None = None) -> str:
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return f"pid {pid}, host {host}{when}"


class Lease:
    """Held until ``release()`` or the end of the process."""

    def __init__(self, release) -> None:  # type: ignore[no-untyped-def]
        self._release = release

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


def acquire(db_url: str) -> Lease:
    """Take the scheduler lease of ``db_url`` or raise LeaseHeld naming the holder."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:"):
            return Lease(None)  # a private in-memory database: nothing to share
        return _file_lease(Path(database).resolve().with_name(Path(database).name + ".lease"))
    if url.get_backend_name() == "postgresql":
        return _advisory_lease(db_url)
    raise ValueError(f"no scheduler lease for database {url.get_backend_name()!r}")


def _file_lease(path: Path) -> Lease:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            who = json.loads(os.pread(fd, 4096, 0) or b"{}")
        os.close(fd)
        described = _describe(who.get("pid", "?"), who.get("host", "?"), who.get("since"))
        raise LeaseHeld(
            f"another Nestor scheduler holds this database: {described} (lease {path}); "
            "stop it first (`nestor stop`), or serve the API alone",
            _int(who.get("pid")),
            str(who.get("host")) if who.get("host") else None,
        ) from None
    os.ftruncate(fd, 0)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.pwrite(fd, json.dumps(me).encode(), 0)

    def release() -> None:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the lock

    return Lease(release)


def _advisory_lease(db_url: str) -> Lease:
    name = f"nestor-scheduler {os.getpid()}@{socket.gethostname()}"[:63]  # 63 bytes at most
    engine = create_engine(db_url, poolclass=pool.NullPool, connect_args={"application_name": name})
    conn = engine.connect()
    got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_KEY}).scalar()
    conn.commit()
    if not got:
        row = conn.execute(
            text(
                "SELECT a.application_name, a.client_addr FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                "AND l.classid = 0 AND l.objid = :k AND l.granted"
            ),
            {"k": ADVISORY_KEY},
        ).first()
        conn.close()
        engine.dispose()
        pid, _, host = (row[0] if row else "").removeprefix("nestor-scheduler ").partition("@")
        where = f" (connected from {row[1]})" if row is not None and row[1] else ""
        raise LeaseHeld(
            f"another Nestor scheduler holds this database: {_describe(pid or '?', host or '?')}"
            f"{where}; stop it first (`nestor stop`), or serve the API alone",
            _int(pid),
            host or None,
        )

    def release() -> None:
        with contextlib.suppress(Exception):
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY})
            conn.commit()
        conn.close()
        engine.dispose()

    return Lease(release)


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
