"""A split's pixels on disk: one .npy per split and kind (images, masks), written once, read by rows.

`load_split` keeps small splits in memory. A split larger than `lazy_bytes()` (default 1 GiB of uint8 pixels;
$SYNTHMED_LAZY_BYTES) is decoded once into `SYNTHMED_CACHE/arrays/<fingerprint>/` and read back as `DiskArray`s:
indexing reads only the rows asked for (positioned reads, no memory map, so a pass over 16,000 images at 512 px
does not grow the process's resident memory), and `np.asarray` still gives the whole array to code that needs it.
The fingerprint covers the metadata file, every referenced file's size and modification time and the pixel rules,
so an edited set is decoded again; the prepared folder itself is never written to (it may be read-only or shared).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from synthmed.core.environment import cache_root
from synthmed.core.io import read_json, write_json

LAZY_ENV = "SYNTHMED_LAZY_BYTES"
ROWS_ONLY_ENV = "SYNTHMED_ROWS_ONLY"  # "1": reading a split on disk whole is an error (benchmarks/scale.py checks with it)
DEFAULT_LAZY_BYTES = 1 << 30
READ_ROWS = 256  # rows per positioned read when a whole range is asked for
_VERSION = "1"  # bump when the pixel rules (data/images.py) or this file format change


def lazy_bytes() -> int:
    """Splits with more uint8 pixel bytes than this are read from disk by rows."""
    value = os.environ.get(LAZY_ENV)
    return int(value) if value not in (None, "") else DEFAULT_LAZY_BYTES


def arrays_root() -> Path:
    """The decoded splits' folder in the synthmed cache (core.environment.cache_root)."""
    return cache_root() / "arrays"


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-ordered .npy file, for positioned reads of its rows."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if fortran:
        raise ValueError(f"npy_header expects a C-ordered array, but {path} is Fortran-ordered")
    return tuple(shape), dtype, offset


def code_counts(masks, n_codes: int, chunk: int = 256) -> np.ndarray:
    """(n_codes,) int64 pixel count of each code 0..n_codes-1 over (N, H, W) masks, read `chunk` rows at a time
    (a split on disk is never read whole); codes >= n_codes are not counted."""
    counts = np.zeros(n_codes, np.int64)
    for start in range(0, len(masks), chunk):
        counts += np.bincount(np.asarray(masks[start : start + chunk]).ravel(), minlength=n_codes)[:n_codes]
    return counts


