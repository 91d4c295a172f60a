"""The image cache's costs and guarantees: a hit hashes nothing it need not, a damaged cache or
memo is detected where the design says, a build into the memory map equals the in-memory one,
and an interrupted build leaves nothing that is later trusted."""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from metagrad.tasks import imageset
from metagrad.tasks.folder import load_image_folder
from metagrad.tasks.imageset import (
    cache_paths,
    cache_verify_mode,
    cached_source_digest,
    cached_split,
    fingerprint,
    source_digest,
)


def _split(seed=0, shape=(3, 4, 6, 6, 3)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape, dtype=np.uint8), np.array([4, 2, 3], np.int32)


def _build_plain(images, counts, calls):
    def build():
        calls.append("plain")
        return images.copy(), counts.copy()

    return build


def _build_into(images, counts, calls, fail_after=None):
    def build(allocate):
        calls.append("into")
        out = allocate(images.shape)
        for i in range(len(images)):
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt  # a Ctrl-C in the middle of the build
            out[i, : counts[i]] = images[i, : counts[i]]
        return out, counts.copy()

    return build


def _flip(path, offset=-5, keep_mtime=False):
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    if keep_mtime:  # silent corruption: same size, same mtime
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _padded(images, counts):
    out = images.copy()
    for i, n in enumerate(counts):
        out[i, n:] = 0
    return out


@pytest.fixture
def counted(monkeypatch):
    """Counts the passes over cached bytes: file checksums, fingerprint hashing, source reads."""
    seen = {"file_sha256": [], "fingerprint": 0, "source_digest": 0}
    file_sha256, blocks, cached_bytes, digest = (
        imageset.file_sha256,
        imageset._blocks,
        imageset._cached_bytes,
        imageset.source_digest,
    )

    def count_sha(path):
        seen["file_sha256"].append(path.name)
        return file_sha256(path)

    def count_blocks(fn):
        def wrapped(array):
            seen["fingerprint"] += 1
            return fn(array)

        return wrapped

    def count_digest(*a, **k):
        seen["source_digest"] += 1
        return digest(*a, **k)

    monkeypatch.setattr(imageset, "file_sha256", count_sha)
    monkeypatch.setattr(imageset, "_blocks", count_blocks(blocks))
    monkeypatch.setattr(imageset, "_cached_bytes", count_blocks(cached_bytes))
    monkeypatch.setattr(imageset, "source_digest", count_digest)
    return seen


# --- building ------------------------------------------------------------------------------------


def test_the_memory_map_build_writes_the_bytes_of_the_in_memory_one(tmp_path):
    images, counts = _split()
    images = _padded(images, counts)
    calls = []
    a, a_counts = cached_split(
        "demo", "k", "train", _build_plain(images, counts, calls), cache_dir=tmp_path / "a"
    )
    b, b_counts = cached_split(
        "demo",
        "k",
        "train",
        _build_into(images, counts, calls),
        cache_dir=tmp_path / "b",
        into=True,
    )
    assert calls == ["plain", "into"]
    for p, q in zip(
        cache_paths("demo", "k", "train", cache_dir=tmp_path / "a"),
        cache_paths("demo", "k", "train", cache_dir=tmp_path / "b"),
        strict=True,
    ):
        assert p.read_bytes() == q.read_bytes()
        assert p.with_name(p.name + ".sha256").read_text() == (
            q.with_name(q.name + ".sha256").read_text()
        )
    assert isinstance(b, np.memmap) and not b.flags.writeable
    np.testing.assert_array_equal(b, images)
    np.testing.assert_array_equal(b_counts, a_counts)
    assert not list((tmp_path / "b").rglob("*.tmp"))


def test_the_file_build_releases_its_pages_and_keeps_the_data(tmp_path, monkeypatch):
    monkeypatch.setattr(imageset, "_RELEASE_BYTES", 1)  # release after every write
    images, counts = _split(1)
    images = _padded(images, counts)
    got, _ = cached_split(
        "demo", "k", "val", _build_into(images, counts, []), cache_dir=tmp_path, into=True
    )
    np.testing.assert_array_equal(got, images)


def test_an_interrupted_build_leaves_no_file_that_is_later_trusted(tmp_path):
    images, counts = _split(2)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        cached_split(
            "demo",
            "k",
            "test",
            _build_into(images, counts, calls, fail_after=2),
            cache_dir=tmp_path,
            into=True,
        )
    folder = tmp_path / "demo"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == []  # no half file
    # a build killed outright (SIGKILL) leaves its temporary file: never read, removed once stale
    image_file, _ = cache_paths("demo", "k", "test", cache_dir=tmp_path)
    dead = folder / (image_file.name + ".abandoned.tmp")
    dead.write_bytes(b"\x93NUMPY half a file")
    os.utime(dead, (time.time() - 2 * 3600,) * 2)
    alive = folder / (image_file.name + ".another-build.tmp")
    alive.write_bytes(b"being written now")
    got, _ = cached_split(
        "demo", "k", "test", _build_into(images, counts, calls), cache_dir=tmp_path, into=True
    )
    assert calls == ["into", "into"]
    np.testing.assert_array_equal(got, _padded(images, counts))
    assert not dead.exists() and alive.exists()
    # a half file at the final name (no checksum beside it) is damaged, not trusted
    image_file.with_name(image_file.name + ".sha256").unlink()
    with pytest.warns(UserWarning, match="is damaged; rebuilding"):
        cached_split(
            "demo", "k", "test", _build_into(images, counts, calls), cache_dir=tmp_path, into=True
        )
    assert len(calls) == 3


