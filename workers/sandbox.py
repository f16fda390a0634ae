"""A job's processes in a sandbox: what they can see, and as whom they run; and how they
ended.

Ray starts every process of a job (its supervisor and driver, each Train worker) through the
job's runtime environment, whose ``py_executable`` is this file's command
(``Sandbox.py_executable()``). Started as ``python workers/sandbox.py OPTIONS -- ARGS``, it
starts, in order:

1. ``bwrap`` (bubblewrap): a mount namespace in which the machine is read-only, the paths in
   ``hide`` are empty (the service's home, which holds its database, keys and tokens, every
   run directory and package), ``/tmp`` is private, and only what the job needs comes back:
   its run directory and the data set cache writable, its ``init_from`` files and its code
   package read-only, Ray's own directory (sockets, logs) writable.
2. ``setpriv``, when ``uid`` is set (the service runs as root): the job's own unprivileged
   uid and gid, no supplementary groups, no capabilities, ``no_new_privs``. The service's
   files are private to the service's user, so even outside the mount namespace (through
   ``/proc/PID/root`` of another process, say) the job cannot open them, and one job's
   processes cannot read another's (each job has its own uid).
3. the real Python with ``ARGS`` (the virtualenv's, when Ray built one for ``pip``).

It stays their parent and waits: a signal that ends the process (a ``kill -9``, the
kernel's OOM killer, Ray's memory monitor) is recorded in the Ray session's
``nestor-deaths/`` for the driver to name in the job's error (``workers.deaths``). With
``--plain`` (isolation off) it only runs the Python, waits and records.

The environment loses every ``NESTOR_*`` variable but the job's own (``keep_env``): the
service's admin token or database URL never reach a job even if the service was started
with them. What a job still holds: its worker token (a file in its run directory), and
Ray's token, which Ray requires of every process of its cluster.

This module imports nothing but the standard library: it runs before every worker.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shlex
import shutil
import signal
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BWRAP = "bwrap"
SETPRIV = "setpriv"
NESTOR_ROOT = str(Path(__file__).resolve().parents[1])  # workers/ and service/ live here


@dataclass(frozen=True)
class Sandbox:
    """What one job's processes see (paths are absolute and exist on the node)."""

    hide: tuple[str, ...]  # emptied: the service's home, run root, packages
    rw: tuple[str, ...]  # the run directory, the data set cache
    ro: tuple[str, ...] = ()  # init_from files
    ray_dir: str | None = None  # Ray's temporary directory (sockets, logs): writable
    uid: int | None = None  # run as this uid and gid (the service is root)
    user: str = "nestor-job"  # USER and LOGNAME inside
    keep_env: tuple[str, ...] = ()  # the NESTOR_* variables the job keeps
    plain: bool = False  # no sandbox: only wait for the process and record its death

    def argv(self) -> list[str]:
        """This module's command line, without the Python to run after ``--``."""
        # The file, not the module: run as a script it imports no package, only the stdlib.
        args = [sys.executable, str(Path(__file__).resolve())]
        if self.plain:
            return [*args, "--plain", "--"]
        args += ["--user", self.user]
        if self.uid is not None:
            args += ["--uid", str(self.uid)]
        if self.ray_dir:
            args += ["--ray-dir", self.ray_dir]
        for flag, paths in (("--hide", self.hide), ("--rw", self.rw), ("--ro", self.ro)):
            for p in paths:
                args += [flag, p]
        for name in self.keep_env:
            args += ["--keep-env", name]
        return [*args, "--"]

    def py_executable(self) -> str:
        """Ray's ``runtime_env["py_executable"]``: Ray runs it with ``bash -c``, so quoted."""
        return shlex.join(self.argv())


