"""Omniglot data layer: loader and cache on a synthetic release, splits, sampler, real data.

The synthetic release is built here in the official layout, so the loader tests run anywhere.
The real-data tests take conftest's ``omniglot_dir`` (``$METAGRAD_OMNIGLOT_DIR``,
``$METAGRAD_DATA/omniglot`` or ``<repo>/../shared/data/omniglot``) and skip without it; they
preprocess once per session into a temporary cache.
"""

import collections
import hashlib
import io
import shutil
import zipfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from metagrad.tasks import Task, omniglot, omniglot_io
from metagrad.tasks.omniglot import (
    OmniglotFormatError,
    OmniglotNotFoundError,
    load_omniglot,
    make_sampler,
    omniglot_splits,
    sample_indices,
    sample_task,
    split_characters,
)

# --- a synthetic release in the official layout ------------------------------------------------

# Names chosen so that file-system order, insertion order and sorted order differ.
SYNTHETIC = {
    "images_background": {"Zeta_(z)": 2, "Alpha": 3},
    "images_evaluation": {"Omega": 2},
}


def _drawing(seed: int) -> np.ndarray:
    """A 105x105 bool image as Omniglot stores it: True is white background, False is ink."""
    rng = np.random.default_rng(seed)
    image = np.ones((105, 105), bool)
    (r, c), (h, w) = rng.integers(5, 55, 2), rng.integers(20, 45, 2)
    image[r : r + h, c : c + w] = False
    return image


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # bool -> mode '1', as in the real zips
    return buffer.getvalue()


def _expected(image: np.ndarray) -> np.ndarray:
    """The documented preprocessing: 8-bit grey, LANCZOS to 28x28, ink 255."""
    grey = Image.fromarray(image).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    return 255 - np.asarray(grey)


def synthetic_release(drawings: int = 20):
    """``(files, expected)``: zip member path -> PNG bytes, and the arrays the loader must give."""
    files, rows, char_id = {}, [], 0
    for half, alphabets in SYNTHETIC.items():
        for alphabet, count in alphabets.items():
            for number in range(1, count + 1):
                char_id += 1
                images = [_drawing(char_id * 100 + d) for d in range(1, drawings + 1)]
                for d, image in reversed(list(enumerate(images, 1))):  # stored out of order
                    path = f"{half}/{alphabet}/character{number:02d}/{char_id:04d}_{d:02d}.png"
                    files[path] = _png(image)
                key = (half != "images_background", alphabet, number)
                rows.append((key, np.stack([_expected(i) for i in images])))
    rows.sort(key=lambda row: row[0])
    expected = omniglot_io.OmniglotData(
        images=np.stack([r[1] for r in rows]),
        alphabet=np.array([r[0][1] for r in rows]),
        character=np.array([r[0][2] for r in rows]),
        background=np.array([not r[0][0] for r in rows]),
    )
    return files, expected