def test_an_unwritable_cache_builds_in_memory_with_a_warning(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    images, counts = _split(3)
    with pytest.warns(UserWarning, match="could not write the demo cache"):
        got, got_counts = cached_split(
            "demo", "k", "train", _build_into(images, counts, []), cache_dir=blocker, into=True
        )
    assert type(got) is np.ndarray
    np.testing.assert_array_equal(got, _padded(images, counts))
    np.testing.assert_array_equal(got_counts, counts)


# --- what a hit checks ---------------------------------------------------------------------------


def test_a_hit_hashes_the_cache_once_or_not_at_all(tmp_path, monkeypatch, counted):
    images, counts = _split(4)
    build = _build_into(images, counts, [])
    cached_split("demo", "k", "train", build, cache_dir=tmp_path, into=True)
    image_file, counts_file = cache_paths("demo", "k", "train", cache_dir=tmp_path)
    assert counted["file_sha256"] == [p for p in counted["file_sha256"] if p.endswith(".tmp")]

    for mode, image_passes in (("full", 1), ("auto", 1), ("stamp", 0)):
        monkeypatch.setenv(imageset.VERIFY_ENV, mode)
        counted["file_sha256"].clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cached_split("demo", "k", "train", None, cache_dir=tmp_path)
        assert counted["file_sha256"].count(image_file.name) == image_passes, mode
        assert counted["file_sha256"].count(counts_file.name) == 1  # 8 bytes a class
    monkeypatch.setenv(imageset.VERIFY_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"\$METAGRAD_VERIFY_CACHE must be one of"):
        cache_verify_mode()


def test_a_bit_flip_is_detected_where_the_design_says(tmp_path, monkeypatch):
    images, counts = _split(5)
    calls = []
    build = _build_into(images, counts, calls)
    cached_split("demo", "k", "val", build, cache_dir=tmp_path, into=True)
    image_file, _ = cache_paths("demo", "k", "val", cache_dir=tmp_path)

    # a silent flip (mtime kept) in a file "over 1 GiB": the stamp trusts it, as documented ...
    monkeypatch.setattr(imageset, "FULL_VERIFY_BYTES", 0)
    _flip(image_file, keep_mtime=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        served, _ = cached_split("demo", "k", "val", build, cache_dir=tmp_path, into=True)
    assert calls == ["into"] and not np.array_equal(served, _padded(images, counts))
    # ... and METAGRAD_VERIFY_CACHE=full finds it and rebuilds
    monkeypatch.setenv(imageset.VERIFY_ENV, "full")
    with pytest.warns(UserWarning, match=r"_val\.npy is damaged; rebuilding"):
        rebuilt, _ = cached_split("demo", "k", "val", build, cache_dir=tmp_path, into=True)
    assert calls == ["into", "into"]
    np.testing.assert_array_equal(rebuilt, _padded(images, counts))

    # a write that moves the mtime fails the stamp: then the bytes are hashed, whatever the mode
    monkeypatch.setenv(imageset.VERIFY_ENV, "stamp")
    _flip(image_file)
    with pytest.warns(UserWarning, match="is damaged"):
        cached_split("demo", "k", "val", build, cache_dir=tmp_path, into=True)
    assert len(calls) == 3
    # a touched but intact file is hashed once, found intact, and stamped again (no rebuild)
    os.utime(image_file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_split("demo", "k", "val", build, cache_dir=tmp_path, into=True)
    assert len(calls) == 3
    # silent flips of small files are found by the default mode
    monkeypatch.delenv(imageset.VERIFY_ENV)
    monkeypatch.setattr(imageset, "FULL_VERIFY_BYTES", 1 << 30)
    _flip(image_file, keep_mtime=True)
    with pytest.warns(UserWarning, match="is damaged"):
        cached_split("demo", "k", "val", build, cache_dir=tmp_path, into=True)
    assert len(calls) == 4


# --- memos: fingerprint and source digest --------------------------------------------------------


def _folder(root, classes=("a", "b"), n=3):
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            pixels = np.full((5, 5, 3), 40 * c + j, np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{j}.png", compress_level=0)
    return {"classes": {"train": list(classes)}}


def test_a_hit_reads_no_source_and_does_not_rehash_for_the_fingerprint(tmp_path, counted):
    root = tmp_path / "data"
    expected = _folder(root)
    first = load_image_folder(root, cache_dir=tmp_path / "c", expected=expected, image_size=5)
    assert counted["source_digest"] == 1 and counted["fingerprint"] == 1  # the miss: computed
    plain = {s: np.array(a) for s, a in first.images.items()}
    assert first.fingerprint == fingerprint("folder", plain, first.counts, first.classes)
    counted["fingerprint"] = 0
    again = load_image_folder(root, cache_dir=tmp_path / "c", expected=expected, image_size=5)
    assert counted["source_digest"] == 1 and counted["fingerprint"] == 0  # both read back
    assert again.fingerprint == first.fingerprint


def test_a_damaged_or_stale_fingerprint_memo_is_recomputed(tmp_path, counted):
    images, counts = _split(6)
    got, got_counts = cached_split(
        "demo", "k", "train", _build_into(images, counts, []), cache_dir=tmp_path, into=True
    )
    split = ({"train": got}, {"train": got_counts}, {"train": ("x", "y", "z")})
    true = fingerprint("demo", {"train": np.array(got)}, *split[1:])
    assert fingerprint("demo", *split) == true  # computed and remembered
    (memo,) = (tmp_path / "demo" / "fingerprints").glob("*.json")
    counted["fingerprint"] = 0
    assert fingerprint("demo", *split) == true and counted["fingerprint"] == 0
    memo.write_text(memo.read_text().replace(true, "0" * 64))  # no longer its checksum
    assert fingerprint("demo", *split) == true and counted["fingerprint"] == 1
    assert true in memo.read_text()  # rewritten
    # another split content: another memo, never the old value
    other, other_counts = cached_split(
        "demo", "k2", "train", _build_into(images ^ 1, counts, []), cache_dir=tmp_path, into=True
    )
    assert fingerprint("demo", {"train": other}, {"train": other_counts}, split[2]) != true
    # arrays that are not what cached_split returned are hashed, not looked up
    counted["fingerprint"] = 0
    assert fingerprint("demo", {"train": got[:]}, *split[1:]) == true
    assert counted["fingerprint"] == 1


def test_an_edited_source_is_never_served_stale(tmp_path):
    root = tmp_path / "data"
    expected = _folder(root)
    cache = tmp_path / "c"
    first = load_image_folder(root, cache_dir=cache, expected=expected, image_size=5)
    # same size, same mtime, other pixels: only the ctime (which utime cannot set back) moves
    path = root / "a" / "0.png"
    st = path.stat()
    replacement = tmp_path / "other.png"
    Image.fromarray(np.full((5, 5, 3), 200, np.uint8)).save(replacement, compress_level=0)
    assert replacement.stat().st_size == st.st_size
    path.write_bytes(replacement.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_image_folder(root, cache_dir=cache, expected=expected, image_size=5)
    assert second.fingerprint != first.fingerprint
    assert int(second.images["train"][0, 0].min()) == 200


def test_the_source_memo_returns_the_content_digest(tmp_path, counted):
    files = []
    for name in ("x.bin", "y.bin"):
        (tmp_path / name).write_bytes(name.encode() * 100)
        files.append(tmp_path / name)
    d = cached_source_digest("demo", tmp_path, files, cache_dir=tmp_path / "c")
    assert d == source_digest(tmp_path, files)
    counted["source_digest"] = 0
    assert cached_source_digest("demo", tmp_path, files, cache_dir=tmp_path / "c") == d
    assert counted["source_digest"] == 0
    (memo,) = (tmp_path / "c" / "demo" / "sources").glob("*.json")
    memo.write_text(memo.read_text().replace(d, "f" * 64))  # damaged: checksum fails
    assert cached_source_digest("demo", tmp_path, files, cache_dir=tmp_path / "c") == d
    assert counted["source_digest"] == 1
    (tmp_path / "y.bin").write_bytes(b"edited")
    assert cached_source_digest("demo", tmp_path, files, cache_dir=tmp_path / "c") != d


@pytest.mark.slow
def test_the_image_cache_benchmark_reports_misses_and_hits(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "image_cache.json"
    args = ["--classes=2", "--images=3", "--tiered-classes=2", "--tiered-images=3", "--repeats=1"]
    subprocess.run(
        [sys.executable, "-m", "experiments.bench.image_cache", *args, f"--json={out}"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["load"] for r in rows[:4]] == ["miss", "hit", "hit (full)", "hit (stamp)"]
    assert len(rows) == 12 and all(r["seconds"] > 0 for r in rows)
    for case in {r["case"] for r in rows}:  # every load of a copy gives the same fingerprint
        assert len({r["fingerprint"] for r in rows if r["case"] == case}) == 1
