"""Reading mini-ImageNet (Ravi & Larochelle 2017) into 84x84 RGB arrays, cached on disk.

Three containers of the same data are accepted, found in this order in ``data_dir``:

1. the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl`` (a dict of ``image_data``, a
   uint8 ``(N, 84, 84, 3)`` array, and ``class_dict``, ``{wnid: [row indices]}``), read with the
   restricted unpickler of :mod:`metagrad.tasks.safe_pickle`;
2. Ravi & Larochelle's ``images/`` folder with ``train.csv``/``val.csv``/``test.csv``
   (``filename,label``);
3. class folders ``train/<wnid>/*.jpg`` (and ``val/``, ``test/``).

Nothing is downloaded. The result is an :class:`~metagrad.tasks.imageset.ImageSetData` named
``"miniimagenet"``: per split ``(classes, 600, 84, 84, 3)`` uint8, classes in wnid order,
images in file-name order (row-index order in a pickle), cached by
:func:`metagrad.tasks.imageset.cached_split` under a key that hashes the source bytes, the
expected classes and the preprocessing version, so an edited source is never served stale.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from metagrad.tasks.imageset import (
    SPLITS,
    ImageSetClassError,
    ImageSetCountError,
    ImageSetData,
    ImageSetError,
    ImageSetFormatError,
    ImageSetImageError,
    ImageSetNotFoundError,
    cached_source_digest,
    cached_split,
    check_classes,
    check_count,
    decode_classes,
    default_cache_dir,
    fingerprint,
    read_split_file,
    resolve_expected,
    shipped_split,
)
from metagrad.tasks.safe_pickle import NotAPickleError, TruncatedPickleError, load_pickle

# Public names (the constants IMAGES_PER_CLASS, IMAGE_SHAPE and SPLITS are importable too).
__all__ = [
    "MiniImageNetClassError",
    "MiniImageNetCountError",
    "MiniImageNetData",
    "MiniImageNetError",
    "MiniImageNetFormatError",
    "MiniImageNetImageError",
    "MiniImageNetNotFoundError",
    "default_cache_dir",
    "fingerprint",
    "load_miniimagenet",
    "read_split_file",
    "standard_split",
]

IMAGES_PER_CLASS = 600
IMAGE_SHAPE = (84, 84, 3)
_NAME = "miniimagenet"
_FORMAT_VERSION = 2  # bump when the preprocessing changes: it is part of the cache key
_PICKLE = "mini-imagenet-cache-{}.pkl"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# The data of every reader is an ImageSetData; the old name stays for code that imports it.
MiniImageNetData = ImageSetData


class MiniImageNetError(ImageSetError):
    """Base of every mini-ImageNet reading error; the message names the file.

    Example:
        >>> issubclass(MiniImageNetClassError, MiniImageNetError), issubclass(
        ...     MiniImageNetClassError, ImageSetClassError)
        (True, True)
    """


class MiniImageNetNotFoundError(MiniImageNetError, ImageSetNotFoundError):
    """No mini-ImageNet container in ``data_dir``, or a file it names is missing.

    A :class:`MiniImageNetError`, an :class:`~metagrad.tasks.imageset.ImageSetNotFoundError`
    and a :class:`FileNotFoundError`.

    Example:
        >>> try:
        ...     load_miniimagenet("/no/such/folder")
        ... except FileNotFoundError as err:
        ...     print(type(err).__name__)
        MiniImageNetNotFoundError
    """


class MiniImageNetFormatError(MiniImageNetError, ImageSetFormatError):
    """A file is truncated, not the format it claims, or an image does not decode.

    Example:
        >>> issubclass(MiniImageNetFormatError, ImageSetFormatError)
        True
    """


class MiniImageNetClassError(MiniImageNetError, ImageSetClassError):
    """A class of the split list is missing, or the container holds one the list does not.

    Example:
        >>> issubclass(MiniImageNetClassError, ImageSetClassError)
        True
    """


class MiniImageNetCountError(MiniImageNetError, ImageSetCountError):
    """A class has another number of images than expected (600, or the caller's count).

    Example:
        >>> issubclass(MiniImageNetCountError, ImageSetCountError)
        True
    """


class MiniImageNetImageError(MiniImageNetError, ImageSetImageError):
    """A pickle's images are not uint8 84x84x3.

    Example:
        >>> issubclass(MiniImageNetImageError, ImageSetImageError)
        True
    """


# Most specific first: a base error raised by the shared code becomes mini-ImageNet's own.
_OWN_ERRORS = (
    (ImageSetNotFoundError, MiniImageNetNotFoundError),
    (ImageSetFormatError, MiniImageNetFormatError),
    (ImageSetClassError, MiniImageNetClassError),
    (ImageSetCountError, MiniImageNetCountError),
    (ImageSetImageError, MiniImageNetImageError),
)


@contextlib.contextmanager
def _own_errors() -> Iterator[None]:
    try:
        yield
    except MiniImageNetError:
        raise
    except ImageSetError as err:
        for base, own in _OWN_ERRORS:
            if isinstance(err, base):
                raise own(str(err)) from err.__cause__
        raise MiniImageNetError(str(err)) from err.__cause__


def standard_split(split: str) -> tuple[str, ...]:
    """The Ravi & Larochelle wnids of ``split`` (64 / 16 / 20), as shipped with the package.

    Example:
        >>> [len(standard_split(s)) for s in SPLITS], standard_split("val")[0]
        ([64, 16, 20], 'n01855672')
    """
    return shipped_split(_NAME, split)


# --- sources: the files of each layout and how to turn them into arrays ------------------------


def _find_layout(data_dir: Path) -> str:
    pickles = [data_dir / _PICKLE.format(s) for s in SPLITS]
    present = [p for p in pickles if p.is_file()]
    if present:
        missing = [p.name for p in pickles if not p.is_file()]
        if missing:
            raise MiniImageNetNotFoundError(
                f"{data_dir} holds {[p.name for p in present]} but not {missing}: the pickle "
                "layout needs all three splits (nothing is downloaded)"
            )
        return "pickle"
    if (data_dir / "images").is_dir():
        missing = [f"{s}.csv" for s in SPLITS if not (data_dir / f"{s}.csv").is_file()]
        if missing:
            raise MiniImageNetNotFoundError(
                f"{data_dir} has images/ but not {missing}: Ravi & Larochelle's layout needs "
                "train.csv, val.csv and test.csv beside images/ (nothing is downloaded)"
            )
        return "csv"
    if all((data_dir / s).is_dir() for s in SPLITS):
        return "folders"
    found = sorted(p.name for p in data_dir.iterdir())[:10] if data_dir.is_dir() else None
    raise MiniImageNetNotFoundError(
        f"mini-ImageNet not found in {data_dir}: expected one of (1) "
        f"{', '.join(_PICKLE.format(s) for s in SPLITS)}; (2) images/ with train.csv, val.csv, "
        "test.csv (Ravi & Larochelle's release); (3) train/<wnid>/, val/<wnid>/, test/<wnid>/ "
        "folders of images. The loader never downloads. "
        + (f"{data_dir} holds: {found}" if found is not None else f"{data_dir} does not exist")
    )


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in _IMAGE_SUFFIXES and not path.name.startswith(".")


def _csv_members(data_dir: Path, split: str) -> dict[str, list[Path]]:
    path = data_dir / f"{split}.csv"
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise MiniImageNetFormatError(f"{path} is not a readable csv ({err})") from err
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise MiniImageNetFormatError(
            f"{path} does not start with the header 'filename,label' of Ravi & Larochelle's "
            f"csv files (got {rows[0] if rows else 'an empty file'})"
        )
    members: dict[str, list[Path]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise MiniImageNetFormatError(f"{path}, line {line}: expected filename,label: {row}")
        image = data_dir / "images" / row[0].strip()
        if not image.is_file():
            raise MiniImageNetNotFoundError(f"{path}, line {line} names {image}, which is missing")
        members.setdefault(row[1].strip(), []).append(image)
    return {w: sorted(m) for w, m in members.items()}


def _folder_members(data_dir: Path, split: str) -> dict[str, list[Path]]:
    root = data_dir / split
    members = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        members[folder.name] = sorted(p for p in folder.iterdir() if _is_image(p))
    return members


def _read_files(
    members: dict[str, list[Path]],
    wnids: tuple[str, ...],
    count: int | None,
    where: Path,
    split: str,
    allocate=None,
) -> tuple[np.ndarray, np.ndarray]:
    check_classes(members, wnids, where=where, split=split)
    return decode_classes(
        members,
        wnids,
        size=IMAGE_SHAPE[:2],
        resize=True,
        count=count,
        where=(lambda w: where / w) if where.is_dir() else where,
        allocate=allocate,
    )


def _read_pickle(
    path: Path, wnids: tuple[str, ...], count: int | None, split: str, allocate=None
) -> tuple[np.ndarray, np.ndarray]:
    try:
        obj = load_pickle(path)
    except (NotAPickleError, TruncatedPickleError) as err:
        raise MiniImageNetFormatError(str(err)) from err
    if not isinstance(obj, dict) or not {"image_data", "class_dict"} <= set(obj):
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise MiniImageNetFormatError(
            f"{path} is a pickle but not a mini-ImageNet cache: expected a dict with "
            f"'image_data' and 'class_dict', got {keys}"
        )
    data, class_dict = obj["image_data"], obj["class_dict"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != IMAGE_SHAPE:
        got = (data.dtype, data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise MiniImageNetImageError(
            f"{path}: image_data must be a uint8 array (N, 84, 84, 3), got {got}; the pickle "
            "layout is read as is (convert other sizes with the folder layouts, which resize)"
        )
    if not isinstance(class_dict, dict):
        raise MiniImageNetFormatError(f"{path}: class_dict is a {type(class_dict).__name__}")
    check_classes(class_dict, wnids, where=path, split=split)
    rows = {w: sorted(int(r) for r in class_dict[w]) for w in wnids}
    for wnid in wnids:
        check_count(wnid, len(rows[wnid]), count, where=path)
        if rows[wnid][0] < 0 or rows[wnid][-1] >= len(data):
            raise MiniImageNetFormatError(
                f"{path}: class_dict[{wnid!r}] indexes rows outside image_data ({len(data)})"
            )
    counts = np.array([len(rows[w]) for w in wnids], np.int32)
    shape = (len(wnids), int(counts.max(initial=0)), *IMAGE_SHAPE)
    images = np.zeros(shape, np.uint8) if allocate is None else allocate(shape)
    for i, wnid in enumerate(wnids):  # class by class: one class's copy at a time
        images[i, : counts[i]] = data[rows[wnid]]
    return images, counts


def _sources(data_dir: Path, layout: str, split: str) -> list[Path]:
    if layout == "pickle":
        return [data_dir / _PICKLE.format(split)]
    if layout == "csv":
        members = _csv_members(data_dir, split)
        return [data_dir / f"{split}.csv"] + sorted(p for m in members.values() for p in m)
    members = _folder_members(data_dir, split)
    return sorted(p for m in members.values() for p in m)


def _build(
    data_dir: Path,
    layout: str,
    split: str,
    wnids: tuple[str, ...],
    count: int | None,
    allocate=None,
) -> tuple[np.ndarray, np.ndarray]:
    """The split's arrays, written into ``allocate(shape)`` (see ``cached_split(into=True)``)."""
    if layout == "pickle":
        return _read_pickle(data_dir / _PICKLE.format(split), wnids, count, split, allocate)
    if layout == "csv":
        return _read_files(
            _csv_members(data_dir, split), wnids, count, data_dir / f"{split}.csv", split, allocate
        )
    return _read_files(
        _folder_members(data_dir, split), wnids, count, data_dir / split, split, allocate
    )


def load_miniimagenet(
    data_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    expected: Mapping | None = None,
) -> ImageSetData:
    """mini-ImageNet's three splits as uint8 84x84 RGB arrays, preprocessed once and cached.

    Reads whichever container ``data_dir`` holds (see the module docstring; pickles first, then
    the csv layout, then class folders) and never downloads. In the two folder layouts an image
    that is not 84x84 RGB is converted to RGB and resized to 84x84 with Pillow's LANCZOS
    filter; the pickle's ``image_data`` must already be uint8 84x84x3. Every class of the split
    list must be present, with nothing else, and with exactly ``images_per_class`` images: the
    standard lists (64 / 16 / 20 classes, 600 images) unless ``expected`` says otherwise, so a
    partial copy is never taken silently. The same images in any container give bit-identical
    arrays and the same :attr:`~metagrad.tasks.imageset.ImageSetData.fingerprint` (for PNG
    files; JPEG files decode as Pillow decodes them).

    Each split is cached by :func:`metagrad.tasks.imageset.cached_split` under
    ``<cache_dir>/miniimagenet/``, keyed by the source files' paths and bytes (hashed when a
    file's size, mtime, ctime or inode changed: :func:`~metagrad.tasks.imageset.
    cached_source_digest`), the expected classes and count, and the preprocessing version; the
    split is built class by class into the memory-mapped cache file (the pickle itself is read
    whole); a damaged cache is rebuilt with a warning.

    Args:
        data_dir: the folder holding one of the containers.
        cache_dir: a writable folder; default ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``. If it
            cannot be written, a warning is issued and the arrays are still returned.
        expected: ``None`` for the standard split, or a dict with ``classes`` (``{split: wnids
            or a path to a split file}``; splits left out keep the standard list) and/or
            ``images_per_class`` (int, or ``None`` for any count, the rows then zero-padded).

    Returns:
        An :class:`~metagrad.tasks.imageset.ImageSetData` named ``"miniimagenet"``, its
        ``layout`` ``"pickle"``, ``"csv"`` or ``"folders"``.

    Raises:
        MiniImageNetNotFoundError: no container, part of one, or a file a csv names is missing.
        MiniImageNetFormatError: a truncated or non-pickle file (an HTML page), a csv without
            the ``filename,label`` header, an image that does not decode.
        MiniImageNetClassError: a listed class is missing, or an unlisted one present.
        MiniImageNetCountError: a class with another number of images than expected.
        MiniImageNetImageError: a pickle's images are not uint8 84x84x3.
        UnsafePickleError: a pickle asks for a global a data set never needs (it is not run).

    Example:
        Typical use is ``data = load_miniimagenet("~/data/miniimagenet")``; without the files:

        >>> load_miniimagenet("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.miniimagenet_io.MiniImageNetNotFoundError: mini-ImageNet not found...
    """
    data_dir = Path(data_dir).expanduser()
    with _own_errors():
        classes, count = resolve_expected(_NAME, expected)
        layout = _find_layout(data_dir)
        images, counts = {}, {}
        for split in SPLITS:
            files = _sources(data_dir, layout, split)
            digest = cached_source_digest(_NAME, data_dir, files, cache_dir=cache_dir)
            key = (
                f"{_NAME}84-v{_FORMAT_VERSION}-{layout}-{count}-{','.join(classes[split])}-{digest}"
            )
            images[split], counts[split] = cached_split(
                _NAME,
                key,
                split,
                lambda allocate, split=split: _build(
                    data_dir, layout, split, classes[split], count, allocate
                ),
                cache_dir=cache_dir,
                into=True,
            )
    return ImageSetData(
        _NAME, images, counts, classes, fingerprint(_NAME, images, counts, classes), layout
    )
