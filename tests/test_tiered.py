"""tiered-ImageNet reader on tiny synthetic copies of the PNG release and the npz re-packs."""

from __future__ import annotations

import io
import pickle
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from metagrad.tasks import tieredimagenet as tim
from metagrad.tasks.imageset import (
    SPLITS,
    ImageSetClassError,
    ImageSetCountError,
    ImageSetFormatError,
    ImageSetImageError,
    ImageSetNotFoundError,
    load_image_dataset,
    shipped_split,
)
from metagrad.tasks.safe_pickle import UnsafePickleError
from metagrad.tasks.tieredimagenet import load_tieredimagenet, read_labels, shipped_categories

PER_CLASS = (5, 3, 4)  # images of the three classes of each split: counts differ
NAMES = {  # words, as the release's label_specific_str; not in name order
    "train": ("house finch", "goldfinch", "robin"),
    "val": ("kit fox", "dingo", "Arctic fox"),
    "test": ("zucchini", "acorn squash", "cauliflower"),
}
GENERAL = {"train": ("birds", "fish"), "val": ("canines", "dogs"), "test": ("foods", "veg")}


def _synthetic(seed=0):
    """``{split: (images (N, 84, 84, 3), label_specific (N,), label_general (N,))}``, the rows
    of the three classes interleaved as in a file."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in SPLITS:
        labels = np.repeat(np.arange(3), PER_CLASS)[rng.permutation(sum(PER_CLASS))]
        images = rng.integers(0, 256, (len(labels), 84, 84, 3), np.uint8)
        out[split] = (images, labels.astype(np.int32), (labels > 0).astype(np.int32))
    return out


DATA = _synthetic()
EXPECTED = {"classes": {s: list(NAMES[s]) for s in SPLITS}}


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's 8-bit strings (BINSTRING), as the release was."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str8(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_str8
    dispatch[str] = _save_str8


def py2_dumps(obj) -> bytes:
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def _png(array, size=None) -> np.ndarray:
    """PNG bytes as ``cv2.imencode`` returns them: uint8 ``(L, 1)``."""
    image = Image.fromarray(array)
    if size is not None:
        image = image.resize(size)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), np.uint8).reshape(-1, 1)


def _labels(split, names=None) -> dict:
    _, specific, general = DATA[split]
    return {
        "label_specific": specific,
        "label_general": general,
        "label_specific_str": list(names or NAMES[split]),
        "label_general_str": list(GENERAL[split]),
    }


def write_png_release(root, data=DATA, names=None, size=None):
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        pngs = [_png(a, size) for a in data[split][0]]
        (root / f"{split}_images_png.pkl").write_bytes(py2_dumps(pngs))
        (root / f"{split}_labels.pkl").write_bytes(
            py2_dumps(_labels(split, names and names[split]))
        )
    return root


def write_npz(root, data=DATA, channels="bgr", labels="release"):
    """``{split}_images.npz`` as the release's decompress writes it (BGR), with the release's
    labels pickle, a re-pack's ``{"labels": ids}`` pickle, or the ids inside the npz."""
    root.mkdir(parents=True, exist_ok=True)
    for i, split in enumerate(SPLITS):
        images = data[split][0][..., ::-1] if channels == "bgr" else data[split][0]
        ids = data[split][1] + 10 * i  # a re-pack's global class ids
        arrays = {"images": images, **({"labels": ids} if labels == "npz" else {})}
        np.savez(root / f"{split}_images.npz", **arrays)
        if labels == "release":
            (root / f"{split}_labels.pkl").write_bytes(pickle.dumps(_labels(split)))
        elif labels == "ids":
            (root / f"{split}_labels.pkl").write_bytes(pickle.dumps({"labels": ids}))
    return root


def expected_split(split, names=NAMES):
    """(classes sorted by name, padded array, counts), built by hand from DATA."""
    images, specific, _ = DATA[split]
    order = sorted(range(3), key=lambda k: names[split][k])
    counts = [PER_CLASS[k] for k in order]
    out = np.zeros((3, max(PER_CLASS), 84, 84, 3), np.uint8)
    for i, k in enumerate(order):
        out[i, : counts[i]] = images[specific == k]
    return tuple(names[split][k] for k in order), out, counts


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiered")
    return {"png": write_png_release(base / "png"), "npz": write_npz(base / "npz")}


def _load(path, tmp_path, **kw):
    return load_tieredimagenet(path, cache_dir=tmp_path / "cache", expected=EXPECTED, **kw)