def write_zips(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for half in SYNTHETIC:
        with zipfile.ZipFile(root / f"{half}.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            folders = set()
            for path, data in files.items():
                if path.startswith(half + "/"):
                    parts = path.split("/")
                    for depth in range(1, len(parts)):  # folder entries, as in the real zips
                        folders.add("/".join(parts[:depth]) + "/")
                    archive.writestr(path, data)
            for folder in sorted(folders):
                archive.writestr(folder, b"")
    return root


def write_folders(root: Path, files: dict[str, bytes]) -> Path:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def release():
    return synthetic_release()


def assert_same_data(actual, expected):
    assert actual.images.dtype == np.uint8
    assert actual.images.shape == expected.images.shape
    np.testing.assert_array_equal(actual.images, expected.images)
    assert actual.alphabet.tolist() == expected.alphabet.tolist()
    assert actual.character.tolist() == expected.character.tolist()
    assert actual.background.tolist() == expected.background.tolist()


# --- loader and cache --------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["zip", "folder", "mixed"])
def test_loads_release_in_canonical_order(tmp_path, release, form):
    files, expected = release
    if form == "zip":
        write_zips(tmp_path / "data", files)
    elif form == "folder":
        write_folders(tmp_path / "data", files)
    else:  # background zipped, evaluation extracted
        write_zips(tmp_path / "data", {p: b for p, b in files.items() if "background" in p})
        (tmp_path / "data" / "images_evaluation.zip").unlink()
        write_folders(tmp_path / "data", {p: b for p, b in files.items() if "evaluation" in p})
    data = load_omniglot(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert_same_data(data, expected)
    assert data.alphabet.tolist()[:6] == ["Alpha"] * 3 + ["Zeta_(z)"] * 2 + ["Omega"]


def test_preprocessing_is_antialiased_with_ink_one(tmp_path, release):
    files, _ = release
    data = load_omniglot(write_zips(tmp_path / "data", files), cache_dir=tmp_path)
    images = data.images.astype(int)
    assert images[..., 0, 0].max() == 0  # white background -> 0
    assert images.max() == 255  # the inside of a solid ink block -> 255
    # Anti-aliased edges are grey; a nearest-neighbour resize (what Pillow does to a mode '1'
    # image) would leave only 0 and 255.
    assert ((images > 10) & (images < 245)).mean() > 0.02
    x = make_sampler(data.images, ways=2, shots=1, query=1).sample(jax.random.key(0)).support[0]
    assert x.dtype == jnp.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_cache_hit_does_not_decode_again(tmp_path, release, monkeypatch):
    files, expected = release
    data_dir = write_zips(tmp_path / "data", files)
    before = sorted(p.name for p in data_dir.rglob("*"))
    load_omniglot(data_dir, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache" / "omniglot").glob("*.npz")
    with np.load(cached, allow_pickle=False) as npz:
        assert npz["images"].dtype == np.uint8
        np.testing.assert_array_equal(npz["images"], expected.images)

    def no_decoding(*args):
        raise AssertionError("a cache hit must not decode PNGs")

    monkeypatch.setattr(omniglot_io, "_decode", no_decoding)
    assert_same_data(load_omniglot(data_dir, cache_dir=tmp_path / "cache"), expected)
    assert sorted(p.name for p in data_dir.rglob("*")) == before  # the data folder is untouched
    # the cache and its checksum, nothing else
    names = sorted(p.name for p in (tmp_path / "cache" / "omniglot").iterdir())
    assert names == [cached.name, cached.name + ".sha256"]


@pytest.mark.parametrize("form", ["zip", "folder"])
def test_changed_source_is_never_served_stale(tmp_path, release, form):
    files, expected = release
    write = write_zips if form == "zip" else write_folders
    data_dir = write(tmp_path / "data", files)
    assert_same_data(load_omniglot(data_dir, cache_dir=tmp_path / "cache"), expected)
    # Replace one drawing of the first character in canonical order (Alpha/character01).
    (path,) = [p for p in files if p.endswith("Alpha/character01/0003_01.png")]
    new_image = _drawing(12345)
    write(data_dir, {**files, path: _png(new_image)})
    data = load_omniglot(data_dir, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.images[0, 0], _expected(new_image))
    np.testing.assert_array_equal(data.images[1:], expected.images[1:])
    assert len(list((tmp_path / "cache" / "omniglot").glob("*.npz"))) == 2


def test_first_decode_shows_progress_on_stderr_and_a_cache_hit_prints_nothing(
    tmp_path, release, monkeypatch, capsys
):
    files, expected = release
    data_dir = write_zips(tmp_path / "data", files)
    monkeypatch.setattr(omniglot_io, "_PROGRESS_DELAY", 0.0)  # as if the decode took time
    assert_same_data(
        load_omniglot(data_dir, cache_dir=tmp_path / "quiet", progress=False), expected
    )
    assert capsys.readouterr().err == ""
    assert_same_data(load_omniglot(data_dir, cache_dir=tmp_path / "cache"), expected)
    err = capsys.readouterr().err
    total = expected.images.shape[0] * expected.images.shape[1]
    assert "decoding Omniglot once" in err and f"{total}/{total}" in err
    assert_same_data(load_omniglot(data_dir, cache_dir=tmp_path / "cache"), expected)
    assert capsys.readouterr().err == ""  # the cache hit


def test_unreadable_cache_is_rebuilt_and_unwritable_cache_warns(tmp_path, release):
    files, expected = release
    data_dir = write_zips(tmp_path / "data", files)
    load_omniglot(data_dir, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache" / "omniglot").glob("*.npz")
    cached.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="is damaged; rebuilding it from the zips"):
        assert_same_data(load_omniglot(data_dir, cache_dir=tmp_path / "cache"), expected)
    with np.load(cached, allow_pickle=False) as npz:  # rewritten
        assert npz["images"].shape == expected.images.shape
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write the Omniglot cache"):
        assert_same_data(load_omniglot(data_dir, cache_dir=blocker), expected)


def test_default_folders_come_from_the_environment(tmp_path, release, monkeypatch):
    files, expected = release
    monkeypatch.delenv("METAGRAD_DATA", raising=False)
    with pytest.raises(OmniglotNotFoundError, match="METAGRAD_DATA"):
        load_omniglot()
    write_zips(tmp_path / "data" / "omniglot", files)
    monkeypatch.setenv("METAGRAD_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    assert_same_data(load_omniglot(), expected)
    assert len(list((tmp_path / "cache" / "omniglot").glob("*.npz"))) == 1


def test_missing_release_names_the_expected_files(tmp_path, release):
    for data_dir in (tmp_path / "does_not_exist", tmp_path):
        with pytest.raises(FileNotFoundError) as info:
            load_omniglot(data_dir, cache_dir=tmp_path / "cache")
        assert isinstance(info.value, OmniglotNotFoundError)
        assert "images_background.zip" in str(info.value)
        assert "images_evaluation.zip" in str(info.value)
    # One half present: the error is about the other.
    files, _ = release
    write_zips(tmp_path / "half", {p: b for p, b in files.items() if "background" in p})
    (tmp_path / "half" / "images_evaluation.zip").unlink()
    with pytest.raises(OmniglotNotFoundError, match=r"expected .*images_evaluation\.zip"):
        load_omniglot(tmp_path / "half", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def _corrupt_member(data: bytes) -> bytes:
    """Flip bytes inside the first PNG's compressed data (the CRC check must notice)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(".png"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 10
    return data[:start] + bytes(b ^ 0xFF for b in data[start : start + 20]) + data[start + 20 :]


@pytest.mark.parametrize(
    "damage",
    [lambda d: b"<html>404 not found</html>", lambda d: d[: len(d) // 2], _corrupt_member],
    ids=["not_a_zip", "truncated", "corrupt_member"],
)
def test_corrupt_or_truncated_zip_is_a_clear_error(tmp_path, release, damage):
    files, _ = release
    data_dir = write_zips(tmp_path / "data", files)
    path = data_dir / "images_background.zip"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(OmniglotFormatError, match="images_background.zip") as info:
        load_omniglot(data_dir, cache_dir=tmp_path / "cache")
    assert isinstance(info.value, ValueError)


def _flatten_alphabets(files):  # images_background/character01/... : no alphabet folder
    return {p.replace("/Alpha/", "/").replace("/Zeta_(z)/", "/"): b for p, b in files.items()}


def _drop_a_drawing(files):
    return {p: b for p, b in files.items() if not p.endswith("Alpha/character02/0004_07.png")}


def _extra_drawing(files):
    return {**files, "images_background/Alpha/character02/0004_21.png": _png(_drawing(1))}


def _nest_one_level(files):  # the zip's top folder is not images_background/
    return {f"omniglot/{p}" if "background" in p else p: b for p, b in files.items()}


@pytest.mark.parametrize("form", ["zip", "folder"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_flatten_alphabets, r"unexpected file 'character01/.*<Alphabet>/character<NN>"),
        (_drop_a_drawing, r"Alpha/character02 .* has 19 drawings; every Omniglot character has 20"),
        (_extra_drawing, r"Alpha/character02 .* has 21 drawings"),
        (_nest_one_level, r"no alphabet folders with PNG drawings in .*images_background"),
    ],
    ids=["no_alphabet_folders", "19_drawings", "21_drawings", "nested"],
)
def test_wrong_layout_is_a_clear_error(tmp_path, release, form, change, message):
    files, _ = release
    write = write_zips if form == "zip" else write_folders
    data_dir = write(tmp_path / "data", change(files))
    if form == "folder" and change is _nest_one_level:
        (data_dir / "images_background").mkdir()
    with pytest.raises(OmniglotFormatError, match=message):
        load_omniglot(data_dir, cache_dir=tmp_path / "cache")


def test_undecodable_png_is_a_clear_error(tmp_path, release):
    files, _ = release
    (path,) = [p for p in files if p.endswith("Omega/character02/0007_03.png")]
    data_dir = write_folders(tmp_path / "data", {**files, path: files[path][:40]})
    with pytest.raises(OmniglotFormatError, match="cannot decode Omega/character02/0007_03.png"):
        load_omniglot(data_dir, cache_dir=tmp_path / "cache")


# --- splits ------------------------------------------------------------------------------------


def _fingerprint(index: dict) -> str:
    return hashlib.sha256(b"".join(index[s].astype("<i8").tobytes() for s in index)).hexdigest()


def test_finn_split_sizes_disjoint_and_pinned():
    index = split_characters(np.array(["A"] * 1623), np.arange(1623) < 964)
    assert {name: len(i) for name, i in index.items()} == {"train": 1100, "val": 100, "test": 423}
    together = np.concatenate(list(index.values()))
    assert sorted(together.tolist()) == list(range(1623))  # disjoint and complete
    assert all((np.diff(i) > 0).all() for i in index.values())
    # The documented shuffle, spelled out; and pinned so a NumPy change cannot move it silently.
    order = np.random.default_rng(1).permutation(1623)
    assert index["val"].tolist() == sorted(order[1100:1200].tolist())
    assert index["val"][:5].tolist() == [6, 18, 29, 45, 52]
    assert _fingerprint(index)[:16] == "ba726a28af298bd6"
    other = split_characters(np.array(["A"] * 1623), np.ones(1623, bool), seed=2)
    assert other["val"].tolist() != index["val"].tolist()


def test_alphabet_split_holds_out_whole_alphabets():
    alphabet = np.array(list("aabbbcddeee") + ["x", "y", "y"])
    background = np.array([True] * 11 + [False] * 3)
    index = split_characters(alphabet, background, split="alphabet", num_val_alphabets=2)
    assert sorted(np.concatenate(list(index.values())).tolist()) == list(range(14))
    assert index["test"].tolist() == [11, 12, 13]
    val, train = set(alphabet[index["val"]]), set(alphabet[index["train"]])
    assert len(val) == 2 and not val & train and val | train == set("abcde")
    assert (
        split_characters(alphabet, background, split="alphabet", num_val_alphabets=0)["val"].size
        == 0
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "vinyals"}, "split must be 'finn' or 'alphabet'"),
        ({"num_train": 1500, "num_val": 200}, "num_train.*num_val"),
        ({"num_train": 0}, "num_train"),
        ({"split": "alphabet", "num_val_alphabets": 3}, "num_val_alphabets"),
    ],
)
def test_bad_split_arguments(kwargs, message):
    alphabet = np.array(["a", "b", "c"] * 541)
    with pytest.raises(ValueError, match=message):
        split_characters(alphabet, alphabet != "c", **kwargs)


# --- sampler -----------------------------------------------------------------------------------


def random_split(num_characters: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images: every drawing and rotation is a different array."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_characters, 20, 28, 28), dtype=np.uint8)


def identify(task_x: np.ndarray, images: np.ndarray) -> list[tuple[int, int, int]]:
    """``(character, rotation, drawing)`` of every image of a task, by exact lookup."""
    lookup = {
        np.rot90(images[c, d], k).tobytes(): (c, k, d)
        for c in range(images.shape[0])
        for d in range(images.shape[1])
        for k in range(4)
    }
    pixels = np.rint(np.asarray(task_x)[..., 0] * 255).astype(np.uint8)
    return [lookup[p.tobytes()] for p in pixels]


def check_task(task: Task, images: np.ndarray, *, ways: int, shots: int, query: int):
    (xs, ys), (xq, yq) = task
    assert xs.shape == (ways * shots, 28, 28, 1) and xq.shape == (ways * query, 28, 28, 1)
    assert xs.dtype == xq.dtype == jnp.float32 and ys.dtype == yq.dtype == jnp.int32
    assert ys.tolist() == np.repeat(np.arange(ways), shots).tolist()
    assert yq.tolist() == np.repeat(np.arange(ways), query).tolist()
    found = collections.defaultdict(list)
    for (c, k, d), y in zip(identify(np.concatenate([xs, xq]), images), [*ys, *yq], strict=True):
        found[int(y)].append((c, k, d))
    classes = set()
    for items in found.values():
        assert len({(c, k) for c, k, _ in items}) == 1  # one class per label, support and query
        assert len({d for _, _, d in items}) == shots + query  # distinct drawings
        classes.add(items[0][:2])
    assert len(classes) == ways  # distinct classes
    return [found[label][0][:2] for label in range(ways)]


def test_sampled_tasks_are_valid_and_rotations_are_np_rot90(key):
    images = random_split(6)
    sampler = make_sampler(images, ways=5, shots=2, query=3)
    batch = sampler.sample_batch(key, 12)
    assert batch.support[0].shape == (12, 10, 28, 28, 1)
    rotations = collections.Counter()
    for t in range(12):
        task = jax.tree.map(lambda leaf, t=t: leaf[t], batch)
        rotations.update(k for _, k in check_task(task, images, ways=5, shots=2, query=3))
    assert set(rotations) == {0, 1, 2, 3}
    unrotated = make_sampler(images, ways=6, shots=1, query=1, rotations=False).sample(key)
    assert {k for _, k in check_task(unrotated, images, ways=6, shots=1, query=1)} == {0}


def test_rotation_is_counterclockwise_quarter_turns():
    images = np.zeros((1, 20, 3, 3), np.float32)
    images[0, :] = np.arange(9, dtype=np.float32).reshape(3, 3)
    # The only character, in all four rotations: its labels are the rotations in random order.
    task = jax.jit(partial(sample_task, ways=4, shots=1, query=1))(images, jax.random.key(3))
    index = jax.jit(partial(sample_indices, num_characters=1, ways=4, shots=1, query=1))(
        jax.random.key(3)
    )
    turned = {
        0: [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
        1: [[2, 5, 8], [1, 4, 7], [0, 3, 6]],
        2: [[8, 7, 6], [5, 4, 3], [2, 1, 0]],
        3: [[6, 3, 0], [7, 4, 1], [8, 5, 2]],
    }
    assert sorted(index.rotation.tolist()) == [0, 1, 2, 3]
    for label, k in enumerate(index.rotation.tolist()):
        assert task.support[0][label, ..., 0].tolist() == turned[k]
        assert task.query[0][label, ..., 0].tolist() == turned[k]


@pytest.mark.slow
def test_sample_batch_is_vmap_of_sample_over_split_keys(key):
    images = random_split(3)
    sampler = make_sampler(images, ways=3, shots=1, query=2)
    batch = sampler.sample_batch(key, 4)
    for t, k in enumerate(jax.random.split(key, 4)):
        one = jax.tree.leaves(sampler.sample(k))
        for got, want in zip(jax.tree.leaves(batch), one, strict=True):
            np.testing.assert_array_equal(got[t], want)
    again = jax.jit(lambda k: sampler.sample(k))(key)
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(sampler.sample(key)), strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(batch.support[0][0], batch.support[0][1])


@pytest.mark.slow
def test_sample_keys_draws_sample_batch_in_blocks(key):
    sampler = make_sampler(random_split(4), ways=3, shots=1, query=2)
    whole = sampler.sample_batch(key, 7)
    keys = jax.random.split(key, 7)
    blocks = [sampler.sample_keys(keys[a:b]) for a, b in ((0, 3), (3, 6), (6, 7))]
    for got, want in zip(jax.tree.leaves(whole), jax.tree.leaves(blocks[0]), strict=True):
        np.testing.assert_array_equal(got[:3], want)
    joined = jax.tree.map(lambda *xs: np.concatenate(xs), *blocks)
    for got, want in zip(jax.tree.leaves(joined), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(got, want)  # bit for bit, every block
    with pytest.raises(ValueError, match="1-d array of PRNG keys"):
        sampler.sample_keys(key)


@pytest.mark.slow
def test_samplers_over_splits_of_one_shape_compile_once(key, monkeypatch):
    traces = []

    def counted(*args, **kwargs):
        traces.append(1)  # runs only while JAX traces
        return sample_task(*args, **kwargs)

    monkeypatch.setattr(omniglot, "sample_task", counted)
    # A shape no other test uses, so that no earlier compilation is cached.
    first, second = random_split(7, seed=1)[:, :, :9, :9], random_split(7, seed=2)[:, :, :9, :9]
    one = make_sampler(first, ways=3, shots=2, query=3).sample_batch(key, 3)
    two = make_sampler(second, ways=3, shots=2, query=3).sample_batch(key, 3)
    assert len(traces) == 1  # the held-out sampler made anew per validation does not recompile
    assert not np.array_equal(one.support[0], two.support[0])  # each its own images
    make_sampler(first, ways=3, shots=2, query=4).sample_batch(key, 3)
    assert len(traces) == 2  # another task shape is another program


def test_classes_labels_and_drawings_are_uniform(key):
    # 3 characters x 4 rotations = 12 classes; 4000 tasks of 5 ways -> 1667 draws per class.
    draw = jax.jit(jax.vmap(lambda k: sample_indices(k, 3, ways=5, shots=2, query=1)))
    index = draw(jax.random.split(key, 4000))
    classes = np.asarray(index.character * 4 + index.rotation)
    assert all(len(set(row)) == 5 for row in classes)
    counts = np.bincount(classes.ravel(), minlength=12)
    assert np.abs(counts / counts.mean() - 1).max() < 0.1, counts
    first = np.bincount(classes[:, 0], minlength=12)  # which class gets label 0: uniform too
    assert np.abs(first / first.mean() - 1).max() < 0.25, first
    assert 0.45 < (classes[:, 0] < classes[:, 1]).mean() < 0.55  # labels are not sorted classes
    drawings = np.asarray(index.drawing)
    assert all(len(set(row)) == 3 for row in drawings.reshape(-1, 3))
    per_slot = [np.bincount(drawings[..., j].ravel(), minlength=20) for j in range(3)]
    assert all(np.abs(c / c.mean() - 1).max() < 0.15 for c in per_slot), per_slot


def test_all_ordered_pairs_equally_likely(key):
    # Exhaustive small case of the sampler's distinct draw: 4 classes, 2 ways -> 12 ordered pairs.
    draw = jax.jit(jax.vmap(lambda k: sample_indices(k, 1, ways=2, shots=1, query=1).rotation))
    pairs = collections.Counter(map(tuple, np.asarray(draw(jax.random.split(key, 24000))).tolist()))
    assert sorted(pairs) == [(a, b) for a in range(4) for b in range(4) if a != b]
    assert max(abs(n / 2000 - 1) for n in pairs.values()) < 0.1, pairs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ways": 13}, r"ways=13 is more than the 12 classes .*3 characters x 4 rotations"),
        ({"ways": 4, "rotations": False}, r"ways=4 is more than the 3 classes"),
        ({"shots": 10, "query": 11}, r"shots \+ query = 10 \+ 11 = 21 .* only 20"),
        ({"ways": 0}, "ways must be an int >= 1, got 0"),
        ({"shots": -1}, "shots must be an int >= 1"),
        ({"query": 0}, "query must be an int >= 1"),
        ({"ways": 2.0}, "ways must be an int"),
        ({"shots": True}, "shots must be an int"),
    ],
)
def test_bad_sampler_arguments_fail_before_compiling(kwargs, message):
    args = {"ways": 5, "shots": 1, "query": 1, **kwargs}
    images = np.zeros((3, 20, 28, 28), np.uint8)
    with pytest.raises(ValueError, match=message):
        make_sampler(images, **args)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda k: sample_task(images, k, **args)).lower(jax.random.key(0))


def test_bad_images_and_batch_size():
    with pytest.raises(ValueError, match="characters, drawings, H, W"):
        make_sampler(np.zeros((3, 28, 28), np.uint8), ways=2, shots=1, query=1)
    with pytest.raises(ValueError, match="square"):
        sample_task(np.zeros((3, 20, 28, 27)), jax.random.key(0), ways=2, shots=1, query=1)
    sampler = make_sampler(np.zeros((3, 20, 28, 28), np.uint8), ways=2, shots=1, query=1)
    with pytest.raises(ValueError, match="meta_batch_size must be an int >= 1"):
        sampler.sample_batch(jax.random.key(0), 0)


# --- the real data: decoding all 32,460 drawings is the slow lane -------------------------------


@pytest.fixture(scope="session")
def real(omniglot_dir, tmp_path_factory):
    """``(data_dir, cache_dir, data)``, preprocessed once per session into a fresh cache (the
    data folder comes from conftest's ``omniglot_dir``, which skips without it)."""
    cache_dir = tmp_path_factory.mktemp("omniglot_cache")
    return omniglot_dir, cache_dir, load_omniglot(omniglot_dir, cache_dir=cache_dir)


@pytest.mark.slow
def test_real_counts_and_order(real):
    _, _, data = real
    assert data.images.shape == (1623, 20, 28, 28) and data.images.dtype == np.uint8
    assert data.background.sum() == 964 and (~data.background).sum() == 659
    background = collections.Counter(data.alphabet[data.background].tolist())
    evaluation = collections.Counter(data.alphabet[~data.background].tolist())
    assert len(background) == 30 and len(evaluation) == 20
    assert background["Tifinagh"] == 55
    assert background["Ojibwe_(Canadian_Aboriginal_Syllabics)"] == 14
    assert evaluation["Angelic"] == 20 and evaluation["Old_Church_Slavonic_(Cyrillic)"] == 45
    assert data.alphabet[0] == "Alphabet_of_the_Magi" and data.alphabet[-1] == "ULOG"
    assert list(data.alphabet[:964]) == sorted(data.alphabet[:964])
    assert list(data.alphabet[964:]) == sorted(data.alphabet[964:])
    for name in background | evaluation:  # characters numbered 1..n in order, per alphabet
        assert data.character[data.alphabet == name].tolist() == list(
            range(1, (data.alphabet == name).sum() + 1)
        )
    assert data.images[..., 0, 0].max() < 16  # background ~ 0 at the corners
    assert 0.05 < data.images.mean() / 255 < 0.15  # ink is the minority, and it is 255


@pytest.mark.slow
def test_real_splits(real):
    data_dir, cache_dir, data = real
    finn = split_characters(data.alphabet, data.background)
    assert [len(finn[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert sorted(np.concatenate(list(finn.values())).tolist()) == list(range(1623))
    by_alphabet = split_characters(data.alphabet, data.background, split="alphabet")
    assert [len(by_alphabet[s]) for s in ("train", "val", "test")] == [817, 147, 659]
    assert sorted(set(data.alphabet[by_alphabet["val"]].tolist())) == [
        "Anglo-Saxon_Futhorc",
        "Futurama",
        "Grantha",
        "Latin",
        "Syriac_(Estrangelo)",
    ]
    assert not data.background[by_alphabet["test"]].any()
    assert not set(data.alphabet[by_alphabet["train"]]) & set(data.alphabet[by_alphabet["val"]])
    splits = omniglot_splits(data_dir, cache_dir=cache_dir)  # served from the session's cache
    for name, index in finn.items():
        np.testing.assert_array_equal(splits[name], data.images[index])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("split", "ways", "shots", "query"), [("train", 5, 1, 15), ("test", 20, 5, 5)]
)
def test_real_sampler_matches_its_indices(real, key, split, ways, shots, query):
    _, _, data = real
    images = data.images[split_characters(data.alphabet, data.background)[split]]
    tasks = 8
    batch = make_sampler(images, ways=ways, shots=shots, query=query).sample_batch(key, tasks)
    # sample_task draws its classes and drawings with sample_indices from the same key.
    draw = partial(sample_indices, num_characters=len(images), ways=ways, shots=shots, query=query)
    index = jax.tree.map(np.asarray, jax.jit(jax.vmap(draw))(jax.random.split(key, tasks)))
    for t in range(tasks):
        character, rotation, drawing = index.character[t], index.rotation[t], index.drawing[t]
        assert len(set(zip(character, rotation, strict=True))) == ways  # distinct classes
        assert all(len(set(row)) == shots + query for row in drawing)  # distinct drawings
        # The oracle: np.rot90 of the split's own images, scaled to [0, 1].
        want = np.stack(
            [
                np.stack([np.rot90(images[c, d], k) for d in row])
                for c, k, row in zip(character, rotation, drawing, strict=True)
            ]
        ).astype(np.float32) * np.float32(1 / 255)
        got_s = np.asarray(batch.support[0][t]).reshape(ways, shots, 28, 28)
        got_q = np.asarray(batch.query[0][t]).reshape(ways, query, 28, 28)
        np.testing.assert_array_equal(got_s, want[:, :shots])
        np.testing.assert_array_equal(got_q, want[:, shots:])
        assert batch.support[1][t].tolist() == np.repeat(np.arange(ways), shots).tolist()
        assert batch.query[1][t].tolist() == np.repeat(np.arange(ways), query).tolist()
    assert set(index.rotation.ravel().tolist()) == {0, 1, 2, 3}


@pytest.mark.slow
def test_real_cache_is_keyed_by_the_source(real, tmp_path):
    data_dir, cache_dir, data = real
    (cached,) = (cache_dir / "omniglot").glob("*.npz")
    # Same bytes under another folder: same key, so the session's cache is reused.
    shutil.copy(data_dir / "images_background.zip", tmp_path)
    shutil.copy(data_dir / "images_evaluation.zip", tmp_path)
    assert_same_data(load_omniglot(tmp_path, cache_dir=cache_dir), data)
    assert [p.name for p in (cache_dir / "omniglot").glob("*.npz")] == [cached.name]
