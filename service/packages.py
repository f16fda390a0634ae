"""Code packages: a user's project directory as a zip, made by the client (`pack_dir`),
checked by the service without extracting, importing or running any of it
(`check_archive`), and stored content-addressed under HOME/packages (`store_package`).

How Ray takes the stored zip (read in Ray 2.60's ray/_private/runtime_env/working_dir.py,
packaging.py and ray/dashboard/modules/dashboard_sdk.py): a local ``.zip`` given as the
runtime_env ``working_dir`` is not re-packed; its bytes are uploaded as they are, to the GCS
as ``gcs://_ray_pkg_<sha1 of the file>.zip`` (through the dashboard's
``PUT /api/packages/gcs/...`` when submitted with JobSubmissionClient), and every node
unpacks a ``gcs://`` package with ``unzip_package(..., remove_top_level_directory=False)``:
the entries land exactly as named in the job's working directory, which is the workers'
current directory and on their ``sys.path``. So a package holds its files relative to the
project root, with no top-level folder: ``mynet.py`` imports as ``mynet``. (Only remote
URIs, ``s3://`` or ``https://``, get a single top-level directory stripped, which would turn
a project made of one package directory ``mynet/`` inside out: hand Ray the local file,
`zip_path`, never a URL to it.) Ray's unzip skips absolute and backslashed names and names
that resolve outside its target with a warning, and writes a symlink entry as a regular
file holding the link's text; the checks here refuse all of those at upload instead, so
that nothing vanishes or changes meaning on the workers. Ray itself refuses packages of
512 MiB and more (RAY_max_grpc_message_size), far above the upload limit.

This module imports neither torch nor workers/: the CLI packs with it too.
"""

from __future__ import annotations

import hashlib
import io
import ntpath
import os
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathspec import GitIgnoreSpec
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import Package

ID_PATTERN = r"^sha256:[0-9a-f]{64}$"  # the same as workers.spec.PACKAGE_PATTERN
ID_EXAMPLE = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SKIP_NAMES = frozenset({".git", ".venv", "__pycache__"})
SKIP_SUFFIXES = (".pyc",)
EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: no mtimes in the bytes
CHUNK = 1 << 16
# A central directory entry is 46 bytes and its names; an honest archive's average stays
# far below this, and zipfile builds one object per entry before anyone can count them.
CENTRAL_BYTES_PER_ENTRY = 1024
MAX_LINK_HOPS = 40  # as Linux's realpath
MAX_LINK_BYTES = 1024


class PackageRefused(ValueError):
    """An archive the service will not store; ``entry`` is the offending member's name
    (None when the archive as a whole is at fault)."""

    def __init__(self, entry: str | None, reason: str) -> None:
        super().__init__(f"{entry}: {reason}" if entry is not None else reason)
        self.entry, self.reason = entry, reason


