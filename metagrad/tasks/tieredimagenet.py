"""Reading tiered-ImageNet (Ren et al. 2018) into 84x84 RGB arrays, cached on disk.

tiered-ImageNet holds 608 ImageNet classes (779,165 images) grouped into 34 super-categories,
split 20 / 6 / 8 into 351 / 97 / 160 classes; each class has its ImageNet training images
(732 to 1300), resized to 84x84. Two containers are accepted, found in this order in
``data_dir`` (``layout=`` forces one), and nothing is downloaded:

1. ``"png"``, the release: ``{train,val,test}_images_png.pkl``, a list of PNG-encoded images
   (numpy uint8 byte arrays, as ``cv2.imencode`` gives them, or bytes), with
   ``{split}_labels.pkl``;
2. ``"npz"``, the common re-packs: ``{split}_images.npz`` holding ``images``, uint8
   ``(N, 84, 84, 3)`` (the release's own ``decompress`` writes these), with ``{split}_labels.pkl``,
   or, without it, a ``labels`` array in the npz.

A labels pickle is a dict: the release's ``label_specific`` (per image, an index into
``label_specific_str``, the class names), ``label_general`` and ``label_general_str`` (the
super-categories); or a re-pack's ``labels`` (per image, an integer class id, no names). Keys may
be ``str`` or ``bytes``. Pickles are read with the restricted unpickler of
:mod:`metagrad.tasks.safe_pickle` (``encoding="latin1"``: the release was written by Python 2),
so a crafted file cannot run code; npz files with ``np.load(allow_pickle=False)``.

**Colour order.** The release built its arrays with OpenCV (``cv2.imread``: blue, green, red)
and encoded them with ``cv2.imencode``, so its PNG files hold proper RGB images (decoded here by
Pillow), while an npz written by its ``decompress`` (``cv2.imdecode``) holds BGR arrays. The npz
reader therefore reverses the channels by default (``npz_channels="bgr"``), which makes both
containers give the same arrays bit for bit; ``npz_channels="rgb"`` reads a re-pack that stored
RGB.

**Classes.** The shipped lists (``metagrad/tasks/splits/tieredimagenet/``) are the release's
split csvs: ImageNet wnids, each with its super-category. The release's labels name classes by
words (``label_specific_str``), not wnids, so against the shipped lists a split is checked by its
number of classes and of super-categories (351 / 20, 97 / 6, 160 / 8); where the labels are
wnids, or where ``expected`` gives lists of your own, by the names themselves. Re-packs without
names call class ``k`` ``"label_<k>"``.

**Size.** Split ``s`` is uint8 ``(classes, 1300, 84, 84, 3)``, class ``i`` named
``classes[s][i]`` (sorted), its images in file order, zero rows after its ``counts[s][i]``. The
cache (:func:`metagrad.tasks.imageset.cached_split`) is about 16 GB for the three splits
(608 x 1300 x 84 x 84 x 3 bytes = 16.7 GB, 15.6 GiB; train alone 9.7 GB), more than a device
holds next to a model: the trainer streams tasks from this memory-mapped cache on the host
(``task.sampling=auto`` does so when a split exceeds the device budget). Building the cache
decodes every image once, a few minutes, straight into the memory-mapped cache file, so the
split's array is never whole in memory; the PNG release's pickle is (the restricted unpickler,
like any unpickler, reads a pickle whole: plan for RAM the size of ``train_images_png.pkl``),
an npz is streamed 1024 rows at a time. Later loads read neither the sources nor the arrays
whole: the source digest and the fingerprint are remembered beside the cache, and the cache
files, over 1 GiB, are checked by size, mtime and inode (``METAGRAD_VERIFY_CACHE=full`` hashes
them on every load, about 14 s, to catch a bit flip; see
:func:`metagrad.tasks.imageset.cache_verify_mode`).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np

from metagrad.tasks.imageset import (
    SPLITS,
    ImageSetClassError,
    ImageSetData,
    ImageSetFormatError,
    ImageSetImageError,
    ImageSetNotFoundError,
    cached_source_digest,
    cached_split,
    check_classes,
    check_count,
    decode_image,
    fingerprint,
    resolve_expected,
)
from metagrad.tasks.safe_pickle import NotAPickleError, TruncatedPickleError, load_pickle

__all__ = ["load_tieredimagenet", "read_labels", "shipped_categories"]

IMAGE_SIZE = (84, 84)
LAYOUTS = ("png", "npz")
_VERSION = 1  # part of the cache key: bump when the decoding changes
_PNG, _NPZ, _LABELS = "{}_images_png.pkl", "{}_images.npz", "{}_labels.pkl"
_WNID = re.compile(r"n\d{8}")


def shipped_categories(split: str) -> dict[str, str]:
    """``{class wnid: super-category wnid}`` of the shipped tiered-ImageNet list of ``split``.

    Example:
        >>> cats = {s: shipped_categories(s) for s in SPLITS}
        >>> [len(cats[s]) for s in SPLITS], [len(set(cats[s].values())) for s in SPLITS]
        ([351, 97, 160], [20, 6, 8])
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    text = resources.files("metagrad.tasks").joinpath(f"splits/tieredimagenet/{split}.txt")
    out = {}
    for line in text.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            wnid, _, category = line.partition("#")
            out[wnid.strip()] = category.strip()
    return out


