"""The shared base of the image readers: fingerprint, split lists, decoding, cache, registry."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from metagrad.tasks import imageset
from metagrad.tasks.imageset import (
    SPLITS,
    ImageSetClassError,
    ImageSetCountError,
    ImageSetError,
    ImageSetFormatError,
    ImageSetImageError,
    ImageSetNotFoundError,
    cache_paths,
    cached_split,
    check_classes,
    check_count,
    decode_image,
    fingerprint,
    load_image_dataset,
    read_split_file,
    resolve_expected,
    shipped_split,
    source_digest,
)


def _split(seed=0, classes=3, max_count=4):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (classes, max_count, 5, 6, 3), np.uint8)
    counts = np.array([max_count] * (classes - 1) + [max_count - 1], np.int32)
    images[-1, -1] = 0  # the padding row
    return images, counts


def _data(seed=0):
    images, counts, classes = {}, {}, {}
    for i, split in enumerate(SPLITS):
        images[split], counts[split] = _split(seed + i)
        classes[split] = tuple(f"{split}{c}" for c in range(3))
    return images, counts, classes


def test_fingerprint_is_stable_and_sees_every_change(tmp_path):
    images, counts, classes = _data()
    base = fingerprint("cub", images, counts, classes)
    assert len(base) == 64 and int(base, 16) >= 0
    np.save(tmp_path / "train.npy", images["train"])
    mapped = dict(images, train=np.load(tmp_path / "train.npy", mmap_mode="r"))
    assert fingerprint("cub", mapped, counts, classes) == base  # memory-mapped or not
    assert fingerprint("cub", {s: images[s].copy() for s in SPLITS}, counts, classes) == base

    flipped = {s: images[s].copy() for s in SPLITS}
    flipped["test"][1, 2, 3, 4, 0] ^= 1
    renamed = dict(classes, val=("val0", "val1", "other"))
    recounted = dict(counts, train=np.array([4, 3, 3], np.int32))
    reshaped = dict(images, val=images["val"].reshape(3, 4, 6, 5, 3))
    changed = [
        fingerprint("cub", flipped, counts, classes),
        fingerprint("cub", images, counts, renamed),
        fingerprint("cub", images, recounted, classes),
        fingerprint("cub", reshaped, counts, classes),
        fingerprint("folder", images, counts, classes),  # the data set's name is part of it
        fingerprint("cub", {s: images[s] for s in ("train", "test")}, counts, classes),
    ]
    assert len(set(changed) | {base}) == len(changed) + 1


def test_shipped_and_user_split_lists(tmp_path):
    assert [len(shipped_split("miniimagenet", s)) for s in SPLITS] == [64, 16, 20]
    assert [len(shipped_split("cub", s)) for s in SPLITS] == [100, 50, 50]
    with pytest.raises(ImageSetNotFoundError, match=r"splits/nothing/train\.txt"):
        shipped_split("nothing", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        shipped_split("cub", "base")

    path = tmp_path / "mine.txt"
    path.write_text("# my classes\nzebra\n\nant  # small\n")
    assert read_split_file(path) == read_split_file(str(path)) == ("ant", "zebra")
    assert read_split_file("b\na\n") == ("a", "b")
    path.write_text("a\nb\na\n")
    with pytest.raises(ImageSetClassError, match=r"mine\.txt lists a class twice: \['a'\]"):
        read_split_file(path)


def test_resolve_expected():
    classes, count = resolve_expected("miniimagenet", None)
    assert count == 600 and classes["val"] == shipped_split("miniimagenet", "val")
    classes, count = resolve_expected("cub", None)
    assert count is None and len(classes["train"]) == 100
    classes, count = resolve_expected("miniimagenet", {"classes": {"val": ["b", "a"]}})
    assert classes["val"] == ("a", "b") and len(classes["train"]) == 64 and count == 600
    assert resolve_expected("miniimagenet", {"images_per_class": None})[1] is None
    assert resolve_expected("cub", None, standard_count=7)[1] == 7

    with pytest.raises(ValueError, match="no split list for 'folder'"):
        resolve_expected("folder", None)
    with pytest.raises(ValueError, match=r"takes 'classes' and 'images_per_class', not \['count'"):
        resolve_expected("folder", {"count": 3})
    with pytest.raises(ValueError, match="keys must be among"):
        resolve_expected("folder", {"classes": {"base": ["a"]}})
    with pytest.raises(ValueError, match="images_per_class must be an int >= 1"):
        resolve_expected("folder", {"classes": {"train": ["a"]}, "images_per_class": 0})
    with pytest.raises(ImageSetClassError, match="'a' is in both the train and test lists"):
        resolve_expected("folder", {"classes": {"train": ["a", "b"], "test": ["a"]}})
    with pytest.raises(ImageSetNotFoundError, match="split file /no/such.txt does not exist"):
        resolve_expected("folder", {"classes": {"train": "/no/such.txt"}})


def test_class_and_count_checks():
    check_classes(["b", "a"], ("a", "b"), where="r", split="val")
    with pytest.raises(ImageSetClassError, match=r"r lacks 1 class\(es\) of the val .*\['c'\]"):
        check_classes(["a"], ("a", "c"), where="r", split="val")
    with pytest.raises(ImageSetClassError, match=r"r holds 1 class\(es\) not in the val .*'z'"):
        check_classes(["a", "z"], ("a",), where="r", split="val")
    check_count("a", 3, None, where="r/a")
    with pytest.raises(ImageSetCountError, match="r/a: class a has no images"):
        check_count("a", 0, None, where="r/a")
    with pytest.raises(ImageSetCountError, match="r/a: class a has 3 images, expected 4"):
        check_count("a", 3, 4, where="r/a")


def _encoded(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_image_resizes_with_lanczos_only_where_allowed(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 10, 3), np.uint8)
    png = tmp_path / "a.png"
    png.write_bytes(_encoded(rgb, "PNG"))
    np.testing.assert_array_equal(decode_image(png, size=(12, 10), resize=False), rgb)
    np.testing.assert_array_equal(decode_image(png.read_bytes(), size=(12, 10), resize=True), rgb)
    with Image.open(png) as im:
        want = np.asarray(im.resize((7, 8), Image.Resampling.LANCZOS))
    got = decode_image(png, size=(8, 7), resize=True)
    assert got.dtype == np.uint8 and got.shape == (8, 7, 3)
    np.testing.assert_array_equal(got, want)
    gray = _encoded(rgb[..., 0], "PNG")
    np.testing.assert_array_equal(
        decode_image(gray, size=(12, 10), resize=True), np.repeat(rgb[..., :1], 3, axis=-1)
    )

    with pytest.raises(ImageSetImageError, match=r"a\.png: an RGB image of 10x12 .*RGB 7x8"):
        decode_image(png, size=(8, 7), resize=False)
    with pytest.raises(ImageSetImageError, match=r"g\.png: an L image .*read as is"):
        decode_image(gray, size=(12, 10), where="g.png", resize=False)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_image_refuses_truncated_and_html_files_naming_them(tmp_path, fmt):
    data = _encoded(np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8), fmt)
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageSetFormatError, match=rf"cannot decode the image {cut}"):
        decode_image(cut, size=(32, 32), resize=True)
    html = tmp_path / "page.jpg"
    html.write_bytes(b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>")
    with pytest.raises(ImageSetFormatError, match=r"page\.jpg \(cannot identify image file"):
        decode_image(html, size=(32, 32), resize=True)
    with pytest.raises(ImageSetNotFoundError, match=r"gone\.png does not exist"):
        decode_image(tmp_path / "gone.png", size=(32, 32), resize=True)


def test_every_error_is_an_imageset_error_and_a_value_error():
    for error in (
        ImageSetNotFoundError,
        ImageSetFormatError,
        ImageSetClassError,
        ImageSetCountError,
        ImageSetImageError,
    ):
        assert issubclass(error, ImageSetError) and issubclass(error, ValueError)
    assert issubclass(ImageSetNotFoundError, FileNotFoundError)


def test_source_digest_sees_bytes_and_names(tmp_path):
    (tmp_path / "a").mkdir()
    one, two = tmp_path / "a" / "1.png", tmp_path / "a" / "2.png"
    one.write_bytes(b"xy")
    two.write_bytes(b"z")
    base = source_digest(tmp_path, [one, two])
    assert source_digest(tmp_path, [one, two]) == base
    assert source_digest(tmp_path, [two, one]) != base
    two.write_bytes(b"w")
    assert source_digest(tmp_path, [one, two]) != base
    two.rename(tmp_path / "a" / "3.png")
    assert source_digest(tmp_path, [one, tmp_path / "a" / "3.png"]) != base


def _builder(calls):
    images, counts = _split(3)

    def build():
        calls.append(1)
        return images.copy(), counts.copy()

    return build, images, counts


def test_cache_hit_then_rebuilt_after_a_bit_flip(tmp_path):
    calls = []
    build, images, counts = _builder(calls)
    got, got_counts = cached_split("demo", "key-1", "val", build, cache_dir=tmp_path)
    assert isinstance(got, np.memmap) and got_counts.dtype == np.int32
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_counts, counts)
    image_file, counts_file = cache_paths("demo", "key-1", "val", cache_dir=tmp_path)
    assert image_file.exists() and counts_file.exists()
    assert image_file.with_name(image_file.name + ".sha256").exists()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _ = cached_split("demo", "key-1", "val", build, cache_dir=tmp_path)
    assert calls == [1]  # a hit: nothing rebuilt
    np.testing.assert_array_equal(again, images)
    other, _ = cached_split("demo", "key-2", "val", build, cache_dir=tmp_path)
    assert calls == [1, 1]  # another key, another file

    for damaged in (image_file, counts_file):
        raw = bytearray(damaged.read_bytes())
        raw[-3] ^= 0x01
        damaged.write_bytes(bytes(raw))
        with pytest.warns(UserWarning, match=r"cache .*_val\.npy is damaged; rebuilding"):
            rebuilt, rebuilt_counts = cached_split(
                "demo", "key-1", "val", build, cache_dir=tmp_path
            )
        np.testing.assert_array_equal(rebuilt, images)
        np.testing.assert_array_equal(rebuilt_counts, counts)
    assert len(calls) == 4
    counts_file.unlink()  # half a cache (a crash between the two writes) is damaged too
    with pytest.warns(UserWarning, match="is damaged"):
        cached_split("demo", "key-1", "val", build, cache_dir=tmp_path)


def test_unwritable_cache_dir_warns_and_returns_the_arrays(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    calls = []
    build, images, counts = _builder(calls)
    with pytest.warns(UserWarning, match=r"could not write the demo cache .*rebuilt next time"):
        got, got_counts = cached_split("demo", "k", "train", build, cache_dir=blocker)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_counts, counts)
    assert blocker.read_text().startswith("a file")


def test_registry_dispatches_lazily(tmp_path, monkeypatch):
    assert set(imageset.DATASETS) == {
        "miniimagenet",
        "tieredimagenet",
        "cifarfs",
        "fc100",
        "cub",
        "folder",
    }
    with pytest.raises(ValueError, match="unknown image data set 'omniglot'"):
        load_image_dataset("omniglot", tmp_path)
    (tmp_path / "a").mkdir()
    Image.new("RGB", (3, 3), (9, 8, 7)).save(tmp_path / "a" / "0.png")
    data = load_image_dataset(
        "folder",
        tmp_path,
        cache_dir=tmp_path / ".cache",
        expected={"classes": {"train": ["a"]}},
        image_size=3,
    )
    assert data.name == "folder" and data.images["train"][0, 0, 0, 0].tolist() == [9, 8, 7]


def test_importing_the_readers_does_not_load_pillow():
    code = (
        "import sys, metagrad.tasks.imageset, metagrad.tasks.folder, metagrad.tasks.cub, "
        "metagrad.tasks.miniimagenet; print('PIL' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
