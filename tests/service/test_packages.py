"""Code packages: packing a project directory the same way every time, the archive checks
(each hostile member refused by name, nothing stored), content-addressed storage, the
upload limits and auth, and specs whose code package is missing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.app import create_app
from service.jobs import create_job
from service.models import Job, Package, Sweep
from service.package_checks import DEFAULT_LIMITS, Limits, PackageRefused, check_archive
from service.package_pack import EPOCH, pack_dir, package_id, project_files
from service.packages import ray_working_dir, zip_path
from service.settings import Settings

from .conftest import ADMIN
from .test_api import SPEC

ZIP = {"Content-Type": "application/zip"}
MISSING = "sha256:" + "0" * 64


# ------------------------------------------------------------------------------ helpers
def make_zip(*members: tuple[str | zipfile.ZipInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we write
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return buf.getvalue()


def symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def patch_central(data: bytes, index: int, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite a field of the ``index``-th central directory header."""
    buf = bytearray(data)
    at = -1
    for _ in range(index + 1):
        at = buf.index(b"PK\x01\x02", at + 1)
    struct.pack_into(fmt, buf, at + offset, value)
    return bytes(buf)


def declared_small(real: int, declared: int) -> bytes:
    """A member of ``real`` zeros whose local and central headers both declare ``declared``
    bytes (with the CRC untouched): more data than it says."""
    buf = bytearray(make_zip(("zeros.bin", bytes(real))))
    struct.pack_into("<L", buf, buf.index(b"PK\x03\x04") + 22, declared)
    return patch_central(bytes(buf), 0, 24, "<L", declared)


def refusal(tmp_path: Path, data: bytes, limits: Limits = DEFAULT_LIMITS) -> PackageRefused:
    path = tmp_path / "upload.zip"
    path.write_bytes(data)
    with pytest.raises(PackageRefused) as caught:
        check_archive(path, limits)
    return caught.value


def stored(client) -> tuple[int, list[str]]:
    """(rows in packages, files in the packages directory)."""
    with client.app.state.db.sessions() as db:
        rows = db.scalar(select(func.count()).select_from(Package))
    root = client.app.state.settings.packages_dir
    return rows, sorted(p.name for p in root.iterdir()) if root.exists() else []


def make_project(root: Path) -> Path:
    files = {
        "train.py": "import mynet\n",
        "mynet/__init__.py": "",
        "mynet/model.py": "def build(data):\n    return None\n",
        "mynet/.gitignore": "secret.txt\n",
        "mynet/secret.txt": "ignored by the nested .gitignore",
        "secret.txt": "not ignored: the nested .gitignore only speaks for mynet/",
        ".gitignore": "data/\n*.log\n!keep.log\n",
        "data/big.npy": "ignored directory",
        "run.log": "ignored",
        "keep.log": "re-included",
        "script.sh": "#!/bin/sh\n",
        ".git/config": "[core]",
        ".venv/lib/site.py": "",
        "__pycache__/train.cpython-311.pyc": "",
        "mynet/__pycache__/model.cpython-311.pyc": "",
        "stray.pyc": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "script.sh").chmod(0o755)
    return root


PROJECT_FILES = [
    ".gitignore",
    "keep.log",
    "mynet/.gitignore",
    "mynet/__init__.py",
    "mynet/model.py",
    "script.sh",
    "secret.txt",
    "train.py",
]


