"""What a job's code can reach on the service's own machine: the isolation of its processes.

Ray runs whatever a job asks on the nodes it controls, as the user that started them. On
the embedded default that is the service's own user and machine: without isolation a job
could read the service's database, its keys and tokens and every other run. So each job's
processes (its Ray job supervisor and driver, every Train worker) start through
``workers.sandbox``: bubblewrap empties the service's home and run directories in a mount
namespace of their own and brings back only the job's run directory, the data sets and its
``init_from`` files; and, where the service runs as root, the processes run as an
unprivileged uid of the job's own, with the service's home private to root.

``Isolation.detect`` picks the strongest mode this machine allows:

- ``uid``: root and bubblewrap: sandbox and a uid per job (``job_uid``);
- ``sandbox``: bubblewrap without root: the sandbox alone, as the service's user;
- ``off``: no bubblewrap, isolation turned off, or an external cluster (its nodes are
  other machines, which the service does not set up): said in one line at start.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from workers.sandbox import Sandbox, available
from workers.settings import VARIABLES

from .ray_cluster import RayCluster
from .settings import Settings

Mode = Literal["uid", "sandbox", "off"]
# Job uids: above every real account and below 2**31 (some tools read a uid as signed).
UID_BASE, UID_SPAN = 2_000_000_000, 100_000_000


@dataclass(frozen=True)
class Isolation:
    mode: Mode
    why: str  # how jobs run, or why they are not isolated

    @classmethod
    def detect(cls, settings: Settings, cluster: RayCluster, owns_cluster: bool) -> Isolation:
        """The mode for jobs on ``cluster``. ``auto`` isolates on the cluster the service
        starts itself (the embedded default); ``on`` also on an embedded cluster it was
        given (tests), and refuses to start where it cannot."""
        wanted = settings.isolation
        if wanted == "off":
            return cls("off", "job isolation is off (NESTOR_ISOLATION=off)")
        if not cluster.embedded:
            return cls(
                "off",
                "jobs run on an external Ray cluster: their nodes are isolated by whoever "
                "runs them, not by this service",
            )
        if wanted == "auto" and not owns_cluster:
            return cls("off", "job isolation is off on a Ray cluster the service was given")
        if os.geteuid() == 0 and available(UID_BASE) is None:
            return cls("uid", "jobs run sandboxed (bubblewrap), each as a uid of its own")
        failed = available(None)
        if failed is None:
            return cls(
                "sandbox",
                "jobs run sandboxed (bubblewrap) as the service's own user (no uid per job: "
                "that takes a service started as root)",
            )
        if wanted == "on":
            raise RuntimeError(f"job isolation is on (NESTOR_ISOLATION=on) but {failed}")
        return cls(
            "off",
            f"job isolation is off ({failed}): a job's code can read and write the service's "
            "database, tokens and every run; give the code scope only to users you would make "
            "admins",
        )

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def line(self) -> str:
        """The one line `nestor serve` prints at start."""
        return f"nestor: {self.why}"


def job_uid(submission_id: str) -> int:
    """The uid a job's processes run as: the same on every attempt of the job (its files
    stay its own when it resumes), another for every other job."""
    digest = hashlib.sha256(submission_id.encode()).digest()
    return UID_BASE + 1 + int.from_bytes(digest[:8], "big") % (UID_SPAN - 1)


def secure_home(settings: Settings) -> None:
    """The service's home and run root private to the service's user: in ``uid`` mode a
    job's uid cannot open them even from outside its sandbox."""
    for path in (settings.home_dir, settings.run_root):
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    datasets = settings.home_dir / "datasets"
    datasets.mkdir(exist_ok=True)
    os.chmod(datasets, 0o1777)  # a cache every job may add to, none replace another's file


def open_ray_dir(ray_dir: Path) -> None:
    """What a job's uid must reach in the directory Ray's root processes made: the node's
    sockets (raylet, object store), the log directories every worker writes into and the
    one where Ray Train makes its runs' working directories."""
    for session in glob.glob(str(ray_dir / "session_*")):
        if os.path.islink(session):
            continue
        for sock in glob.glob(os.path.join(session, "sockets", "*")):
            with contextlib.suppress(OSError):
                os.chmod(sock, 0o777)
        with contextlib.suppress(OSError):
            os.chmod(os.path.join(session, "sockets"), 0o755)
        # Where Ray Train makes each run's working directory: one each, none another's.
        artifacts = os.path.join(session, "artifacts")
        with contextlib.suppress(OSError):
            os.makedirs(artifacts, exist_ok=True)
            os.chmod(artifacts, 0o1777)
        logs = os.path.join(session, "logs")
        for directory, _subdirs, _ in os.walk(logs):
            with contextlib.suppress(OSError):
                os.chmod(directory, 0o1777)


def prepare_job(
    isolation: Isolation,
    *,
    settings: Settings,
    cluster: RayCluster,
    submission_id: str,
    run_dir: Path,
    init_files: list[str],
) -> Sandbox | None:
    """Ready the node for the job (its run directory its own, Ray's directory open to its
    uid) and return the sandbox its processes start in: a plain one (which only records
    how they end) when isolation is off, None on an external cluster (whose nodes may keep
    Nestor elsewhere)."""
    if not cluster.embedded:
        return None
    if not isolation.on:
        return Sandbox(hide=(), rw=(), plain=True)
    uid = job_uid(submission_id) if isolation.mode == "uid" else None
    datasets = settings.home_dir / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    if uid is not None:
        _own(run_dir, uid)
        for path in init_files:  # another job's files, private to its uid: readable here
            os.chmod(path, os.stat(path).st_mode | 0o444)
        open_ray_dir(cluster.temp_dir)
        # Ray's job manager (root) would make the driver's log as root, which the job's
        # supervisor then cannot open.
        logs = cluster.temp_dir.joinpath("session_latest", "logs")  # Ray's, not a run's
        if logs.is_dir():
            driver_log = logs / f"job-driver-{submission_id}.log"
            driver_log.touch()
            os.chown(driver_log, uid, uid)
    hide = [settings.home_dir, settings.run_root, settings.packages_dir]
    return Sandbox(
        # Each once: a path inside another hidden one is gone with it.
        hide=tuple(sorted({str(p) for p in hide if not any(q in p.parents for q in hide)})),
        rw=(str(run_dir), str(datasets)),
        ro=tuple(init_files),
        ray_dir=str(cluster.temp_dir),
        uid=uid,
        keep_env=VARIABLES,
    )


def _own(run_dir: Path, uid: int) -> None:
    """The run directory and all in it the job's uid's, private to it (the service, root,
    reads it all the same)."""
    os.chown(run_dir, uid, uid)
    os.chmod(run_dir, 0o700)
    for directory, subdirs, files in os.walk(run_dir):
        for name in subdirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(directory, name), uid, uid, follow_symlinks=False)
