"""The class-folder and CUB-200-2011 readers, on tiny synthetic copies the helpers here write."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from metagrad.tasks.cub import cub_split, find_cub, load_cub
from metagrad.tasks.folder import load_image_folder
from metagrad.tasks.imageset import (
    SPLITS,
    ImageSetClassError,
    ImageSetCountError,
    ImageSetFormatError,
    ImageSetNotFoundError,
    shipped_split,
)
from metagrad.tasks.miniimagenet_io import load_miniimagenet

# 8 classes, 12 images of 10x10 for most, fewer for some: counts differ as in CUB.
COUNTS = [12, 12, 9, 12, 5, 12, 12, 7]
FOLDER_CLASSES = [f"class_{c}" for c in "abcdefgh"]
FOLDER_SPLITS = {
    "train": FOLDER_CLASSES[:4],
    "val": FOLDER_CLASSES[4:6],
    "test": FOLDER_CLASSES[6:],
}


def _pixels(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), np.uint8)


def write_folder(root, classes=FOLDER_CLASSES, counts=COUNTS, size=(10, 10), fmt="PNG"):
    """``root/<class>/<class>_<j>.<png|jpg>`` with random pixels; returns ``{class: arrays}``."""
    suffix = {"PNG": "png", "JPEG": "jpg"}[fmt]
    pixels = {}
    for i, (cls, n) in enumerate(zip(classes, counts, strict=True)):
        (root / cls).mkdir(parents=True)
        pixels[cls] = _pixels(n, size, seed=i)
        for j, array in enumerate(pixels[cls]):
            Image.fromarray(array).save(root / cls / f"{cls}_{j:04d}.{suffix}", format=fmt)
    return pixels


def _pillow(path, size):
    """What a direct Pillow decode gives: RGB, LANCZOS to ``size`` = (height, width)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != size[::-1]:
            im = im.resize(size[::-1], Image.Resampling.LANCZOS)
        return np.asarray(im)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    return root, write_folder(root)


def _load_folder(root, tmp_path, **kw):
    kw.setdefault("expected", {"classes": FOLDER_SPLITS})
    return load_image_folder(root, cache_dir=tmp_path / "cache", **kw)


def test_folder_reads_the_pixels_with_per_class_counts_and_zero_padding(folder, tmp_path):
    root, pixels = folder
    data = _load_folder(root, tmp_path, image_size=10)  # 10x10 already: nothing is resized
    assert data.name == "folder" and data.layout == "folders" and len(data.fingerprint) == 64
    for split, names in FOLDER_SPLITS.items():
        assert data.classes[split] == tuple(names)
        want_counts = [COUNTS[FOLDER_CLASSES.index(c)] for c in names]
        assert data.counts[split].dtype == np.int32
        assert data.counts[split].tolist() == want_counts
        array = data.images[split]
        assert array.dtype == np.uint8 and array.shape == (len(names), max(want_counts), 10, 10, 3)
        for i, cls in enumerate(names):
            np.testing.assert_array_equal(array[i, : want_counts[i]], pixels[cls])
            assert not array[i, want_counts[i] :].any()  # padding
    again = _load_folder(root, tmp_path, image_size=(10, 10))  # from the cache
    assert isinstance(again.images["train"], np.memmap)
    assert again.fingerprint == data.fingerprint


def test_folder_split_files_and_resizing(folder, tmp_path):
    root, _ = folder
    for split, names in FOLDER_SPLITS.items():
        (tmp_path / f"{split}.txt").write_text("# my split\n" + "\n".join(reversed(names)) + "\n")
    only = {"classes": {"train": tmp_path / "train.txt", "test": str(tmp_path / "test.txt")}}
    data = _load_folder(root, tmp_path, expected=only, image_size=(6, 8))
    assert set(data.images) == {"train", "test"}  # only the splits given are read
    assert data.classes["train"] == tuple(FOLDER_SPLITS["train"])
    cls = FOLDER_SPLITS["test"][1]
    np.testing.assert_array_equal(
        data.images["test"][1, 3], _pillow(root / cls / f"{cls}_0003.png", (6, 8))
    )
    assert data.images["test"].shape == (2, 12, 6, 8, 3)


