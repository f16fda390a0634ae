"""/v1/packages: upload a code package (a zip of a project directory), describe one."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path as FilePath
from typing import Annotated, Any, BinaryIO

import anyio
from fastapi import APIRouter, HTTPException, Path, Request, Response, status
from sqlalchemy.orm import Session

from ..audit import record
from ..deps import CodeDep, ReadDep, SessionDep
from ..models import Package
from ..packages import (
    ID_EXAMPLE,
    ID_PATTERN,
    Limits,
    PackageRefused,
    get_package,
    store_package,
)
from ..schemas import PackagePublic
from ..settings import Settings
from .jobs import owner_names

router = APIRouter(prefix="/v1/packages", tags=["packages"])
PackageId = Annotated[
    str, Path(pattern=ID_PATTERN, description="a package's id", examples=[ID_EXAMPLE])
]
WRITE_BYTES = 1 << 20  # the body is written and hashed in a worker thread a MiB at a time


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=PackagePublic,
    responses={
        200: {"model": PackagePublic, "description": "these bytes were already stored"},
        413: {"description": "over NESTOR_MAX_PACKAGE_BYTES"},
        422: {"description": "not a zip, or a member that is refused (named in loc and msg)"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {  # the raw zip; its Content-Type is not looked at
                kind: {"schema": {"type": "string", "format": "binary"}}
                for kind in ("application/zip", "application/octet-stream")
            },
        }
    },
)
async def upload(request: Request, response: Response, token: CodeDep) -> PackagePublic:
    """Store a zip of a project directory, sent as the raw body (``curl --data-binary
    @pkg.zip -H 'Content-Type: application/zip'``), under its content's id
    ``sha256:<hex>``. 201 when stored now, 200 when the same bytes already were (stored
    once). The archive is checked, never extracted or imported: a member that escapes the
    root (``..``, an absolute path, a symlink out), a zip bomb (more bytes than declared,
    too many members or bytes), or bytes that are not a zip are a 422 naming the member,
    and nothing is stored. Bodies over NESTOR_MAX_PACKAGE_BYTES are cut off with a 413
    (counted as they arrive, by the request guard)."""
    settings: Settings = request.app.state.settings
    limits = Limits(
        entries=settings.max_package_entries,
        unpacked_bytes=settings.max_package_unpacked_bytes,
    )
    root = settings.packages_dir
    # In the packages directory itself, so that storing is an atomic rename.
    path = await anyio.to_thread.run_sync(_new_upload, root)
    try:
        pkg_id = await _receive(request, path)

        def store() -> tuple[PackagePublic, bool]:
            with request.app.state.db.sessions() as db:
                row, created = store_package(db, root, path, pkg_id, limits, token.user_id)
                if created:
                    record(db, token, "package.upload", pkg_id[:100])
                    db.commit()
                return _public(db, row), created

        try:
            public, created = await anyio.to_thread.run_sync(store)
        except PackageRefused as e:
            loc = ["body"] if e.entry is None else ["body", "entry", e.entry]
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                [{"loc": loc, "msg": str(e), "type": "value_error"}],
            ) from None
    finally:
        await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
    if not created:
        response.status_code = status.HTTP_200_OK
    return public


@router.get("/{package_id}", response_model=PackagePublic)
def show(package_id: PackageId, db: SessionDep, _: ReadDep) -> PackagePublic:
    """A stored package: its id, size, files and owner."""
    package = get_package(db, package_id)
    if package is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"package {package_id} not found")
    return _public(db, package)


def _public(db: Session, package: Package) -> PackagePublic:
    owner = owner_names(db, {package.owner_id}).get(package.owner_id)
    return PackagePublic.model_validate(package).model_copy(update={"owner": owner})


def _new_upload(root: FilePath) -> FilePath:
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=root, prefix=".upload-", suffix=".part")
    os.close(fd)
    return FilePath(name)


async def _receive(request: Request, path: FilePath) -> str:
    """Write the body to ``path`` as it arrives, hashing it on the way; returns its id.
    Disk writes and hashing run in a worker thread, never on the event loop."""
    digest = hashlib.sha256()
    file: BinaryIO = await anyio.to_thread.run_sync(path.open, "wb")
    try:
        pending = bytearray()
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= WRITE_BYTES:
                await anyio.to_thread.run_sync(_append, file, digest, bytes(pending))
                pending.clear()
        await anyio.to_thread.run_sync(_append, file, digest, bytes(pending), True)
    finally:
        await anyio.to_thread.run_sync(file.close)
    return "sha256:" + digest.hexdigest()


def _append(file: BinaryIO, digest: Any, data: bytes, last: bool = False) -> None:
    file.write(data)
    digest.update(data)
    if last:  # on disk before the row that points at it is committed
        file.flush()
        os.fsync(file.fileno())
