"""mini-ImageNet reader, restricted unpickler, cache and task sampler, on tiny synthetic copies."""

from __future__ import annotations

import csv
import io
import os
import pickle
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from metagrad.tasks import miniimagenet_io as mio
from metagrad.tasks.miniimagenet import (
    SPLITS,
    MiniImageNetClassError,
    MiniImageNetCountError,
    MiniImageNetError,
    MiniImageNetFormatError,
    MiniImageNetImageError,
    MiniImageNetNotFoundError,
    load_miniimagenet,
    make_sampler,
    sample_task,
    standard_split,
)
from metagrad.tasks.safe_pickle import (
    NotAPickleError,
    TruncatedPickleError,
    UnsafePickleError,
    load_pickle,
)

CLASSES = {"train": 3, "val": 2, "test": 2}
PER_CLASS = 6


def _synthetic():
    """``{split: {wnid: (6, 84, 84, 3) uint8}}``, distinct random content per image."""
    rng = np.random.default_rng(0)
    out, n = {}, 0
    for split, count in CLASSES.items():
        out[split] = {}
        for _ in range(count):
            n += 1
            out[split][f"n{n:08d}"] = rng.integers(0, 256, (PER_CLASS, 84, 84, 3), np.uint8)
    return out


DATA = _synthetic()
EXPECTED = dict(classes={s: list(DATA[s]) for s in SPLITS}, images_per_class=PER_CLASS)


def _png(array, path, size=None):
    image = Image.fromarray(array)
    if size is not None:
        image = image.resize(size)
    image.save(path, format="PNG")


def write_pickles(root, data=DATA):
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        images, class_dict = [], {}
        for wnid, arrays in data[split].items():
            class_dict[wnid] = list(range(len(images), len(images) + len(arrays)))
            images.extend(arrays)
        obj = {"image_data": np.stack(images), "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(obj, protocol=4))
    return root


def write_csv(root, data=DATA):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for wnid, arrays in data[split].items():
                for j, array in enumerate(arrays):
                    name = f"{wnid}{j + 1:08d}.png"
                    _png(array, root / "images" / name)
                    writer.writerow([name, wnid])
    return root


def write_folders(root, data=DATA, size=None):
    for split in SPLITS:
        for wnid, arrays in data[split].items():
            (root / split / wnid).mkdir(parents=True)
            for j, array in enumerate(arrays):
                _png(array, root / split / wnid / f"{wnid}_{j:04d}.png", size=size)
    return root


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    base = tmp_path_factory.mktemp("mini")
    return {
        "pickle": write_pickles(base / "pickle"),
        "csv": write_csv(base / "csv"),
        "folders": write_folders(base / "folders"),
    }


def _load(path, tmp_path, **kw):
    return load_miniimagenet(path, cache_dir=tmp_path / "cache", expected=EXPECTED, **kw)


def test_formats_agree_bit_for_bit(copies, tmp_path):
    loaded = {name: _load(path, tmp_path) for name, path in copies.items()}
    for name, data in loaded.items():
        assert data.layout == name
        for split in SPLITS:
            assert data.classes[split] == tuple(sorted(DATA[split]))
            want = np.stack([DATA[split][w] for w in data.classes[split]])
            assert data.images[split].dtype == np.uint8
            assert data.counts[split].tolist() == [PER_CLASS] * len(DATA[split])
            np.testing.assert_array_equal(data.images[split], want)
    assert len({d.fingerprint for d in loaded.values()}) == 1
    assert len(loaded["pickle"].fingerprint) == 64


def test_folder_images_of_another_size_are_resized_with_lanczos(tmp_path):
    one = {s: dict(list(DATA[s].items())[:1]) for s in SPLITS}
    for s in SPLITS:
        one[s] = {w: a[:2] for w, a in one[s].items()}
    root = write_folders(tmp_path / "big", one, size=(90, 100))
    expected = dict(classes={s: list(one[s]) for s in SPLITS}, images_per_class=2)
    data = load_miniimagenet(root, cache_dir=tmp_path / "cache", expected=expected)
    wnid = data.classes["train"][0]
    path = root / "train" / wnid / f"{wnid}_0000.png"
    with Image.open(path) as im:
        assert im.size == (90, 100)
        want = np.asarray(im.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(data.images["train"][0, 0], want)


def test_standard_split_lists_ship_64_16_20_disjoint():
    lists = {s: standard_split(s) for s in SPLITS}
    assert [len(lists[s]) for s in SPLITS] == [64, 16, 20]
    union = set().union(*lists.values())
    assert len(union) == 100
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in union)
    assert "n01532829" in lists["train"] and "n01855672" in lists["val"]
    assert "n01930112" in lists["test"]


def test_standard_split_refuses_a_smaller_copy(copies, tmp_path):
    with pytest.raises(MiniImageNetClassError, match=r"mini-imagenet-cache-train\.pkl lacks 64"):
        load_miniimagenet(copies["pickle"], cache_dir=tmp_path)
    with pytest.raises(MiniImageNetCountError, match=r"n00000001 has 6 images, expected 5"):
        load_miniimagenet(
            copies["folders"], cache_dir=tmp_path, expected={**EXPECTED, "images_per_class": 5}
        )


def test_missing_data_dir_says_what_is_expected_and_that_nothing_is_downloaded(tmp_path):
    with pytest.raises(MiniImageNetNotFoundError, match="never downloads") as err:
        load_miniimagenet(tmp_path / "nothing", cache_dir=tmp_path)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, MiniImageNetError)
    assert "mini-imagenet-cache-train.pkl" in str(err.value) and "train.csv" in str(err.value)


