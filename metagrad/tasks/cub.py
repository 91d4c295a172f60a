"""CUB-200-2011 (Wah et al. 2011) for few-shot classification, with the split of Chen et al. 2019.

The release folder ``CUB_200_2011/`` holds ``images/<NNN.Name>/*.jpg`` (200 bird species, 41 to
60 photos each, 11,788 in all) and the lists ``images.txt`` (``<id> <NNN.Name>/<file>.jpg``) and
``classes.txt`` (``<id> <NNN.Name>``). The few-shot split is that of Chen et al. 2019, "A Closer
Look at Few-shot Classification" (``filelists/CUB/write_CUB_filelist.py``): the 200 class
folders in sorted order, indexed ``i = 0..199``, are train if ``i % 2 == 0``, val if
``i % 4 == 1``, test if ``i % 4 == 3`` (100 / 50 / 50 classes), shipped as
``metagrad/tasks/splits/cub/{train,val,test}.txt``. Images are resized to 84x84 (the usual
protocol) with LANCZOS; the bounding boxes are not used.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from metagrad.tasks.folder import class_members, image_size_option, read_split_folders
from metagrad.tasks.imageset import (
    SPLITS,
    ImageSetClassError,
    ImageSetCountError,
    ImageSetData,
    ImageSetFormatError,
    ImageSetNotFoundError,
    fingerprint,
    resolve_expected,
)

__all__ = ["cub_split", "find_cub", "load_cub"]

_NAME = "cub"
_FORMAT_VERSION = 1  # bump when the preprocessing changes: it is part of the cache key
_CLASS_FOLDER = re.compile(r"\d{3}\.\S+")


def cub_split(class_folders: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Chen et al.'s split of the CUB class folders: by index ``i`` in sorted order, train if
    ``i % 2 == 0``, val if ``i % 4 == 1``, test if ``i % 4 == 3``.

    Applied to the release's 200 folders this gives the shipped lists
    (:func:`~metagrad.tasks.imageset.shipped_split`).

    Example:
        >>> cub_split([f"{i:03d}.Bird" for i in range(1, 9)])["val"]
        ('002.Bird', '006.Bird')
        >>> from metagrad.tasks.imageset import shipped_split
        >>> folders = [c for s in SPLITS for c in shipped_split("cub", s)]
        >>> cub_split(folders) == {s: shipped_split("cub", s) for s in SPLITS}
        True
    """
    ordered = sorted(class_folders)
    rule = {"train": (2, 0), "val": (4, 1), "test": (4, 3)}
    return {s: tuple(c for i, c in enumerate(ordered) if i % m == r) for s, (m, r) in rule.items()}


def find_cub(data_dir: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(images folder, folder of images.txt / classes.txt or None)`` of a CUB copy.

    ``data_dir`` may be the folder holding ``CUB_200_2011/``, the release folder itself (holding
    ``images/``), or the ``images/`` folder (its class folders ``NNN.Name``); the lists are looked
    for beside ``images/``.

    Raises:
        ImageSetNotFoundError: none of these.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "CUB_200_2011" / "images" / "001.Black_footed_Albatross").mkdir(parents=True)
        >>> images, lists = find_cub(root)
        >>> images.relative_to(root).as_posix(), lists
        ('CUB_200_2011/images', None)
    """
    data_dir = Path(data_dir).expanduser()
    for images in (data_dir / "CUB_200_2011" / "images", data_dir / "images", data_dir):
        if images.is_dir() and any(
            _CLASS_FOLDER.fullmatch(p.name) and p.is_dir() for p in images.iterdir()
        ):
            lists = images.parent
            has_lists = (lists / "images.txt").is_file() or (lists / "classes.txt").is_file()
            return images, lists if has_lists else None
    found = sorted(p.name for p in data_dir.iterdir())[:10] if data_dir.is_dir() else None
    raise ImageSetNotFoundError(
        f"CUB-200-2011 not found in {data_dir}: expected CUB_200_2011/images/<NNN.Name>/*.jpg "
        "(the release folder), images/<NNN.Name>/ or the <NNN.Name>/ folders themselves. The "
        "loader never downloads. "
        + (f"{data_dir} holds: {found}" if found is not None else f"{data_dir} does not exist")
    )


def _read_list(path: Path) -> list[tuple[int, str]]:
    """The ``<id> <value>`` lines of ``images.txt`` or ``classes.txt``."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ImageSetFormatError(f"{path} is not readable text ({err})") from err
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ImageSetFormatError(
                f"{path}, line {number}: expected '<id> <name>' as in the CUB release, got "
                f"{line[:80]!r}"
            )
        rows.append((int(parts[0]), parts[1]))
    return rows


def _release_files(lists: Path) -> dict[str, set[str]]:
    """``{class folder: file names}`` of ``images.txt``."""
    path, files = lists / "images.txt", {}
    for number, (_, rel) in enumerate(_read_list(path), start=1):
        cls, _, name = rel.partition("/")
        if not name or "/" in name:
            raise ImageSetFormatError(
                f"{path}, entry {number}: {rel!r} is not <NNN.Name>/<file> as in the CUB release"
            )
        files.setdefault(cls, set()).add(name)
    return files


