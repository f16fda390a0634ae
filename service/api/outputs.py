"""What comes out of a job: /v1/jobs/{id}/logs and /v1/jobs/{id}/artifacts.

Downloads are streamed from the run's storage (``Range`` requests, ``Content-Length``, the
SHA-256 in ``X-Checksum-SHA256`` and ``Repr-Digest``). A listing also gives each artifact a
signed link that works for an hour without the bearer token (a browser's download cannot
send a header): an HMAC of the job, the name and the expiry under the service's key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from ..audit import record
from ..deps import ReadDep, Scope, SessionDep, SubmitDep, authenticate, require_owner
from ..models import TERMINAL, Job, utcnow
from ..schemas import UtcDatetime
from ..storage import RunStorage
from ..streams import StreamResponse
from .jobs import JobId, get_job

router = APIRouter(prefix="/v1/jobs", tags=["outputs"])
LINK_SECONDS = 3600  # a signed download link's life
LOG_POLL_SECONDS = 0.5
LOG_GRACE_SECONDS = 15.0  # after a job's end, how long a follower waits for an unclosed log


# ---------------------------------------------------------------------- schemas
class LogPage(BaseModel):
    job_id: int
    lines: list[str] = Field(description="lines `first` .. `next - 1`, each '[rank R] text'")
    first: int = Field(description="the number of the first line returned")
    next: int = Field(description="the cursor for the next request (`since`)")
    dropped: int = Field(0, description="lines before `first` the log's size cap removed")
    notice: str | None = Field(None, description="a marker for the dropped lines")
    running: bool = Field(description="whether the job may still write")
    closed: bool = Field(
        False, description="its driver has exited: no more lines will come, whatever the status"
    )


class ArtifactPublic(BaseModel):
    name: str = Field(examples=["model.pt", "step-400-optimizer.pt"])
    kind: str = Field(description="model.pt, optimizer.pt, spec.json, result.json, metrics.csv")
    step: int | None = Field(None, description="a checkpoint's step; null for the final state")
    size: int
    sha256: str
    url: str = Field(description="a signed download link, valid for an hour without a token")


class ArtifactList(BaseModel):
    job_id: int
    data: list[ArtifactPublic]
    checkpoints: list[int] = Field(description="steps with a downloadable checkpoint")
    deleted_at: UtcDatetime | None = Field(None, description="when DELETE freed the storage")


class ArtifactsDeleted(BaseModel):
    job_id: int
    freed_bytes: int
    deleted_at: UtcDatetime


# ---------------------------------------------------------------------- helpers
class ArtifactFile(FileResponse):
    """A FileResponse that reads 1 MiB at a time. Each read is a hop to a worker thread and
    back; at Starlette's 64 KiB those hops, not the bytes, bounded a download to ~300 MB/s
    on loopback (bench/artifacts.py)."""

    chunk_size = 1 << 20


def storage(request: Request) -> RunStorage:
    return request.app.state.storage


StorageDep = Annotated[RunStorage, Depends(storage)]


def signing_key(home: Path) -> bytes:
    """The key download links are signed with: HOME/signing_key (mode 0600), made on first
    use and shared by every API replica on that home."""
    path = home / "signing_key"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f"signing_key.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        if not path.exists():
            os.replace(tmp, path)
        else:
            tmp.unlink()
    return bytes.fromhex(path.read_text().strip())


def signature(key: bytes, job_id: int, name: str, expires: int) -> str:
    message = f"{job_id}\n{name}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _deleted(job: Job) -> HTTPException:
    return HTTPException(
        status.HTTP_410_GONE,
        f"job {job.id}'s artifacts were deleted at {job.artifacts_deleted_at:%Y-%m-%d %H:%M:%S} "
        "UTC (DELETE /v1/jobs/{id}/artifacts); its log and metrics remain",
    )


def _log_notice(page, cap: int) -> str | None:
    if not page.dropped:
        return None
    return (
        f"... {page.dropped} earlier line(s) dropped: the log keeps its newest {cap} bytes "
        "(NESTOR_MAX_LOG_BYTES) ..."
    )


# ---------------------------------------------------------------------- logs
@router.get(
    "/{job_id}/logs",
    response_model=LogPage,
    responses={200: {"content": {"text/event-stream": {}}, "description": "with follow=true"}},
)
async def logs(
    job_id: JobId,
    request: Request,
    token: ReadDep,
    runs: StorageDep,
    since: Annotated[int, Query(ge=0, le=2**62, description="the first line wanted")] = 0,
    offset: Annotated[
        int | None, Query(ge=0, le=2**62, description="the same as since (a line number)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    follow: Annotated[bool, Query(description="stream (SSE) until the job ends")] = False,
    last_event_id: Annotated[str | None, Header(max_length=24)] = None,
):
    """The job's stdout and stderr, every line prefixed with the rank (or driver) that
    wrote it, kept by Nestor in the run's storage: they outlive the job, Ray and service
    restarts. Page with ``since`` (or ``offset``) = the previous answer's ``next``;
    ``follow=true`` is a server-sent event stream of `log` messages (each with its `next`
    as the event id, so a reconnect with Last-Event-ID resumes) and `end` once the job has
    ended."""
    hub = request.app.state.streams
    cap = request.app.state.settings.max_log_bytes
    since = since if offset is None else offset

    def read(db: Session, *, at: int) -> LogPage:
        job = get_job(db, job_id)
        log = runs.log(job.run_dir_path) if job.run_dir else None
        page = log.read(at, limit) if log else None
        running = job.status not in TERMINAL
        if page is None:
            return LogPage(
                job_id=job_id, lines=[], first=at, next=at, running=running, closed=not running
            )
        return LogPage(
            job_id=job_id,
            lines=page.lines,
            first=page.first,
            next=page.next,
            dropped=page.dropped,
            notice=_log_notice(page, cap),
            running=running,
            closed=log.closed,
        )

    if not follow:
        return await hub.db(partial(read, at=since))
    if last_event_id and last_event_id.isdigit():
        since = int(last_event_id)
    await hub.db(lambda db: get_job(db, job_id))  # 404 before the stream starts
    release = hub.open_or_refuse(token.token_id)

    async def messages():
        at, ended_reads = since, 0
        while True:
            page = await hub.db(partial(read, at=at))
            if page.lines or page.dropped:
                ended_reads = 0
                at = page.next
                data = page.model_dump_json(include={"lines", "first", "next", "dropped", "notice"})
                yield f"event: log\nid: {at}\ndata: {data}\n\n".encode()
            if len(page.lines) == limit:
                continue
            if not page.running:
                # A job's status can end (rank 0 reports it) before its driver has written
                # its last lines: wait for the driver to close the log, or for quiet.
                ended_reads += 1
                closed = page.closed or ended_reads * LOG_POLL_SECONDS > LOG_GRACE_SECONDS
                if closed and ended_reads > 1:
                    yield f"event: end\nid: {at}\ndata: {json.dumps({'next': at})}\n\n".encode()
                    return
            await asyncio.sleep(LOG_POLL_SECONDS)

    settings = request.app.state.settings
    return StreamResponse(
        messages(),
        release,
        ping=settings.sse_ping_seconds,
        send_timeout=30,
        sep="\n",
        headers={"Cache-Control": "no-cache"},
    )


# ---------------------------------------------------------------------- artifacts
@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(
    job_id: JobId, request: Request, db: SessionDep, _: ReadDep, runs: StorageDep
) -> ArtifactList:
    """What the job has left: the final ``model.pt`` (a plain state dict, load it with
    ``weights_only=True``), ``optimizer.pt`` (the consolidated optimizer state, loadable by
    ``create_optimizer(model.parameters(), spec).load_state_dict``), ``spec.json``,
    ``result.json``, ``metrics.csv``, and the same portable pair for each kept checkpoint
    (``step-N-model.pt``, ``step-N-optimizer.pt``). Listed while the job runs, too."""
    job = get_job(db, job_id)
    if job.artifacts_deleted_at is not None:
        deleted = job.artifacts_deleted_at
        return ArtifactList(job_id=job_id, data=[], checkpoints=[], deleted_at=deleted)
    if not job.run_dir:
        return ArtifactList(job_id=job_id, data=[], checkpoints=[])
    key = request.app.state.signing_key
    expires = int(time.time()) + LINK_SECONDS
    data = []
    for a in runs.artifacts(job.run_dir_path):
        sig = signature(key, job_id, a.name, expires)
        data.append(
            ArtifactPublic(
                name=a.name,
                kind=a.kind,
                step=a.step,
                size=a.size,
                sha256=runs.sha256(job.run_dir_path, a),
                url=f"/v1/jobs/{job_id}/artifacts/{a.name}?expires={expires}&signature={sig}",
            )
        )
    steps = sorted({a.step for a in data if a.step is not None})
    return ArtifactList(job_id=job_id, data=data, checkpoints=steps)


class SignedOrScope(Scope):
    """A signed link from a listing, or a bearer token with the scope (``read``)."""

    def __call__(  # type: ignore[override]
        self,
        request: Request,
        job_id: JobId,
        name: str,
        expires: Annotated[int | None, Query(ge=0, le=2**62)] = None,
        signature_: Annotated[str | None, Query(alias="signature", max_length=64)] = None,
    ) -> None:
        if signature_ is None:
            self.check(authenticate(request, request.headers.get("authorization")))
            return
        good = signature(request.app.state.signing_key, job_id, name, expires or 0)
        if expires is None or expires < time.time() or not hmac.compare_digest(good, signature_):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "this download link is invalid or has expired; list the artifacts again for "
                "a fresh one, or send a bearer token",
            )


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=ArtifactFile,
    dependencies=[Depends(SignedOrScope("read"))],
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "the byte range asked for (Range: bytes=a-b)"},
        410: {"description": "the job's artifacts were deleted"},
    },
)
def download(job_id: JobId, name: str, db: SessionDep, runs: StorageDep) -> ArtifactFile:
    """One artifact's bytes, streamed; ``Range`` requests are answered with 206. A name
    that is not in the job's listing (``..``, a path, another file of the run) is a 404."""
    job = get_job(db, job_id)
    if job.artifacts_deleted_at is not None:
        raise _deleted(job)
    found = runs.artifact(job.run_dir_path, name) if job.run_dir else None
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no artifact {name!r}")
    digest = runs.sha256(job.run_dir_path, found)
    encoded = base64.b64encode(bytes.fromhex(digest)).decode()
    return ArtifactFile(
        found.path,
        filename=name,
        media_type="application/octet-stream",
        headers={
            "X-Checksum-SHA256": digest,
            "Repr-Digest": f"sha-256=:{encoded}:",
            # A job's files are private and may be deleted: a browser must ask every time,
            # not answer a signed link from its cache (with Last-Modified it would, for a
            # while, after the artifacts are gone).
            "Cache-Control": "no-store",
        },
    )


@router.delete("/{job_id}/artifacts", response_model=ArtifactsDeleted)
def delete_artifacts(
    job_id: JobId, db: SessionDep, token: SubmitDep, runs: StorageDep
) -> ArtifactsDeleted:
    """Free a finished job's storage: its model, optimizer state, checkpoints and files
    (its log, its metrics in the database and its record stay). Afterwards the listing
    says when, and downloads answer 410. 409 while the job may still write."""
    job = get_job(db, job_id)
    require_owner(token, job.owner_id, f"job {job_id}")
    if job.status not in TERMINAL:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} is {job.status}; cancel it or wait for it to end first",
        )
    if job.artifacts_deleted_at is not None:
        return ArtifactsDeleted(job_id=job_id, freed_bytes=0, deleted_at=job.artifacts_deleted_at)
    freed = runs.delete(job.run_dir_path) if job.run_dir else 0
    job.artifacts_deleted_at = utcnow()
    record(db, token, "artifacts.delete", f"job {job_id}", f"{freed} bytes")
    db.commit()
    return ArtifactsDeleted(job_id=job_id, freed_bytes=freed, deleted_at=job.artifacts_deleted_at)