def _str(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _unpickle(path: Path) -> object:
    try:
        return load_pickle(path, encoding="latin1")
    except (NotAPickleError, TruncatedPickleError) as err:
        raise ImageSetFormatError(str(err)) from err


def read_labels(path: str | os.PathLike) -> tuple[np.ndarray, tuple[str, ...], np.ndarray | None]:
    """A tiered-ImageNet labels pickle: per-image class indices, class names, super-categories.

    Accepts the release's keys (``label_specific`` and ``label_specific_str``, with
    ``label_general`` where present) and a re-pack's ``labels``, as ``str`` or ``bytes``.

    Returns:
        ``(labels, names, general)``: int64 ``(N,)`` with ``names[labels[i]]`` image ``i``'s
        class; the names (``"label_<k>"`` for a re-pack's ids); int64 ``(N,)`` super-category
        indices, or None.

    Raises:
        ImageSetNotFoundError: no such file.
        ImageSetFormatError: not a pickle (an HTML page), truncated, not a dict, without the keys,
            or labels that do not index the names.
        UnsafePickleError: the pickle asks for a global a labels file never needs (not run).

    Example:
        >>> import pickle, tempfile
        >>> path = Path(tempfile.mkdtemp()) / "val_labels.pkl"
        >>> _ = path.write_bytes(pickle.dumps({b"label_specific": np.array([1, 0, 1]),
        ...                                    b"label_specific_str": [b"dingo", b"kit fox"]}))
        >>> labels, names, general = read_labels(path)
        >>> labels.tolist(), names, general
        ([1, 0, 1], ('dingo', 'kit fox'), None)
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ImageSetNotFoundError(f"the labels file {path} does not exist")
    obj = _unpickle(path)
    if not isinstance(obj, dict):
        raise ImageSetFormatError(f"{path} holds a {type(obj).__name__}, not a dict of labels")
    d = {_str(k): v for k, v in obj.items()}
    general = None
    if "label_specific" in d:
        if "label_specific_str" not in d:
            raise ImageSetFormatError(
                f"{path} has label_specific but not label_specific_str (the class names)"
            )
        labels = _int_vector(d["label_specific"], path, "label_specific")
        values = d["label_specific_str"]
        if not isinstance(values, list | tuple | np.ndarray):
            raise ImageSetFormatError(f"{path}: label_specific_str is not a list of names")
        names = tuple(_str(v) for v in values)
        if len(set(names)) != len(names):
            raise ImageSetFormatError(f"{path}: label_specific_str names a class twice")
        if "label_general" in d:
            general = _int_vector(d["label_general"], path, "label_general")
            if general.shape != labels.shape:
                raise ImageSetFormatError(
                    f"{path}: label_general has {len(general)} entries, label_specific "
                    f"{len(labels)}"
                )
    elif "labels" in d:
        ids = _int_vector(d["labels"], path, "labels")
        unique, labels = np.unique(ids, return_inverse=True)
        names = tuple(f"label_{k}" for k in unique.tolist())
    else:
        raise ImageSetFormatError(
            f"{path} lacks the keys label_specific and label_specific_str (Ren et al.'s release) "
            f"or labels (a re-pack); it has {sorted(d)[:8]}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ImageSetFormatError(
            f"{path}: label_specific holds indices outside the {len(names)} names"
        )
    return labels.astype(np.int64), names, general


def _int_vector(value: object, path: Path, key: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise ImageSetFormatError(f"{path}: {key} is not an integer array ({err})") from err
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ImageSetFormatError(
            f"{path}: {key} should be one integer per image, got {array.dtype} {array.shape}"
        )
    return array.astype(np.int64)


# --- containers -------------------------------------------------------------------------------


def _find_layout(data_dir: Path, layout: str | None) -> str:
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    for candidate in (layout,) if layout else LAYOUTS:
        pattern = _PNG if candidate == "png" else _NPZ
        present = [s for s in SPLITS if (data_dir / pattern.format(s)).is_file()]
        if not present and layout is None:
            continue
        needed = [pattern.format(s) for s in SPLITS]
        if candidate == "png":
            needed += [_LABELS.format(s) for s in SPLITS]
        missing = [n for n in needed if not (data_dir / n).is_file()]
        if missing:
            raise ImageSetNotFoundError(
                f"{data_dir} lacks {missing} of the tiered-ImageNet {candidate} layout "
                f"(it needs {', '.join(needed)}; nothing is downloaded)"
            )
        return candidate
    raise ImageSetNotFoundError(
        f"tiered-ImageNet not found in {data_dir}: expected (1) Ren et al.'s release, "
        "{train,val,test}_images_png.pkl with {train,val,test}_labels.pkl, or (2) "
        "{train,val,test}_images.npz (with {split}_labels.pkl, or labels in the npz); "
        "metagrad never downloads"
    )


def _sniff_npz(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(64)  # not read_bytes(): an npz of tiered's train split is 9.7 GB
    if head.lstrip()[:1] == b"<":
        raise ImageSetFormatError(
            f"{path} is not an npz but an HTML/XML page (it starts with {head.lstrip()[:15]!r}): "
            "probably an error page saved under the file's name; fetch it again"
        )
    if head[:4] != b"PK\x03\x04":
        raise ImageSetFormatError(
            f"{path} is not an npz (zip) archive (it starts with {head[:8]!r})"
        )


def _npy_header(f) -> tuple[tuple, bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the .npy stream ``f``, leaving it at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npz_header(path: Path, key: str) -> tuple[zipfile.ZipFile, tuple, np.dtype]:
    """The open zip, the shape and the dtype of member ``key``, read from its .npy header."""
    _sniff_npz(path)
    archive = None
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
        if f"{key}.npy" not in names:
            archive.close()
            raise ImageSetFormatError(
                f"{path} has no '{key}' array (it holds {[n[:-4] for n in names][:8]})"
            )
        with archive.open(f"{key}.npy") as f:
            shape, fortran, dtype = _npy_header(f)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        if archive is not None:
            archive.close()
        raise ImageSetFormatError(
            f"{path} is not a readable npz ({type(err).__name__}: {err}): truncated or damaged"
        ) from err
    if fortran or dtype.hasobject:
        archive.close()
        raise ImageSetFormatError(f"{path}: '{key}' is a Fortran-order or object array")
    return archive, shape, dtype


def _npz_labels(path: Path) -> tuple[np.ndarray, tuple[str, ...], None]:
    archive, shape, _ = _npz_header(path, "labels")
    archive.close()
    try:
        with np.load(path, allow_pickle=False) as npz:
            ids = _int_vector(npz["labels"], path, "labels")
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ImageSetFormatError(f"{path}: cannot read its labels ({err})") from err
    unique, labels = np.unique(ids, return_inverse=True)
    return labels.astype(np.int64), tuple(f"label_{k}" for k in unique.tolist()), None


def _scatter_npz(path: Path, n: int, slots: np.ndarray, out: np.ndarray, bgr: bool) -> None:
    """Streams ``images`` from the npz row block by row block into ``out[class, row]``."""
    archive, shape, dtype = _npz_header(path, "images")
    with archive:
        if dtype != np.uint8 or len(shape) != 4 or tuple(shape[1:]) != (*IMAGE_SIZE, 3):
            raise ImageSetImageError(
                f"{path}: images should be uint8 (N, 84, 84, 3), got {dtype} {tuple(shape)}"
            )
        if shape[0] != n:
            raise ImageSetFormatError(
                f"{path} holds {shape[0]} images but its labels {n}: the files do not belong "
                "together"
            )
        row = 84 * 84 * 3
        try:
            with archive.open("images.npy") as f:
                _npy_header(f)  # the data follow it
                for start in range(0, n, 1024):
                    stop = min(n, start + 1024)
                    block = f.read(row * (stop - start))
                    if len(block) != row * (stop - start):
                        raise EOFError(f"images end after {start} of {n} rows")
                    images = np.frombuffer(block, np.uint8).reshape(-1, *IMAGE_SIZE, 3)
                    cls, pos = slots[start:stop, 0], slots[start:stop, 1]
                    out[cls, pos] = images[..., ::-1] if bgr else images
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
            raise ImageSetFormatError(
                f"{path} is not a readable npz ({type(err).__name__}: {err}): truncated or damaged"
            ) from err


def _scatter_png(path: Path, n: int, slots: np.ndarray, out: np.ndarray) -> None:
    items = _unpickle(path)
    if not isinstance(items, list | tuple | np.ndarray):
        raise ImageSetFormatError(
            f"{path} holds a {type(items).__name__}, not a list of PNG-encoded images"
        )
    if len(items) != n:
        raise ImageSetFormatError(
            f"{path} holds {len(items)} images but its labels {n}: the files do not belong together"
        )
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray) and item.dtype == np.uint8:
            data = item.tobytes()
        elif isinstance(item, bytes | bytearray):
            data = bytes(item)
        else:
            raise ImageSetFormatError(
                f"{path}: image {i} is a {type(item).__name__}, not PNG bytes"
            )
        out[slots[i, 0], slots[i, 1]] = decode_image(
            data, size=IMAGE_SIZE, where=f"{path} image {i}", resize=False
        )


# --- the reader -------------------------------------------------------------------------------


def _check_split(
    split: str,
    names: tuple[str, ...],
    general: np.ndarray | None,
    wanted: tuple[str, ...],
    own_list: bool,
    where: Path,
) -> None:
    if own_list or (names and all(_WNID.fullmatch(n) for n in names)):
        check_classes(names, wanted, where=where, split=split)
        return
    # Words, not wnids: what can be checked against the shipped wnid list is its size.
    if len(names) != len(wanted):
        raise ImageSetClassError(
            f"{where} holds {len(names)} classes, the tiered-ImageNet {split} split "
            f"{len(wanted)} (its class names are words, not wnids, so the count is checked): a "
            "partial copy is read only with your own lists, expected=dict(classes=...) "
            "(task.classes.train=... on the command line)"
        )
    categories = len(set(shipped_categories(split).values()))
    if general is not None and len(np.unique(general)) != categories:
        raise ImageSetClassError(
            f"{where} holds {len(np.unique(general))} super-categories (label_general), the "
            f"tiered-ImageNet {split} split {categories}"
        )


def load_tieredimagenet(
    data_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    expected: Mapping | None = None,
    layout: str | None = None,
    npz_channels: str = "bgr",
) -> ImageSetData:
    """tiered-ImageNet's three splits as uint8 84x84 RGB arrays, decoded once and cached.

    Reads Ren et al.'s PNG release or an npz re-pack (see the module docstring) and never
    downloads. Split ``s`` is uint8 ``(classes, max_count, 84, 84, 3)``; row ``j`` of class ``i``
    (``classes[s][i]``, sorted) is the class's ``j``-th image in file order for ``j <
    counts[s][i]`` (732 to 1300 in the release) and zeros after. The images are not resized:
    a PNG or an npz of another size is refused. The PNG release and an npz written from it by the
    release's ``decompress`` give bit-identical arrays and the same fingerprint.

    The classes are checked against the shipped lists (351 / 97 / 160 classes in 20 / 6 / 8
    super-categories; by count where the labels name classes by words, see the module
    docstring) or against ``expected["classes"]``; any count >= 1 per class is accepted unless
    ``expected["images_per_class"]`` gives one. Each split is cached under
    ``<cache_dir>/tieredimagenet/``, keyed by the source files' bytes, the lists, the options and
    the decoding version (about 16 GB in all: the trainer streams it from the host).

    Args:
        data_dir: the folder holding one of the containers.
        cache_dir: the cache root (default ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``).
        expected: ``None``, or ``{"classes": {split: names or a split file}, "images_per_class":
            int or None}``.
        layout: ``"png"`` or ``"npz"`` to read that container when both are there (default: the
            PNG release if present, else the npz).
        npz_channels: ``"bgr"`` (default, what the release's ``decompress`` writes) or ``"rgb"``,
            the channel order of the npz arrays; ignored for the PNG release.

    Returns:
        An :class:`~metagrad.tasks.imageset.ImageSetData` named ``"tieredimagenet"``, layout
        ``"png"`` or ``"npz"``.

    Raises:
        ImageSetNotFoundError: no container, or part of one.
        ImageSetFormatError: a truncated or non-pickle / non-npz file (an HTML page), a labels
            pickle without its keys, image and label counts that differ, a PNG that does not
            decode.
        ImageSetClassError: a listed class missing, an unlisted one present, or (word labels)
            another number of classes or super-categories than the split's.
        ImageSetCountError: a class with another count than ``images_per_class``.
        ImageSetImageError: images that are not uint8 84x84 RGB.
        UnsafePickleError: a pickle asks for a global a data file never needs (not run).

    Example:
        Typical use is ``data = load_tieredimagenet("~/data/tiered-imagenet")``; without files:

        >>> load_tieredimagenet("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.imageset.ImageSetNotFoundError: tiered-ImageNet not found in /no/such...
    """
    if npz_channels not in ("bgr", "rgb"):
        raise ValueError(f"npz_channels must be 'bgr' or 'rgb', got {npz_channels!r}")
    data_dir = Path(data_dir).expanduser()
    wanted, count = resolve_expected("tieredimagenet", expected, standard_count=None)
    own = set(dict((expected or {}).get("classes") or {}))
    layout = _find_layout(data_dir, layout)
    images, counts, classes = {}, {}, {}
    for split in SPLITS:
        labels_path = data_dir / _LABELS.format(split)
        image_path = data_dir / (_PNG if layout == "png" else _NPZ).format(split)
        if labels_path.is_file():
            labels, names, general = read_labels(labels_path)
        else:  # an npz re-pack with its labels inside
            labels, names, general = _npz_labels(image_path)
            labels_path = image_path
        present = np.bincount(labels, minlength=len(names))
        names_present = tuple(n for n, k in zip(names, present.tolist(), strict=True) if k)
        _check_split(split, names_present, general, wanted[split], split in own, labels_path)
        order = sorted(range(len(names)), key=lambda k: names[k])
        order = [k for k in order if present[k]]
        split_counts = present[order].astype(np.int32)
        for k, n in zip(order, split_counts.tolist(), strict=True):
            check_count(names[k], n, count, where=labels_path)
        # image i goes to (its class's position in `order`, its rank within the class)
        position = np.full(len(names), -1, np.int64)
        position[order] = np.arange(len(order))
        cls = position[labels]
        by_class = np.argsort(cls, kind="stable")  # file order within a class
        first = np.concatenate([[0], np.cumsum(split_counts)[:-1]])
        rank = np.empty(len(labels), np.int64)
        rank[by_class] = np.arange(len(labels)) - np.repeat(first, split_counts)
        slots = np.stack([cls, rank], axis=1)

        def build(allocate, image_path=image_path, slots=slots, split_counts=split_counts):
            # straight into the memory-mapped cache file: the split is never whole in memory
            out = allocate((len(split_counts), int(split_counts.max()), *IMAGE_SIZE, 3))
            if layout == "png":
                _scatter_png(image_path, len(slots), slots, out)
            else:
                _scatter_npz(image_path, len(slots), slots, out, npz_channels == "bgr")
            return out, split_counts

        files = sorted({image_path, labels_path})
        channels = npz_channels if layout == "npz" else "rgb"
        key = (
            f"tieredimagenet-v{_VERSION}-{layout}-{channels}-{count}-{split}-"
            f"{','.join(names[k] for k in order)}-"
            f"{cached_source_digest('tieredimagenet', data_dir, files, cache_dir=cache_dir)}"
        )
        images[split], counts[split] = cached_split(
            "tieredimagenet", key, split, build, cache_dir=cache_dir, into=True
        )
        classes[split] = tuple(names[k] for k in order)
    return ImageSetData(
        "tieredimagenet",
        images,
        counts,
        classes,
        fingerprint("tieredimagenet", images, counts, classes),
        layout,
    )