def test_png_release_and_npz_repack_agree_bit_for_bit(copies, tmp_path):
    loaded = {name: _load(path, tmp_path / name) for name, path in copies.items()}
    for layout, data in loaded.items():
        assert data.name == "tieredimagenet" and data.layout == layout
        for split in SPLITS:
            classes, images, counts = expected_split(split)
            assert data.classes[split] == classes
            assert data.counts[split].dtype == np.int32
            assert data.counts[split].tolist() == counts
            assert data.images[split].dtype == np.uint8
            np.testing.assert_array_equal(data.images[split], images)
    assert loaded["png"].fingerprint == loaded["npz"].fingerprint


def test_both_containers_in_one_folder_prefer_the_release_unless_told(copies, tmp_path):
    root = tmp_path / "both"
    shutil.copytree(copies["png"], root)
    for split in SPLITS:
        shutil.copy(copies["npz"] / f"{split}_images.npz", root)
    assert _load(root, tmp_path).layout == "png"
    forced = _load(root, tmp_path, layout="npz")
    assert forced.layout == "npz" and forced.fingerprint == _load(root, tmp_path).fingerprint


def test_an_rgb_repack_is_read_with_npz_channels_rgb(copies, tmp_path):
    root = write_npz(tmp_path / "rgb", channels="rgb")
    release = _load(copies["png"], tmp_path)
    assert _load(root, tmp_path, npz_channels="rgb").fingerprint == release.fingerprint
    swapped = _load(root, tmp_path)  # read as BGR: the colours come out reversed
    np.testing.assert_array_equal(swapped.images["val"], release.images["val"][..., ::-1])
    with pytest.raises(ValueError, match="npz_channels must be 'bgr' or 'rgb'"):
        _load(root, tmp_path, npz_channels="BGR")


@pytest.mark.parametrize("labels", ["ids", "npz"])
def test_repacks_with_integer_labels(tmp_path, labels):
    root = write_npz(tmp_path / labels, labels=labels)
    ids = {s: [f"label_{k + 10 * i}" for k in range(3)] for i, s in enumerate(SPLITS)}
    data = load_tieredimagenet(root, cache_dir=tmp_path / "c", expected={"classes": ids})
    for split in SPLITS:
        classes, images, counts = expected_split(split, names=ids)
        assert data.classes[split] == classes and data.counts[split].tolist() == counts
        np.testing.assert_array_equal(data.images[split], images)


def test_shipped_lists_are_the_release_split():
    lists = {s: shipped_split("tieredimagenet", s) for s in SPLITS}
    assert [len(lists[s]) for s in SPLITS] == [351, 97, 160]
    assert len(set().union(*lists.values())) == 608
    cats = {s: set(shipped_categories(s).values()) for s in SPLITS}
    assert [len(cats[s]) for s in SPLITS] == [20, 6, 8]
    assert not (cats["train"] & cats["val"]) and not (cats["train"] & cats["test"])
    assert shipped_categories("val")["n02099267"] == "n02098550"
    assert set(shipped_categories("test")) == set(lists["test"])


def test_the_full_size_check_refuses_the_small_copy(copies, tmp_path):
    with pytest.raises(
        ImageSetClassError, match=r"holds 3 classes, the tiered-ImageNet train"
    ) as e:
        load_tieredimagenet(copies["png"], cache_dir=tmp_path)
    assert "\n" not in str(e.value) and "train_labels.pkl" in str(e.value)


def test_wnid_labels_are_checked_against_the_shipped_lists(tmp_path):
    wnids = {s: shipped_split("tieredimagenet", s)[:3] for s in SPLITS}
    root = write_png_release(tmp_path / "w", names=wnids)
    with pytest.raises(ImageSetClassError, match=r"train_labels\.pkl lacks 348 class\(es\)"):
        load_tieredimagenet(root, cache_dir=tmp_path)
    data = load_tieredimagenet(root, cache_dir=tmp_path, expected={"classes": wnids})
    assert data.classes["test"] == tuple(sorted(wnids["test"]))


def test_word_labels_are_checked_by_their_number_of_super_categories(tmp_path):
    names = tuple(f"class {i}" for i in range(97))
    general = np.zeros(10, np.int64)  # one super-category where the val split has 6
    with pytest.raises(ImageSetClassError, match=r"holds 1 super-categories .* val split 6"):
        tim._check_split("val", names, general, shipped_split("tieredimagenet", "val"), False, "v")
    tim._check_split("val", names, np.arange(6), shipped_split("tieredimagenet", "val"), False, "v")


def test_images_per_class_when_given_is_checked(copies, tmp_path):
    with pytest.raises(ImageSetCountError, match=r"labels\.pkl: class goldfinch has 3 images, exp"):
        load_tieredimagenet(
            copies["npz"], cache_dir=tmp_path, expected={**EXPECTED, "images_per_class": 5}
        )