def _corrupt_copy(copies, tmp_path, name):
    import shutil

    root = tmp_path / name
    shutil.copytree(copies[name], root)
    return root


def test_truncated_pickle(copies, tmp_path):
    root = _corrupt_copy(copies, tmp_path, "pickle")
    path = root / "mini-imagenet-cache-val.pkl"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(MiniImageNetFormatError, match=r"cache-val\.pkl.*cut off"):
        _load(root, tmp_path)


def test_html_page_under_the_pickles_name(copies, tmp_path):
    root = _corrupt_copy(copies, tmp_path, "pickle")
    path = root / "mini-imagenet-cache-test.pkl"
    path.write_bytes(b"<!DOCTYPE html><html><body>Quota exceeded</body></html>")
    with pytest.raises(MiniImageNetFormatError, match=r"cache-test\.pkl is not a pickle.*HTML"):
        _load(root, tmp_path)


def test_wrong_image_size_in_the_pickle(tmp_path):
    root = write_pickles(tmp_path / "p")
    path = root / "mini-imagenet-cache-train.pkl"
    obj = {"image_data": np.zeros((18, 80, 80, 3), np.uint8), "class_dict": {}}
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(MiniImageNetImageError, match=r"cache-train\.pkl: image_data.*80, 80"):
        _load(root, tmp_path)


def test_csv_naming_a_missing_file(copies, tmp_path):
    root = _corrupt_copy(copies, tmp_path, "csv")
    victim = sorted((root / "images").iterdir())[0]
    victim.unlink()
    with pytest.raises(MiniImageNetNotFoundError, match=rf"\.csv, line \d+ names .*{victim.name}"):
        _load(root, tmp_path)


def test_a_class_missing(copies, tmp_path):
    root = _corrupt_copy(copies, tmp_path, "folders")
    wnid = sorted(DATA["val"])[1]
    for image in (root / "val" / wnid).iterdir():
        image.unlink()
    (root / "val" / wnid).rmdir()
    with pytest.raises(MiniImageNetClassError, match=rf"val lacks 1 class.*{wnid}"):
        _load(root, tmp_path)


def test_csv_without_its_header(copies, tmp_path):
    root = _corrupt_copy(copies, tmp_path, "csv")
    (root / "test.csv").write_text("<html>not found</html>\n")
    with pytest.raises(MiniImageNetFormatError, match=r"test\.csv does not start with"):
        _load(root, tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"echo hi > {self.marker}",))


