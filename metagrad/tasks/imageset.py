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
"""

from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from metagrad._files import matches_checksum, write_verified

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

    Example:
        >>> a = {"train": np.zeros((1, 2, 4, 4, 3), np.uint8)}
        >>> n, c = {"train": np.array([2], np.int32)}, {"train": ("n01",)}
        >>> fingerprint("cub", a, n, c) == fingerprint("cub", {"train": a["train"].copy()}, n, c)
        True
        >>> fingerprint("cub", a, n, c) == fingerprint("folder", a, n, c)
        False
    """
    h = hashlib.sha256(f"metagrad-imageset-v1\n{name}\n".encode())
    for split in (s for s in SPLITS if s in images):
        array = np.ascontiguousarray(images[split])
        count = np.asarray(counts[split], np.int64).tolist()
        header = f"{split}:{','.join(classes[split])}:{count}:{array.dtype.str}:{array.shape}\n"
        h.update(header.encode())
        flat = array.reshape(-1)
        for start in range(0, flat.size, 1 << 26):
            h.update(memoryview(flat[start : start + (1 << 26)]))
    return h.hexdigest()


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
    images = np.zeros((len(classes), int(counts.max(initial=0)), *size, 3), np.uint8)
    for i, cls in enumerate(classes):
        for j, path in enumerate(members[cls]):
            images[i, j] = decode_image(path, size=size, resize=resize)
    return images, counts


# --- cache -------------------------------------------------------------------------------------


def source_digest(root: str | os.PathLike, files: Iterable[Path]) -> str:
    """sha256 (hex) of the files' paths relative to ``root``, sizes and bytes, in the order given.

    Length-prefixed, so unambiguous; a renamed, edited or added file changes it.

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


def cached_split(
    dataset: str,
    key: str,
    split: str,
    build: Callable[[], tuple[np.ndarray, np.ndarray]],
    *,
    cache_dir: str | os.PathLike | None,
) -> tuple[np.ndarray, np.ndarray]:
    """A split's ``(images, counts)`` from the cache, or from ``build()`` and then cached.

    The two arrays are kept as ``.npy`` files (:func:`cache_paths`), each written atomically with
    its sha256 beside it (:func:`metagrad._files.write_verified`) and read back memory-mapped
    after the checksum matched. ``key`` must change whenever the result would: hash the source
    (:func:`source_digest`), the options and the reader's preprocessing version into it. A
    damaged cache (checksum, dtype or shape wrong) is rebuilt with a warning; a cache folder that
    cannot be written gives a warning and the built arrays.

    Args:
        dataset: the cache subfolder.
        key: any string identifying the content (hashed into the file name).
        split: part of the file name.
        build: returns uint8 ``(classes, max_count, H, W, 3)`` and int ``(classes,)``.
        cache_dir: the cache root; ``None`` for :func:`default_cache_dir`.

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
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    images_path, counts_path = cache_paths(dataset, key, split, cache_dir=cache_dir)
    cached = _read_cache(images_path, counts_path)
    if cached is not None:
        return cached
    images, counts = build()
    counts = np.asarray(counts, np.int32)
    if images.dtype != np.uint8 or images.ndim != 5 or counts.shape != images.shape[:1]:
        raise AssertionError(f"build() gave {images.dtype} {images.shape}, counts {counts.shape}")
    try:
        write_verified(images_path, lambda f: np.save(f, images, allow_pickle=False))
        write_verified(counts_path, lambda f: np.save(f, counts, allow_pickle=False))
    except OSError as err:
        warnings.warn(
            f"could not write the {dataset} cache {images_path} ({err}); it will be rebuilt next "
            "time",
            stacklevel=2,
        )
        return images, counts
    return np.load(images_path, mmap_mode="r", allow_pickle=False), counts


def _read_cache(images_path: Path, counts_path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached split, or None when absent (silently) or damaged (with a warning)."""
    if not images_path.exists() and not counts_path.exists():
        return None
    try:
        intact = matches_checksum(images_path) and matches_checksum(counts_path)
        images = np.load(images_path, mmap_mode="r", allow_pickle=False) if intact else None
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
