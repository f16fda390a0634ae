"""The service's store of code packages: checked archives under HOME/packages at their
content address, one ``Package`` row each, and what a job needs from them.

How Ray takes a stored zip (read in Ray 2.60's ray/_private/runtime_env/working_dir.py,
packaging.py and ray/dashboard/modules/dashboard_sdk.py): a local ``.zip`` given as the
runtime_env ``working_dir`` is not re-packed; its bytes are uploaded as they are, to the GCS
as ``gcs://_ray_pkg_<sha1 of the file>.zip`` (through the dashboard's
``PUT /api/packages/gcs/...`` when submitted with JobSubmissionClient), and every node
unpacks it without stripping a top-level directory. (Only remote URIs, ``s3://`` or
``https://``, get a single top-level directory stripped, which would turn a project made of
one package directory ``mynet/`` inside out: hand Ray the local file, `zip_path`, never a
URL to it.)

Packing is `service.package_pack`'s (the client's side); the archive checks are
`service.package_checks`'. Their names that the store's callers use are re-exported here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import Package
from .package_checks import DEFAULT_LIMITS, Limits, PackageRefused, check_archive
from .package_pack import ID_EXAMPLE, ID_PATTERN

__all__ = [
    "DEFAULT_LIMITS",
    "ID_EXAMPLE",
    "ID_PATTERN",
    "Limits",
    "PackageRefused",
    "get_package",
    "missing_package",
    "package_exists",
    "ray_working_dir",
    "store_package",
    "zip_path",
]


def zip_path(packages_dir: Path, pkg_id: str) -> Path:
    """Where a package's archive is stored: ``PACKAGES_DIR/<hex>.zip``."""
    if not re.fullmatch(ID_PATTERN, pkg_id):
        raise ValueError(f"{pkg_id!r} is not a package id 'sha256:<64 hex digits>'")
    return packages_dir / f"{pkg_id.removeprefix('sha256:')}.zip"


def ray_working_dir(packages_dir: Path, pkg_id: str) -> Path:
    """The stored archive to give Ray as the runtime_env ``working_dir`` (a local .zip:
    Ray uploads it as is and unpacks it without stripping a top-level directory)."""
    path = zip_path(packages_dir, pkg_id)
    if not path.is_file():
        raise FileNotFoundError(f"package {pkg_id} is not stored at {path}")
    return path


def get_package(db: Session, pkg_id: str) -> Package | None:
    return db.get(Package, pkg_id)


def package_exists(db: Session, pkg_id: str) -> bool:
    return db.get(Package, pkg_id) is not None


def missing_package(db: Session, code: str | None) -> str | None:
    """Why a spec's ``code`` cannot run (no such package stored), or None."""
    if code is None or package_exists(db, code):
        return None
    return f"no package {code} (upload it with POST /v1/packages)"


def store_package(
    db: Session,
    packages_dir: Path,
    upload: Path,
    pkg_id: str,
    limits: Limits = DEFAULT_LIMITS,
    owner_id: int | None = None,
) -> tuple[Package, bool]:
    """Check the archive at ``upload`` (a file in ``packages_dir``, whose sha256 the
    caller computed as it arrived) and move it to its content address; returns the
    record and whether it is new. The same bytes are stored once: a second upload finds
    the record and leaves ``upload`` where it is, for the caller to delete. Refused:
    PackageRefused, and nothing is stored."""
    target = zip_path(packages_dir, pkg_id)
    existing = db.get(Package, pkg_id)
    if existing is not None:
        if not target.exists():  # the file was lost; these are the same bytes
            os.replace(upload, target)
        return existing, False
    files = check_archive(upload, limits)
    os.replace(upload, target)  # atomic: a reader sees the whole archive or none
    row = Package(id=pkg_id, size=target.stat().st_size, files=files, owner_id=owner_id)
    db.add(row)
    try:
        db.commit()
    except IntegrityError:  # the same bytes, uploaded at the same time by someone else
        db.rollback()
        return db.get(Package, pkg_id), False
    return row, True