def available(uid: int | None = None) -> str | None:
    """None when a sandbox can be made on this machine (bwrap runs, and setpriv when
    ``uid`` is asked), else why not, in a few words."""
    import subprocess

    if shutil.which(BWRAP) is None:
        return "bubblewrap (bwrap) is not installed"
    if uid is not None and shutil.which(SETPRIV) is None:
        return "setpriv is not installed"
    probe = [BWRAP, "--ro-bind", "/", "/", "--dev-bind", "/dev", "/dev", "--tmpfs", "/tmp"]
    if uid is not None:
        probe += ["--", SETPRIV, "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
    try:
        done = subprocess.run(
            [*probe, "--", "true"] if uid is None else [*probe, "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap could not run: {e}"
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        return f"bwrap could not make a sandbox here: {why[-1] if why else done.returncode}"
    return None


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _between(path: str, hidden: Sequence[str]) -> list[str]:
    """The directories strictly between the innermost emptied directory holding ``path`` and
    ``path`` itself, outermost first."""
    roots = [h for h in hidden if _under(path, [h]) and path != h]
    if not roots:
        return []
    root = max(roots, key=len)
    parts = Path(path).relative_to(root).parts[:-1]
    return [os.path.join(root, *parts[: i + 1]) for i in range(len(parts))]


def closed_ancestor(path: str, uid: int) -> str | None:
    """The outermost directory above ``path`` that ``uid`` may not pass through (a home
    directory of mode 0700, say), or None. The job's uid has no groups, so "others"
    bits decide unless it owns the directory."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        d = os.path.join(*parts[:i])
        try:
            st = os.stat(d)
        except OSError:
            return None
        if st.st_uid != uid and not st.st_mode & 0o001:
            return d
    return None


def bwrap_argv(
    options: argparse.Namespace, cwd: str, python: str, environ: dict[str, str]
) -> list[str]:
    """The whole command: bwrap, setpriv where asked, then ``python`` and the rest.

    Mounts are applied in order, each on top of the ones before: the machine read-only,
    a private /tmp, the directories the job's uid could not pass through replaced by empty
    ones (the Python and Nestor's code brought back into them), the hidden paths emptied,
    Ray's directory, then what the job may read and write."""
    real = os.path.realpath
    venv = environ.get("VIRTUAL_ENV")
    # What every process runs from: Nestor's code, this Python and its packages, the job's
    # package (the working directory Ray unpacked) and the virtualenv Ray built for its
    # requirements. Not sys.path at large: it holds the working directory's parents.
    paths = sysconfig.get_paths()
    runs_from = [
        real(p)
        for p in (
            NESTOR_ROOT,
            sys.prefix,
            sys.base_prefix,
            paths["purelib"],
            paths["platlib"],
            paths["stdlib"],
            cwd,
            venv and os.path.dirname(venv),
        )
        if p
    ]
    argv = [
        BWRAP,
        "--die-with-parent",
        "--ro-bind", "/", "/",
        "--dev-bind", "/dev", "/dev",
        "--perms", "1777", "--tmpfs", "/tmp",
    ]  # fmt: skip
    hidden = ["/tmp"]
    if options.uid is not None:
        needed = [
            *runs_from,
            *options.rw,
            *options.ro,
            *([options.ray_dir] if options.ray_dir else []),
        ]
        closed = sorted({a for p in needed if (a := closed_ancestor(real(p), options.uid))})
        for d in closed:
            argv += ["--tmpfs", d]
        hidden += closed
    hide = [real(p) for p in options.hide if os.path.isdir(p)]
    for p in hide:
        argv += ["--tmpfs", p]
    hidden += hide
    if options.ray_dir and os.path.isdir(options.ray_dir):
        # Ray's directory comes back writable (sockets, the logs each process writes), but
        # not the packages and virtualenvs of other jobs that Ray keeps in it.
        argv += ["--bind", options.ray_dir, options.ray_dir]
        pattern = os.path.join(options.ray_dir, "session_*", "runtime_resources")
        for resources in sorted(glob.glob(pattern)):
            argv += ["--tmpfs", real(resources)]
            hidden.append(real(resources))
    # Never what holds a hidden path (a service started from inside its own home).
    back = sorted(
        {
            p
            for p in runs_from
            if _under(p, hidden)
            and not _under(p, hide)
            and not any(_under(h, [p]) for h in hide)
            and os.path.exists(p)
        }
    )
    binds = [("--ro-bind", p) for p in back]
    binds += [("--bind", real(p)) for p in options.rw if os.path.exists(p)]
    binds += [("--ro-bind", real(p)) for p in options.ro if os.path.exists(p)]
    made: set[str] = set()
    for how, p in binds:
        # bwrap makes the directories leading to a mount point in an emptied one with mode
        # 0700 (root's): open them to the job's uid first, or it cannot reach what it may use.
        for d in _between(p, hidden):
            if d not in made:
                made.add(d)
                argv += ["--perms", "0755", "--dir", d]
        argv += [how, p, p]
    for name in environ:
        if name.startswith("NESTOR_") and name not in options.keep_env:
            argv += ["--unsetenv", name]
    argv += [
        "--setenv", "USER", options.user,
        "--setenv", "LOGNAME", options.user,
        "--setenv", "HOME", "/tmp",
        "--chdir", real(cwd) if real(cwd) in back or not _under(real(cwd), hidden) else "/tmp",
        "--",
    ]  # fmt: skip
    if options.uid is not None:
        uid = str(options.uid)
        argv += [
            SETPRIV,
            "--reuid", uid,
            "--regid", uid,
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]  # fmt: skip
    # What the job writes is its own: private unless it says otherwise. (Set here, not
    # before bwrap, whose mount points must stay open to the job's uid.)
    return [*argv, "/bin/sh", "-c", 'umask 077 && exec "$@"', "sh", python, *options.args]


def session_dir(args: Sequence[str]) -> str | None:
    """The Ray session directory a Ray worker's arguments name (``--temp-dir``,
    ``--session-name``), or None."""
    found: dict[str, str] = {}
    for i, arg in enumerate(args):
        for flag in ("--temp-dir", "--session-name"):
            if arg.startswith(flag + "="):
                found[flag] = arg.split("=", 1)[1]
            elif arg == flag and i + 1 < len(args):
                found[flag] = args[i + 1]
    if len(found) < 2:
        return None
    return os.path.join(found["--temp-dir"], found["--session-name"])


def _die_with_parent() -> None:
    """In the child: SIGKILL when this process dies (Ray's kill of the process it started
    then ends the job's process too)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the job's process (in its sandbox unless ``--plain``) and wait for it: a signal
    that ends it is recorded for the driver to name (``workers.deaths``), and this process
    exits as it did."""
    import subprocess

    parser = argparse.ArgumentParser(description="run a job's process in its sandbox")
    parser.add_argument("--plain", action="store_true", help="no sandbox: only wait and record")
    parser.add_argument("--user", default="nestor-job")
    parser.add_argument("--uid", type=int)
    parser.add_argument("--ray-dir")
    parser.add_argument("--hide", action="append", default=[])
    parser.add_argument("--rw", action="append", default=[])
    parser.add_argument("--ro", action="append", default=[])
    parser.add_argument("--keep-env", action="append", default=[])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    if options.args[:1] == ["--"]:
        options.args = options.args[1:]
    venv = os.environ.get("VIRTUAL_ENV")
    python = os.path.join(venv, "bin", "python") if venv else sys.executable
    status = None
    if options.plain:
        command = [python, *options.args]
    else:
        command = bwrap_argv(options, os.getcwd(), python, dict(os.environ))
        status, write_end = os.pipe()  # bwrap says its child's pid here
        command = [command[0], "--json-status-fd", str(write_end), *command[1:]]
    child = subprocess.Popen(
        command, pass_fds=() if status is None else (write_end,), preexec_fn=_die_with_parent
    )
    if status is not None:
        os.close(write_end)
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(number, lambda number, _: child.send_signal(number))
    code = child.wait()
    pid, number = child.pid, (-code if code < 0 else None)
    if status is not None:
        with os.fdopen(status) as lines:
            for line in lines:
                with contextlib.suppress(ValueError):
                    pid = int(json.loads(line).get("child-pid", pid))
        if 128 < code <= 128 + 64:  # bwrap's exit for a child a signal ended
            number = code - 128
    if number is not None and (session := session_dir(options.args)):
        record(session, pid, number)
    if code < 0:  # end as it ended (SIGKILL has no handler to reset)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def record(session: str, pid: int, number: int) -> None:
    """``workers.deaths.record``, loaded from its file: this one runs as a script, outside
    the package (whose import would cost every process of a job pydantic's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "nestor_deaths", os.path.join(NESTOR_ROOT, "workers", "deaths.py")
    )
    assert spec is not None and spec.loader is not None
    deaths = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deaths)
    deaths.record(session, pid, number)


if __name__ == "__main__":
    main()
