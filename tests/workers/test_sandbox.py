"""The sandbox a job's processes start in, run for real (bubblewrap, setpriv): what a
process inside can read, write and hold in its environment; and how the service chooses
its isolation, and says so, where it cannot have it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from service.isolation import Isolation, job_uid
from service.ray_cluster import RayCluster
from service.settings import Settings
from workers.sandbox import Sandbox, available

PROBE = """
import json, os, sys
def can(fn):
    try:
        fn()
        return True
    except OSError:
        return False
home, run, other, init = sys.argv[1:5]
print(json.dumps({
    "uid": os.getuid(),
    "read key": can(lambda: open(f"{home}/signing_key").read()),
    "key in home's listing": "signing_key" in os.listdir(home),
    "read other run": can(lambda: open(f"{other}/spec.json").read()),
    "write own run": can(lambda: open(f"{run}/out.txt", "w").write("ok")),
    "write data sets": can(lambda: open(f"{home}/datasets/cache.npz", "w").write("ok")),
    "read init_from": can(lambda: open(init).read()),
    "write init_from": can(lambda: open(init, "a").write("x")),
    "write tmp": can(lambda: open("/tmp/scratch", "w").write("ok")),
    "nestor": sorted(k for k in os.environ if k.startswith("NESTOR_")),
    "home": os.environ["HOME"],
    "umask": oct(os.umask(0)),
}))
"""


def layout(root: Path) -> dict[str, Path]:
    home = root / "home"
    paths = {
        "home": home,
        "run": home / "runs" / "mine",
        "other": home / "runs" / "theirs",
        "init": home / "runs" / "theirs" / "model.pt",
        "datasets": home / "datasets",
    }
    for key in ("run", "other", "datasets"):
        paths[key].mkdir(parents=True)
    (home / "signing_key").write_text("secret")
    (paths["other"] / "spec.json").write_text("{}")
    paths["init"].write_text("weights")
    os.chmod(home, 0o700)
    os.chmod(paths["datasets"], 0o1777)
    return paths


def run_probe(paths: dict[str, Path], uid: int | None) -> dict:
    if uid is not None:
        os.chown(paths["run"], uid, uid)
        os.chmod(paths["init"], 0o644)
    box = Sandbox(
        hide=(str(paths["home"]),),
        rw=(str(paths["run"]), str(paths["datasets"])),
        ro=(str(paths["init"]),),
        uid=uid,
        keep_env=("NESTOR_HOME",),
    )
    args = [str(paths[k]) for k in ("home", "run", "other", "init")]
    env = {**os.environ, "NESTOR_ADMIN_TOKEN": "nst_admin", "NESTOR_HOME": str(paths["home"])}
    # As Ray runs a py_executable: through bash, the job's arguments after it.
    command = f"{box.py_executable()} -c {shlex.quote(PROBE)} {shlex.join(args)}"
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


needs_bwrap = pytest.mark.skipif(
    available() is not None and os.environ.get("CI") != "true",
    reason=f"no sandbox on this machine: {available()}",
)


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="a uid per job takes root")
def test_a_sandboxed_process_as_its_own_uid_sees_its_run_and_data_not_the_services(tmp_path):
    paths = layout(tmp_path)
    uid = job_uid("nestor-job-1-test")
    seen = run_probe(paths, uid)
    assert seen == {
        "uid": uid,
        "read key": False,
        "key in home's listing": False,
        "read other run": False,
        "write own run": True,
        "write data sets": True,
        "read init_from": True,
        "write init_from": False,
        "write tmp": True,
        "nestor": ["NESTOR_HOME"],
        "home": "/tmp",
        "umask": "0o77",
    }
    written = paths["run"] / "out.txt"
    assert written.read_text() == "ok" and written.stat().st_uid == uid
    assert not (tmp_path / "scratch").exists()  # its /tmp was its own


@needs_bwrap
def test_the_sandbox_alone_hides_the_same_paths_as_the_services_user(tmp_path):
    paths = layout(tmp_path)
    seen = run_probe(paths, None)
    assert seen["uid"] == os.geteuid()
    assert not seen["read key"] and not seen["key in home's listing"] and not seen["read other run"]
    assert seen["write own run"] and seen["read init_from"] and not seen["write init_from"]
    assert seen["nestor"] == ["NESTOR_HOME"]


def test_job_uids_are_stable_per_job_distinct_between_jobs_and_unprivileged():
    uids = {job_uid(f"nestor-job-{i}-2026") for i in range(1000)}
    assert len(uids) == 1000
    assert job_uid("nestor-job-7-x") == job_uid("nestor-job-7-x")
    assert all(2_000_000_000 < u < 2**31 for u in uids)


def test_without_bubblewrap_the_service_says_in_one_line_that_jobs_are_not_isolated(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    cluster = RayCluster(None, tmp_path, auth=False)
    settings = Settings(home=tmp_path)
    off = Isolation.detect(settings, cluster, owns_cluster=True)
    assert off.mode == "off" and "\n" not in off.line()
    assert off.line().startswith("nestor: job isolation is off (bubblewrap (bwrap) is not")
    assert "read and write the service's database" in off.line()
    with pytest.raises(RuntimeError, match="NESTOR_ISOLATION=on"):
        Isolation.detect(Settings(home=tmp_path, isolation="on"), cluster, owns_cluster=True)
    external = RayCluster("127.0.0.1:6379", tmp_path)
    assert Isolation.detect(settings, external, owns_cluster=True).mode == "off"
    assert Isolation.detect(settings, cluster, owns_cluster=False).mode == "off"  # given one


@needs_bwrap
def test_the_embedded_default_isolates_with_the_strongest_mode_the_machine_allows(tmp_path):
    cluster = RayCluster(None, tmp_path, auth=False)
    mode = Isolation.detect(Settings(home=tmp_path), cluster, owns_cluster=True).mode
    assert mode == ("uid" if os.geteuid() == 0 else "sandbox")


def test_the_sandbox_command_runs_from_a_file_with_the_standard_library_alone():
    box = Sandbox(hide=("/nowhere",), rw=())
    argv = box.argv()
    assert argv[:2] == [sys.executable, str(Path(__file__).parents[2] / "workers" / "sandbox.py")]
    source = (Path(__file__).parents[2] / "workers" / "sandbox.py").read_text()
    imports = {
        line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))
    }
    assert all(
        name.split(".")[0] in sys.stdlib_module_names | {"__future__"} for name in imports
    ), imports


def test_rays_processes_inherit_no_setting_of_the_service_but_what_workers_read(
    tmp_path, monkeypatch
):
    """`ray start`'s environment is every Ray process's: the service's admin token and
    database URL stay out of it even where the sandbox is off."""
    monkeypatch.setenv("NESTOR_ADMIN_TOKEN", "nst_admin")
    monkeypatch.setenv("NESTOR_DATABASE_URL", "postgresql+psycopg://u:secret@db/nestor")
    monkeypatch.setenv("NESTOR_PEAK_TFLOPS", "100")
    env = RayCluster(None, tmp_path, auth=False).env()
    assert "NESTOR_ADMIN_TOKEN" not in env and "NESTOR_DATABASE_URL" not in env
    assert env["NESTOR_PEAK_TFLOPS"] == "100"