@pytest.fixture
def tight(db_url, tmp_path):
    """The API with small package limits: 64 KiB uploads, 5 members."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=db_url,
        admin_token=ADMIN,
        max_package_bytes=64 << 10,
        max_package_entries=5,
    )
    with TestClient(create_app(settings, scheduler=False)) as c:
        c.headers["Authorization"] = f"Bearer {ADMIN}"
        yield c


# ------------------------------------------------------------------------------ packing
def test_pack_dir_skips_git_venv_caches_and_what_gitignore_ignores(tmp_path):
    root = make_project(tmp_path / "proj")
    assert project_files(root) == PROJECT_FILES
    with zipfile.ZipFile(io.BytesIO(pack_dir(root))) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == PROJECT_FILES  # relative, no top-level folder
        assert zf.read("mynet/model.py") == (root / "mynet/model.py").read_bytes()
    modes = {i.filename: i.external_attr >> 16 for i in infos}
    assert modes["script.sh"] == stat.S_IFREG | 0o755
    assert modes["train.py"] == stat.S_IFREG | 0o644
    assert {i.date_time for i in infos} == {EPOCH}


def test_pack_dir_gives_the_same_bytes_for_the_same_contents(tmp_path):
    a = make_project(tmp_path / "a")
    first = pack_dir(a)
    assert pack_dir(a) == first
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)  # another path, other inode order, other times
    os.utime(b / "train.py", (1_000_000_000, 1_000_000_000))
    (b / "new.log").write_text("ignored, so no change")
    assert pack_dir(b) == first
    (b / "train.py").write_text("import mynet  # changed\n")
    assert package_id(pack_dir(b)) != package_id(first)


def test_pack_dir_follows_symlinks_inside_and_refuses_those_out(tmp_path):
    root = make_project(tmp_path / "proj")
    (root / "alias.py").symlink_to("mynet/model.py")
    with zipfile.ZipFile(io.BytesIO(pack_dir(root))) as zf:
        info = zf.getinfo("alias.py")
        assert stat.S_ISREG(info.external_attr >> 16)
        assert zf.read("alias.py") == (root / "mynet/model.py").read_bytes()
    (tmp_path / "outside.py").write_text("secret")
    (root / "leak.py").symlink_to(tmp_path / "outside.py")
    with pytest.raises(ValueError, match=r"leak\.py is a symlink to .*outside\.py"):
        pack_dir(root)


def test_ray_unpacks_the_stored_zip_as_the_project_root(tmp_path):
    """What the module docstring says of Ray: a gcs:// package (a local .zip working_dir
    becomes one) is unpacked without stripping a top-level directory, so a project that is
    one package directory keeps it; a remote URL's unpacking would strip it."""
    from ray._private.runtime_env.packaging import unzip_package

    root = tmp_path / "proj"
    (root / "mynet").mkdir(parents=True)
    (root / "mynet/__init__.py").write_text("NAME = 'mynet'\n")
    archive = tmp_path / "pkg.zip"
    archive.write_bytes(pack_dir(root))
    unzip_package(str(archive), str(tmp_path / "gcs"), False, unlink_zip=False)
    assert (tmp_path / "gcs/mynet/__init__.py").read_text() == "NAME = 'mynet'\n"
    unzip_package(str(archive), str(tmp_path / "https"), True, unlink_zip=False)
    assert (tmp_path / "https/__init__.py").exists()  # why a URL must not be handed to Ray


# ----------------------------------------------------------------------------- checking
BOMB = 10 << 20


@pytest.mark.parametrize(
    ("members", "entry", "text"),
    [
        ([("../escape.py", b"x")], "../escape.py", "escapes the package's root"),
        ([("a/../../x.py", b"x")], "a/../../x.py", "escapes the package's root"),
        ([("/etc/x", b"x")], "/etc/x", "absolute path"),
        ([("C:x.py", b"x")], "C:x.py", "absolute path"),
        ([("C:\\x.py", b"x")], "C:\\x.py", "backslash"),
        ([("\\x.py", b"x")], "\\x.py", "backslash"),
        ([("./a.py", b"x")], "./a.py", "not a plain relative path"),
        ([("a//b.py", b"x")], "a//b.py", "not a plain relative path"),
        ([("a.py", b"x"), ("a.py", b"y")], "a.py", "appears twice"),
        ([("a", b"x"), ("a/b.py", b"y")], "a", "is a file and a directory"),
        ([symlink("evil", "../../etc/passwd")], "evil", "resolves outside"),
        ([symlink("abs", "/etc/passwd")], "abs", "absolute path"),
        # Each link alone stays inside; followed through sub/x, sub/l2 leaves the root.
        ([symlink("sub/x", ".."), symlink("sub/l2", "x/..")], "sub/l2", "resolves outside"),
        ([symlink("sub/x", ".."), symlink("up", "sub/x/..")], "up", "resolves outside"),
        ([symlink("d", "sub"), ("d/x.py", b"x")], "d", "d/x.py is written through"),
        ([symlink("a", "b"), symlink("b", "a")], "a", "symlink loop"),
        ([("zeros.bin", bytes(20 << 20))], "zeros.bin", "over 200 times"),
    ],
)
def test_hostile_members_are_refused_by_name(tmp_path, members, entry, text):
    refused = refusal(tmp_path, make_zip(*members))
    assert refused.entry == entry and text in str(refused), str(refused)
    assert str(refused).startswith(f"{entry}: ")


