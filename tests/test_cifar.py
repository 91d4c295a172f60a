"""CIFAR-FS and FC100 readers on a tiny synthetic cifar-100-python (100 classes x 3 images)."""

from __future__ import annotations

import io
import pickle
import shutil
import struct
import tarfile
from importlib import resources

import numpy as np
import pytest

from metagrad.tasks import cifar
from metagrad.tasks.cifar import load_cifarfs, load_fc100, read_cifar100
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

TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 1
PER_CLASS = TRAIN_PER_CLASS + TEST_PER_CLASS
EXPECTED = {"images_per_class": PER_CLASS}


def _hierarchy() -> dict[str, str]:
    """fine name -> coarse name, from the comments of the shipped CIFAR-FS lists."""
    out = {}
    for split in SPLITS:
        text = resources.files("metagrad.tasks").joinpath(f"splits/cifarfs/{split}.txt")
        for line in text.read_text().splitlines():
            if line and not line.startswith("#"):
                fine, coarse = (p.strip() for p in line.split("#"))
                out[fine] = coarse
    return out


COARSE_OF = _hierarchy()
FINE_NAMES = sorted(COARSE_OF)  # the release's order: alphabetical
COARSE_NAMES = sorted(set(COARSE_OF.values()))


def _members(seed: int = 0) -> dict[str, dict]:
    """The three pickled dicts of a synthetic release, rows of all classes shuffled."""
    rng = np.random.default_rng(seed)
    out = {
        "meta": {"fine_label_names": FINE_NAMES, "coarse_label_names": COARSE_NAMES},
    }
    for member, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        fine = np.repeat(np.arange(100), per_class)[rng.permutation(100 * per_class)]
        out[member] = {
            "data": rng.integers(0, 256, (len(fine), 3072), np.uint8),
            "fine_labels": fine.tolist(),
            "coarse_labels": [COARSE_NAMES.index(COARSE_OF[FINE_NAMES[f]]) for f in fine],
            "batch_label": f"{member} batch 1 of 1",
        }
    return out


MEMBERS = _members()


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's 8-bit strings (BINSTRING), as cPickle wrote the
    release; numpy arrays then carry their bytes as such a string."""

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


def _bytes_keys(obj):
    """What ``pickle.load(f, encoding="bytes")`` gives, re-pickled by Python 3."""
    if isinstance(obj, dict):
        return {k.encode(): _bytes_keys(v) for k, v in obj.items()}
    if isinstance(obj, list) and obj and isinstance(obj[0], str):
        return [s.encode() for s in obj]
    return obj


def _blobs(members=MEMBERS, *, bytes_keys=False) -> dict[str, bytes]:
    if bytes_keys:
        return {m: pickle.dumps(_bytes_keys(d), protocol=4) for m, d in members.items()}
    return {m: py2_dumps(d) for m, d in members.items()}


def write_folder(root, blobs=None):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, blob in (blobs or _blobs()).items():
        (folder / name).write_bytes(blob)
    return root


def write_tar(path, blobs=None, *, prefix="cifar-100-python/"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, blob in (blobs or _blobs()).items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def expected_images(fine_name: str) -> np.ndarray:
    """The class's images decoded by hand: its train rows, then its test rows, CHW -> HWC."""
    f = FINE_NAMES.index(fine_name)
    rows = []
    for member in ("train", "test"):
        d = MEMBERS[member]
        rows += [d["data"][i] for i in np.flatnonzero(np.array(d["fine_labels"]) == f)]
    return np.stack([r.reshape(3, 32, 32).transpose(1, 2, 0) for r in rows])


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    base = tmp_path_factory.mktemp("cifar")
    return {
        "folder": write_folder(base / "folder"),
        "tar": write_tar(base / "tar" / "cifar-100-python.tar.gz"),
    }


def test_folder_and_archive_give_the_same_arrays_as_a_hand_decode(copies, tmp_path):
    loaded = {
        name: load_cifarfs(path, cache_dir=tmp_path / name, expected=EXPECTED)
        for name, path in copies.items()
    }
    for layout, data in loaded.items():
        assert data.name == "cifarfs" and data.layout == layout
        for split in SPLITS:
            assert data.classes[split] == shipped_split("cifarfs", split)
            assert data.images[split].shape == (len(data.classes[split]), 3, 32, 32, 3)
            assert data.images[split].dtype == np.uint8
            assert data.counts[split].tolist() == [PER_CLASS] * len(data.classes[split])
        for split, i in (("train", 0), ("val", 3), ("test", 19)):
            name = data.classes[split][i]
            np.testing.assert_array_equal(data.images[split][i], expected_images(name))
    assert loaded["folder"].fingerprint == loaded["tar"].fingerprint
    # the archive's folder, the archive itself and the extracted folder all read the same
    parent = load_cifarfs(copies["tar"].parent, cache_dir=tmp_path / "p", expected=EXPECTED)
    inner = load_cifarfs(
        copies["folder"] / "cifar-100-python", cache_dir=tmp_path / "i", expected=EXPECTED
    )
    assert parent.fingerprint == inner.fingerprint == loaded["tar"].fingerprint