def test_pickle_importing_os_is_refused_and_not_run(tmp_path):
    evil = _Evil()
    evil.marker = tmp_path / "ran"
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": evil}))
    with pytest.raises(UnsafePickleError, match=r"cache-train\.pkl asks for the global") as err:
        load_pickle(path)
    assert err.value.name == "system" and str(path) == err.value.path
    assert not evil.marker.exists()
    for payload in (eval, getattr):  # builtins too
        with pytest.raises(UnsafePickleError, match=f"builtins.{payload.__name__}"):
            load_pickle(io.BytesIO(pickle.dumps(payload)))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_pickle_reads_numpy_arrays_at_every_protocol(protocol):
    obj = {"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [np.float32(1.5), "s", 3]}
    back = load_pickle(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert back["b"] == obj["b"]


def test_load_pickle_names_truncation_and_non_pickles(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(np.zeros(100))[:40])
    with pytest.raises(TruncatedPickleError, match="x.pkl"):
        load_pickle(path)
    path.write_bytes(b"")
    with pytest.raises(TruncatedPickleError, match="x.pkl is empty"):
        load_pickle(path)
    path.write_bytes(b"\x1f\x8bgzip")
    with pytest.raises(NotAPickleError, match="gzip"):
        load_pickle(path)


def test_cache_hit_then_rebuilt_with_a_warning_after_a_bit_flip(copies, tmp_path, monkeypatch):
    first = _load(copies["pickle"], tmp_path)
    files = sorted((tmp_path / "cache" / "miniimagenet").glob("*_train.npy"))
    assert len(files) == 1 and files[0].with_name(files[0].name + ".sha256").exists()
    assert isinstance(first.images["train"], np.memmap)

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although the cache was intact")

    with monkeypatch.context() as m:
        m.setattr(mio, "_build", fail)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = _load(copies["pickle"], tmp_path)
    assert second.fingerprint == first.fingerprint

    raw = bytearray(files[0].read_bytes())
    raw[-7] ^= 0x10
    files[0].write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="cache .*_train.npy is damaged"):
        third = _load(copies["pickle"], tmp_path)
    assert third.fingerprint == first.fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load(copies["pickle"], tmp_path).fingerprint == first.fingerprint


@pytest.mark.slow
def test_sampler_labels_images_and_limits():
    images = np.stack([np.full((PER_CLASS, 2, 2, 3), 10 * c, np.uint8) for c in range(4)])
    images[:, :, 0, 0, 0] += np.arange(PER_CLASS, dtype=np.uint8)  # image id in one pixel
    task = sample_task(images, jax.random.key(3), ways=3, shots=2, query=3)
    (xs, ys), (xq, yq) = task.support, task.query
    assert xs.shape == (6, 2, 2, 3) and xs.dtype == np.float32 and xq.shape == (9, 2, 2, 3)
    assert ys.tolist() == [0, 0, 1, 1, 2, 2] and yq.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert float(xs.min()) >= 0.0 and float(xs.max()) <= 1.0
    xs, xq = np.asarray(xs) * 255, np.asarray(xq) * 255
    classes = [round(float(xs[2 * i, 1, 1, 0])) // 10 for i in range(3)]
    assert len(set(classes)) == 3  # distinct classes, each label one class
    for label, c in enumerate(classes):
        ids = [round(float(x[0, 0, 0])) - 10 * c for x in xs[2 * label : 2 * label + 2]]
        ids += [round(float(x[0, 0, 0])) - 10 * c for x in xq[3 * label : 3 * label + 3]]
        assert all(round(float(x[1, 1, 0])) == 10 * c for x in xq[3 * label : 3 * label + 3])
        assert len(set(ids)) == 5  # support and query images distinct
    orders = {
        tuple(c)
        for c in (
            np.asarray(sample_task(images, jax.random.key(k), ways=4, shots=1, query=1).support[0])[
                :, 1, 1, 0
            ]
            .round(3)
            .tolist()
            for k in range(8)
        )
    }
    assert len(orders) > 1  # the label assignment is shuffled
    with pytest.raises(ValueError, match="ways=5 is more than the 4 classes"):
        make_sampler(images, ways=5, shots=1, query=1)
    with pytest.raises(ValueError, match=r"shots \+ query = 4 \+ 3 = 7 .* only 6"):
        make_sampler(images, ways=2, shots=4, query=3)
    batch = make_sampler(images, ways=2, shots=1, query=1).sample_batch(jax.random.key(0), 3)
    assert batch.support[0].shape == (3, 2, 2, 2, 3)


# That importing the reader does not load Pillow: tests/test_imageset.py, for every image reader.