def test_folder_jpeg_matches_a_direct_pillow_decode(tmp_path):
    root = tmp_path / "jpeg"
    write_folder(root, FOLDER_CLASSES[:2], [3, 2], size=(12, 9), fmt="JPEG")
    data = load_image_folder(
        root,
        cache_dir=tmp_path / "cache",
        expected={"classes": {"train": FOLDER_CLASSES[:2]}},
        image_size=(10, 10),
    )
    for i, cls in enumerate(FOLDER_CLASSES[:2]):
        for j in range(data.counts["train"][i]):
            want = _pillow(root / cls / f"{cls}_{j:04d}.jpg", (10, 10))
            np.testing.assert_array_equal(data.images["train"][i, j], want)


def test_folder_needs_the_split_lists_and_checks_counts(folder, tmp_path):
    root, _ = folder
    with pytest.raises(ValueError, match="load_image_folder needs the split lists"):
        load_image_folder(root, cache_dir=tmp_path)
    with pytest.raises(
        ImageSetCountError, match=r"class_c: class class_c has 9 images, expected 12"
    ):
        _load_folder(root, tmp_path, expected={"classes": FOLDER_SPLITS, "images_per_class": 12})
    with pytest.raises(ImageSetNotFoundError, match="does not exist"):
        _load_folder(tmp_path / "nowhere", tmp_path)
    with pytest.raises(ValueError, match="image_size must be"):
        _load_folder(root, tmp_path, image_size=(0, 84))


