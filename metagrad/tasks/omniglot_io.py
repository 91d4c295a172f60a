"""Reading the official Omniglot release into 28x28 arrays, cached on disk (numpy + Pillow only).

The source is the pair ``images_background`` / ``images_evaluation``, each either the official
zip or its extracted folder, laid out as ``<half>/<Alphabet>/character<NN>/<CCCC>_<DD>.png``.
Decoding happens once (about 10 s on two cores, in threads, with a progress bar on stderr);
the result is an ``.npz`` in the cache folder, named after a sha256 of the source bytes, so an
edited or replaced source is never served stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from metagrad._files import matches_checksum, write_verified

HALVES = ("images_background", "images_evaluation")
DRAWINGS = 20
IMAGE_SIZE = 28
# Bump when the preprocessing changes: it is part of the cache key.
_FORMAT_VERSION = 1
_MEMBER = re.compile(r"(?P<alphabet>[^/]+)/character(?P<char>\d+)/\d+_(?P<drawer>\d+)\.png")
_RELEASE_URL = "https://github.com/brendenlake/omniglot/tree/master/python"
# Pillow releases the GIL while it inflates and resamples, so threads decode in parallel (4,000
# PNGs on two cores: 1.1-1.8 s against 3.4-4.0 s serially; no gain while other jobs hold both
# cores); past 8 the 105x105 PNGs are too small to gain.
_DECODE_THREADS = min(os.cpu_count() or 1, 8)
_PROGRESS_DELAY = 1.0  # seconds before the bar shows: a small release decodes silently


class OmniglotNotFoundError(FileNotFoundError):
    """The Omniglot files are not where the loader was told to look.

    A :class:`FileNotFoundError`, so generic handlers catch it too.

    Example:
        >>> try:
        ...     load_omniglot("/no/such/folder")
        ... except FileNotFoundError as err:
        ...     print(type(err).__name__)
        OmniglotNotFoundError
    """


class OmniglotFormatError(ValueError):
    """The Omniglot files are there but unreadable: corrupt, truncated or in the wrong layout.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = (Path(folder) / "images_background.zip").write_bytes(b"not a zip")
        ...     load_omniglot(folder, cache_dir=folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.omniglot_io.OmniglotFormatError: ...background.zip is not a readable zip...
    """


class OmniglotData(NamedTuple):
    """All Omniglot characters, one row per character, in canonical order.

    The order is background before evaluation, then alphabet name (Python string order), then
    character number; the 20 drawings of a character are in drawer order ``01..20``.

    Attributes:
        images: ``uint8`` array ``(num_characters, 20, 28, 28)``; ink is 255, background 0.
        alphabet: ``str`` array ``(num_characters,)``, the alphabet folder name.
        character: ``int32`` array ``(num_characters,)``, the ``NN`` of ``character<NN>``.
        background: ``bool`` array ``(num_characters,)``, True for ``images_background``.

    Example:
        A split selects rows (what :func:`metagrad.tasks.omniglot.omniglot_splits` does):

        >>> from metagrad.tasks.omniglot import split_characters
        >>> data = OmniglotData(
        ...     images=np.zeros((4, 20, 28, 28), np.uint8),
        ...     alphabet=np.array(["A", "A", "B", "B"]),
        ...     character=np.array([1, 2, 1, 2], np.int32),
        ...     background=np.array([True, True, False, False]),
        ... )
        >>> split = split_characters(data.alphabet, data.background, num_train=2, num_val=1)
        >>> {name: data.images[rows].shape[0] for name, rows in split.items()}
        {'train': 2, 'val': 1, 'test': 1}
    """

    images: np.ndarray
    alphabet: np.ndarray
    character: np.ndarray
    background: np.ndarray


class _Source(NamedTuple):
    """One half of the release: where it is, its PNG members and how to read their bytes."""

    where: Path
    members: list[str]  # paths relative to the half's folder, '/'-separated, sorted
    read: Callable[[str], bytes]
    digest: Callable[[], str]


def default_data_dir() -> Path:
    """``$METAGRAD_DATA/omniglot``; raises if ``METAGRAD_DATA`` is not set."""
    root = os.environ.get("METAGRAD_DATA")
    if not root:
        raise OmniglotNotFoundError(
            "no data_dir was given and METAGRAD_DATA is not set: pass data_dir= (a folder "
            f"holding {HALVES[0]}.zip and {HALVES[1]}.zip) or set METAGRAD_DATA so that "
            "$METAGRAD_DATA/omniglot is that folder"
        )
    return Path(root) / "omniglot"


def default_cache_dir() -> Path:
    """``$METAGRAD_CACHE``, or ``~/.cache/metagrad`` when it is not set."""
    return Path(os.environ.get("METAGRAD_CACHE") or Path.home() / ".cache" / "metagrad")


def load_omniglot(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> OmniglotData:
    """All 1,623 Omniglot characters as 28x28 ``uint8`` arrays, preprocessed once and cached.

    Reads ``images_background.zip`` and ``images_evaluation.zip`` (or the folders they extract
    to; the zip wins when both are present) from ``data_dir`` and never downloads. Each PNG is
    converted to 8-bit grey and resized to 28x28 with Pillow's LANCZOS filter, then inverted so
    that ink is 255 and background 0. (Finn et al.'s script called the same resize on the 1-bit
    images, which Pillow silently performs as nearest-neighbour; converting first makes the
    resize really anti-aliased.)

    The arrays are cached as ``<cache_dir>/omniglot/omniglot28_<key>.npz`` (read with
    ``allow_pickle=False``, written atomically), where ``key`` is a sha256 of the zips' bytes, or
    of the extracted files' relative paths and bytes, and of the preprocessing version.

    Args:
        data_dir: the folder holding the two halves; default ``$METAGRAD_DATA/omniglot``.
        cache_dir: a writable folder; default ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``.
            If it cannot be written, a warning is issued and the arrays are still returned.
        progress: show a progress bar on stderr while decoding (only once a decode has taken
            a second: a cache hit or a small release prints nothing).

    Returns:
        An :class:`OmniglotData` in canonical order (see there).

    Raises:
        OmniglotNotFoundError: a half is missing (the message names the expected files).
        OmniglotFormatError: a zip is corrupt or truncated, a PNG does not decode, or the
            layout is wrong (no alphabet folders, a character without exactly 20 drawings).

    Example:
        Typical use is ``data = load_omniglot("~/data/omniglot")``; without the files:

        >>> load_omniglot("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.omniglot_io.OmniglotNotFoundError: ...images_background.zip...
    """
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    with contextlib.ExitStack() as open_files:
        sources = [_open_source(data_dir, half, open_files) for half in HALVES]
        key = hashlib.sha256(f"omniglot{IMAGE_SIZE}-v{_FORMAT_VERSION}".encode())
        for source in sources:
            key.update(source.digest().encode())
        path = cache_dir / "omniglot" / f"omniglot{IMAGE_SIZE}_{key.hexdigest()[:32]}.npz"
        data = _read_cache(path)
        if data is None:
            data = _decode_all(sources, progress)
            _write_cache(path, data)
    return data


# --- finding and hashing the source ------------------------------------------------------------


def _open_source(data_dir: Path, half: str, open_files: contextlib.ExitStack) -> _Source:
    zip_path, folder = data_dir / f"{half}.zip", data_dir / half
    if zip_path.is_file():
        return _zip_source(zip_path, half, open_files)
    if folder.is_dir():
        return _folder_source(folder)
    found = sorted(p.name for p in data_dir.iterdir())[:10] if data_dir.is_dir() else None
    raise OmniglotNotFoundError(
        f"Omniglot not found: expected {zip_path} (or its extracted folder {folder}/). "
        f"The loader needs {HALVES[0]}.zip and {HALVES[1]}.zip from the official release "
        f"({_RELEASE_URL}) and never downloads. "
        + (f"{data_dir} holds: {found}" if found is not None else f"{data_dir} does not exist")
    )


def _zip_source(path: Path, half: str, open_files: contextlib.ExitStack) -> _Source:
    try:
        archive = open_files.enter_context(zipfile.ZipFile(path))
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise OmniglotFormatError(
            f"{path} is not a readable zip ({err}); it is probably truncated or corrupt: "
            f"download it again from {_RELEASE_URL}"
        ) from err
    prefix = f"{half}/"
    members = sorted(
        n[len(prefix) :] for n in archive.namelist() if n.startswith(prefix) and not n.endswith("/")
    )

    def read(member: str) -> bytes:
        try:
            return archive.read(prefix + member)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
            raise OmniglotFormatError(
                f"{path}: cannot read {prefix + member} ({err}); the zip is corrupt: download "
                "it again"
            ) from err

    def digest() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    return _Source(path, members, read, digest)


def _folder_source(folder: Path) -> _Source:
    members = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def read(member: str) -> bytes:
        return (folder / member).read_bytes()

    def digest() -> str:
        # Length-prefixed paths and bytes: unambiguous, and a renamed file changes the key.
        h = hashlib.sha256()
        for member in _pngs(members):
            data, name = read(member), member.encode()
            h.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    return _Source(folder, members, read, digest)


# --- layout and decoding -----------------------------------------------------------------------


def _pngs(members: list[str]) -> list[str]:
    """PNG members, leaving out OS litter (``__MACOSX/``, dot files)."""
    litter = lambda member: any(p.startswith((".", "__MACOSX")) for p in member.split("/"))
    return [m for m in members if m.lower().endswith(".png") and not litter(m)]


def _layout(source: _Source) -> dict[tuple[str, int], list[str]]:
    """``(alphabet, character number) -> its 20 members in drawer order``, checked."""
    groups: dict[tuple[str, int], list[tuple[int, str]]] = {}
    expected = "<Alphabet>/character<NN>/<CCCC>_<DD>.png"
    for member in _pngs(source.members):
        match = _MEMBER.fullmatch(member)
        if match is None:
            raise OmniglotFormatError(
                f"unexpected file {member!r} in {source.where}: Omniglot PNGs are laid out as "
                f"{expected} inside the {HALVES[0]}/ or {HALVES[1]}/ folder"
            )
        group = groups.setdefault((match["alphabet"], int(match["char"])), [])
        group.append((int(match["drawer"]), member))
    if not groups:
        raise OmniglotFormatError(
            f"no alphabet folders with PNG drawings in {source.where}: expected {expected}"
        )
    for (alphabet, char), group in groups.items():
        if len(group) != DRAWINGS:
            raise OmniglotFormatError(
                f"{alphabet}/character{char:02d} in {source.where} has {len(group)} drawings; "
                f"every Omniglot character has {DRAWINGS}"
            )
    return {k: [m for _, m in sorted(groups[k])] for k in sorted(groups)}


def _decode(source: _Source, member: str) -> np.ndarray:
    from PIL import Image  # only a reader of images needs Pillow

    data = source.read(member)
    try:
        with Image.open(io.BytesIO(data)) as im:
            grey = im.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise OmniglotFormatError(f"cannot decode {member} in {source.where}: {err}") from err
    return 255 - np.asarray(grey, dtype=np.uint8)


def _decode_all(sources: list[_Source], progress: bool) -> OmniglotData:
    """Both halves decoded by a pool of threads, behind one progress bar."""
    from tqdm.auto import tqdm

    layouts = [_layout(source) for source in sources]  # every layout error before any decoding
    total = sum(len(layout) for layout in layouts) * DRAWINGS
    bar = tqdm(
        total=total,
        desc="decoding Omniglot once (cached for later runs)",
        unit="png",
        disable=not progress,
        delay=_PROGRESS_DELAY,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    with bar, ThreadPoolExecutor(_DECODE_THREADS) as pool:
        try:
            parts = [
                _preprocess(source, layout, half == HALVES[0], pool, bar)
                for source, layout, half in zip(sources, layouts, HALVES, strict=True)
            ]
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a corrupt PNG fails now, not after the rest
            raise
    return _concat(parts)


def _preprocess(
    source: _Source,
    layout: dict[tuple[str, int], list[str]],
    background: bool,
    pool: ThreadPoolExecutor,
    bar,
) -> OmniglotData:
    members = [member for drawings in layout.values() for member in drawings]
    images = np.empty((len(members), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    # ``_decode`` looked up per call (not bound here), so a test can replace it.
    decoded = pool.map(lambda member: _decode(source, member), members, chunksize=1)
    for i, image in enumerate(decoded):
        images[i] = image
        bar.update()
    return OmniglotData(
        images=images.reshape(len(layout), DRAWINGS, IMAGE_SIZE, IMAGE_SIZE),
        alphabet=np.array([a for a, _ in layout], dtype=str),
        character=np.array([c for _, c in layout], dtype=np.int32),
        background=np.full(len(layout), background),
    )


def _concat(parts: list[OmniglotData]) -> OmniglotData:
    return OmniglotData(*(np.concatenate(field) for field in zip(*parts, strict=True)))


# --- cache -------------------------------------------------------------------------------------


def _read_cache(path: Path) -> OmniglotData | None:
    """The cached arrays, or None when absent or damaged (then they are rebuilt, with a warning
    for a damaged one). The file's sha256, written beside it, is checked before it is read."""
    if not path.exists():
        return None
    data = None
    if matches_checksum(path):
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = OmniglotData(*(npz[f] for f in OmniglotData._fields))
        except Exception:  # a damaged npz fails in zlib, zipfile, numpy's header parser, ...
            data = None
    if data is not None:
        n, shape = len(data.images), (DRAWINGS, IMAGE_SIZE, IMAGE_SIZE)
        ok = data.images.dtype == np.uint8 and data.images.shape[1:] == shape
        if ok and all(len(a) == n for a in data[1:]):
            return data
    warnings.warn(
        f"the Omniglot cache {path} is damaged; rebuilding it from the zips", stacklevel=3
    )
    return None


def _write_cache(path: Path, data: OmniglotData) -> None:
    """Written whole and verified (:func:`metagrad._files.write_verified`)."""
    try:
        write_verified(path, lambda f: np.savez_compressed(f, **data._asdict()))
    except OSError as err:
        warnings.warn(
            f"could not write the Omniglot cache {path} ({err}); it will be rebuilt next time",
            stacklevel=3,
        )