class DiskArray(np.lib.mixins.NDArrayOperatorsMixin):  # operators go through __array_ufunc__
    """(N, ...) rows of a .npy file. `a[i]`, `a[i:j]`, `a[index array]`, `a[bool mask]` read only those rows;
    `np.asarray(a)` reads everything. `digest` is the sha256 of the rows' bytes (a content key for caches)."""

    def __init__(self, path: Path, digest: str | None = None):
        self.path, self.digest = Path(path), digest
        self.shape, self.dtype, self.offset = npy_header(self.path)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DiskArray({self.path}, shape={self.shape}, dtype={self.dtype})"

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 in one read."""
        n = max(0, stop - start)
        with open(self.path, "rb") as fh:
            data = os.pread(fh.fileno(), n * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape(n, *self.shape[1:]).copy()

    def take(self, idx) -> np.ndarray:
        """Rows at integer positions `idx` (any order, repeats allowed), each read once."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} rows")
        idx = np.where(idx < 0, idx + len(self), idx)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        with open(self.path, "rb") as fh:
            for pos, i in enumerate(idx.tolist()):
                out[pos] = np.frombuffer(os.pread(fh.fileno(), self.row_bytes, self.offset + i * self.row_bytes), self.dtype).reshape(self.shape[1:])
        return out

    def __getitem__(self, key):
        first = key[0] if isinstance(key, tuple) and key else key
        if first is Ellipsis or first is None:  # x[..., k], x[None]: numpy's own indexing of the whole array
            return np.asarray(self)[key]
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {int(key)} out of range for {len(self)} rows")
            out = self._rows(i, i + 1)[0]
            return out[rest] if rest else out
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            out = self._rows(start, stop)[::step] if step > 0 else self.take(np.arange(start, stop, step))
        else:
            arr = np.asarray(key)
            if arr.dtype == bool:
                if arr.shape != (len(self),):
                    raise IndexError(f"boolean index of shape {arr.shape} for {len(self)} rows")
                arr = np.flatnonzero(arr)
            out = self.take(arr).reshape(*np.shape(arr), *self.shape[1:])
        return out[(slice(None), *rest)] if rest else out

    def __iter__(self):
        for start in range(0, len(self), READ_ROWS):
            yield from self._rows(start, min(len(self), start + READ_ROWS))

    def __array__(self, dtype=None, copy=None):
        if os.environ.get(ROWS_ONLY_ENV) == "1":
            raise RuntimeError(f"{self.path}: read whole ({len(self)} rows) while ${ROWS_ONLY_ENV}=1: this step does not stream")
        out = self._rows(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    # Anything else an ndarray does (methods, operators, ufuncs, numpy functions) works on the whole array, read
    # once: correct everywhere, bounded only where a consumer indexes in batches (the large-data paths do).
    def __getattr__(self, name):
        if name.startswith("__") or name in ("path", "digest", "shape", "dtype", "offset", "row_bytes"):
            raise AttributeError(name)
        return getattr(np.asarray(self), name)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(np.asarray(x) if isinstance(x, DiskArray) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        def load(x):
            if isinstance(x, DiskArray):
                return np.asarray(x)
            if isinstance(x, (list, tuple)):
                return type(x)(load(y) for y in x)
            return x

        return func(*load(args), **{k: load(v) for k, v in kwargs.items()})



class Rows:
    """Chosen rows of an (N, ...) array (in memory or a DiskArray), read only when indexed, optionally mapped
    through a lookup table as they are read (`lut[rows]`: mask codes of merged classes). A study's pools are
    Rows of the train split: a fraction, its held-out patients or a synthetic set cost no memory until a batch
    is drawn. `a[i]`, `a[i:j]`, `a[index array]`, `a[bool mask]` read those rows; `subset(idx)` is a smaller
    view; iteration reads READ_ROWS rows at a time; `np.asarray(a)` reads everything."""

    def __init__(self, base, idx=None, lut: np.ndarray | None = None):
        self.base, self.lut = base, lut
        self.idx = np.arange(len(base)) if idx is None else np.asarray(idx, dtype=np.int64).reshape(-1)
        self.shape = (len(self.idx), *base.shape[1:])
        self.dtype = base.dtype if lut is None else lut.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.idx)

    def __repr__(self) -> str:
        return f"Rows({len(self)} of {self.base!r})"

    def subset(self, idx) -> Rows:
        """The rows at positions `idx` of this view (indices or a boolean mask), as a view."""
        idx = np.asarray(idx)
        return Rows(self.base, self.idx[np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)], self.lut)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.asarray(self.base[rows])  # a DiskArray reads just these rows
        return out if self.lut is None else self.lut[out]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._read(self.idx[[key]])[0]
        if isinstance(key, slice):
            return self._read(self.idx[key])
        key = np.asarray(key)
        rows = self.idx[np.flatnonzero(key) if key.dtype == bool else key.astype(np.int64)]
        return self._read(rows.reshape(-1)).reshape(*rows.shape, *self.shape[1:])

    def __iter__(self):
        for start in range(0, len(self), READ_ROWS):
            yield from self[start : start + READ_ROWS]

    def __array__(self, dtype=None, copy=None):
        out = self._read(self.idx)
        return out if dtype is None else out.astype(dtype)


def take_rows(a, idx):
    """`a[idx]` as a view where `a` is Rows (nothing read), else numpy's indexing (a copy)."""
    return a.subset(idx) if isinstance(a, Rows) else a[idx]


def fingerprint(folder: Path, rows: list[dict], keys: tuple[str, ...], extra: str = "") -> str:
    """What a split's arrays depend on: its metadata, each referenced file's name, size and mtime, the rules."""
    h = hashlib.sha256((_VERSION + extra).encode())
    meta = folder / "metadata.jsonl"
    h.update(meta.read_bytes() if meta.is_file() else b"")
    for r in rows:
        for k in keys:
            if r.get(k):
                st = (folder / r[k]).stat()
                h.update(f"{r[k]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def split_arrays(key: str, n: int, readers: dict[str, callable]) -> dict[str, DiskArray]:
    """{kind: DiskArray} of n rows each, decoded once by readers[kind](i) -> row and kept under arrays_root()/key."""
    folder = arrays_root() / key
    done = folder / "done.json"
    if done.is_file():
        record = read_json(done)
        return {kind: DiskArray(folder / f"{kind}.npy", record["digests"][kind]) for kind in readers}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{key}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        digests = {kind: _write_rows(tmp / f"{kind}.npy", n, read) for kind, read in readers.items()}
        write_json(tmp / "done.json", {"n": n, "digests": digests})
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same arrays first: theirs are identical
            if not (folder / "done.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return split_arrays(key, n, readers)


def _write_rows(path: Path, n: int, read) -> str:
    """Write read(0..n-1) as one (n, ...) .npy, streaming (one row in memory); -> sha256 of the rows' bytes."""
    first = np.ascontiguousarray(read(0))
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                                                  "shape": (n, *first.shape)})
        for i in range(n):
            row = first if i == 0 else np.ascontiguousarray(read(i))
            if row.shape != first.shape or row.dtype != first.dtype:
                raise ValueError(f"row {i}: {row.shape} {row.dtype}, but row 0 is {first.shape} {first.dtype}")
            data = row.tobytes()
            h.update(data)
            fh.write(data)
    return h.hexdigest()
