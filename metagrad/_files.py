"""Files written whole and verified when read: the one place for the SHA-256 checksums that the
data caches and checkpoints keep beside what they write."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_path(path: Path) -> Path:
    """Where ``path``'s checksum is kept: ``<name>.sha256`` beside it."""
    return path.with_name(path.name + ".sha256")


def matches_checksum(path: Path) -> bool:
    """Whether ``path`` exists and its bytes match the checksum kept beside it."""
    try:
        return checksum_path(path).read_text().strip() == file_sha256(path)
    except OSError:
        return False


def write_verified(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` with ``write(file)`` into a temporary file beside it, records its checksum,
    then renames it into place: a reader never sees a half-written file, and a damaged one fails
    :func:`matches_checksum`. An exception (an ``OSError``, an interrupt) leaves no temporary file
    behind and is re-raised.

    Example:
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_verified(folder / "a.bin", lambda f: f.write(b"data"))
        >>> matches_checksum(folder / "a.bin"), (folder / "a.bin").read_bytes()
        (True, b'data')
    """

    def fill(tmp: Path) -> None:
        with tmp.open("wb") as f:
            write(f)

    write_verified_file(path, fill)


def temporary_beside(path: Path) -> Path:
    """A new empty file ``<name>.<random>.tmp`` in ``path``'s folder (created with its parents),
    never a name a reader looks for.

    Example:
        >>> tmp = temporary_beside(Path(tempfile.mkdtemp()) / "sub" / "a.npy")
        >>> tmp.name.startswith("a.npy.") and tmp.name.endswith(".tmp"), tmp.stat().st_size
        (True, 0)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    return Path(name)


def write_verified_file(path: Path, fill: Callable[[Path], None]) -> None:
    """:func:`write_verified` for writers that need a path (a memory map): ``fill(tmp)`` writes the
    temporary file ``tmp`` beside ``path``, whose checksum is then recorded before it is renamed
    into place. An exception leaves no temporary file behind and is re-raised.

    Example:
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_verified_file(folder / "b.bin", lambda tmp: tmp.write_bytes(b"xyz"))
        >>> matches_checksum(folder / "b.bin")
        True
    """
    tmp = None
    try:
        tmp = temporary_beside(path)
        fill(tmp)
        checksum_path(path).write_text(file_sha256(tmp))  # before the data is visible
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and tmp.exists():
            tmp.unlink()
        raise