def test_a_python3_copy_with_bytes_keys_reads_the_same(copies, tmp_path):
    root = write_folder(tmp_path / "py3", _blobs(bytes_keys=True))
    a = load_cifarfs(root, cache_dir=tmp_path / "a", expected=EXPECTED)
    b = load_cifarfs(copies["folder"], cache_dir=tmp_path / "b", expected=EXPECTED)
    assert a.fingerprint == b.fingerprint


def test_fc100_splits_by_superclass(copies, tmp_path):
    data = load_image_dataset("fc100", copies["tar"], cache_dir=tmp_path, expected=EXPECTED)
    assert data.name == "fc100" and [len(data.classes[s]) for s in SPLITS] == [60, 20, 20]
    supers = {s: {COARSE_OF[c] for c in data.classes[s]} for s in SPLITS}
    assert [len(supers[s]) for s in SPLITS] == [12, 4, 4]
    assert supers["test"] == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    assert supers["val"] == set(cifar.FC100_SUPERCLASSES["val"])
    assert not (supers["train"] & supers["val"]) and not (supers["train"] & supers["test"])
    i = data.classes["val"].index("wolf")
    np.testing.assert_array_equal(data.images["val"][i], expected_images("wolf"))
    cifarfs = load_cifarfs(copies["tar"], cache_dir=tmp_path, expected=EXPECTED)
    assert cifarfs.fingerprint != data.fingerprint  # the name and the split enter


def test_split_lists_ship_with_their_sources():
    fs = {s: shipped_split("cifarfs", s) for s in SPLITS}
    fc = {s: shipped_split("fc100", s) for s in SPLITS}
    for lists, sizes in ((fs, [64, 16, 20]), (fc, [60, 20, 20])):
        assert [len(lists[s]) for s in SPLITS] == sizes
        assert set().union(*lists.values()) == set(FINE_NAMES)
    assert {"whale", "woman", "worm", "rocket"} <= set(fs["test"])
    for dataset, source in (("cifarfs", "bertinetto"), ("fc100", "TADAM")):
        text = resources.files("metagrad.tasks").joinpath(f"splits/{dataset}/train.txt")
        assert source in text.read_text()


def test_the_standard_count_refuses_the_small_copy(copies, tmp_path):
    with pytest.raises(ImageSetCountError, match=r"has 3 images, expected 600") as err:
        load_cifarfs(copies["tar"], cache_dir=tmp_path)
    assert "\n" not in str(err.value) and "cifar-100-python.tar.gz" in str(err.value)


def test_a_cache_hit_reads_nothing_but_the_digest(copies, tmp_path, monkeypatch):
    first = load_cifarfs(copies["folder"], cache_dir=tmp_path, expected=EXPECTED)
    monkeypatch.setattr(cifar, "read_cifar100", lambda *a: pytest.fail("decoded again"))
    again = load_cifarfs(copies["folder"], cache_dir=tmp_path, expected=EXPECTED)
    assert type(again.images["train"]).__name__ == "memmap"
    assert again.fingerprint == first.fingerprint


def test_nothing_there(tmp_path):
    with pytest.raises(ImageSetNotFoundError, match=r"cifar-100-python\.tar\.gz.*never downloads"):
        load_fc100(tmp_path, cache_dir=tmp_path)
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"")
    with pytest.raises(ImageSetNotFoundError, match=r"not \['test', 'meta'\]"):
        load_fc100(tmp_path, cache_dir=tmp_path)


# --- corrupt copies: each refused with its typed error, naming the file --------------------------


def _tar_error(tmp_path, blobs=None, raw=None, **kw):
    path = tmp_path / "bad" / "cifar-100-python.tar.gz"
    if raw is not None:
        path.parent.mkdir(parents=True)
        path.write_bytes(raw)
    else:
        write_tar(path, blobs, **kw)
    return path


def test_truncated_archive(copies, tmp_path):
    path = _tar_error(tmp_path, raw=copies["tar"].read_bytes()[:20000])
    with pytest.raises(ImageSetFormatError, match=r"cifar-100-python\.tar\.gz is not a readable"):
        load_cifarfs(path, cache_dir=tmp_path, expected=EXPECTED)


def test_html_page_under_the_archives_name(tmp_path):
    path = _tar_error(tmp_path, raw=b"<!DOCTYPE html><html><body>Not found</body></html>")
    with pytest.raises(ImageSetFormatError, match=r"tar\.gz is not a tar archive but an HTML"):
        load_cifarfs(path, cache_dir=tmp_path, expected=EXPECTED)


def test_archive_without_meta(tmp_path):
    blobs = {k: v for k, v in _blobs().items() if k != "meta"}
    path = _tar_error(tmp_path, blobs)
    with pytest.raises(ImageSetFormatError, match=r"tar\.gz lacks the member\(s\) \['cifar-100-"):
        load_cifarfs(path, cache_dir=tmp_path, expected=EXPECTED)


