"""CIFAR-FS and FC100, the few-shot splits of CIFAR-100, read from the standard release.

Both are built from ``cifar-100-python.tar.gz`` (Krizhevsky 2009), or the folder it extracts
to, and nothing is downloaded. ``data_dir`` may be the archive itself, a folder holding it, the
extracted ``cifar-100-python/`` folder (``train``, ``test``, ``meta``) or a folder holding that;
an extracted folder is preferred to an archive beside it (same bytes, no decompression). The
archive's members are read in memory with :mod:`tarfile`, never extracted to disk, and an archive
with a member name that climbs out of its folder (``../x``, ``/etc/x``) is refused.

The three members are Python 2 pickles, read with the restricted unpickler of
:mod:`metagrad.tasks.safe_pickle` (``encoding="latin1"``), so a crafted file cannot run code:
``train`` and ``test`` are dicts of ``data`` (uint8 ``(N, 3072)``, each row an image's red, green
then blue 32x32 planes), ``fine_labels`` and ``coarse_labels``; ``meta`` holds
``fine_label_names`` (100) and ``coarse_label_names`` (20). Keys and names may be ``str`` or
``bytes`` (a copy re-pickled after ``encoding="bytes"``).

- **CIFAR-FS** (Bertinetto et al. 2019): 64 / 16 / 20 fine classes chosen at random, the lists of
  the R2D2 repository (``metagrad/tasks/splits/cifarfs/``).
- **FC100** (Oreshkin et al. 2018): split by super-class, 12 / 4 / 4 super-classes (60 / 20 / 20
  fine classes), TADAM's indices (``metagrad/tasks/splits/fc100/``, :data:`FC100_SUPERCLASSES`).

Each class has 600 images (its 500 ``train`` rows then its 100 ``test`` rows, each in file
order), 32x32 RGB, returned as uint8 ``(classes, 600, 32, 32, 3)`` (HWC) per split, classes in
name order, and cached like the other image sets (:func:`metagrad.tasks.imageset.cached_split`,
about 180 MB for all 100 classes).
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

import numpy as np

from metagrad.tasks.imageset import (
    ImageSetClassError,
    ImageSetData,
    ImageSetFormatError,
    ImageSetImageError,
    ImageSetNotFoundError,
    cached_source_digest,
    cached_split,
    check_classes,
    check_count,
    fingerprint,
    resolve_expected,
)
from metagrad.tasks.safe_pickle import NotAPickleError, TruncatedPickleError, load_pickle

__all__ = ["load_cifarfs", "load_fc100", "read_cifar100"]

ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
MEMBERS = ("train", "test", "meta")
IMAGE_SHAPE = (32, 32, 3)
_VERSION = 1  # part of the cache key: bump when the decoding changes

# FC100's super-classes per split: TADAM's class_split (coarse label indices of
# cifar-100-python/meta) by name; also in the headers of splits/fc100/*.txt.
FC100_SUPERCLASSES = {
    "train": (
        "fish",
        "flowers",
        "food_containers",
        "fruit_and_vegetables",
        "household_electrical_devices",
        "household_furniture",
        "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes",
        "reptiles",
        "trees",
        "vehicles_1",
        "vehicles_2",
    ),
    "val": (
        "large_carnivores",
        "large_omnivores_and_herbivores",
        "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}


class _Source:
    """Where the three members are: an extracted folder or an archive."""

    def __init__(self, data_dir: Path) -> None:
        data_dir = data_dir.expanduser()
        for folder in (data_dir, data_dir / FOLDER):
            if folder.is_dir() and any((folder / m).is_file() for m in MEMBERS):
                missing = [m for m in MEMBERS if not (folder / m).is_file()]
                if missing:
                    raise ImageSetNotFoundError(
                        f"{folder} holds part of cifar-100-python but not {missing}: it needs "
                        "train, test and meta (nothing is downloaded)"
                    )
                self.layout, self.root = "folder", folder
                self.files = [folder / m for m in MEMBERS]
                return
        archive = data_dir if data_dir.is_file() else data_dir / ARCHIVE
        if archive.is_file():
            self.layout, self.root, self.files = "tar", archive.parent, [archive]
            return
        raise ImageSetNotFoundError(
            f"CIFAR-100 not found in {data_dir}: expected {ARCHIVE} or the {FOLDER}/ folder it "
            "extracts to (train, test, meta), from https://www.cs.toronto.edu/~kriz/cifar.html; "
            "metagrad never downloads"
        )

    def where(self, member: str) -> str:
        if self.layout == "folder":
            return str(self.root / member)
        return f"{self.files[0]}:{FOLDER}/{member}"

    def read(self) -> dict[str, object]:
        """member -> the unpickled object."""
        if self.layout == "folder":
            return {m: _unpickle(self.root / m, self.where(m)) for m in MEMBERS}
        return _read_archive(self.files[0], self.where)


def _unpickle(source: Path | io.BytesIO, where: str) -> object:
    try:
        return load_pickle(source, encoding="latin1")
    except (NotAPickleError, TruncatedPickleError) as err:
        raise ImageSetFormatError(str(err)) from err


def _read_archive(archive: Path, where: Callable[[str], str]) -> dict[str, object]:
    head = archive.read_bytes()[:64] if archive.stat().st_size else b""
    if head.lstrip()[:1] == b"<":
        raise ImageSetFormatError(
            f"{archive} is not a tar archive but an HTML/XML page (it starts with "
            f"{head.lstrip()[:15]!r}): probably an error or login page saved under the archive's "
            "name; fetch it again"
        )
    out: dict[str, object] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts:
                    raise ImageSetFormatError(
                        f"{archive} holds the member {member.name!r}, whose path leaves the "
                        "archive's folder: refused (not the CIFAR-100 release)"
                    )
            by_name = {m.name.lstrip("./"): m for m in members if m.isfile()}
            missing = [f"{FOLDER}/{m}" for m in MEMBERS if f"{FOLDER}/{m}" not in by_name]
            if missing:
                raise ImageSetFormatError(
                    f"{archive} lacks the member(s) {missing}: not the cifar-100-python archive "
                    f"(it holds {sorted(by_name)[:6]})"
                )
            for m in MEMBERS:
                data = tar.extractfile(by_name[f"{FOLDER}/{m}"]).read()
                buffer = io.BytesIO(data)
                buffer.name = where(m)
                out[m] = _unpickle(buffer, where(m))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        if isinstance(err, ImageSetNotFoundError):
            raise
        raise ImageSetFormatError(
            f"{archive} is not a readable tar.gz ({type(err).__name__}: {err}): truncated or "
            "damaged; fetch it again"
        ) from err
    return out


def _keyed(obj: object, where: str, keys: tuple[str, ...]) -> dict[str, object]:
    """A dict with str keys (bytes keys decoded) holding ``keys``, or a format error."""
    if not isinstance(obj, dict):
        raise ImageSetFormatError(f"{where} holds a {type(obj).__name__}, not CIFAR-100's dict")
    out = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in keys if k not in out]
    if missing:
        raise ImageSetFormatError(
            f"{where} lacks the key(s) {missing} (it has {sorted(map(str, out))[:8]}): not a "
            "cifar-100-python file"
        )
    return out


def _names(value: object, where: str, key: str, n: int) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or len(value) != n:
        raise ImageSetFormatError(f"{where}: {key} should be a list of {n} names")
    return tuple(v.decode("latin1") if isinstance(v, bytes) else str(v) for v in value)


def read_cifar100(data_dir: str | os.PathLike) -> dict[str, object]:
    """Reads and checks the CIFAR-100 release: all 60000 images, labels and names.

    Args:
        data_dir: ``cifar-100-python.tar.gz``, a folder holding it, the extracted
            ``cifar-100-python/`` folder, or a folder holding that.

    Returns:
        A dict: ``images`` uint8 ``(N, 32, 32, 3)`` (the ``train`` rows, then the ``test``
        rows), ``fine`` and ``coarse`` int64 ``(N,)``, ``fine_names`` (100) and
        ``coarse_names`` (20), ``layout`` (``"folder"`` or ``"tar"``), ``files`` (what was read)
        and ``root`` (the folder they are named relative to).

    Raises:
        ImageSetNotFoundError: neither the archive nor the folder.
        ImageSetFormatError: a truncated or non-tar archive, a member missing or with a path
            leaving the archive, a truncated or non-pickle member (an HTML page), missing keys,
            labels that do not match the images or the 100 / 20 names.
        ImageSetImageError: ``data`` that is not uint8 ``(N, 3072)``.
        UnsafePickleError: a member asks for a global a data file never needs (not run).

    Example:
        >>> read_cifar100("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.imageset.ImageSetNotFoundError: CIFAR-100 not found in /no/such/folder...
    """
    source = _Source(Path(data_dir))
    raw = source.read()
    meta = _keyed(raw["meta"], source.where("meta"), ("fine_label_names", "coarse_label_names"))
    fine_names = _names(meta["fine_label_names"], source.where("meta"), "fine_label_names", 100)
    coarse_names = _names(
        meta["coarse_label_names"], source.where("meta"), "coarse_label_names", 20
    )
    images, fine, coarse = [], [], []
    for member in ("train", "test"):
        where = source.where(member)
        part = _keyed(raw[member], where, ("data", "fine_labels", "coarse_labels"))
        data = part["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
            raise ImageSetImageError(f"{where}: data should be uint8 (N, 3072), got {got}")
        if data.shape[1] != 3 * 32 * 32:
            raise ImageSetImageError(
                f"{where}: data rows have {data.shape[1]} values, expected 3072 (3 x 32 x 32)"
            )
        labels = []
        for key, n in (("fine_labels", 100), ("coarse_labels", 20)):
            values = np.asarray(part[key])
            if values.shape != (len(data),) or values.dtype.kind not in "iu":
                raise ImageSetFormatError(
                    f"{where}: {key} should be {len(data)} integers (one per image), got "
                    f"{values.dtype} {values.shape}"
                )
            if len(values) and (values.min() < 0 or values.max() >= n):
                raise ImageSetFormatError(f"{where}: {key} outside 0..{n - 1}")
            labels.append(values.astype(np.int64))
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW rows -> HWC
        fine.append(labels[0])
        coarse.append(labels[1])
    fine_all, coarse_all = np.concatenate(fine), np.concatenate(coarse)
    parents = {int(f): set() for f in np.unique(fine_all)}
    for f, c in zip(fine_all.tolist(), coarse_all.tolist(), strict=True):
        parents[f].add(c)
    split_up = [fine_names[f] for f, p in parents.items() if len(p) > 1]
    if split_up:
        raise ImageSetFormatError(
            f"{source.where('train')}: the fine classes {split_up[:5]} have images under more "
            "than one coarse label: not CIFAR-100's hierarchy"
        )
    return {
        "images": np.ascontiguousarray(np.concatenate(images)),
        "fine": fine_all,
        "coarse": coarse_all,
        "fine_names": fine_names,
        "coarse_names": coarse_names,
        "layout": source.layout,
        "files": source.files,
        "root": source.root,
    }


def _split_array(
    cifar: Mapping, classes: tuple[str, ...], count: int | None, where: str, split: str
) -> tuple[np.ndarray, np.ndarray]:
    names = cifar["fine_names"]
    present = {names[f] for f in np.unique(cifar["fine"]).tolist()}
    check_classes(sorted(present & set(classes)), classes, where=where, split=split)
    index = {n: i for i, n in enumerate(names)}
    members = [np.flatnonzero(cifar["fine"] == index[c]) for c in classes]  # train rows first
    counts = np.array([len(m) for m in members], np.int32)
    for c, n in zip(classes, counts.tolist(), strict=True):
        check_count(c, n, count, where=where)
    images = np.zeros((len(classes), int(counts.max(initial=0)), *IMAGE_SHAPE), np.uint8)
    for i, rows in enumerate(members):
        images[i, : len(rows)] = cifar["images"][rows]
    return images, counts


def _check_fc100_hierarchy(cifar: Mapping, split: str, classes: tuple[str, ...], where: str):
    """The shipped FC100 list must be exactly the fine classes of the split's super-classes."""
    coarse_of = {
        cifar["fine_names"][f]: cifar["coarse_names"][c]
        for f, c in zip(cifar["fine"].tolist(), cifar["coarse"].tolist(), strict=True)
    }
    wanted = set(FC100_SUPERCLASSES[split])
    derived = tuple(sorted(f for f, c in coarse_of.items() if c in wanted))
    if derived != classes:
        raise ImageSetClassError(
            f"{where}: the fine classes under the FC100 {split} super-classes "
            f"{sorted(wanted)} are not those of the shipped {split} list (e.g. "
            f"{sorted(set(derived) ^ set(classes))[:5]}): not CIFAR-100's hierarchy"
        )


def _load(
    name: str,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None,
    expected: Mapping | None,
) -> ImageSetData:
    classes, count = resolve_expected(name, expected)
    given = set(dict((expected or {}).get("classes") or {}))
    source = _Source(Path(data_dir))
    digest = cached_source_digest(name, source.root, source.files, cache_dir=cache_dir)
    read = functools.cache(lambda: read_cifar100(data_dir))  # only on a cache miss, once
    where = str(source.files[0]) if source.layout == "tar" else str(source.root)
    images, counts = {}, {}
    for split in classes:

        def build(split=split):
            cifar = read()
            if name == "fc100" and split not in given:
                _check_fc100_hierarchy(cifar, split, classes[split], where)
            return _split_array(cifar, classes[split], count, where, split)

        key = f"{name}-v{_VERSION}-{count}-{','.join(classes[split])}-{digest}"
        images[split], counts[split] = cached_split(name, key, split, build, cache_dir=cache_dir)
    return ImageSetData(
        name, images, counts, classes, fingerprint(name, images, counts, classes), source.layout
    )


def load_cifarfs(
    data_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    expected: Mapping | None = None,
) -> ImageSetData:
    """CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20 CIFAR-100 classes x 600 images, 32x32 RGB.

    Reads ``cifar-100-python.tar.gz`` or its extracted folder (see the module docstring) with a
    restricted unpickler that cannot run code. Split ``s`` is uint8 ``(classes, 600, 32, 32,
    3)``: class ``i`` is ``classes[s][i]`` (CIFAR-100 fine names, sorted), its rows its
    ``train``-file images then its ``test``-file images, each in file order. Every class of the
    shipped lists (R2D2's ``bertinetto`` split) must be present with exactly 600 images unless
    ``expected`` says otherwise (a smaller copy is never taken silently). The container does not
    change the arrays or the fingerprint.

    Args:
        data_dir: the archive, a folder holding it, or the extracted folder (or its parent).
        cache_dir: the cache root (default ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``).
        expected: ``None`` for the standard split, or ``{"classes": {split: names or a split
            file}, "images_per_class": int or None}``.

    Returns:
        An :class:`~metagrad.tasks.imageset.ImageSetData` named ``"cifarfs"``, layout ``"tar"``
        or ``"folder"``.

    Raises:
        ImageSetNotFoundError, ImageSetFormatError, ImageSetImageError: see
            :func:`read_cifar100`.
        ImageSetClassError: a listed class without images.
        ImageSetCountError: a class with another count than expected (600).
        UnsafePickleError: a member asks for a global a data file never needs (not run).

    Example:
        Typical use is ``data = load_cifarfs("~/data/cifar-100-python.tar.gz")``; the lists:

        >>> from metagrad.tasks.imageset import SPLITS, shipped_split
        >>> [len(shipped_split("cifarfs", s)) for s in SPLITS], shipped_split("cifarfs", "val")[0]
        ([64, 16, 20], 'beaver')
        >>> load_cifarfs("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.imageset.ImageSetNotFoundError: CIFAR-100 not found in /no/such/folder...
    """
    return _load("cifarfs", data_dir, cache_dir, expected)


def load_fc100(
    data_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    expected: Mapping | None = None,
) -> ImageSetData:
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by super-class, 60 / 20 / 20 classes x 600.

    The train / val / test splits hold the fine classes of 12 / 4 / 4 of CIFAR-100's 20
    super-classes (:data:`FC100_SUPERCLASSES`, TADAM's indices ``{1, 2, 3, 4, 5, 6, 9, 10, 15,
    17, 18, 19}``, ``{8, 11, 13, 16}``, ``{0, 7, 12, 14}``), so no test class shares a
    super-class with a training class. Read, laid out, checked and cached as
    :func:`load_cifarfs`; with the shipped lists, the file's own hierarchy (``coarse_labels``)
    must put exactly the listed fine classes under each split's super-classes.

    Args:
        data_dir: the archive, a folder holding it, or the extracted folder (or its parent).
        cache_dir: the cache root (default ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``).
        expected: ``None`` for the standard split, or ``{"classes": {split: names or a split
            file}, "images_per_class": int or None}``.

    Returns:
        An :class:`~metagrad.tasks.imageset.ImageSetData` named ``"fc100"``.

    Raises:
        As :func:`load_cifarfs`; ImageSetClassError also when the file's hierarchy disagrees.

    Example:
        >>> from metagrad.tasks.imageset import SPLITS, shipped_split
        >>> [len(shipped_split("fc100", s)) for s in SPLITS], len(FC100_SUPERCLASSES["train"])
        ([60, 20, 20], 12)
        >>> load_fc100("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.imageset.ImageSetNotFoundError: CIFAR-100 not found in /no/such/folder...
    """
    return _load("fc100", data_dir, cache_dir, expected)
