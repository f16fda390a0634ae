"""Packing a project directory into a code package, on the client: which files it takes
(git's ignore rules), a deterministic zip of them, and the package's id.

A package holds its files relative to the project root, with no top-level folder:
``mynet.py`` imports as ``mynet`` on the workers, where Ray unpacks the archive as it is
(see `service.packages` for how the service hands it to Ray).

No SQLAlchemy, no FastAPI, no torch, no workers/: `service.client` and the CLI pack with it
on any machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path

from pathspec import GitIgnoreSpec

ID_PATTERN = r"^sha256:[0-9a-f]{64}$"  # the same as workers.spec.PACKAGE_PATTERN
ID_EXAMPLE = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SKIP_NAMES = frozenset({".git", ".venv", "__pycache__"})
SKIP_SUFFIXES = (".pyc",)
EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: no mtimes in the bytes


def package_id(data: bytes | Path) -> str:
    """``"sha256:<hex>"`` of an archive's bytes (given, or in a file)."""
    if isinstance(data, Path):
        with data.open("rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    return "sha256:" + hashlib.sha256(data).hexdigest()


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
