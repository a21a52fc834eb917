"""Large splits are read from disk by rows: the same pixels as in memory, decoded once, bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from synthmed.core.io import SynthmedError
from synthmed.data.arrays import DiskArray, arrays_root
from synthmed.data.metadata import read_metadata
from synthmed.data.prepared import load_split


@pytest.fixture()
def pair(tmp_path):
    ref = np.random.default_rng(0).integers(0, 255, (23, 5, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", ref)
    return ref, DiskArray(tmp_path / "a.npy")


@pytest.mark.parametrize("key", [0, 7, -1, -23, slice(None), slice(3, 11), slice(2, 20, 3), slice(None, None, -2), slice(20, 3, -4), slice(30, 40),
                                 [4, 1, 4, 22], np.array([[0, 5], [6, 2]]), np.arange(23) % 3 == 0, (slice(1, 4), 2), (np.array([3, 1]), slice(None), 1),
                                 (Ellipsis, 0), (Ellipsis, None), None])
def test_disk_array_indexes_like_numpy(pair, key):
    ref, arr = pair
    want = ref[key]
    got = arr[key]
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


def test_disk_array_whole_and_iteration(pair):
    ref, arr = pair
    assert (arr.shape, arr.dtype, arr.ndim, len(arr), arr.nbytes) == (ref.shape, ref.dtype, 4, 23, ref.nbytes)
    assert np.array_equal(np.asarray(arr), ref) and np.array_equal(np.stack(list(arr)), ref)
    assert np.array_equal(arr.astype(np.float32), ref.astype(np.float32))
    with pytest.raises(IndexError):
        arr[23]
    with pytest.raises(IndexError):
        arr[[0, 23]]


def test_large_splits_read_from_disk_give_the_same_split(phantom_data, monkeypatch):
    monkeypatch.setenv("SYNTHMED_LAZY_BYTES", str(1 << 40))  # small: in memory
    memory = load_split(phantom_data, "train")
    assert isinstance(memory.images, np.ndarray)
    monkeypatch.setenv("SYNTHMED_LAZY_BYTES", "0")  # every split counts as large
    lazy = load_split(phantom_data, "train")
    assert isinstance(lazy.images, DiskArray) and isinstance(lazy.masks, DiskArray)
    assert lazy.rows == memory.rows
    assert np.array_equal(np.asarray(lazy.images), memory.images) and np.array_equal(np.asarray(lazy.masks), memory.masks)
    assert np.array_equal(lazy.images[[5, 1]], memory.images[[5, 1]])
    (folder,) = [p for p in arrays_root().iterdir() if (p / "done.json").is_file() and p.name in str(lazy.images.path)]
    stamp = (folder / "images.npy").stat().st_mtime_ns
    again = load_split(phantom_data, "train")  # decoded once: the second load reads the same files
    assert again.images.path == lazy.images.path and (folder / "images.npy").stat().st_mtime_ns == stamp
    assert again.images.digest == lazy.images.digest and len(lazy.images.digest) == 64
    limited = load_split(phantom_data, "train", limit=5)
    assert limited.images.path != lazy.images.path and np.array_equal(np.asarray(limited.images), memory.images[:5])


def test_an_edited_file_is_decoded_again(phantom_data, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "copy"
    shutil.copytree(phantom_data, data)
    monkeypatch.setenv("SYNTHMED_LAZY_BYTES", "0")
    before = load_split(data, "train")
    row = read_metadata(data / "train" / "metadata.jsonl")[3]
    edited = np.asarray(before.images[3]).copy()
    edited[:8] = 255
    Image.fromarray(edited).save(data / "train" / row["file_name"])
    after = load_split(data, "train")
    assert after.images.path != before.images.path
    assert np.array_equal(after.images[3], edited) and np.array_equal(after.images[4], before.images[4])


def test_a_file_of_another_size_is_named_in_the_lazy_path_too(phantom_data, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "copy"
    shutil.copytree(phantom_data, data)
    row = read_metadata(data / "train" / "metadata.jsonl")[2]
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(data / "train" / row["file_name"])
    messages = []
    for lazy in ("0", str(1 << 40)):
        monkeypatch.setenv("SYNTHMED_LAZY_BYTES", lazy)
        with pytest.raises(SynthmedError) as err:
            load_split(data, "train")
        messages.append(str(err.value))
    assert messages[0] == messages[1] and f"{row['file_name']}: size 40x40 differs from" in messages[0]
    assert not [p for p in arrays_root().glob(".*partial")]  # a refused decode leaves nothing


def test_a_pass_over_a_disk_array_keeps_resident_memory_bounded(tmp_path):
    """Reading 400 MB by rows adds far less than 400 MB to the peak resident memory (no memory map)."""
    big = tmp_path / "big.npy"
    rows = np.lib.format.open_memmap(big, mode="w+", dtype=np.uint8, shape=(1600, 512, 512))
    rows[:] = 7
    del rows
    script = ("import resource, numpy as np, sys; from synthmed.data.arrays import DiskArray;"
              "a = DiskArray(sys.argv[1]); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
              "total = sum(int(a[i:i + 64].sum(dtype=np.int64)) for i in range(0, len(a), 64));"
              "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; print(total, (after - before) // 1024)")
    out = subprocess.run([sys.executable, "-c", script, str(big)], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    total, grown_mb = map(int, out.stdout.split())
    assert total == 7 * 1600 * 512 * 512
    assert grown_mb < 120, f"peak RSS grew by {grown_mb} MB reading a 400 MB array by rows"


def test_disk_array_does_what_an_array_does_by_reading_it_whole(pair):
    ref, arr = pair
    assert arr.max() == ref.max() and np.array_equal(arr.ravel(), ref.ravel()) and arr.mean() == ref.mean()
    assert np.array_equal(arr > 100, ref > 100) and np.array_equal(arr == 3, ref == 3) and int((arr == ref).sum()) == ref.size
    assert np.array_equal(np.stack([arr[0], arr[1]]), ref[:2]) and np.array_equal(np.concatenate([arr, ref]), np.concatenate([ref, ref]))
    assert np.array_equal(arr + 1, ref + 1) and np.array_equal(np.unique(arr), np.unique(ref)) and np.array_equal(np.isin(arr, [3, 4]), np.isin(ref, [3, 4]))


def test_code_counts_read_by_rows_equal_one_bincount(tmp_path):
    from synthmed.data.arrays import code_counts

    class RowsOnly(DiskArray):
        def __array__(self, dtype=None, copy=None):
            raise AssertionError("read whole")

    masks = np.random.default_rng(5).integers(0, 7, (19, 6, 5), dtype=np.uint8)
    np.save(tmp_path / "m.npy", masks)
    want = np.bincount(masks.ravel(), minlength=7)
    assert np.array_equal(code_counts(RowsOnly(tmp_path / "m.npy"), 7, chunk=4), want)
    assert np.array_equal(code_counts(masks, 5), want[:5])  # codes beyond n_codes are not counted
    assert code_counts(masks[:0], 3).tolist() == [0, 0, 0]


def test_rows_only_mode_refuses_a_whole_read_but_not_batches(pair, monkeypatch):
    ref, arr = pair
    monkeypatch.setenv("SYNTHMED_ROWS_ONLY", "1")
    assert np.array_equal(arr[3:9], ref[3:9]) and np.array_equal(np.stack(list(arr)), ref)  # rows and iteration still work
    with pytest.raises(RuntimeError, match=r"a\.npy: read whole \(23 rows\)"):
        np.asarray(arr)
    with pytest.raises(RuntimeError, match="read whole"):
        arr.max()
