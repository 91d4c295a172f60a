"""The shared base of the image benchmark readers: errors, split lists, decoding, cache, registry.

Every reader (:mod:`~metagrad.tasks.miniimagenet_io`, :mod:`~metagrad.tasks.folder`,
:mod:`~metagrad.tasks.cub`, tiered-ImageNet, CIFAR-FS/FC100) has the signature
``load_X(data_dir, *, cache_dir=None, expected=None, **options) -> ImageSetData`` and returns,
per split, a uint8 array ``(classes, max_count, H, W, 3)`` with the images of class ``c`` in rows
``0 .. counts[split][c] - 1`` and zeros after them. A split is decoded once and cached as
``.npy`` files keyed by the source's content (:func:`cached_split`); a damaged cache is rebuilt.
Nothing is downloaded. Pillow is imported only when an image is decoded.

The fingerprint (:func:`fingerprint`) hashes the data set's name and the decoded splits, so two
labs that report the same name and fingerprint ran on the same decoded images, whichever
container each read them from.

**What a load reads.** A cache hit reads neither the sources nor, for large splits, the cached
arrays: (1) the cache key's source digest is remembered beside the cache under the files'
``os.stat`` (path, size, mtime, ctime, inode; :func:`cached_source_digest`), so sources are
hashed only when one changed; (2) the fingerprint is remembered under the cache files' sha256
(:func:`fingerprint`); (3) the cached array is checked as :func:`cache_verify_mode` says: a full
sha256 (one pass) for files up to 1 GiB (mini-ImageNet, CIFAR-FS, FC100, CUB), the stamp
(size, mtime, inode recorded when it was written or last hashed) above that (tiered-ImageNet),
``METAGRAD_VERIFY_CACHE=full`` to hash every load. Every memo is a small checksummed record
(:func:`metagrad._files.write_verified`); a damaged one is recomputed. A build writes large
splits class by class into a memory-mapped temporary ``.npy`` (``cached_split(into=True)``),
so it holds about one class in memory, not the split.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import mmap
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from metagrad._files import (
    checksum_path,
    file_sha256,
    matches_checksum,
    temporary_beside,
    write_verified,
)

SPLITS = ("train", "val", "test")

# The image count every class of a data set's standard release has; None where it varies (CUB's
# 41..60, tiered-ImageNet's 732..1300) or where there is no standard release (a user's folder).
STANDARD_COUNTS = {"miniimagenet": 600, "cifarfs": 600, "fc100": 600}

# name -> "module:function", imported only when that data set is loaded.
DATASETS = {
    "miniimagenet": "metagrad.tasks.miniimagenet_io:load_miniimagenet",
    "tieredimagenet": "metagrad.tasks.tieredimagenet:load_tieredimagenet",
    "cifarfs": "metagrad.tasks.cifar:load_cifarfs",
    "fc100": "metagrad.tasks.cifar:load_fc100",
    "cub": "metagrad.tasks.cub:load_cub",
    "folder": "metagrad.tasks.folder:load_image_folder",
}


class ImageSetError(ValueError):
    """Base of every image-set reading error; the message names the file and what is wrong.

    Example:
        >>> issubclass(ImageSetClassError, ImageSetError), issubclass(ImageSetError, ValueError)
        (True, True)
    """


class ImageSetNotFoundError(ImageSetError, FileNotFoundError):
    """No container in ``data_dir``, or a file it names is missing.

    Both an :class:`ImageSetError` and a :class:`FileNotFoundError`.

    Example:
        >>> try:
        ...     shipped_split("no-such-set", "train")
        ... except FileNotFoundError as err:
        ...     print(type(err).__name__)
        ImageSetNotFoundError
    """


class ImageSetFormatError(ImageSetError):
    """A file is truncated, not the format it claims, laid out otherwise, or does not decode.

    Example:
        >>> try:
        ...     decode_image(b"<html>Quota</html>", size=(8, 8), where="a.jpg", resize=True)
        ... except ImageSetFormatError as err:
        ...     print(str(err)[:31])
        cannot decode the image a.jpg (
    """


class ImageSetClassError(ImageSetError):
    """A class of the split list is missing, or the container holds one the list does not.

    Example:
        >>> check_classes(["a"], ("a", "b"), where="root/", split="train")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.imageset.ImageSetClassError: root/ lacks 1 class(es) of the train split...
    """


class ImageSetCountError(ImageSetError):
    """A class has another number of images than expected.

    Example:
        >>> check_count("n01", 5, 600, where="train/n01")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.imageset.ImageSetCountError: train/n01: class n01 has 5 images, ...
    """


class ImageSetImageError(ImageSetError):
    """An image of the wrong size, mode or dtype, where the format is read as is (no resize).

    Example:
        >>> gray = np.zeros((4, 4), np.uint8)
        >>> try:
        ...     check_image_array(gray, size=(4, 4), where="x.pkl")
        ... except ImageSetImageError as err:
        ...     print(err)
        x.pkl: expected a uint8 image (4, 4, 3), got uint8 (4, 4)
    """


class ImageSetData(NamedTuple):
    """The splits of an image data set, decoded, as the readers return them.

    Attributes:
        name: the data set (``"miniimagenet"``, ``"tieredimagenet"``, ``"cifarfs"``, ``"fc100"``,
            ``"cub"``, ``"folder"``).
        images: split -> uint8 ``(classes, max_count, H, W, 3)``, memory-mapped from the cache
            when it could be written; row ``j >= counts[split][c]`` of class ``c`` is zeros.
        counts: split -> int32 ``(classes,)``, the number of images of each class.
        classes: split -> class names, row ``i`` of ``images`` is ``classes[split][i]``.
        fingerprint: :func:`fingerprint` of the above.
        layout: the container it was read from (``"pickle"``, ``"csv"``, ``"folders"``, ...).

    Example:
        >>> images = {"train": np.zeros((2, 3, 4, 4, 3), np.uint8)}
        >>> counts = {"train": np.array([3, 2], np.int32)}
        >>> classes = {"train": ("a", "b")}
        >>> data = ImageSetData("folder", images, counts, classes,
        ...                     fingerprint("folder", images, counts, classes), "folders")
        >>> data.images["train"].shape, data.counts["train"].tolist()
        ((2, 3, 4, 4, 3), [3, 2])
    """

    name: str
    images: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    classes: dict[str, tuple[str, ...]]
    fingerprint: str
    layout: str


def fingerprint(
    name: str,
    images: Mapping[str, np.ndarray],
    counts: Mapping[str, np.ndarray],
    classes: Mapping[str, Iterable[str]],
) -> str:
    """sha256 (hex) of the data set's name and, split by split, its classes, counts and bytes.

    ``sha256("metagrad-imageset-v1" | name | for each split s in SPLITS order that is present:
    s, classes[s], counts[s], dtype, shape, images[s] bytes)``. Equal fingerprints mean the same
    decoded arrays of the same data set; the container they came from does not enter. The name
    does, so the folder reader (name ``"folder"``) on a copy of mini-ImageNet gives the same
    arrays as :func:`~metagrad.tasks.miniimagenet_io.load_miniimagenet` but another
    fingerprint: a fingerprint says which benchmark a number is on, not only which pixels.
    Images stored encoded (JPEG folders) are hashed as decoded and resized, so two labs with the
    same files but Pillow/libjpeg builds that decode differently get different fingerprints:
    the fingerprint certifies the arrays that were trained on.

    Splits that :func:`cached_split` returned are not hashed again on every load: their
    fingerprint is remembered in ``<cache folder>/fingerprints/`` (a checksummed record) under
    a key of the name, classes, counts, shapes and the cache files' sha256, so it is computed
    once per cache content and read afterwards (the cache file's bytes stand for the pixels,
    as checked on each hit by :func:`cache_verify_mode`); other arrays are hashed.

    Example:
        >>> a = {"train": np.zeros((1, 2, 4, 4, 3), np.uint8)}
        >>> n, c = {"train": np.array([2], np.int32)}, {"train": ("n01",)}
        >>> fingerprint("cub", a, n, c) == fingerprint("cub", {"train": a["train"].copy()}, n, c)
        True
        >>> fingerprint("cub", a, n, c) == fingerprint("folder", a, n, c)
        False
    """
    memo = _fingerprint_memo(name, images, counts, classes)
    if memo is not None:
        record = _read_record(memo[0])
        if record is not None and record.get("key") == memo[1]:
            return record["fingerprint"]
    h = hashlib.sha256(f"metagrad-imageset-v1\n{name}\n".encode())
    for split in (s for s in SPLITS if s in images):
        array = images[split]
        count = np.asarray(counts[split], np.int64).tolist()
        shape = tuple(array.shape)
        header = f"{split}:{','.join(classes[split])}:{count}:{array.dtype.str}:{shape}\n"
        h.update(header.encode())
        for block in _cached_bytes(array) if memo is not None else _blocks(array):
            h.update(block)
    digest = h.hexdigest()
    if memo is not None:
        _write_record(memo[0], {"key": memo[1], "fingerprint": digest})
    return digest


def _blocks(array: np.ndarray) -> Iterable[memoryview]:
    flat = np.ascontiguousarray(array).reshape(-1)
    for start in range(0, flat.size, 1 << 26):
        yield memoryview(flat[start : start + (1 << 26)])


# --- split lists -------------------------------------------------------------------------------


def shipped_split(dataset: str, split: str) -> tuple[str, ...]:
    """The class names of ``split`` that ship with the package, sorted.

    Read from ``metagrad/tasks/splits/<dataset>/<split>.txt`` (package data).

    Raises:
        ImageSetNotFoundError: no list ships for that data set and split.

    Example:
        >>> [len(shipped_split("miniimagenet", s)) for s in SPLITS]
        [64, 16, 20]
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    text = resources.files("metagrad.tasks").joinpath(f"splits/{dataset}/{split}.txt")
    if not text.is_file():
        raise ImageSetNotFoundError(
            f"no {split} split list ships for the data set {dataset!r} "
            f"(metagrad/tasks/splits/{dataset}/{split}.txt): give the classes in expected="
        )
    return read_split_file(text.read_text(), where=f"splits/{dataset}/{split}.txt")


def read_split_file(
    path_or_text: str | os.PathLike, *, where: str | None = None
) -> tuple[str, ...]:
    """Class names of a split file: one per line, ``#`` comments and blank lines ignored; sorted.

    Args:
        path_or_text: a path (a ``Path``, or a one-line ``str`` that names an existing file,
            holds a ``/`` or ends in ``.txt``), or else the file's text.
        where: the name errors give; default the path, or ``<split file>`` for text.

    Raises:
        ImageSetNotFoundError: a path that does not exist.
        ImageSetClassError: a class listed twice.

    Example:
        >>> read_split_file("# mine\\nn02\\nn01  # a comment\\n")
        ('n01', 'n02')
        >>> read_split_file("~/no/such/train.txt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.imageset.ImageSetNotFoundError: split file .../no/such/train.txt does not...
    """
    if isinstance(path_or_text, os.PathLike) or _names_a_file(path_or_text):
        path = Path(path_or_text).expanduser()
        where = where or str(path)
        try:
            text = path.read_text()
        except FileNotFoundError as err:
            raise ImageSetNotFoundError(f"split file {path} does not exist") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ImageSetFormatError(f"split file {path} is not readable text ({err})") from err
    else:
        text, where = str(path_or_text), where or "<split file>"
    names = [line.split("#")[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ImageSetClassError(f"{where} lists a class twice: {twice[:5]}")
    return tuple(sorted(names))


def _names_a_file(text: str) -> bool:
    if not isinstance(text, str) or "\n" in text or not text.strip():
        return False
    return (
        "/" in text or os.sep in text or text.endswith(".txt") or Path(text).expanduser().is_file()
    )


def resolve_expected(
    dataset: str, expected: Mapping | None, *, standard_count: int | None = ...
) -> tuple[dict[str, tuple[str, ...]], int | None]:
    """The class lists and image count a reader checks: the shipped ones unless told otherwise.

    Args:
        dataset: the data set whose shipped lists fill the splits ``expected`` leaves out. A
            data set without shipped lists (``"folder"``) reads only the splits given.
        expected: ``None``, or a dict with ``"classes"`` (``{split: class names, or a path to a
            split file}``) and/or ``"images_per_class"`` (an int, or ``None`` for any count).
        standard_count: the count when ``expected`` gives none; default
            ``STANDARD_COUNTS.get(dataset)``.

    Returns:
        ``({split: sorted class names}, images_per_class or None)``.

    Raises:
        ValueError: an unknown key, a bad count, or no split at all.
        ImageSetNotFoundError: a split file that does not exist.
        ImageSetClassError: a class listed twice, or in two splits.

    Example:
        >>> classes, count = resolve_expected("miniimagenet", None)
        >>> [len(classes[s]) for s in SPLITS], count
        ([64, 16, 20], 600)
        >>> resolve_expected("folder", {"classes": {"train": ["b", "a"]}, "images_per_class": 3})
        ({'train': ('a', 'b')}, 3)
    """
    expected = dict(expected or {})
    unknown = set(expected) - {"classes", "images_per_class"}
    if unknown:
        raise ValueError(f"expected= takes 'classes' and 'images_per_class', not {sorted(unknown)}")
    given = dict(expected.get("classes") or {})
    if set(given) - set(SPLITS):
        raise ValueError(f"expected['classes'] keys must be among {SPLITS}, got {sorted(given)}")
    classes = {}
    for split in SPLITS:
        value = given.get(split)
        if value is None:
            try:
                classes[split] = shipped_split(dataset, split)
            except ImageSetNotFoundError:
                continue  # a data set without shipped lists reads the splits it is given
        elif isinstance(value, str | os.PathLike):
            path = Path(value).expanduser()
            if not path.is_file():
                raise ImageSetNotFoundError(f"split file {path} does not exist")
            classes[split] = read_split_file(path)
        else:
            classes[split] = read_split_file(
                "\n".join(str(n) for n in value), where=f"{split} list"
            )
    if not classes:
        raise ValueError(
            f"no split list for {dataset!r}: give expected={{'classes': {{'train': ..., "
            "'val': ..., 'test': ...}}}} (class names or paths to split files)"
        )
    seen: dict[str, str] = {}
    for split, names in classes.items():
        for n in names:
            if n in seen:
                raise ImageSetClassError(f"class {n!r} is in both the {seen[n]} and {split} lists")
            seen[n] = split
    count = expected.get(
        "images_per_class",
        STANDARD_COUNTS.get(dataset) if standard_count is ... else standard_count,
    )
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"images_per_class must be an int >= 1 or None, got {count!r}")
    return classes, count


def check_classes(
    found: Iterable[str], wanted: Sequence[str], *, where: str | os.PathLike, split: str
) -> None:
    """Raises unless ``found`` holds exactly the classes ``wanted``.

    Raises:
        ImageSetClassError: naming ``where``, the split and a few of the missing / extra classes.

    Example:
        >>> check_classes(["b", "a"], ("a", "b"), where="root/train", split="train")
    """
    found = set(found)
    missing, extra = sorted(set(wanted) - found), sorted(found - set(wanted))
    if missing:
        raise ImageSetClassError(
            f"{where} lacks {len(missing)} class(es) of the {split} split list, e.g. "
            f"{missing[:5]} (it has {len(found)}; the list {len(wanted)}); a partial copy is "
            f"read only with your own list: expected=dict(classes=...) (task.classes.{split}="
            "<file> on the command line)"
        )
    if extra:
        raise ImageSetClassError(
            f"{where} holds {len(extra)} class(es) not in the {split} split list, e.g. "
            f"{extra[:5]}: another split, or pass your own list in expected=dict(classes=...) "
            f"(task.classes.{split}=<file> on the command line)"
        )


def check_count(cls: str, count: int, wanted: int | None, *, where: str | os.PathLike) -> None:
    """Raises unless class ``cls`` has ``wanted`` images (any number >= 1 when ``wanted`` is None).

    Raises:
        ImageSetCountError: naming ``where``, the class and both counts.

    Example:
        >>> check_count("n01", 600, 600, where="train/n01")
        >>> check_count("n01", 41, None, where="images/001.Black_footed_Albatross")
    """
    if count < 1:
        raise ImageSetCountError(f"{where}: class {cls} has no images")
    if wanted is not None and count != wanted:
        raise ImageSetCountError(
            f"{where}: class {cls} has {count} images, expected {wanted}; a smaller copy is "
            "read only when you say so: expected=dict(images_per_class=...) "
            "(task.images_per_class=... on the command line)"
        )


# --- images ------------------------------------------------------------------------------------


def check_image_array(array: np.ndarray, *, size: tuple[int, int], where: str) -> np.ndarray:
    """``array`` if it is a uint8 ``(H, W, 3)`` image with ``(H, W) == size``, else raises.

    Raises:
        ImageSetImageError: another dtype, shape or channel count.

    Example:
        >>> check_image_array(np.zeros((2, 3, 3), np.uint8), size=(2, 3), where="x").shape
        (2, 3, 3)
    """
    shape = (*size, 3)
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.shape != shape:
        got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array)
        raise ImageSetImageError(f"{where}: expected a uint8 image {shape}, got {got}")
    return array


def decode_image(
    source: Path | str | bytes, *, size: tuple[int, int], where: str | None = None, resize: bool
) -> np.ndarray:
    """One image file (a path or its bytes) as uint8 ``(H, W, 3)`` RGB, ``(H, W) == size``.

    With ``resize=True`` (formats whose images come in any size: JPEG folders) another mode is
    converted to RGB and another size resized with Pillow's LANCZOS filter; with
    ``resize=False`` (formats that are stored at the benchmark's size: PNG bytes in a pickle)
    the image must already be RGB at ``size``. Pillow is imported here, not at module import.

    Args:
        source: a path, or the encoded bytes.
        size: ``(height, width)``.
        where: the name errors give (default the path, or ``<bytes>``).
        resize: whether to convert and resize (see above).

    Raises:
        ImageSetFormatError: truncated, not an image (an HTML page), or undecodable.
        ImageSetImageError: ``resize=False`` and another size or mode.

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO()
        >>> Image.new("L", (10, 12), 7).save(buf, format="PNG")
        >>> decode_image(buf.getvalue(), size=(8, 8), resize=True).shape
        (8, 8, 3)
        >>> decode_image(buf.getvalue(), size=(8, 8), where="a.png", resize=False)
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.imageset.ImageSetImageError: a.png: an L image of 10x12 (width x ...
    """
    import io

    from PIL import Image  # only a reader of image files needs Pillow

    if isinstance(source, bytes | bytearray | memoryview):
        where, opened = where or "<bytes>", io.BytesIO(bytes(source))
    else:
        where, opened = where or str(source), source
    height, width = size
    try:
        with Image.open(opened) as im:
            im.load()
            if im.mode != "RGB" or im.size != (width, height):
                if not resize:
                    raise ImageSetImageError(
                        f"{where}: an {im.mode} image of {im.size[0]}x{im.size[1]} (width x "
                        f"height), expected RGB {width}x{height}; this format is read as is, "
                        "without resizing"
                    )
                if im.mode != "RGB":
                    im = im.convert("RGB")
                if im.size != (width, height):
                    im = im.resize((width, height), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError as err:
        raise ImageSetNotFoundError(f"the image {where} does not exist") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, ImageSetError):
            raise
        raise ImageSetFormatError(f"cannot decode the image {where} ({err})") from err


def decode_classes(
    members: Mapping[str, Sequence[Path]],
    classes: Sequence[str],
    *,
    size: tuple[int, int],
    resize: bool,
    count: int | None,
    where: Callable[[str], str | os.PathLike] | str | os.PathLike,
    allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes ``members[c]`` for each class ``c`` of ``classes`` into one padded array.

    Every class is checked (:func:`check_count`, ``where`` naming it) before any image is
    decoded, so a wrong count fails fast.

    Args:
        members: class -> its image files, in the order the rows take.
        classes: the classes in array order (all must be keys of ``members``).
        size: ``(height, width)``; ``resize`` as in :func:`decode_image`.
        count: the image count every class must have, or None for any count >= 1.
        where: what count errors name: a path, or a function of the class.
        allocate: gives the array to fill, of the shape it is called with (default
            ``np.zeros``): :func:`cached_split`'s, so that a large split is written into its
            memory-mapped cache image by image rather than held in memory.

    Returns:
        ``(images, counts)``: uint8 ``(len(classes), max count, H, W, 3)`` with zero padding,
        and int32 ``(len(classes),)``.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> for i in range(3):
        ...     Image.new("RGB", (5, 5), (i, 0, 0)).save(folder / f"{i}.png")
        >>> files = sorted(folder.iterdir())
        >>> images, counts = decode_classes({"a": files[:1], "b": files[1:]}, ("a", "b"),
        ...                                 size=(5, 5), resize=False, count=None, where=folder)
        >>> images.shape, counts.tolist(), int(images[0, 1].max()), int(images[1, 1, 0, 0, 0])
        ((2, 2, 5, 5, 3), [1, 2], 0, 2)
    """
    name = where if callable(where) else (lambda cls: where)
    counts = np.array([len(members[c]) for c in classes], np.int32)
    for cls, n in zip(classes, counts, strict=True):
        check_count(cls, int(n), count, where=name(cls))
    shape = (len(classes), int(counts.max(initial=0)), *size, 3)
    images = np.zeros(shape, np.uint8) if allocate is None else allocate(shape)
    for i, cls in enumerate(classes):
        for j, path in enumerate(members[cls]):
            images[i, j] = decode_image(path, size=size, resize=resize)
    return images, counts


# --- cache -------------------------------------------------------------------------------------

# How a cache hit checks the cached array (``$METAGRAD_VERIFY_CACHE``): "full" recomputes its
# sha256 (one pass over it: a bit flip is detected); "stamp" trusts it when its size, mtime and
# inode are those recorded, beside its checksum, when it was written or last fully verified
# (nothing is read: an edit, truncation or replacement is detected, silent bit rot is not);
# "auto" (the default) is "full" for files up to FULL_VERIFY_BYTES (every mini-ImageNet,
# CIFAR and CUB split: about a second) and "stamp" above (tiered-ImageNet: 14 s a start).
VERIFY_ENV = "METAGRAD_VERIFY_CACHE"
VERIFY_MODES = ("auto", "full", "stamp")
FULL_VERIFY_BYTES = 1 << 30
_STALE_TMP_S = 3600.0  # a temporary file untouched this long belongs to a build that died
_RELEASE_BYTES = 1 << 25  # a file build drops its written pages from memory this often


def source_digest(root: str | os.PathLike, files: Iterable[Path]) -> str:
    """sha256 (hex) of the files' paths relative to ``root``, sizes and bytes, in the order given.

    Length-prefixed, so unambiguous; a renamed, edited or added file changes it. Readers call
    :func:`cached_source_digest`, which reads the files only when they changed.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> _ = (root / "a.png").write_bytes(b"x")
        >>> d = source_digest(root, [root / "a.png"])
        >>> _ = (root / "a.png").write_bytes(b"y")
        >>> d == source_digest(root, [root / "a.png"])
        False
    """
    root = Path(root)
    h = hashlib.sha256()
    for path in files:
        path = Path(path)
        name = path.relative_to(root).as_posix().encode()
        h.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _stat_key(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256(f"metagrad-source-stat-v1\n{root.resolve()}\n".encode())
    for path in files:
        st = path.stat()
        h.update(
            f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0"
            f"{st.st_ctime_ns}\0{st.st_ino}\n".encode()
        )
    return h.hexdigest()


def cached_source_digest(
    dataset: str,
    root: str | os.PathLike,
    files: Iterable[Path],
    *,
    cache_dir: str | os.PathLike | None,
) -> str:
    """:func:`source_digest` of the files, read from a memo while none of them changed.

    The memo (``<cache_dir>/<dataset>/sources/<h>.json``, checksummed) is keyed by ``sha256``
    of ``root`` and, per file, its relative path, size, mtime, ctime and inode (``os.stat``, no
    byte read), and holds the content digest computed the first time. Any write to a file moves
    its mtime and ctime (ctime cannot be set back by ``touch``/``utime``; a copy or restore gets
    a new inode), so an edited source gets a new memo key and is hashed again: it is never
    served stale. What this trusts: the file system's clock and inode numbers (a file system
    that keeps neither, some FUSE mounts, hashes again on every load, which is only slower).
    A cache folder that cannot be written gives the digest without a memo.

    Example:
        >>> import tempfile
        >>> root, cache = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
        >>> _ = (root / "a.png").write_bytes(b"x")
        >>> d = cached_source_digest("demo", root, [root / "a.png"], cache_dir=cache)
        >>> d == source_digest(root, [root / "a.png"]), len(list((cache / "demo").iterdir()))
        (True, 1)
        >>> d == cached_source_digest("demo", root, [root / "a.png"], cache_dir=cache)  # memo
        True
    """
    root, files = Path(root), [Path(p) for p in files]
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    key = _stat_key(root, files)
    memo = cache_dir / dataset / "sources" / f"{key[:32]}.json"
    record = _read_record(memo)
    if record is not None and record.get("stat_key") == key:
        return record["digest"]
    digest = source_digest(root, files)
    if _stat_key(root, files) == key:  # unchanged while it was read: safe to remember
        _write_record(memo, {"stat_key": key, "digest": digest})
    return digest


def _read_record(path: Path) -> dict | None:
    """A small checksummed JSON record, or None when absent or damaged."""
    import json

    try:
        if not matches_checksum(path):
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(path: Path, record: dict) -> None:
    """Writes a small JSON record atomically with its checksum; a failure only loses the memo."""
    import json

    try:
        write_verified(path, lambda f: f.write(json.dumps(record).encode()))
    except OSError:
        pass


def default_cache_dir() -> Path:
    """``$METAGRAD_CACHE``, or ``~/.cache/metagrad`` when it is not set.

    Example:
        >>> saved = os.environ.pop("METAGRAD_CACHE", None)
        >>> default_cache_dir() == Path.home() / ".cache" / "metagrad"
        True
        >>> os.environ["METAGRAD_CACHE"] = "/data/cache"
        >>> default_cache_dir().as_posix()
        '/data/cache'
        >>> if saved is None:
        ...     del os.environ["METAGRAD_CACHE"]
        ... else:
        ...     os.environ["METAGRAD_CACHE"] = saved
    """
    return Path(os.environ.get("METAGRAD_CACHE") or Path.home() / ".cache" / "metagrad")


def cache_verify_mode() -> str:
    """How a cache hit checks the cached array: ``$METAGRAD_VERIFY_CACHE``, default ``"auto"``.

    ``"full"``: its sha256 is recomputed on every hit (one pass; detects a bit flip).
    ``"stamp"``: trusted when its size, mtime_ns and inode equal those recorded when it was
    written or last fully verified (no byte read; detects edits, truncation, replacement, not
    silent bit rot). ``"auto"``: ``"full"`` for files up to :data:`FULL_VERIFY_BYTES` (1 GiB),
    ``"stamp"`` above. A stamp that does not match always leads to a full check, never
    straight to a rebuild.

    Raises:
        ValueError: another value, naming the variable.

    Example:
        >>> saved = os.environ.pop(VERIFY_ENV, None)
        >>> cache_verify_mode()
        'auto'
        >>> if saved is not None:
        ...     os.environ[VERIFY_ENV] = saved
    """
    mode = os.environ.get(VERIFY_ENV, "").strip().lower() or "auto"
    if mode not in VERIFY_MODES:
        raise ValueError(f"${VERIFY_ENV} must be one of {VERIFY_MODES}, got {mode!r}")
    return mode


def cache_paths(
    dataset: str, key: str, split: str, *, cache_dir: str | os.PathLike
) -> tuple[Path, Path]:
    """Where :func:`cached_split` keeps a split: ``<cache_dir>/<dataset>/<h>_<split>.npy`` and
    ``<h>_<split>.counts.npy``, ``h`` the first 32 hex digits of ``sha256(key)``.

    Example:
        >>> images, counts = cache_paths("cub", "k", "val", cache_dir="/tmp/c")
        >>> images.parent.as_posix(), images.name[-8:], counts.name[-15:]
        ('/tmp/c/cub', '_val.npy', '_val.counts.npy')
    """
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    folder = Path(cache_dir).expanduser() / dataset
    return folder / f"{digest}_{split}.npy", folder / f"{digest}_{split}.counts.npy"


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".stamp")


def _stamp_of(path: Path, checksum: str) -> dict:
    st = path.stat()
    return {"sha256": checksum, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _write_stamp(path: Path, checksum: str) -> None:
    """Records that ``path`` (as it is now) has ``checksum``; written atomically, best effort."""
    import json

    stamp = _stamp_path(path)
    try:
        tmp = temporary_beside(stamp)
        tmp.write_text(json.dumps(_stamp_of(path, checksum)))
        os.replace(tmp, stamp)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            tmp.unlink()


def _stamp_matches(path: Path, checksum: str) -> bool:
    import json

    try:
        return json.loads(_stamp_path(path).read_text()) == _stamp_of(path, checksum)
    except (OSError, ValueError):
        return False


def _verified_checksum(path: Path, mode: str) -> str | None:
    """``path``'s recorded sha256 if the file passes the check ``mode`` asks for, else None."""
    try:
        recorded = checksum_path(path).read_text().strip()
        size = path.stat().st_size
    except OSError:
        return None
    full = mode == "full" or (mode == "auto" and size <= FULL_VERIFY_BYTES)
    if not full and _stamp_matches(path, recorded):
        return recorded
    try:
        if file_sha256(path) != recorded:
            return None
    except OSError:
        return None
    if not full:
        _write_stamp(path, recorded)  # so that the next hit need not read it
    return recorded


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of builds that were killed (untouched for an hour): never read, only
    removed, so that a killed 10 GB build does not keep its disk space."""
    import time

    try:
        for tmp in folder.glob("*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
                    tmp.unlink()
    except OSError:
        pass


class _FileSplit:
    """The array a file build fills: a writable ``.npy`` memory map whose written pages are
    flushed and dropped from this process's memory every :data:`_RELEASE_BYTES`, so a build
    holds about one block of the split in memory, however large the split."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path = path
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate") and self.array.nbytes:
            # reserve the blocks now: a full disk is an OSError here, not a SIGBUS mid-build
            with path.open("r+b") as f:
                os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
        self.shape, self.dtype, self._dirty = self.array.shape, self.array.dtype, 0

    def __setitem__(self, index, value) -> None:
        self.array[index] = value
        self._dirty += np.asarray(value).nbytes
        if self._dirty >= _RELEASE_BYTES:
            self.release()

    def __getitem__(self, index):
        return self.array[index]

    def release(self) -> None:
        mapped = getattr(self.array, "_mmap", None)
        if mapped is None or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            self.array.flush()
        elif sys.platform.startswith("linux"):
            # Linux keeps a dropped page's data (dirty) in the page cache, written back later:
            # no synchronous flush, which would make the build wait for the disk
            mapped.madvise(mmap.MADV_DONTNEED)
        else:
            self.array.flush()
            mapped.madvise(mmap.MADV_DONTNEED)
        self._dirty = 0

    def close(self) -> None:
        self.release()
        if not sys.platform.startswith("linux"):  # Linux's reads see the mapped writes
            self.array.flush()
        del self.array


def cached_split(
    dataset: str,
    key: str,
    split: str,
    build: Callable[..., tuple[np.ndarray, np.ndarray]],
    *,
    cache_dir: str | os.PathLike | None,
    into: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A split's ``(images, counts)`` from the cache, or from ``build`` and then cached.

    The two arrays are kept as ``.npy`` files (:func:`cache_paths`), each written atomically with
    its sha256 beside it (:func:`metagrad._files.write_verified`) and read back memory-mapped.
    ``key`` must change whenever the result would: hash the source (:func:`cached_source_digest`),
    the options and the reader's preprocessing version into it.

    A hit checks the counts' sha256 and the images as :func:`cache_verify_mode` says (a full
    sha256, or the size/mtime/inode stamp recorded beside the checksum); a damaged cache
    (checksum, dtype or shape wrong, half of it missing) is rebuilt with a warning.

    Building: with ``into=False``, ``build()`` returns the arrays, written with ``np.save``. With
    ``into=True``, ``build(allocate)`` calls ``allocate(shape)`` once it knows the split's shape,
    fills the array-like it gets (``out[i, j] = image``, ``out[i, :n] = block``, ``out[cls, pos]
    = images``) and returns ``(out, counts)``: the array is a memory-mapped ``.npy`` in a
    temporary file of the cache folder (its written pages released as it goes, so the build
    holds about one block in memory, not the split), renamed into place after its checksum is
    written. Both give the same file, byte for byte. An interrupted build removes its temporary
    file (a killed one leaves a ``*.tmp`` that no reader trusts, removed an hour later by the
    next build). A cache folder that cannot be written gives a warning and the built arrays
    (``into=True``: built in memory).

    Args:
        dataset: the cache subfolder.
        key: any string identifying the content (hashed into the file name).
        split: part of the file name.
        build: see above; uint8 ``(classes, max_count, H, W, 3)`` and int ``(classes,)``.
        cache_dir: the cache root; ``None`` for :func:`default_cache_dir`.
        into: whether ``build`` takes ``allocate`` (large splits).

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> build = lambda: (np.ones((2, 3, 4, 4, 3), np.uint8), np.array([3, 1]))
        >>> images, counts = cached_split("demo", "v1", "train", build, cache_dir=folder)
        >>> type(images).__name__, counts.tolist()
        ('memmap', [3, 1])
        >>> again = cached_split("demo", "v1", "train", None, cache_dir=folder)  # a hit
        >>> bool((again[0] == images).all())
        True
        >>> def build_into(allocate):
        ...     out = allocate((2, 3, 4, 4, 3))
        ...     out[0, :3] = 1
        ...     out[1, :1] = 1
        ...     return out, np.array([3, 1])
        >>> images, counts = cached_split("demo", "v2", "train", build_into, cache_dir=folder,
        ...                               into=True)
        >>> type(images).__name__, int(images.sum()) == 4 * 4 * 4 * 3
        ('memmap', True)
    """
    mode = cache_verify_mode()
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    images_path, counts_path = cache_paths(dataset, key, split, cache_dir=cache_dir)
    cached = _read_cache(images_path, counts_path, mode)
    if cached is not None:
        return cached
    _remove_stale_temporaries(images_path.parent)
    with contextlib.suppress(OSError):
        _stamp_path(images_path).unlink()
    if into:
        return _build_into(dataset, build, images_path, counts_path)
    images, counts = build()
    counts = _checked_counts(images, counts)
    try:
        write_verified(images_path, lambda f: np.save(f, images, allow_pickle=False))
        write_verified(counts_path, lambda f: np.save(f, counts, allow_pickle=False))
    except OSError as err:
        _warn_unwritable(dataset, images_path, err, stacklevel=3)
        return images, counts
    checksum = checksum_path(images_path).read_text().strip()
    _write_stamp(images_path, checksum)
    return _open_cached(images_path, checksum), counts


def _checked_counts(images, counts) -> np.ndarray:
    counts = np.asarray(counts, np.int32)
    if images.dtype != np.uint8 or len(images.shape) != 5 or counts.shape != images.shape[:1]:
        raise AssertionError(f"build gave {images.dtype} {images.shape}, counts {counts.shape}")
    return counts


def _warn_unwritable(dataset: str, path: Path, err: OSError, stacklevel: int = 4) -> None:
    warnings.warn(  # stacklevel: the reader that called cached_split
        f"could not write the {dataset} cache {path} ({err}); it will be rebuilt next time",
        stacklevel=stacklevel,
    )


def _open_cached(path: Path, checksum: str) -> np.memmap:
    """The cached array, memory-mapped read-only, marked with its file and checksum so that
    :func:`fingerprint` can read its digest from the cache instead of hashing it."""
    images = np.load(path, mmap_mode="r", allow_pickle=False)
    st = path.stat()
    images._metagrad_cache = (path, checksum, st.st_ino, st.st_mtime_ns)
    return images


def _build_into(dataset, build, images_path: Path, counts_path: Path):
    """``build(allocate)`` into a temporary ``.npy`` beside ``images_path``, then put in place."""
    state: dict = {}

    def allocate(shape) -> _FileSplit | np.ndarray:
        if state:
            raise AssertionError("allocate() called twice")
        shape = tuple(int(n) for n in shape)
        try:
            state["tmp"] = temporary_beside(images_path)
            state["out"] = _FileSplit(state["tmp"], shape)
        except OSError as err:  # an unwritable folder, a full disk: build in memory
            state["error"] = err
            _discard(state.pop("tmp", None))
            state["out"] = np.zeros(shape, np.uint8)
        return state["out"]

    try:
        images, counts = build(allocate)
        counts = _checked_counts(images, counts)
        if images is not state.get("out"):
            raise AssertionError("build(allocate) must return the array allocate() gave")
        if "error" in state:
            _warn_unwritable(dataset, images_path, state["error"], stacklevel=4)
            return images, counts
        images.close()
        tmp = state["tmp"]
        try:
            checksum = file_sha256(tmp)
            checksum_path(images_path).write_text(checksum)  # before the data is visible
            os.replace(tmp, images_path)
            write_verified(counts_path, lambda f: np.save(f, counts, allow_pickle=False))
        except OSError as err:  # built, but not put in place: served from where it is
            array = np.load(tmp if tmp.exists() else images_path, mmap_mode="r")
            _warn_unwritable(dataset, images_path, err, stacklevel=4)
            return array, counts  # (a map outlives its file's removal, in finally below)
    finally:
        _discard(state.get("tmp") if state.get("tmp") and state["tmp"].exists() else None)
    _write_stamp(images_path, checksum)
    return _open_cached(images_path, checksum), counts


def _discard(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _read_cache(
    images_path: Path, counts_path: Path, mode: str = "full"
) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached split, or None when absent (silently) or damaged (with a warning)."""
    if not images_path.exists() and not counts_path.exists():
        return None
    images = counts = None
    try:
        checksum = _verified_checksum(images_path, mode)
        intact = checksum is not None and _verified_checksum(counts_path, "full") is not None
        images = _open_cached(images_path, checksum) if intact else None
        counts = np.load(counts_path, allow_pickle=False) if intact else None
    except (OSError, ValueError):
        images = counts = None
    if (
        images is not None
        and images.dtype == np.uint8
        and images.ndim == 5
        and counts.dtype == np.int32
        and counts.shape == images.shape[:1]
        and (counts.size == 0 or int(counts.max()) <= images.shape[1])
    ):
        return images, counts
    warnings.warn(f"the cache {images_path} is damaged; rebuilding it", stacklevel=3)
    return None


# --- fingerprints of cached splits -------------------------------------------------------------


def _fingerprint_memo(name, images, counts, classes) -> tuple[Path, str] | None:
    """Where the fingerprint of these cached splits is remembered, and the memo's key; None
    unless every split is an array :func:`cached_split` returned (a read-only map of a cache
    file whose checksum was verified), the only arrays whose bytes a checksum stands for."""
    files = {}
    for split in (s for s in SPLITS if s in images):
        array = images[split]
        marked = getattr(array, "_metagrad_cache", None) if type(array) is np.memmap else None
        if marked is None or array.mode != "r":
            return None
        files[split] = marked
    if not files:
        return None
    h = hashlib.sha256(f"metagrad-imageset-fingerprint-memo-v1\n{name}\n".encode())
    for split, (_, checksum, _, _) in files.items():
        array = images[split]
        count = np.asarray(counts[split], np.int64).tolist()
        h.update(
            f"{split}:{','.join(classes[split])}:{count}:{array.dtype.str}:{array.shape}:"
            f"{checksum}\n".encode()
        )
    key = h.hexdigest()
    folder = next(iter(files.values()))[0].parent / "fingerprints"
    return folder / f"{key[:32]}.json", key


def _cached_bytes(array: np.ndarray) -> Iterable[memoryview | bytes]:
    """The bytes of a cached split in blocks, read from its file (not through the memory map,
    which would keep the whole split resident in this process)."""
    path, _, ino, mtime_ns = array._metagrad_cache
    remaining = array.nbytes
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        if (st.st_ino, st.st_mtime_ns) != (ino, mtime_ns):  # replaced since it was mapped
            yield from _blocks(array)
            return
        f.seek(array.offset)
        while remaining:
            block = f.read(min(remaining, 1 << 26))
            if not block:
                raise OSError(f"{path} ended {remaining} bytes early")
            remaining -= len(block)
            yield block


# --- registry ----------------------------------------------------------------------------------


def load_image_dataset(
    name: str,
    data_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    expected: Mapping | None = None,
    **options,
) -> ImageSetData:
    """Loads the data set ``name`` of :data:`DATASETS` with its reader (imported only now).

    ``load_image_dataset("cub", d, **o)`` is ``metagrad.tasks.cub.load_cub(d, **o)``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).

    Example:
        >>> load_image_dataset("miniimagenet", "/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.miniimagenet_io.MiniImageNetNotFoundError: mini-ImageNet not found...
        >>> load_image_dataset("imagenet", "/data")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: unknown image data set 'imagenet'; known: ['cifarfs', 'cub', ...]
    """
    if name not in DATASETS:
        raise ValueError(f"unknown image data set {name!r}; known: {sorted(DATASETS)}")
    module, function = DATASETS[name].split(":")
    loader = getattr(importlib.import_module(module), function)
    return loader(data_dir, cache_dir=cache_dir, expected=expected, **options)