def _corrupt(folder, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(folder[0], root)
    return root


def test_folder_truncated_image(folder, tmp_path):
    root = _corrupt(folder, tmp_path)
    victim = root / "class_b" / "class_b_0004.png"
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(ImageSetFormatError, match=rf"cannot decode the image {victim}"):
        _load_folder(root, tmp_path)


def test_folder_html_page_saved_as_jpg(folder, tmp_path):
    root = _corrupt(folder, tmp_path)
    victim = root / "class_g" / "class_g_0000.jpg"
    victim.write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>")
    with pytest.raises(ImageSetFormatError, match=rf"{victim} \(cannot identify image file"):
        _load_folder(root, tmp_path)


def test_folder_class_missing(folder, tmp_path):
    root = _corrupt(folder, tmp_path)
    shutil.rmtree(root / "class_e")
    with pytest.raises(ImageSetClassError, match=r"copy lacks 1 class folder\(s\) of the val .*e'"):
        _load_folder(root, tmp_path)


def test_folder_odd_files(folder, tmp_path):
    root = _corrupt(folder, tmp_path)
    (root / "class_a" / ".DS_Store").write_bytes(b"\0")  # hidden: skipped
    (root / "unlisted").mkdir()  # a folder no list names: ignored
    assert _load_folder(root, tmp_path).counts["train"][0] == 12
    (root / "class_a" / "notes.txt").write_text("taken on a Tuesday")
    with pytest.raises(ImageSetFormatError, match=r"class_a/notes\.txt is not an image file"):
        _load_folder(root, tmp_path)
    (root / "class_a" / "notes.txt").unlink()
    for image in (root / "class_h").iterdir():
        image.unlink()
    with pytest.raises(ImageSetCountError, match="class_h: class class_h has no images"):
        _load_folder(root, tmp_path)


def test_folder_reader_and_miniimagenet_class_folders_give_the_same_arrays(tmp_path):
    wnids = {s: [f"n{i:08d}" for i in range(3 * k, 3 * k + 2)] for k, s in enumerate(SPLITS)}
    mini = tmp_path / "mini"
    for split in SPLITS:
        write_folder(mini / split, wnids[split], [3, 3], size=(84, 84))
    by_mini = load_miniimagenet(
        mini, cache_dir=tmp_path / "cache", expected={"classes": wnids, "images_per_class": 3}
    )
    for split in SPLITS:
        by_folder = load_image_folder(
            mini / split, cache_dir=tmp_path / "cache", expected={"classes": {split: wnids[split]}}
        )
        assert by_folder.classes[split] == by_mini.classes[split]
        np.testing.assert_array_equal(by_folder.counts[split], by_mini.counts[split])
        np.testing.assert_array_equal(by_folder.images[split], by_mini.images[split])
    # The same pixels under another data set's name: the fingerprint says which benchmark.
    assert by_folder.fingerprint != by_mini.fingerprint


# --- CUB ---------------------------------------------------------------------------------------

ALL_CUB = sorted(c for s in SPLITS for c in shipped_split("cub", s))
TINY_CUB = ALL_CUB[:8]  # by Chen et al.'s rule: train 0, 2, 4, 6; val 1, 5; test 3, 7
TINY_COUNTS = [3, 4, 2, 3, 5, 3, 4, 2]


def write_cub(root, classes=TINY_CUB, counts=TINY_COUNTS, size=(12, 10), lists=True):
    """The release folder ``root/CUB_200_2011`` with ``images/<NNN.Name>/<Name>_<j>.jpg`` and,
    if ``lists``, ``images.txt`` and ``classes.txt`` as the release writes them."""
    release = root / "CUB_200_2011"
    lines, image_id = [], 0
    for i, (cls, n) in enumerate(zip(classes, counts, strict=True)):
        (release / "images" / cls).mkdir(parents=True)
        for j, array in enumerate(_pixels(n, size, seed=100 + i)):
            name = f"{cls.split('.', 1)[1]}_{j:04d}_{1000 + j}.jpg"
            Image.fromarray(array).save(release / "images" / cls / name, format="JPEG")
            image_id += 1
            lines.append(f"{image_id} {cls}/{name}")
    if lists:
        (release / "images.txt").write_text("\n".join(lines) + "\n")
        (release / "classes.txt").write_text(
            "".join(f"{int(c[:3])} {c}\n" for c in classes)  # ids as in the release
        )
    return release


TINY_EXPECTED = {"classes": cub_split(TINY_CUB)}


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return write_cub(tmp_path_factory.mktemp("cub"))


def test_shipped_cub_lists_are_chen_et_al_split_of_the_200_release_folders():
    lists = {s: shipped_split("cub", s) for s in SPLITS}
    assert [len(lists[s]) for s in SPLITS] == [100, 50, 50]
    assert len(ALL_CUB) == 200 and len(set(ALL_CUB)) == 200
    assert [int(c[:3]) for c in ALL_CUB] == list(range(1, 201))
    assert ALL_CUB[0] == "001.Black_footed_Albatross" and ALL_CUB[-1] == "200.Common_Yellowthroat"
    for split, (modulus, rest) in {"train": (2, 0), "val": (4, 1), "test": (4, 3)}.items():
        assert lists[split] == tuple(c for i, c in enumerate(ALL_CUB) if i % modulus == rest)
    assert lists["val"][:2] == ("002.Laysan_Albatross", "006.Least_Auklet")
    assert lists["test"][:2] == ("004.Groove_billed_Ani", "008.Rhinoceros_Auklet")
    assert cub_split(ALL_CUB) == lists


def test_cub_tiny_copy_with_expected(cub, tmp_path):
    data = load_cub(cub.parent, cache_dir=tmp_path / "cache", expected=TINY_EXPECTED, image_size=8)
    assert data.name == "cub" and data.layout == "release"
    assert data.classes == {s: tuple(TINY_EXPECTED["classes"][s]) for s in SPLITS}
    assert data.classes["val"] == (TINY_CUB[1], TINY_CUB[5])
    assert data.counts["train"].tolist() == [3, 2, 5, 4]
    assert data.images["train"].shape == (4, 5, 8, 8, 3)
    cls = data.classes["train"][2]
    files = sorted((cub / "images" / cls).iterdir())
    for j, path in enumerate(files):
        np.testing.assert_array_equal(data.images["train"][2, j], _pillow(path, (8, 8)))
    assert not data.images["train"][1, 2:].any()  # padding of the class with 2 images
    # The release folder itself and its images/ folder are accepted too: same arrays.
    for where in (cub, cub / "images"):
        same = load_cub(where, cache_dir=tmp_path / "cache", expected=TINY_EXPECTED, image_size=8)
        assert same.fingerprint == data.fingerprint and same.layout == "release"
    # The folder reader on the same images with the same lists: the same arrays.
    by_folder = load_image_folder(
        cub / "images", cache_dir=tmp_path / "cache", expected=TINY_EXPECTED, image_size=8
    )
    for split in SPLITS:
        np.testing.assert_array_equal(by_folder.images[split], data.images[split])
        np.testing.assert_array_equal(by_folder.counts[split], data.counts[split])


def test_cub_refuses_a_smaller_copy_without_expected(cub, tmp_path):
    with pytest.raises(ImageSetClassError, match=r"classes\.txt does not name 192 class"):
        load_cub(cub, cache_dir=tmp_path)
    (tmp_path / "c").mkdir()
    shutil.copytree(cub / "images", tmp_path / "c" / "images")
    with pytest.raises(ImageSetClassError, match=r"images lacks 96 class folder\(s\) of the train"):
        load_cub(tmp_path / "c", cache_dir=tmp_path)


def test_cub_full_release_with_the_shipped_lists(tmp_path):
    release = write_cub(tmp_path, ALL_CUB, [1] * 200, size=(4, 4))
    data = load_cub(tmp_path, cache_dir=tmp_path / "cache", image_size=4)
    assert {s: data.classes[s] for s in SPLITS} == {s: shipped_split("cub", s) for s in SPLITS}
    assert [data.images[s].shape for s in SPLITS] == [(100, 1, 4, 4, 3), (50, 1, 4, 4, 3)] + [
        (50, 1, 4, 4, 3)
    ]
    (release / "images" / "201.Dodo").mkdir()
    with pytest.raises(ImageSetClassError, match=r"holds 1 folder\(s\) that the CUB split lists"):
        load_cub(tmp_path, cache_dir=tmp_path / "cache", image_size=4)
    (release / "images" / "201.Dodo").rmdir()
    (release / "images.txt").unlink()
    with pytest.warns(UserWarning, match="no images.txt beside .*counts of the CUB release"):
        assert load_cub(tmp_path, cache_dir=tmp_path / "cache", image_size=4).layout == "images"


def _cub_copy(cub, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(cub, root / "CUB_200_2011")
    return root / "CUB_200_2011"


def _load_cub(root, tmp_path):
    return load_cub(root, cache_dir=tmp_path / "cache", expected=TINY_EXPECTED, image_size=8)


def test_cub_image_missing_from_what_images_txt_lists(cub, tmp_path):
    release = _cub_copy(cub, tmp_path)
    cls = TINY_CUB[4]
    victim = sorted((release / "images" / cls).iterdir())[1]
    victim.unlink()
    with pytest.raises(
        ImageSetCountError,
        match=rf"{cls}: class {cls} has 4 images, .*images\.txt lists 5; "
        rf"missing \['{victim.name}'\]",
    ):
        _load_cub(release, tmp_path)


def test_cub_class_missing(cub, tmp_path):
    release = _cub_copy(cub, tmp_path)
    shutil.rmtree(release / "images" / TINY_CUB[3])
    with pytest.raises(ImageSetClassError, match=rf"lacks 1 class folder.* test .*{TINY_CUB[3]}"):
        _load_cub(release, tmp_path)
    (release / "images" / TINY_CUB[3]).mkdir()
    (release / "classes.txt").write_text("1 001.Black_footed_Albatross\n")
    with pytest.raises(ImageSetClassError, match=r"classes\.txt does not name 7 class"):
        _load_cub(release, tmp_path)


def test_cub_truncated_and_html_images(cub, tmp_path):
    release = _cub_copy(cub, tmp_path)
    victim = sorted((release / "images" / TINY_CUB[0]).iterdir())[0]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageSetFormatError, match=rf"cannot decode the image {victim} \("):
        _load_cub(release, tmp_path)
    victim.write_bytes(b"<html><head><title>404 Not Found</title></head></html>")
    with pytest.raises(ImageSetFormatError, match=rf"{victim} \(cannot identify image file"):
        _load_cub(release, tmp_path)


def test_cub_malformed_lists_and_missing_folder(cub, tmp_path):
    release = _cub_copy(cub, tmp_path)
    (release / "images.txt").write_text("<!DOCTYPE html>\n")
    with pytest.raises(ImageSetFormatError, match=r"images\.txt, line 1: expected '<id> <name>'"):
        _load_cub(release, tmp_path)
    with pytest.raises(ImageSetNotFoundError, match="CUB-200-2011 not found .*never downloads"):
        load_cub(tmp_path / "nothing", cache_dir=tmp_path)
    images, lists = find_cub(release / "images")
    assert images == release / "images" and lists == release


def test_cub_images_folder_without_lists(cub, tmp_path):
    root = tmp_path / "bare"
    shutil.copytree(cub / "images", root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the user's lists, no warning about images.txt
        data = load_cub(root, cache_dir=tmp_path / "cache", expected=TINY_EXPECTED, image_size=8)
    assert data.layout == "images"
    assert data.fingerprint == _load_cub(cub, tmp_path).fingerprint
