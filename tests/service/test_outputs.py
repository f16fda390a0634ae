"""A job's outputs through the API, on SQLite and PostgreSQL: the artifact listing, downloads
(checksums, Range, signed links), names outside the listing, deletion, logs and their
follow stream, and init_from's refusals. The run directory is laid out here as a worker
leaves it; the same files from a real Ray job are tested in test_outputs_live.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from service.models import Job
from workers.logs import JobLog

SPEC = {"model": "mnist1d-mlp", "dataset": {"name": "mnist1d", "num_samples": 1000}}


def make_run(run_dir: Path) -> dict[str, bytes]:
    """A finished run's files: the final pair, a checkpoint at step 8 (complete) and one at
    step 12 (incomplete: no complete.json), the files around them, and a log."""
    files: dict[str, bytes] = {}
    run_dir.mkdir(parents=True)
    for name, value in [("model.pt", {"w": torch.arange(10.0)}), ("optimizer.pt", {"state": {}})]:
        torch.save(value, run_dir / name)
        files[name] = (run_dir / name).read_bytes()
    for name, text in [
        ("spec.json", json.dumps(SPEC)),
        ("result.json", '{"status": "succeeded"}'),
        ("metrics.csv", "step,time,train_loss\n1,0.0,2.3\n"),
        ("metrics.jsonl", '{"step": 1}\n'),
        ("nestor-job.json", "{}"),
    ]:
        (run_dir / name).write_text(text)
        files[name] = text.encode()
    for step, complete in [(8, True), (12, False)]:
        d = run_dir / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(b"model at %d" % step)
        (d / "optimizer.pt").write_bytes(b"optimizer at %d" % step)
        (d / "rank0.pt").write_bytes(b"shard")
        if complete:
            (d / "complete.json").write_text(json.dumps({"step": step}))
    JobLog(run_dir / "logs").append([f"[rank {i % 2}] line {i}" for i in range(30)])
    return files


@pytest.fixture
def finished(client, tmp_path):
    """A job whose run directory holds a finished run; (job id, run directory, files)."""
    job = client.post("/v1/jobs", json={"name": "done", "spec": SPEC}).json()
    run_dir = tmp_path / "runs" / "nestor-job-x"
    files = make_run(run_dir)
    with client.app.state.db.sessions() as db:
        row = db.get(Job, job["id"])
        row.run_dir, row.status = str(run_dir), "succeeded"
        db.commit()
    return job["id"], run_dir, files


def test_listing_names_sizes_and_checksums_of_final_and_checkpoint_files(client, finished):
    job_id, _, files = finished
    listing = client.get(f"/v1/jobs/{job_id}/artifacts").json()
    by_name = {a["name"]: a for a in listing["data"]}
    assert list(by_name) == [
        "model.pt",
        "optimizer.pt",
        "spec.json",
        "result.json",
        "metrics.csv",
        "step-8-model.pt",
        "step-8-optimizer.pt",
    ]  # the incomplete step-12 checkpoint and the run's other files are not artifacts
    assert listing["checkpoints"] == [8] and listing["deleted_at"] is None
    for name, content in files.items():
        if name in by_name:
            assert by_name[name]["size"] == len(content)
            assert by_name[name]["sha256"] == hashlib.sha256(content).hexdigest()
    assert by_name["step-8-model.pt"]["step"] == 8
    assert by_name["step-8-model.pt"]["kind"] == "model.pt"


def test_download_is_whole_checksummed_and_answers_ranges(client, finished):
    job_id, _, files = finished
    resp = client.get(f"/v1/jobs/{job_id}/artifacts/model.pt")
    assert resp.status_code == 200 and resp.content == files["model.pt"]
    digest = hashlib.sha256(files["model.pt"]).digest()
    assert resp.headers["content-length"] == str(len(files["model.pt"]))
    assert resp.headers["x-checksum-sha256"] == digest.hex()
    assert resp.headers["repr-digest"] == f"sha-256=:{base64.b64encode(digest).decode()}:"
    assert resp.headers["cache-control"] == "no-store"  # no stale copy after a DELETE
    part = client.get(f"/v1/jobs/{job_id}/artifacts/model.pt", headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == files["model.pt"][10:100]
    ckpt = client.get(f"/v1/jobs/{job_id}/artifacts/step-8-optimizer.pt")
    assert ckpt.status_code == 200 and ckpt.content == b"optimizer at 8"
    # The downloaded model loads without unpickling anything but tensors.
    assert torch.equal(
        torch.load(__import__("io").BytesIO(resp.content), weights_only=True)["w"],
        torch.arange(10.0),
    )


@pytest.mark.parametrize(
    "name",
    [
        "%2E%2E",
        "..%2Fspec.json",
        "..%2F..%2Fnestor.db",
        "checkpoints%2Fstep-00000008%2Fmodel.pt",
        "a%2Fb",
        "%2Fetc%2Fpasswd",
        "metrics.jsonl",
        "nestor-job.json",
        "worker_token",
        "step-12-model.pt",  # incomplete checkpoint
        "step-8-rank0.pt",
        "step-00000008-model.pt",
    ],
)
def test_no_name_reaches_outside_the_listing(client, finished, name):
    job_id, _, _ = finished
    assert client.get(f"/v1/jobs/{job_id}/artifacts/{name}").status_code == 404


def test_signed_links_work_without_a_token_and_nothing_else_does(client, finished):
    job_id, _, files = finished
    url = next(a["url"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"])
    anon = {"Authorization": ""}
    assert client.get(url, headers=anon).content == files["model.pt"]
    assert client.get(f"/v1/jobs/{job_id}/artifacts/model.pt", headers=anon).status_code == 401
    tampered = url.replace("model.pt?", "optimizer.pt?")
    assert client.get(tampered, headers=anon).status_code == 403
    expired = url.split("?")[0] + "?expires=1&signature=" + url.split("signature=")[1]
    resp = client.get(expired, headers=anon)
    assert resp.status_code == 403 and "expired" in resp.json()["detail"]


def test_delete_frees_storage_keeps_the_log_and_says_so_afterwards(client, finished):
    job_id, run_dir, files = finished
    running = client.post("/v1/jobs", json={"name": "r", "spec": SPEC}).json()
    resp = client.delete(f"/v1/jobs/{running['id']}/artifacts")
    assert resp.status_code == 409 and "queued" in resp.json()["detail"]

    resp = client.delete(f"/v1/jobs/{job_id}/artifacts")
    assert resp.status_code == 200
    assert resp.json()["freed_bytes"] >= sum(len(b) for b in files.values()) - len(b"{}")
    assert not (run_dir / "model.pt").exists() and not (run_dir / "checkpoints").exists()
    listing = client.get(f"/v1/jobs/{job_id}/artifacts").json()
    assert listing["data"] == [] and listing["deleted_at"]
    gone = client.get(f"/v1/jobs/{job_id}/artifacts/model.pt")
    assert gone.status_code == 410 and "deleted" in gone.json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}/logs").json()["lines"][0] == "[rank 0] line 0"
    again = client.delete(f"/v1/jobs/{job_id}/artifacts")
    assert again.status_code == 200 and again.json()["freed_bytes"] == 0
    # init_from a job whose artifacts are gone is refused at submit.
    resp = client.post("/v1/jobs", json={"spec": {**SPEC, "init_from": {"job": job_id}}})
    assert resp.status_code == 422 and "deleted" in resp.text


def test_logs_page_with_a_cursor_and_follow_ends_with_the_job(client, finished):
    job_id, _, _ = finished
    first = client.get(f"/v1/jobs/{job_id}/logs", params={"limit": 20}).json()
    assert first["lines"][:2] == ["[rank 0] line 0", "[rank 1] line 1"]
    assert (first["first"], first["next"], first["running"]) == (0, 20, False)
    rest = client.get(f"/v1/jobs/{job_id}/logs", params={"since": first["next"]}).json()
    assert rest["lines"] == [f"[rank {i % 2}] line {i}" for i in range(20, 30)]
    same = client.get(f"/v1/jobs/{job_id}/logs", params={"offset": first["next"]}).json()
    assert same == rest  # offset is since's other name
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true", "since": 25}
    ) as r:
        body = r.read().decode()
    events = [block for block in body.split("\n\n") if block.startswith("event:")]
    assert events[0].startswith("event: log\nid: 30")
    assert json.loads(events[0].split("data: ")[1])["lines"][0] == "[rank 1] line 25"
    assert events[-1].startswith("event: end")
    assert client.get("/v1/jobs/999/logs").status_code == 404


def test_a_capped_log_drops_its_oldest_lines_with_a_marker(tmp_path):
    log = JobLog(tmp_path / "logs", cap=8192)
    for i in range(2000):
        log.append([f"[rank 0] line {i:05d}"])
    page = log.read(0, 10)
    assert page.dropped == page.first > 0 and page.lines[0] == f"[rank 0] line {page.first:05d}"
    total = sum(p.stat().st_size for p in (tmp_path / "logs").glob("*.log"))
    assert total <= 8192 + 8192 // 8  # the cap, plus at most the segment being written
    assert log.tail(1) == ["[rank 0] line 01999"]


def test_init_from_is_refused_naming_the_field(client, finished):
    job_id, _, _ = finished

    def submit(init):
        return client.post("/v1/jobs", json={"spec": {**SPEC, "init_from": init}})

    resp = submit({"job": 4242})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"][-2:] == ["init_from", "job"]
    assert "job 4242 does not exist" in resp.json()["detail"][0]["msg"]
    resp = submit({"job": job_id, "step": 12})  # incomplete checkpoint
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][-1] == "step"
    assert "its checkpoints: 8" in resp.json()["detail"][0]["msg"]
    queued = client.post("/v1/jobs", json={"spec": SPEC}).json()
    resp = submit({"job": queued["id"]})
    assert resp.status_code == 422 and "has not started" in resp.text
    assert submit({"job": 0}).status_code == 422  # not a job id
    for ok in ({"job": job_id}, {"job": job_id, "step": 8, "optimizer_state": True}):
        assert submit(ok).status_code == 201


def test_the_cli_downloads_a_jobs_files_and_prints_its_log(api_server, tmp_path, capsys):
    """`nestor download ID [--out DIR] [--step N]` and `nestor logs ID [-f]` against a live
    API: the files arrive whole (a partial download resumes), the log prints line by line."""
    from service.cli import main as nestor
    from service.db import Database

    live, client = api_server
    job_id = client.submit(SPEC, name="cli-outputs")["id"]
    files = make_run(tmp_path / "run")
    db = Database(live.settings.db_url)
    with db.sessions() as s:
        row = s.get(Job, job_id)
        row.run_dir, row.status = str(tmp_path / "run"), "succeeded"
        s.commit()
    db.engine.dispose()
    base = ["--url", live.url, "--token", live.settings.admin_token]

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt.part").write_bytes(files["model.pt"][:100])  # an interrupted download
    assert nestor(["download", str(job_id), "--out", str(out), *base]) == 0
    for name in ("model.pt", "optimizer.pt", "spec.json", "result.json", "metrics.csv"):
        assert (out / name).read_bytes() == files[name], name
    assert not list(out.glob("*.part"))
    assert "sha256" in capsys.readouterr().err
    assert (
        nestor(["download", str(job_id), "--step", "8", "--out", str(tmp_path / "s8"), *base]) == 0
    )
    assert sorted(p.read_bytes() for p in (tmp_path / "s8").iterdir()) == [
        b"model at 8",
        b"optimizer at 8",
    ]
    capsys.readouterr()

    assert nestor(["logs", str(job_id), *base]) == 0
    assert capsys.readouterr().out.splitlines() == [f"[rank {i % 2}] line {i}" for i in range(30)]
    assert nestor(["logs", str(job_id), "-f", "--since", "28", *base]) == 0  # ended: returns
    assert capsys.readouterr().out.splitlines() == ["[rank 0] line 28", "[rank 1] line 29"]
    with pytest.raises(SystemExit):
        nestor(["download", str(job_id), "--step", "12", *base])  # incomplete: not listed
    assert "no such artifact" in capsys.readouterr().err


def test_the_cli_says_in_one_line_when_the_service_is_not_there(tmp_path, capsys):
    """A stopped service (or a wrong --url) is an error message naming the URL and exit
    status 2 from every command that calls the API, not an httpx traceback."""
    import socket

    from service.cli import main as nestor

    with socket.socket() as s:  # a loopback port nobody listens on once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    base = ["--url", url, "--token", "t"]
    for command in (
        ["jobs"],
        ["show", "1"],
        ["cancel", "1"],
        ["submit", str(spec)],
        ["logs", "1"],
        ["download", "1", "--out", str(tmp_path / "d")],
    ):
        with pytest.raises(SystemExit) as exited:
            nestor([*command, *base])
        assert exited.value.code == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"nestor: error: cannot reach the Nestor service at {url}/"), err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_links_planted_in_the_run_directory_are_not_served(client, finished, tmp_path):
    """User code writes the run directory: a symbolic or hard link named like an artifact
    (to the service's signing key, say), or a linked checkpoints directory, is not listed
    and not downloadable; the real files beside them still are."""
    job_id, run_dir, _ = finished
    secret = tmp_path / "secret"
    secret.write_text("the service's own file")
    (run_dir / "spec.json").unlink()
    (run_dir / "spec.json").symlink_to(secret)
    (run_dir / "metrics.csv").unlink()
    os.link(secret, run_dir / "metrics.csv")
    outside = tmp_path / "elsewhere" / "step-00000016"
    outside.mkdir(parents=True)
    (outside / "model.pt").write_text("the service's own file")
    (outside / "complete.json").write_text("{}")
    (run_dir / "checkpoints" / "step-00000016").symlink_to(outside, target_is_directory=True)

    listed = client.get(f"/v1/jobs/{job_id}/artifacts").json()
    names = {a["name"] for a in listed["data"]}
    assert {"spec.json", "metrics.csv", "step-16-model.pt"}.isdisjoint(names), names
    assert {"model.pt", "optimizer.pt", "step-8-model.pt"} <= names
    for name in ("spec.json", "metrics.csv", "step-16-model.pt"):
        resp = client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert resp.status_code == 404 and "own file" not in resp.text, name
    assert client.get(f"/v1/jobs/{job_id}/artifacts/model.pt").status_code == 200
