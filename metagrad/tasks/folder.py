"""Any folder of classes, ``root/<class>/<image>``, as a few-shot data set with the user's splits.

A lab's own data set works with one config key: the images of class ``c`` are the image files
in ``root/c/`` (sorted by name), the split lists say which classes are train, val and test
(nothing is guessed), and each split is decoded once, resized with LANCZOS, and cached by
:func:`metagrad.tasks.imageset.cached_split`. Classes may hold different numbers of images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from metagrad.tasks.imageset import (
    ImageSetClassError,
    ImageSetData,
    ImageSetFormatError,
    ImageSetNotFoundError,
    cached_source_digest,
    cached_split,
    decode_classes,
    fingerprint,
    resolve_expected,
)

__all__ = ["class_members", "image_size_option", "load_image_folder", "read_split_folders"]

# The files a class folder may hold (hidden files such as .DS_Store are skipped); anything else is
# refused rather than silently left out, so a class never loses images unnoticed.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
_FORMAT_VERSION = 1  # bump when the preprocessing changes: it is part of the cache key


def image_size_option(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from an int (square) or a pair of ints >= 1.

    Example:
        >>> image_size_option(84), image_size_option([84, 100])
        ((84, 84), (84, 100))
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(
        isinstance(s, int | np.integer) and not isinstance(s, bool) and s >= 1 for s in size
    ):
        raise ValueError(f"image_size must be an int or (height, width) of ints >= 1: {image_size}")
    return int(size[0]), int(size[1])


def class_members(root: Path, classes: Sequence[str], *, split: str) -> dict[str, list[Path]]:
    """``{class: sorted image files of root/class}`` for the listed classes.

    Raises:
        ImageSetClassError: a listed class has no folder (names ``root`` and the classes).
        ImageSetFormatError: a class folder holds a file that is not an image by its suffix, or
            a folder.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "cat").mkdir()
        >>> _ = (root / "cat" / "b.png").write_bytes(b""), (root / "cat" / "a.JPG").write_bytes(b"")
        >>> [p.name for p in class_members(root, ["cat"], split="train")["cat"]]
        ['a.JPG', 'b.png']
    """
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        raise ImageSetClassError(
            f"{root} lacks {len(missing)} class folder(s) of the {split} split list, e.g. "
            f"{missing[:5]} (the list has {len(classes)})"
        )
    members = {}
    for cls in classes:
        files = []
        for path in sorted((root / cls).iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ImageSetFormatError(
                    f"{path} is not an image file (a class folder holds only "
                    f"{', '.join(IMAGE_SUFFIXES)} files); move it out of {root / cls}"
                )
            files.append(path)
        members[cls] = files
    return members


def read_split_folders(
    name: str,
    root: Path,
    classes: Mapping[str, Sequence[str]],
    *,
    count: int | None,
    size: tuple[int, int],
    cache_dir: str | os.PathLike | None,
    key: str,
    members: Mapping[str, Mapping[str, Sequence[Path]]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each split's ``(images, counts)`` from class folders under ``root``, cached per split.

    Args:
        name: the data set (the cache subfolder).
        root: the folder holding the class folders.
        classes: split -> its classes, in array order.
        count: the image count every class must have, or None for any count >= 1.
        size: ``(height, width)`` every image is resized to (LANCZOS).
        cache_dir: see :func:`metagrad.tasks.imageset.cached_split`.
        key: the reader's part of the cache key (name and version); the source files, the
            classes, ``count`` and ``size`` are added here.
        members: split -> class -> files, when the caller listed them already (default
            :func:`class_members`).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for cls, n in [("a", 2), ("b", 1)]:
        ...     (root / cls).mkdir()
        ...     for j in range(n):
        ...         Image.new("RGB", (6, 4)).save(root / cls / f"{j}.png")
        >>> images, counts = read_split_folders("demo", root, {"train": ("a", "b")}, count=None,
        ...     size=(3, 3), cache_dir=root / "cache", key="demo-v1")
        >>> images["train"].shape, counts["train"].tolist()
        ((2, 2, 3, 3, 3), [2, 1])
    """
    images, counts = {}, {}
    for split, names in classes.items():
        files = members[split] if members is not None else class_members(root, names, split=split)
        digest = cached_source_digest(
            name, root, [p for c in names for p in files[c]], cache_dir=cache_dir
        )
        split_key = f"{key}-{size}-{count}-{','.join(names)}-{digest}"
        images[split], counts[split] = cached_split(
            name,
            split_key,
            split,
            lambda allocate, names=names, files=files: decode_classes(
                files,
                names,
                size=size,
                resize=True,
                count=count,
                where=lambda cls: root / cls,
                allocate=allocate,
            ),
            cache_dir=cache_dir,
            into=True,
        )
    return images, counts