def test_symlinks_that_stay_inside_are_accepted(tmp_path):
    path = tmp_path / "ok.zip"
    path.write_bytes(
        make_zip(
            ("pkg/real.py", b"x = 1\n"),
            symlink("alias.py", "pkg/real.py"),
            symlink("pkg/root", ".."),
            symlink("pkg/again", "root/pkg/real.py"),
        )
    )
    names = [f["name"] for f in check_archive(path)]
    assert names == ["alias.py", "pkg/again", "pkg/real.py", "pkg/root"]


def test_a_member_holding_more_than_it_declares_is_refused_while_inflating(tmp_path):
    refused = refusal(tmp_path, declared_small(BOMB, declared=1000))
    assert refused.entry == "zeros.bin"
    assert "inflates past the 1000 bytes it declares" in str(refused)


def test_broken_and_unusual_archives_are_refused(tmp_path):
    good = make_zip(("a.py", b"print('a')\n" * 100), ("b.py", b"b = 2\n"))
    assert "not a zip archive" in str(refusal(tmp_path, b"PK\x03\x04 but not really" * 50))
    assert "not a zip archive" in str(refusal(tmp_path, good[:-30]))
    assert "holds no files" in str(refusal(tmp_path, make_zip()))
    # one byte of a's deflate stream flipped
    corrupt = bytearray(good)
    corrupt[30 + len("a.py") + 3] ^= 0xFF
    refused = refusal(tmp_path, bytes(corrupt))
    assert refused.entry == "a.py" and ("corrupt" in str(refused) or "CRC" in str(refused))
    crc = patch_central(good, 1, 16, "<L", 0)
    assert str(refusal(tmp_path, crc)) == "b.py: fails its CRC check"
    # b's directory entry pointing at a's data: one stream counted twice
    overlap = patch_central(good, 1, 42, "<L", 0)
    assert str(refusal(tmp_path, overlap)) == "b.py: overlaps the data of a.py"
    encrypted = patch_central(good, 0, 8, "<H", 0x1)
    assert str(refusal(tmp_path, encrypted)) == "a.py: is encrypted"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_BZIP2) as zf:
        zf.writestr("c.py", b"c = 3\n")
    assert "compression method 12" in str(refusal(tmp_path, buf.getvalue()))


def test_limits_on_members_and_unpacked_bytes_name_the_member_past_them(tmp_path):
    many = make_zip(*[(f"f{i}.py", b"") for i in range(6)])
    refused = refusal(tmp_path, many, Limits(entries=5))
    assert refused.entry == "f5.py" and "6 entries, over the limit of 5" in str(refused)
    big = make_zip(("a.bin", os.urandom(600)), ("b.bin", os.urandom(600)))
    refused = refusal(tmp_path, big, Limits(unpacked_bytes=1000))
    assert refused.entry == "b.bin" and "1200 bytes" in str(refused)


# ----------------------------------------------------------------------------- the API
def test_upload_is_content_addressed_stored_once_and_described(client, tmp_path):
    data = pack_dir(make_project(tmp_path / "proj"))
    first = client.post("/v1/packages", content=data, headers=ZIP)
    assert first.status_code == 201, first.text
    body = first.json()
    hex_ = hashlib.sha256(data).hexdigest()
    assert body["id"] == f"sha256:{hex_}" and body["size"] == len(data)
    root = tmp_path / "proj"
    assert body["files"] == [{"name": n, "size": (root / n).stat().st_size} for n in PROJECT_FILES]
    again = client.post("/v1/packages", content=data, headers=ZIP)
    assert again.status_code == 200 and again.json() == body
    assert stored(client) == (1, [f"{hex_}.zip"])
    settings = client.app.state.settings
    assert ray_working_dir(settings.packages_dir, body["id"]).read_bytes() == data
    assert client.get(f"/v1/packages/{body['id']}").json() == body
    missing = client.get(f"/v1/packages/{MISSING}")
    assert missing.status_code == 404 and missing.json()["detail"] == f"package {MISSING} not found"
    assert client.get("/v1/packages/sha256:nothex").status_code == 422


