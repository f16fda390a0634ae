"""The checks a code package's zip must pass before the service stores it: names, sizes,
links and zip bombs, read from the archive's bytes without extracting, importing or running
any of it (`check_archive`).

Why these checks (read in Ray 2.60's ray/_private/runtime_env/working_dir.py and
packaging.py): every node unpacks a package with ``unzip_package(...,
remove_top_level_directory=False)``, so the entries land exactly as named in the job's
working directory. Ray's unzip skips absolute and backslashed names and names that resolve
outside its target with a warning, and writes a symlink entry as a regular file holding the
link's text; the checks here refuse all of those at upload instead, so that nothing vanishes
or changes meaning on the workers. Ray itself refuses packages of 512 MiB and more
(RAY_max_grpc_message_size), far above the upload limit.
"""

from __future__ import annotations

import io
import ntpath
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