@dataclass(frozen=True)
class Limits:
    """What an archive may hold (settings: NESTOR_MAX_PACKAGE_ENTRIES,
    NESTOR_MAX_PACKAGE_UNPACKED_BYTES)."""

    entries: int = 10_000
    unpacked_bytes: int = 1 << 30
    # Deflate tops out near 1032:1; source code compresses 3-10:1. Checked from 1 MiB up,
    # where a bomb starts to cost something.
    ratio: float = 200.0
    ratio_from_bytes: int = 1 << 20


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------------- ids
def package_id(data: bytes | Path) -> str:
    """``"sha256:<hex>"`` of an archive's bytes (given, or in a file)."""
    if isinstance(data, Path):
        with data.open("rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    return "sha256:" + hashlib.sha256(data).hexdigest()


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


# ------------------------------------------------------------------------------ packing
def project_files(root: Path) -> list[str]:
    """The files `pack_dir` takes from ``root``, as sorted relative POSIX paths: all but
    ``.git``, ``.venv``, ``__pycache__``, ``*.pyc`` and what the ``.gitignore`` files
    (the root's and nested ones, deeper ones first, as git reads them) ignore. A symlink
    is followed to a file inside ``root``; one to a directory or out of ``root`` is an
    error naming it."""
    root = root.resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    files: list[str] = []

    def walk(rel_dir: str, ignores: list[tuple[str, GitIgnoreSpec]]) -> None:
        here = root / rel_dir
        if (here / ".gitignore").is_file():
            lines = (here / ".gitignore").read_text(errors="replace").splitlines()
            ignores = [*ignores, (rel_dir, GitIgnoreSpec.from_lines(lines))]
        for entry in sorted(os.scandir(here), key=lambda e: e.name):
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if entry.name in SKIP_NAMES or entry.name.endswith(SKIP_SUFFIXES):
                continue
            if _ignored(ignores, rel, is_dir):
                continue
            if is_dir:
                walk(rel, ignores)
            elif entry.is_symlink():
                target = Path(entry.path).resolve()
                if not target.is_relative_to(root) or not target.is_file():
                    what = "a directory" if target.is_dir() else str(target)
                    raise ValueError(
                        f"{rel} is a symlink to {what}; packages take regular files inside "
                        f"{root}: copy it in or list it in .gitignore"
                    )
                files.append(rel)
            elif entry.is_file():
                files.append(rel)

    walk("", [])
    return sorted(files)


def _ignored(ignores: list[tuple[str, GitIgnoreSpec]], rel: str, is_dir: bool) -> bool:
    for base, spec in reversed(ignores):  # the deepest .gitignore that has a say decides
        sub = rel[len(base) + 1 :] if base else rel
        verdict = spec.check_file(sub + "/" if is_dir else sub).include
        if verdict is not None:
            return verdict
    return False


def pack_dir(root: Path) -> bytes:
    """A deterministic zip of a project directory (`project_files`): entries sorted and
    relative to ``root``, every date 1980-01-01, modes 0o755 or 0o644 by the owner's
    execute bit, deflated. The same contents give the same bytes, hence the same id,
    wherever the directory is and whenever its files were touched."""
    root = Path(root).resolve()
    names = project_files(root)
    if not names:
        raise ValueError(f"{root} has no files to pack")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            path = root / name
            info = zipfile.ZipInfo(name, date_time=EPOCH)
            info.create_system = 3  # Unix, on every platform, so the modes mean the same
            mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


# ----------------------------------------------------------------------------- checking
def check_archive(path: Path, limits: Limits = DEFAULT_LIMITS) -> list[dict[str, Any]]:
    """The files of the zip at ``path`` as ``[{"name", "size"}]`` sorted by name, or
    PackageRefused naming the first member at fault. Nothing is extracted: each member is
    inflated as a stream, counted and thrown away. Refused: bytes that are not a zip;
    names that are empty, absolute (``/x``, ``C:\\x``, ``\\x``), hold a backslash, a ``..``
    or ``.`` component, or repeat another; a file that is also a directory; symlinks whose
    target is absolute or resolves, through the archive's other symlinks, outside the
    root (symlinks inside it are fine); encrypted members and compression methods other
    than stored and deflate; members whose data overlap; more than ``limits.entries``
    members; more than ``limits.unpacked_bytes`` declared in all; a member over
    ``limits.ratio`` times its compressed size; and one whose data inflate to more or
    fewer bytes than it declares, fail their CRC, or end early."""
    with open(path, "rb") as f:
        _bound_central_directory(f, limits)
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as e:
            raise PackageRefused(None, f"not a zip archive ({e})") from None
        with archive:
            infos = archive.infolist()
            _check_directory(infos, limits)
            _check_overlaps(f, infos)
            links = {}
            for info in infos:
                data = _inflate(f, info, keep=MAX_LINK_BYTES if _is_link(info) else 0)
                if _is_link(info):
                    links[info.filename] = _link_target(info.filename, data)
    for info in infos:
        _resolve(info.filename, links)
    files = [{"name": i.filename, "size": i.file_size} for i in infos if not i.is_dir()]
    return sorted(files, key=lambda file: file["name"])


def _bound_central_directory(f: io.BufferedReader, limits: Limits) -> None:
    """Refuse before zipfile reads the central directory when it is too large for the
    entry limit (zipfile reads entries until the directory's declared size is used up,
    whatever count the end record states)."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    f.seek(max(0, end - (22 + 0xFFFF)))
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise PackageRefused(None, "not a zip archive (no end of central directory record)")
    _, _, _, _, count, size, _, _ = struct.unpack("<4s4H2LH", tail[at : at + 22])
    if count == 0xFFFF or size == 0xFFFFFFFF:
        raise PackageRefused(None, "a zip64 archive: more entries or bytes than a package may hold")
    if size > limits.entries * CENTRAL_BYTES_PER_ENTRY:
        raise PackageRefused(
            None,
            f"the central directory ({size} bytes) is too large for {limits.entries} entries "
            "(NESTOR_MAX_PACKAGE_ENTRIES)",
        )


def _check_directory(infos: list[zipfile.ZipInfo], limits: Limits) -> None:
    """Names, counts and declared sizes, before a byte of data is read."""
    if not infos:
        raise PackageRefused(None, "the archive holds no files")
    if len(infos) > limits.entries:
        raise PackageRefused(
            infos[limits.entries].filename,
            f"the archive has {len(infos)} entries, over the limit of {limits.entries} "
            "(NESTOR_MAX_PACKAGE_ENTRIES)",
        )
    seen: set[str] = set()
    parents: dict[str, str] = {}  # directory -> an entry under it
    total = 0
    for info in infos:
        name = info.filename
        _check_name(name)
        key = name.rstrip("/")
        if key in seen:
            raise PackageRefused(name, "appears twice in the archive")
        seen.add(key)
        parts = key.split("/")
        for i in range(1, len(parts)):
            parents.setdefault("/".join(parts[:i]), name)
        if info.flag_bits & 0x1:
            raise PackageRefused(name, "is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise PackageRefused(
                name, f"uses compression method {info.compress_type} (stored or deflate only)"
            )
        if info.is_dir() and info.file_size:
            raise PackageRefused(name, "is a directory entry with data")
        total += info.file_size
        if total > limits.unpacked_bytes:
            raise PackageRefused(
                name,
                f"the files declare {total} bytes uncompressed by here, over the limit of "
                f"{limits.unpacked_bytes} (NESTOR_MAX_PACKAGE_UNPACKED_BYTES)",
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= limits.ratio_from_bytes and ratio > limits.ratio:
            raise PackageRefused(
                name,
                f"{info.compress_size} bytes inflate to {info.file_size}, over "
                f"{limits.ratio:g} times (a zip bomb?)",
            )
    for info in infos:
        under = parents.get(info.filename)
        if under is not None and _is_link(info):
            raise PackageRefused(info.filename, f"is a symlink that {under} is written through")
        if under is not None and not info.is_dir():
            raise PackageRefused(info.filename, f"is a file and a directory (of {under})")


def _check_name(name: str) -> None:
    if not name or name == "/":
        raise PackageRefused(name, "has an empty name")
    if "\\" in name:
        raise PackageRefused(name, "has a backslash in its name (a Windows path?)")
    if name.startswith("/") or ntpath.splitdrive(name)[0]:
        raise PackageRefused(name, "is an absolute path")
    parts = name.removesuffix("/").split("/")
    if ".." in parts:
        raise PackageRefused(name, "escapes the package's root (a '..' component)")
    if "." in parts or "" in parts:
        raise PackageRefused(name, "is not a plain relative path ('.' or an empty component)")


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _link_target(name: str, data: bytes) -> str:
    try:
        target = data.decode()
    except UnicodeDecodeError:
        raise PackageRefused(name, "is a symlink whose target is not UTF-8") from None
    if not target or "\x00" in target:
        raise PackageRefused(name, "is a symlink with an empty or NUL-holding target")
    if target.startswith("/") or "\\" in target or ntpath.splitdrive(target)[0]:
        raise PackageRefused(name, f"is a symlink to an absolute path ({target})")
    return target


def _resolve(name: str, links: dict[str, str]) -> None:
    """Walk ``name`` component by component, following the archive's symlinks as the
    kernel would once extracted; refuse it when the walk leaves the root."""
    resolved: list[str] = []
    todo = name.rstrip("/").split("/")[::-1]  # a stack: the next component last
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                via = f" (through {links[name]})" if name in links else ""
                raise PackageRefused(name, f"resolves outside the package's root{via}")
            resolved.pop()
            continue
        resolved.append(part)
        target = links.get("/".join(resolved))
        if target is not None:
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise PackageRefused(name, "goes through a symlink loop")
            resolved.pop()
            todo.extend(target.split("/")[::-1])


def _inflate(f: io.BufferedReader, info: zipfile.ZipInfo, keep: int) -> bytes:
    """Decompress one member as a stream from its local header on, counting bytes
    against what the central directory declares; the first ``keep`` bytes are returned."""
    name = info.filename
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise PackageRefused(name, "has no local header where the directory points")
    name_len, extra_len = struct.unpack("<2H", header[26:30])
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    if f.read(name_len).decode(encoding, errors="replace") != info.orig_filename:
        raise PackageRefused(name, "has another name in its local header")
    f.seek(extra_len, os.SEEK_CUR)
    inflate = zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
    kept = bytearray()
    real, crc, left = 0, 0, info.compress_size

    def take(out: bytes) -> None:
        nonlocal real, crc
        real += len(out)
        if real > info.file_size:
            raise PackageRefused(
                name, f"inflates past the {info.file_size} bytes it declares (a zip bomb?)"
            )
        crc = zlib.crc32(out, crc)
        if len(kept) < keep:
            kept.extend(out[: keep - len(kept)])

    try:
        while left:
            data = f.read(min(CHUNK, left))
            if not data:
                raise PackageRefused(name, "the archive ends inside this entry's data")
            left -= len(data)
            if inflate is None:
                take(data)
                continue
            while data and not inflate.eof:
                take(inflate.decompress(data, CHUNK))  # bounded output per call
                data = inflate.unconsumed_tail
        if inflate is not None:
            take(inflate.flush())
            if not inflate.eof:
                raise PackageRefused(name, "its compressed data end early")
    except zlib.error as e:
        raise PackageRefused(name, f"has corrupt compressed data ({e})") from None
    if real != info.file_size:
        raise PackageRefused(name, f"holds {real} bytes but declares {info.file_size}")
    if crc != info.CRC:
        raise PackageRefused(name, "fails its CRC check")
    return bytes(kept)


def _check_overlaps(f: io.BufferedReader, infos: list[zipfile.ZipInfo]) -> None:
    """Members must not share data (the overlapping-entries bomb: one deflate stream
    counted many times)."""
    end, previous = 0, None
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < end:
            raise PackageRefused(info.filename, f"overlaps the data of {previous}")
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<2H", f.read(4))
        end = info.header_offset + 30 + name_len + extra_len + info.compress_size
        previous = info.filename


# ------------------------------------------------------------------------------ storing
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