def _check_against_release(
    images: Path,
    members: Mapping[str, Sequence[Path]],
    release: Mapping[str, set[str]],
    lists: Path,
) -> None:
    for cls, files in members.items():
        have, listed = {p.name for p in files}, release.get(cls, set())
        if have != listed:
            missing, extra = sorted(listed - have), sorted(have - listed)
            raise ImageSetCountError(
                f"{images / cls}: class {cls} has {len(have)} images, {lists / 'images.txt'} lists "
                f"{len(listed)}"
                + (f"; missing {missing[:3]}" if missing else "")
                + (f"; not listed {extra[:3]}" if extra else "")
                + " (a partial copy is read only with expected=dict(classes=...) and without "
                "the release's images.txt beside images/)"
            )


def load_cub(
    data_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    expected: Mapping | None = None,
    image_size: int | Sequence[int] = (84, 84),
) -> ImageSetData:
    """CUB-200-2011's few-shot splits (Chen et al. 2019) as uint8 RGB arrays, cached.

    Reads the release folder (see :func:`find_cub`), never downloads. Every class of the split
    lists must have its folder with at least one image; where the release's ``images.txt`` is
    beside ``images/``, each listed class must hold exactly the files it lists (the release
    counts, 41 to 60), and where ``classes.txt`` is, it must name every listed class. With the
    shipped lists, a folder they do not name is refused too. A smaller copy (a test's, a subset)
    is read only when ``expected`` says so. Classes have different counts: the arrays are
    ``(classes, max_count, H, W, 3)``, zero-padded (:class:`~metagrad.tasks.imageset.ImageSetData`
    ``.counts`` has the counts), 100 x 60 x 84 x 84 x 3 bytes = 127 MB for train. Images are
    converted to RGB (a few CUB photos are grayscale) and resized to ``image_size`` with LANCZOS,
    in file-name order.

    Args:
        data_dir: the folder holding ``CUB_200_2011/``, the release folder, or its ``images/``.
        cache_dir: the cache root (default ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``); the
            arrays are kept under ``<cache_dir>/cub/``, keyed by the image files' paths and
            bytes, the lists, the count and the size.
        expected: ``None`` for the shipped split, or ``{"classes": {split: names or a path to a
            split file}, "images_per_class": int or None}``; splits left out keep the shipped
            list.
        image_size: ``(height, width)`` or an int for a square; default 84x84.

    Returns:
        An :class:`~metagrad.tasks.imageset.ImageSetData` named ``"cub"``, layout ``"release"``
        (``images.txt`` checked) or ``"images"`` (only the folders).

    Raises:
        ImageSetNotFoundError: no CUB folder in ``data_dir``.
        ImageSetClassError: a listed class missing (from the folders or ``classes.txt``), or,
            with the shipped lists, an unlisted one present.
        ImageSetCountError: a class without images, or other files than ``images.txt`` lists.
        ImageSetFormatError: an image that does not decode (the message names it), a file in a
            class folder that is not an image, a malformed ``images.txt``/``classes.txt``.

    Example:
        Typical use is ``data = load_cub("~/data/CUB_200_2011")``; without the files:

        >>> load_cub("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.imageset.ImageSetNotFoundError: CUB-200-2011 not found in /no/such/folder...
    """
    size = image_size_option(image_size)
    classes, count = resolve_expected(_NAME, expected)
    images_dir, lists = find_cub(data_dir)
    standard = expected is None or not expected.get("classes")
    if lists is not None and (lists / "classes.txt").is_file():
        named = {name for _, name in _read_list(lists / "classes.txt")}
        absent = sorted(c for s in classes for c in classes[s] if c not in named)
        if absent:
            raise ImageSetClassError(
                f"{lists / 'classes.txt'} does not name {len(absent)} class(es) of the split "
                f"lists, e.g. {absent[:5]}"
            )
    if standard:
        listed = {c for s in SPLITS for c in classes[s]}
        extra = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and p.name not in listed)
        if extra:
            raise ImageSetClassError(
                f"{images_dir} holds {len(extra)} folder(s) that the CUB split lists do not "
                f"name, e.g. {extra[:5]}: not the CUB-200-2011 release, or pass your own lists "
                "in expected=dict(classes=...)"
            )
    members = {s: class_members(images_dir, classes[s], split=s) for s in classes}
    release = lists is not None and (lists / "images.txt").is_file()
    if release:
        files = _release_files(lists)
        for split in classes:
            _check_against_release(images_dir, members[split], files, lists)
    elif standard:
        warnings.warn(
            f"no images.txt beside {images_dir}: the per-class image counts of the CUB release "
            "are not checked (only that each class has images)",
            stacklevel=2,
        )
    images, counts = read_split_folders(
        _NAME,
        images_dir,
        classes,
        count=count,
        size=size,
        cache_dir=cache_dir,
        key=f"cub-v{_FORMAT_VERSION}",
        members=members,
    )
    layout = "release" if release else "images"
    return ImageSetData(
        _NAME, images, counts, classes, fingerprint(_NAME, images, counts, classes), layout
    )
