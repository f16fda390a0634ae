"""A throwaway PostgreSQL server from the Debian package, on a loopback port, for the tests
and the benchmarks (bench/load.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .helpers import free_port


class PostgresMissing(RuntimeError):
    pass


def _pg_bin() -> Path | None:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").exists():
            return root
    return None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a private server and yield its SQLAlchemy URL; stopped and removed afterwards."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        raise PostgresMissing("PostgreSQL (Debian package postgresql) is not installed")
    # PostgreSQL refuses to run as root: as root, run it as the package's postgres user in a
    # directory that user can reach (pytest's own tmp dirs are private to root).
    data = Path(tempfile.mkdtemp(prefix="nestor-pg-"))
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if user:
        shutil.chown(data, "postgres")
    subprocess.run(
        [*user, str(bin_dir / "initdb"), "-D", str(data), "-U", "nestor", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            *user,
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            ready = subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                break
            time.sleep(0.2)
        subprocess.run(
            [
                str(bin_dir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "nestor",
                "nestor",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg://nestor@127.0.0.1:{port}/nestor"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
