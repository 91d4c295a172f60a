"""Reading mini-ImageNet (Ravi & Larochelle 2017) into 84x84 RGB arrays, cached on disk.

Three containers of the same data are accepted, found in this order in ``data_dir``:

1. the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl`` (a dict of ``image_data``, a
   uint8 ``(N, 84, 84, 3)`` array, and ``class_dict``, ``{wnid: [row indices]}``), read with the
   restricted unpickler of :mod:`metagrad.tasks.safe_pickle`;
2. Ravi & Larochelle's ``images/`` folder with ``train.csv``/``val.csv``/``test.csv``
   (``filename,label``);
3. class folders ``train/<wnid>/*.jpg`` (and ``val/``, ``test/``).

Nothing is downloaded. The result per split is ``(classes, images_per_class, 84, 84, 3)`` uint8,
classes in wnid order, images in file-name order (row-index order in a pickle); it is cached as
one ``.npy`` per split, named after a sha256 of the source bytes, the expected classes and the
preprocessing version, so an edited source is never served stale.
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from metagrad._files import matches_checksum, write_verified
from metagrad.tasks.safe_pickle import NotAPickleError, TruncatedPickleError, load_pickle

SPLITS = ("train", "val", "test")
IMAGES_PER_CLASS = 600
IMAGE_SHAPE = (84, 84, 3)
_FORMAT_VERSION = 1  # bump when the preprocessing changes: it is part of the cache key
_PICKLE = "mini-imagenet-cache-{}.pkl"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class MiniImageNetError(ValueError):
    """Base of every mini-ImageNet reading error; the message names the file."""


class MiniImageNetNotFoundError(MiniImageNetError, FileNotFoundError):
    """No mini-ImageNet container in ``data_dir``, or a file it names is missing.

    Both a :class:`MiniImageNetError` and a :class:`FileNotFoundError`.

    Example:
        >>> try:
        ...     load_miniimagenet("/no/such/folder")
        ... except FileNotFoundError as err:
        ...     print(type(err).__name__)
        MiniImageNetNotFoundError
    """


class MiniImageNetFormatError(MiniImageNetError):
    """A file is truncated, not the format it claims, or an image does not decode."""


class MiniImageNetClassError(MiniImageNetError):
    """A class of the split list is missing, or the container holds one the list does not."""


class MiniImageNetCountError(MiniImageNetError):
    """A class has another number of images than expected (600, or the caller's count)."""


class MiniImageNetImageError(MiniImageNetError):
    """A pickle's images are not uint8 84x84x3."""


class MiniImageNetData(NamedTuple):
    """The three splits of mini-ImageNet.

    Attributes:
        images: ``{"train", "val", "test"}`` -> uint8 ``(classes, images_per_class, 84, 84, 3)``
            (memory-mapped from the cache when it was read from there).
        wnids: the same keys -> tuple of the classes' wnids, row ``i`` of ``images`` is
            ``wnids[i]``; sorted.
        fingerprint: sha256 (hex) of the split names, wnids, shapes and image bytes: two copies
            with the same fingerprint hold the same decoded data, whatever the container.
        layout: ``"pickle"``, ``"csv"`` or ``"folders"``, the container it was read from.
    """

    images: dict[str, np.ndarray]
    wnids: dict[str, tuple[str, ...]]
    fingerprint: str
    layout: str


def standard_split(split: str) -> tuple[str, ...]:
    """The Ravi & Larochelle wnids of ``split`` (64 / 16 / 20), as shipped with the package.

    Example:
        >>> [len(standard_split(s)) for s in SPLITS], standard_split("val")[0]
        ([64, 16, 20], 'n01855672')
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    text = resources.files("metagrad.tasks").joinpath(f"splits/miniimagenet/{split}.txt")
    return read_split_file(text.read_text(), where=f"{split}.txt")


def read_split_file(text: str, *, where: str = "<split file>") -> tuple[str, ...]:
    """Wnids of a split file: one per line, ``#`` comments and blank lines ignored; sorted.

    Example:
        >>> read_split_file("# mine\\nn02\\nn01\\n")
        ('n01', 'n02')
    """
    wnids = [line.split("#")[0].strip() for line in text.splitlines()]
    wnids = [w for w in wnids if w]
    if len(set(wnids)) != len(wnids):
        raise MiniImageNetClassError(f"{where} lists a class twice")
    return tuple(sorted(wnids))


def default_cache_dir() -> Path:
    """``$METAGRAD_CACHE``, or ``~/.cache/metagrad`` when it is not set."""
    return Path(os.environ.get("METAGRAD_CACHE") or Path.home() / ".cache" / "metagrad")


def _expected_classes(expected: Mapping | None) -> tuple[dict[str, tuple[str, ...]], int]:
    expected = dict(expected or {})
    unknown = set(expected) - {"classes", "images_per_class"}
    if unknown:
        raise ValueError(f"expected= takes 'classes' and 'images_per_class', not {unknown}")
    given = expected.get("classes") or {}
    classes = {}
    for split in SPLITS:
        value = given.get(split)
        if value is None:
            classes[split] = standard_split(split)
        elif isinstance(value, str | os.PathLike):
            path = Path(value).expanduser()
            if not path.is_file():
                raise MiniImageNetNotFoundError(f"split file {path} does not exist")
            classes[split] = read_split_file(path.read_text(), where=str(path))
        else:
            classes[split] = tuple(sorted(str(w) for w in value))
    count = expected.get("images_per_class", IMAGES_PER_CLASS)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"images_per_class must be an int >= 1, got {count!r}")
    return classes, count


# --- sources: the files of each layout and how to turn them into {wnid: [image getter]} --------


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


def _check_classes(found: Iterable[str], wanted: tuple[str, ...], where: Path, split: str) -> None:
    found = set(found)
    missing, extra = sorted(set(wanted) - found), sorted(found - set(wanted))
    if missing:
        raise MiniImageNetClassError(
            f"{where} lacks {len(missing)} class(es) of the {split} split list, e.g. "
            f"{missing[:5]} (it has {len(found)}; the list {len(wanted)})"
        )
    if extra:
        raise MiniImageNetClassError(
            f"{where} holds {len(extra)} class(es) not in the {split} split list, e.g. "
            f"{extra[:5]}: another split, or pass your own list in expected=dict(classes=...)"
        )


def _check_count(wnid: str, count: int, wanted: int, where: Path) -> None:
    if count != wanted:
        raise MiniImageNetCountError(
            f"{where}: class {wnid} has {count} images, expected {wanted}; a smaller copy is "
            "read only when you say so: expected=dict(images_per_class=...)"
        )


def _decode_file(path: Path) -> np.ndarray:
    """84x84 RGB uint8: other sizes are resized with LANCZOS, other modes converted to RGB."""
    from PIL import Image  # only a reader of image files needs Pillow

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            if im.size != IMAGE_SHAPE[1::-1]:
                im = im.resize(IMAGE_SHAPE[1::-1], Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise MiniImageNetFormatError(f"cannot decode the image {path}: {err}") from err


def _read_files(
    members: dict[str, list[Path]], wnids: tuple[str, ...], count: int, where: Path, split: str
) -> np.ndarray:
    _check_classes(members, wnids, where, split)
    images = np.empty((len(wnids), count, *IMAGE_SHAPE), np.uint8)
    for i, wnid in enumerate(wnids):
        _check_count(wnid, len(members[wnid]), count, where / wnid if where.is_dir() else where)
        for j, path in enumerate(members[wnid]):
            images[i, j] = _decode_file(path)
    return images


def _read_pickle(path: Path, wnids: tuple[str, ...], count: int, split: str) -> np.ndarray:
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
    _check_classes(class_dict, wnids, path, split)
    images = np.empty((len(wnids), count, *IMAGE_SHAPE), np.uint8)
    for i, wnid in enumerate(wnids):
        rows = sorted(int(r) for r in class_dict[wnid])
        _check_count(wnid, len(rows), count, path)
        if rows and (rows[0] < 0 or rows[-1] >= len(data)):
            raise MiniImageNetFormatError(
                f"{path}: class_dict[{wnid!r}] indexes rows outside image_data ({len(data)})"
            )
        images[i] = data[rows]
    return images


def _sources(data_dir: Path, layout: str, split: str) -> tuple[Path, list[Path]]:
    if layout == "pickle":
        path = data_dir / _PICKLE.format(split)
        return path, [path]
    if layout == "csv":
        members = _csv_members(data_dir, split)
        return data_dir / f"{split}.csv", [data_dir / f"{split}.csv"] + sorted(
            p for m in members.values() for p in m
        )
    members = _folder_members(data_dir, split)
    return data_dir / split, sorted(p for m in members.values() for p in m)


def _build(
    data_dir: Path, layout: str, split: str, wnids: tuple[str, ...], count: int
) -> np.ndarray:
    if layout == "pickle":
        return _read_pickle(data_dir / _PICKLE.format(split), wnids, count, split)
    if layout == "csv":
        return _read_files(
            _csv_members(data_dir, split), wnids, count, data_dir / f"{split}.csv", split
        )
    return _read_files(_folder_members(data_dir, split), wnids, count, data_dir / split, split)


def _source_digest(data_dir: Path, files: list[Path]) -> str:
    """Length-prefixed relative paths and bytes: unambiguous; a renamed file changes it."""
    h = hashlib.sha256()
    for path in files:
        name = path.relative_to(data_dir).as_posix().encode()
        h.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def fingerprint(images: Mapping[str, np.ndarray], wnids: Mapping[str, Iterable[str]]) -> str:
    """sha256 (hex) of each split's name, wnids, shape and image bytes, in split order.

    Example:
        >>> a = {s: np.zeros((1, 2, 84, 84, 3), np.uint8) for s in SPLITS}
        >>> ids = {s: (f"n0{i}",) for i, s in enumerate(SPLITS)}
        >>> fingerprint(a, ids) == fingerprint({s: a[s].copy() for s in SPLITS}, ids)
        True
    """
    h = hashlib.sha256(b"miniimagenet-fingerprint-v1")
    for split in SPLITS:
        array = np.ascontiguousarray(images[split])
        header = f"{split}:{','.join(wnids[split])}:{array.dtype.str}:{array.shape}\n"
        h.update(header.encode())
        flat = array.reshape(-1)
        for start in range(0, flat.size, 1 << 26):
            h.update(memoryview(flat[start : start + (1 << 26)]))
    return h.hexdigest()


def load_miniimagenet(
    data_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    expected: Mapping | None = None,
) -> MiniImageNetData:
    """mini-ImageNet's three splits as uint8 84x84 RGB arrays, preprocessed once and cached.

    Reads whichever container ``data_dir`` holds (see the module docstring; pickles first, then
    the csv layout, then class folders) and never downloads. In the two folder layouts an image
    that is not 84x84 RGB is converted to RGB and resized to 84x84 with Pillow's LANCZOS
    filter; the pickle's ``image_data`` must already be uint8 84x84x3. Every class of the split
    list must be present, with nothing else, and with exactly ``images_per_class`` images: the
    standard lists (64 / 16 / 20 classes, 600 images) unless ``expected`` says otherwise, so a
    partial copy is never taken silently. The same images in any container give bit-identical
    arrays and the same :attr:`~MiniImageNetData.fingerprint` (for PNG files; JPEG files decode
    as Pillow decodes them).

    Each split is cached as ``<cache_dir>/miniimagenet/mini84_<key>_<split>.npy`` (written
    atomically, its sha256 beside it in ``.npy.sha256``, read back memory-mapped), where ``key``
    hashes the source files' paths and bytes, the expected classes and count, and the
    preprocessing version. A damaged cache is rebuilt with a warning.

    Args:
        data_dir: the folder holding one of the containers.
        cache_dir: a writable folder; default ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``. If it
            cannot be written, a warning is issued and the arrays are still returned.
        expected: ``None`` for the standard split, or a dict with ``classes`` (``{split: wnids
            or a path to a split file}``; splits left out keep the standard list) and/or
            ``images_per_class`` (int).

    Returns:
        A :class:`MiniImageNetData`.

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
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    classes, count = _expected_classes(expected)
    layout = _find_layout(data_dir)
    images = {}
    for split in SPLITS:
        _, files = _sources(data_dir, layout, split)
        key = hashlib.sha256(f"miniimagenet84-v{_FORMAT_VERSION}-{layout}-{count}".encode())
        key.update(",".join(classes[split]).encode())
        key.update(_source_digest(data_dir, files).encode())
        path = cache_dir / "miniimagenet" / f"mini84_{key.hexdigest()[:32]}_{split}.npy"
        shape = (len(classes[split]), count, *IMAGE_SHAPE)
        array = _read_cache(path, shape)
        if array is None:
            array = _build(data_dir, layout, split, classes[split], count)
            array = _write_cache(path, array)
        images[split] = array
    return MiniImageNetData(images, classes, fingerprint(images, classes), layout)


# --- cache -------------------------------------------------------------------------------------


def _read_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached split memory-mapped, or None when absent or damaged (then rebuilt, with a
    warning for a damaged one). The file's sha256, written beside it, is checked first."""
    if not path.exists():
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False) if matches_checksum(path) else None
    except (OSError, ValueError):
        array = None
    if array is not None and array.dtype == np.uint8 and array.shape == shape:
        return array
    warnings.warn(f"the mini-ImageNet cache {path} is damaged; rebuilding it", stacklevel=3)
    return None


def _write_cache(path: Path, array: np.ndarray) -> np.ndarray:
    """Written whole and verified (:func:`metagrad._files.write_verified`). Returns the array
    memory-mapped from the cache, or as given when the cache cannot be written."""
    try:
        write_verified(path, lambda f: np.save(f, array, allow_pickle=False))
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as err:
        warnings.warn(
            f"could not write the mini-ImageNet cache {path} ({err}); it will be rebuilt next time",
            stacklevel=3,
        )
        return array