def test_archive_member_escaping_its_folder(tmp_path):
    path = _tar_error(tmp_path, {**_blobs(), "../../evil": b"x"})
    with pytest.raises(ImageSetFormatError, match=r"'cifar-100-python/../../evil'.*refused"):
        load_cifarfs(path, cache_dir=tmp_path, expected=EXPECTED)


def _folder_error(tmp_path, copies, member, blob):
    root = tmp_path / "bad"
    shutil.copytree(copies["folder"], root)
    (root / "cifar-100-python" / member).write_bytes(blob)
    return root


def test_truncated_pickle(copies, tmp_path):
    blob = _blobs()["train"]
    root = _folder_error(tmp_path, copies, "train", blob[: len(blob) // 2])
    with pytest.raises(ImageSetFormatError, match=r"cifar-100-python/train .*cut off"):
        load_cifarfs(root, cache_dir=tmp_path, expected=EXPECTED)


def test_html_page_under_a_pickles_name(copies, tmp_path):
    root = _folder_error(tmp_path, copies, "test", b"<!DOCTYPE html><html>quota</html>")
    with pytest.raises(ImageSetFormatError, match=r"cifar-100-python/test is not a pickle.*HTML"):
        load_fc100(root, cache_dir=tmp_path, expected=EXPECTED)


def test_meta_without_its_keys(copies, tmp_path):
    root = _folder_error(tmp_path, copies, "meta", py2_dumps({"label_names": FINE_NAMES}))
    with pytest.raises(ImageSetFormatError, match=r"meta lacks the key\(s\) \['fine_label_names'"):
        load_cifarfs(root, cache_dir=tmp_path, expected=EXPECTED)


def test_wrong_image_size(tmp_path):
    members = {k: dict(v) for k, v in _members().items()}
    members["train"]["data"] = members["train"]["data"][:, :1024]  # 32x32 grey, not RGB
    root = write_folder(tmp_path / "grey", _blobs(members))
    with pytest.raises(ImageSetImageError, match=r"cifar-100-python/train: data rows have 1024"):
        load_cifarfs(root, cache_dir=tmp_path, expected=EXPECTED)


def test_a_class_missing(tmp_path):
    members = {k: dict(v) for k, v in _members().items()}
    beaver, otter = FINE_NAMES.index("beaver"), FINE_NAMES.index("otter")
    for m in ("train", "test"):  # beaver's images relabelled as otters (same super-class)
        members[m]["fine_labels"] = [otter if f == beaver else f for f in members[m]["fine_labels"]]
    path = write_tar(tmp_path / "c" / "cifar-100-python.tar.gz", _blobs(members))
    with pytest.raises(ImageSetClassError, match=r"lacks 1 class\(es\) of the val.*'beaver'"):
        load_cifarfs(path, cache_dir=tmp_path, expected={"images_per_class": None})


def test_fc100_refuses_a_file_whose_hierarchy_differs(tmp_path):
    members = {k: dict(v) for k, v in _members().items()}
    whale, fish = FINE_NAMES.index("whale"), COARSE_NAMES.index("fish")
    for m in ("train", "test"):
        pairs = zip(members[m]["fine_labels"], members[m]["coarse_labels"], strict=True)
        members[m]["coarse_labels"] = [fish if f == whale else c for f, c in pairs]
    root = write_folder(tmp_path / "h", _blobs(members))
    with pytest.raises(ImageSetClassError, match=r"FC100 train super-classes.*'whale'"):
        load_fc100(root, cache_dir=tmp_path, expected=EXPECTED)
    load_cifarfs(root, cache_dir=tmp_path, expected=EXPECTED)  # CIFAR-FS ignores super-classes


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned-by-pickle",))


def test_a_pickle_that_imports_os_is_refused_and_not_run(copies, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blobs = {**_blobs(), "test": pickle.dumps({"data": _RunsCode()}, protocol=2)}
    path = write_tar(tmp_path / "evil" / "cifar-100-python.tar.gz", blobs)
    with pytest.raises(UnsafePickleError, match=r"tar\.gz:cifar-100-python/test asks for .*system"):
        read_cifar100(path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_load_pickle_reads_python2_strings_only_when_told_and_stays_restricted():
    from metagrad.tasks.safe_pickle import NotAPickleError, load_pickle

    array = (np.arange(600) % 256).astype(np.uint8).reshape(2, 300)  # bytes >= 0x80
    blob = py2_dumps({"data": array, "name": "batch"})
    with pytest.raises(NotAPickleError, match=r"Python 2 strings that are not ASCII.*latin1"):
        load_pickle(io.BytesIO(blob))
    latin1 = load_pickle(io.BytesIO(blob), encoding="latin1")
    np.testing.assert_array_equal(latin1["data"], array)
    assert latin1["name"] == "batch"
    assert load_pickle(io.BytesIO(blob), encoding="bytes")[b"name"] == b"batch"
    evil = py2_dumps({"data": _RunsCode()})
    with pytest.raises(UnsafePickleError, match=r"system"):
        load_pickle(io.BytesIO(evil), encoding="latin1")