def test_a_package_may_be_larger_than_other_request_bodies(client):
    data = make_zip(("weights.bin", os.urandom(3 << 20)))  # incompressible, over 1 MiB
    assert client.app.state.settings.max_body_bytes < len(data)
    resp = client.post("/v1/packages", content=data, headers=ZIP)
    assert resp.status_code == 201, resp.text


@pytest.mark.parametrize(
    ("data", "loc", "text"),
    [
        (make_zip(("../escape.py", b"x")), ["body", "entry", "../escape.py"], "escapes"),
        (make_zip(("/etc/x", b"x")), ["body", "entry", "/etc/x"], "absolute path"),
        (
            make_zip(("ok.py", b""), symlink("passwd", "../../etc/passwd")),
            ["body", "entry", "passwd"],
            "resolves outside",
        ),
        (declared_small(BOMB, 1000), ["body", "entry", "zeros.bin"], "inflates past"),
        (b"#!/bin/sh\nrm -rf /\n" * 10, ["body"], "not a zip archive"),
    ],
    ids=["dotdot", "absolute", "symlink-out", "bomb", "not-a-zip"],
)
def test_hostile_uploads_are_422_naming_the_member_and_nothing_is_stored(client, data, loc, text):
    resp = client.post("/v1/packages", content=data, headers=ZIP)
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"] == loc and text in error["msg"], error
    if len(loc) == 3:
        assert error["msg"].startswith(f"{loc[2]}: ")
    assert stored(client) == (0, [])


def test_too_many_members_is_422_naming_the_first_past_the_limit(tight):
    data = make_zip(*[(f"f{i}.py", b"") for i in range(6)])
    resp = tight.post("/v1/packages", content=data, headers=ZIP)
    assert resp.status_code == 422
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body", "entry", "f5.py"]
    assert "over the limit of 5 (NESTOR_MAX_PACKAGE_ENTRIES)" in error["msg"]
    assert stored(tight) == (0, [])


def test_a_body_over_the_package_limit_is_413_with_or_without_a_length(tight):
    limit = 64 << 10
    detail = f"request body over {limit} bytes (NESTOR_MAX_PACKAGE_BYTES)"
    resp = tight.post("/v1/packages", content=bytes(limit + 1), headers=ZIP)
    assert resp.status_code == 413 and resp.json()["detail"] == detail
    chunks = (b"x" * 16384 for _ in range(5))  # no Content-Length: counted as it arrives
    resp = tight.post("/v1/packages", content=chunks, headers=ZIP)
    assert resp.status_code == 413 and resp.json()["detail"] == detail
    assert stored(tight) == (0, [])  # the partial upload was removed
    just_under = make_zip(("w.bin", os.urandom(limit - 200)))
    assert len(just_under) <= limit
    assert tight.post("/v1/packages", content=just_under, headers=ZIP).status_code == 201


def test_no_token_is_401_before_a_byte_of_the_body_is_read(client):
    read = []

    def body():
        read.append(True)
        yield b"x" * 65536

    resp = client.post("/v1/packages", content=body(), headers={**ZIP, "Authorization": ""})
    assert resp.status_code == 401 and resp.json()["detail"] == "missing bearer token"
    assert read == []
    assert client.get(f"/v1/packages/{MISSING}", headers={"Authorization": ""}).status_code == 401
    assert stored(client) == (0, [])


# ----------------------------------------------------------------------- specs' code
def test_a_spec_naming_a_package_that_is_not_stored_is_422(client, tmp_path):
    resp = client.post("/v1/jobs", json={"spec": {**SPEC, "code": MISSING}})
    assert resp.status_code == 422
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body", "spec", "code"]
    assert error["msg"] == f"no package {MISSING} (upload it with POST /v1/packages)"
    sweep = {"name": "s", "base": {**SPEC, "code": MISSING}, "space": {"optimizer.lr": [0.1]}}
    resp = client.post("/v1/sweeps", json=sweep)
    assert resp.status_code == 422
    assert resp.json()["detail"]["errors"] == [
        {"loc": ["code"], "msg": f"no package {MISSING} (upload it with POST /v1/packages)"}
    ]
    with client.app.state.db.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Job)) == 0
        assert db.scalar(select(func.count()).select_from(Sweep)) == 0
        orphan = create_job(db, "orphan", {**SPEC, "code": MISSING}, 0).id
    resp = client.post(f"/v1/jobs/{orphan}/retry")
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["spec", "code"]

    pkg = client.post("/v1/packages", content=pack_dir(make_project(tmp_path / "p")), headers=ZIP)
    code = pkg.json()["id"]
    job = client.post("/v1/jobs", json={"spec": {**SPEC, "code": code}})
    assert job.status_code == 201 and job.json()["spec"]["code"] == code
    sweep["base"] = {**SPEC, "code": code}
    assert client.post("/v1/sweeps", json=sweep).status_code == 201


