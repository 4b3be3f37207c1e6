"""NPZ uploads: arrays `X` and `y`, sized from their zip entries and .npy headers before
anything is unpacked, then read and converted a chunk at a time, without unpickling."""

from __future__ import annotations

import io
import math
import zipfile
from typing import Any

import numpy as np

from service.errors import TooLarge
from service.uploads import DEFAULT_MAX_PARSE_BYTES, check_budget, fail, memory_estimate

# Most entries an NPZ's zip directory may list: zipfile makes an object of each before
# anything else can be checked.
MAX_NPZ_ENTRIES = 64# Bytes of an NPZ array read and converted at a time.
_NPZ_CHUNK_BYTES = 1 << 20


def npz_memory_estimate(n_rows: int, n_features: int) -> int:
    """memory_estimate of an NPZ whose X has this shape (read and converted 1 MiB at a time)."""
    return memory_estimate(n_rows, n_features, 3 * _NPZ_CHUNK_BYTES)


class _NpyHeader:
    """One .npy entry of an NPZ, as its zip entry and its header describe it."""

    def __init__(self, entry: zipfile.ZipInfo, name: str, shape: tuple[int, ...],
                 fortran_order: bool, dtype: np.dtype) -> None:
        self.entry, self.name, self.shape = entry, name, shape
        self.fortran_order, self.dtype = fortran_order, dtype
        self.nbytes = math.prod(shape) * dtype.itemsize


def parse_npz(raw: bytes, max_bytes: int, max_parse_bytes: int = DEFAULT_MAX_PARSE_BYTES
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Arrays `X` (rows, features) as float32 and `y` (rows,) as float64 of an NPZ file,
    without unpickling.

    Each array's size is read from its zip entry and its .npy header before anything is
    unpacked: together they may take at most `max_bytes` (else 413), and the memory that
    converting, checking and storing them needs at most `max_parse_bytes` (else 422), so
    neither a header that claims a huge shape nor a small file that inflates to gigabytes
    makes the server allocate them. The arrays are then read and converted a chunk at a time.
    """
    if not raw:
        raise fail("file is empty")
    # Every central-directory entry starts with this signature: an upper bound of entries.
    if raw.count(b"PK\x01\x02") > MAX_NPZ_ENTRIES:
        raise fail(f"NPZ has more than {MAX_NPZ_ENTRIES} entries; it should hold X and y")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            entries = {info.filename.removesuffix(".npy"): info for info in zf.infolist()}
            missing = [k for k in ("X", "y") if k not in entries]
            if missing:
                raise fail(f"NPZ lacks array(s) {', '.join(missing)}; it has {sorted(entries)}")
            hx = _read_npy_header(zf, entries["X"], "X", max_bytes)
            hy = _read_npy_header(zf, entries["y"], "y", max_bytes - hx.nbytes)
            if len(hx.shape) != 2:
                raise fail(f"X must be 2-D (rows, features), got shape {list(hx.shape)}")
            if len(hy.shape) != 1:
                raise fail(f"y must be 1-D, got shape {list(hy.shape)}")
            n_rows, n_features = hx.shape
            if n_rows != hy.shape[0]:
                raise fail(f"X has {n_rows} rows but y has {hy.shape[0]}")
            if n_features == 0:
                raise fail("X has no feature columns")
            check_budget(npz_memory_estimate(n_rows, n_features), max_parse_bytes,
                         f"{n_rows} rows x {n_features} features")
            X = _read_npy_as(zf, hx, np.float32)
            y = _read_npy_as(zf, hy, np.float64)
    except (ValueError, OSError, EOFError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile) as exc:
        raise fail(f"not a readable NPZ file: {exc}") from None
    except MemoryError:
        raise TooLarge("NPZ arrays too large to unpack", field="file") from None
    return X, y, [f"x{i}" for i in range(n_features)]


def _read_npy_header(zf: zipfile.ZipFile, entry: zipfile.ZipInfo, name: str, max_bytes: int
                     ) -> _NpyHeader:
    """One array's header, refused from its sizes before anything of it is unpacked."""
    if entry.file_size > max_bytes:
        raise TooLarge(f"array {name} unpacks to {entry.file_size} bytes, more than the "
                       f"{max_bytes} bytes left of the upload limit", field="file")
    with zf.open(entry) as fh:
        shape, fortran_order, dtype = _read_npy_fields(fh, name)
    if not np.issubdtype(dtype, np.number) or dtype.kind == "c":
        raise fail(f"{name} must be real numbers, got dtype {dtype}")
    header = _NpyHeader(entry, name, tuple(shape), bool(fortran_order), dtype)
    if header.nbytes > max_bytes:
        raise TooLarge(f"array {name} has shape {list(shape)}: {header.nbytes} bytes, more "
                       f"than the {max_bytes} bytes left of the upload limit", field="file")
    return header


def _read_npy_fields(fh: Any, name: str) -> tuple[Any, bool, np.dtype]:
    """Shape, Fortran order and dtype of a .npy stream, leaving it at the array's data."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    raise fail(f"array {name}: unsupported .npy format version {version}")


def _read_npy_as(zf: zipfile.ZipFile, h: _NpyHeader, out_dtype: type[np.floating]
                 ) -> np.ndarray:
    """The array converted to `out_dtype` a chunk at a time, refusing NaN, infinity and values
    out of `out_dtype`'s range with the (first) row and column, in the file's element order."""
    out = np.empty(h.shape, out_dtype, order="F" if h.fortran_order else "C")
    flat = np.ravel(out, order="K")  # a view, in the file's element order
    per_chunk = max(1, _NPZ_CHUNK_BYTES // h.dtype.itemsize)
    # Only a wider float can overflow the target type (int64's largest is far below 3.4e38).
    narrowing = h.dtype.kind == "f" and h.dtype.itemsize > np.dtype(out_dtype).itemsize
    with zf.open(h.entry) as fh:
        _read_npy_fields(fh, h.name)
        for start in range(0, flat.size, per_chunk):
            count = min(per_chunk, flat.size - start)
            data = fh.read(count * h.dtype.itemsize)
            if len(data) != count * h.dtype.itemsize:
                raise ValueError(f"EOF: array {h.name} has {start + len(data) // h.dtype.itemsize}"
                                 f" of the {flat.size} values its header claims")
            src = np.frombuffer(data, dtype=h.dtype)
            if h.dtype.kind == "f":
                bad = np.flatnonzero(~np.isfinite(src))
                if len(bad):
                    raise fail(f"{_npy_place(h, start + int(bad[0]))}: NaN or infinity is "
                               f"not allowed")
            dst = flat[start:start + count]
            with np.errstate(over="ignore"):  # overflow is refused just below
                dst[...] = src
            if narrowing:
                over = np.flatnonzero(~np.isfinite(dst))
                if len(over):
                    k = int(over[0])
                    raise fail(f"{_npy_place(h, start + k)}: {src[k]:g} is out of range "
                               f"for {np.dtype(out_dtype).name}")
    return out


def _npy_place(h: _NpyHeader, k: int) -> str:
    """'X row r, column c' or 'y row r' of the k-th element in the file's order."""
    if len(h.shape) == 1:
        return f"{h.name} row {k}"
    rows, cols = h.shape
    if h.fortran_order:
        c, r = divmod(k, rows)
    else:
        r, c = divmod(k, cols)
    return f"{h.name} row {r}, column {c}"