def load_image_folder(
    data_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    expected: Mapping | None = None,
    image_size: int | Sequence[int] = (84, 84),
) -> ImageSetData:
    """The classes of ``data_dir/<class>/<image>`` split as the user says, as uint8 RGB arrays.

    ``expected["classes"]`` is required: ``{split: class names, or a path to a split file}``
    (one folder name per line, ``#`` comments), for any of ``"train"``, ``"val"``, ``"test"``;
    only the splits given are read and a class may be in one split only. Folders in
    ``data_dir`` that no list names are ignored. Every image is converted to RGB and resized to
    ``image_size`` with Pillow's LANCZOS filter; images of a class are in file-name order.
    ``expected["images_per_class"]`` (default None, any count >= 1) makes every class need
    exactly that many images. Classes may hold different numbers of images: the split's array
    is ``(classes, max_count, H, W, 3)``, zero-padded past each class's count, so it takes
    ``classes x max_count x H x W x 3`` bytes of memory (memory-mapped from the cache) however
    few images the small classes have.

    Args:
        data_dir: the root folder.
        cache_dir: the cache root (default ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``); split
            arrays are kept under ``<cache_dir>/folder/``, keyed by the image files' paths and
            bytes, the lists, the count and the size.
        expected: ``{"classes": {...}, "images_per_class": int or None}`` (see above).
        image_size: ``(height, width)`` or an int for a square; default 84x84.

    Returns:
        An :class:`~metagrad.tasks.imageset.ImageSetData` named ``"folder"``, layout
        ``"folders"``.

    Raises:
        ValueError: no split lists given, or a bad option.
        ImageSetNotFoundError: ``data_dir`` or a split file does not exist.
        ImageSetClassError: a listed class has no folder, or is listed twice or in two splits.
        ImageSetFormatError: a file that is not an image, or an image that does not decode
            (truncated, an HTML page saved as ``.jpg``); the message names the file.
        ImageSetCountError: a class without images, or not ``images_per_class`` of them.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for cls in ["cat", "dog", "owl"]:
        ...     (root / cls).mkdir()
        ...     for j in range(2):
        ...         Image.new("RGB", (20, 16), (j, 0, 0)).save(root / cls / f"{j}.jpg")
        >>> data = load_image_folder(root, cache_dir=root / ".cache", image_size=8,
        ...     expected={"classes": {"train": ["cat", "dog"], "test": ["owl"]}})
        >>> data.images["train"].shape, data.classes["test"], data.counts["test"].tolist()
        ((2, 2, 8, 8, 3), ('owl',), [2])
    """
    root = Path(data_dir).expanduser()
    size = image_size_option(image_size)
    if not (expected or {}).get("classes"):
        raise ValueError(
            "load_image_folder needs the split lists: expected={'classes': {'train': [...] or "
            "'train.txt', 'val': ..., 'test': ...}} (nothing is guessed from the folders)"
        )
    classes, count = resolve_expected("folder", expected, standard_count=None)
    if not root.is_dir():
        raise ImageSetNotFoundError(
            f"the image folder {root} does not exist (nothing is downloaded)"
        )
    images, counts = read_split_folders(
        "folder",
        root,
        classes,
        count=count,
        size=size,
        cache_dir=cache_dir,
        key=f"folder-v{_FORMAT_VERSION}",
    )
    return ImageSetData(
        "folder", images, counts, classes, fingerprint("folder", images, counts, classes), "folders"
    )