def test_the_client_uploads_a_directory_once_to_a_live_server(api_server, tmp_path, monkeypatch):
    live, client = api_server
    root = make_project(tmp_path / "proj")
    (root / "weights.bin").write_bytes(os.urandom(3 << 20))  # past the 1 MiB of other bodies
    data = pack_dir(root)
    pkg_id = client.ensure_package(root)
    assert pkg_id == package_id(data) and client.package(pkg_id)["size"] == len(data)
    monkeypatch.setattr(client, "upload_package", lambda _: pytest.fail("uploaded again"))
    assert client.ensure_package(root) == pkg_id
    # A chunked upload (no Content-Length) over a real connection.
    other = make_zip(("other.py", os.urandom(2 << 20)))
    resp = httpx.post(
        f"{live.url}/v1/packages",
        content=(other[i : i + 65536] for i in range(0, len(other), 65536)),
        headers={**ZIP, "Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert resp.status_code == 201 and resp.json()["id"] == package_id(other), resp.text


def test_nestor_submit_and_sweep_with_code_upload_the_directory_once(api_server, tmp_path, capsys):
    from service.cli import main

    live, client = api_server
    root = make_project(tmp_path / "proj")
    spec = {**SPEC, "model": {"factory": "pkg.model:build"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    sweep = {"name": "s", "base": spec, "space": {"optimizer.lr": [0.01, 0.02]}}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    common = ["--url", live.url, "--token", ADMIN, "--code", str(root)]
    stored_before = set(live.settings.packages_dir.glob("*.zip"))
    assert main(["submit", str(tmp_path / "spec.json"), *common]) == 0
    job = json.loads(capsys.readouterr().out)
    assert main(["sweep", str(tmp_path / "sweep.json"), *common]) == 0
    created = json.loads(capsys.readouterr().out)
    trials = client.jobs(sweep=created["id"])["data"]
    assert job["spec"]["code"] == package_id(pack_dir(root))
    assert {t["spec"]["code"] for t in trials} == {job["spec"]["code"]} and len(trials) == 2
    new = set(live.settings.packages_dir.glob("*.zip")) - stored_before
    assert [p.name for p in new] == [job["spec"]["code"].removeprefix("sha256:") + ".zip"]


def test_a_jobs_runtime_env_ships_its_package_and_its_requirements(tmp_path):
    from service.scheduler import job_runtime_env

    settings = Settings(home=tmp_path)
    data = pack_dir(make_project(tmp_path / "proj"))
    pkg = package_id(data)
    settings.packages_dir.mkdir(parents=True)
    zip_path(settings.packages_dir, pkg).write_bytes(data)
    env = job_runtime_env({"code": pkg, "requirements": ["einops==0.8.0"]}, settings)
    assert env == {
        "env_vars": {
            "NESTOR_HOME": str(tmp_path),
            "NESTOR_MAX_LOG_BYTES": str(settings.max_log_bytes),  # the job log's cap
            "NESTOR_WARM_WORKERS": str(settings.warm_workers),  # per environment,
            "NESTOR_WARM_IDLE_SECONDS": str(settings.warm_idle_seconds),  # and their idle life
        },
        "working_dir": str(zip_path(settings.packages_dir, pkg)),
        "pip": ["einops==0.8.0"],
    }
    assert job_runtime_env({"requirements": []}, settings) == {"env_vars": env["env_vars"]}
    gone = "sha256:" + "f" * 64
    with pytest.raises(FileNotFoundError, match=f"package {gone} is not stored"):
        job_runtime_env({"code": gone}, settings)