def test_a_cache_hit_decodes_nothing(copies, tmp_path, monkeypatch):
    first = _load(copies["png"], tmp_path)
    monkeypatch.setattr(tim, "_scatter_png", lambda *a: pytest.fail("decoded again"))
    again = _load(copies["png"], tmp_path)
    assert type(again.images["train"]).__name__ == "memmap"
    assert again.fingerprint == first.fingerprint


def test_nothing_there_or_part_of_it(tmp_path):
    with pytest.raises(ImageSetNotFoundError, match=r"images_png\.pkl.*never downloads"):
        load_image_dataset("tieredimagenet", tmp_path, cache_dir=tmp_path)
    (tmp_path / "train_images_png.pkl").write_bytes(b"")
    with pytest.raises(ImageSetNotFoundError, match=r"lacks \['val_images_png\.pkl'"):
        load_tieredimagenet(tmp_path, cache_dir=tmp_path)


# --- corrupt copies: each refused with its typed error, naming the file --------------------------


def _copy(copies, tmp_path, layout):
    root = tmp_path / f"bad-{layout}"
    shutil.copytree(copies[layout], root)
    return root


def test_truncated_pickle(copies, tmp_path):
    root = _copy(copies, tmp_path, "png")
    path = root / "val_images_png.pkl"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ImageSetFormatError, match=r"val_images_png\.pkl .*cut off"):
        _load(root, tmp_path)


def test_html_page_under_the_labels_name(copies, tmp_path):
    root = _copy(copies, tmp_path, "png")
    (root / "test_labels.pkl").write_bytes(b"<!DOCTYPE html><html>Quota exceeded</html>")
    with pytest.raises(ImageSetFormatError, match=r"test_labels\.pkl is not a pickle.*HTML"):
        _load(root, tmp_path)


def test_labels_pickle_without_its_keys(copies, tmp_path):
    root = _copy(copies, tmp_path, "npz")
    (root / "train_labels.pkl").write_bytes(pickle.dumps({"specific": [0, 1]}))
    with pytest.raises(ImageSetFormatError, match=r"train_labels\.pkl lacks the keys label_spec"):
        _load(root, tmp_path)
    (root / "train_labels.pkl").write_bytes(pickle.dumps({"label_specific": np.arange(3)}))
    with pytest.raises(ImageSetFormatError, match=r"has label_specific but not label_specific_s"):
        read_labels(root / "train_labels.pkl")


def test_a_class_missing(copies, tmp_path):
    classes = {**EXPECTED["classes"], "val": [*NAMES["val"], "red wolf"]}
    with pytest.raises(ImageSetClassError, match=r"val_labels\.pkl lacks 1 class.*'red wolf'"):
        load_tieredimagenet(copies["npz"], cache_dir=tmp_path, expected={"classes": classes})


def test_wrong_image_size_in_the_npz(copies, tmp_path):
    root = _copy(copies, tmp_path, "npz")
    np.savez(root / "test_images.npz", images=np.zeros((12, 80, 80, 3), np.uint8))
    with pytest.raises(ImageSetImageError, match=r"test_images\.npz: images should be uint8 \(N"):
        _load(root, tmp_path)


def test_wrong_image_size_in_the_png_release(tmp_path):
    root = write_png_release(tmp_path / "small", size=(80, 80))
    with pytest.raises(ImageSetImageError, match=r"train_images_png\.pkl image 0: an RGB image"):
        _load(root, tmp_path)


def test_truncated_or_html_npz(copies, tmp_path):
    root = _copy(copies, tmp_path, "npz")
    path = root / "val_images.npz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ImageSetFormatError, match=r"val_images\.npz is not a readable npz"):
        _load(root, tmp_path)
    path.write_bytes(b"<html><body>Moved</body></html>")
    with pytest.raises(ImageSetFormatError, match=r"val_images\.npz is not an npz but an HTML"):
        _load(root, tmp_path)


def test_images_and_labels_of_different_lengths(copies, tmp_path):
    root = _copy(copies, tmp_path, "png")
    pngs = [_png(a) for a in DATA["val"][0][:-1]]
    (root / "val_images_png.pkl").write_bytes(py2_dumps(pngs))
    with pytest.raises(ImageSetFormatError, match=r"val_images_png\.pkl holds 11 images but its"):
        _load(root, tmp_path)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned-by-pickle",))


def test_a_pickle_that_imports_os_is_refused_and_not_run(copies, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _copy(copies, tmp_path, "png")
    (root / "train_labels.pkl").write_bytes(pickle.dumps({"label_specific": _RunsCode()}))
    with pytest.raises(UnsafePickleError, match=r"train_labels\.pkl asks for the global .*system"):
        _load(root, tmp_path)
    assert not (tmp_path / "pwned-by-pickle").exists()
