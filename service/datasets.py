"""Uploaded datasets: parsed and checked at upload, stored in the database, cached by workers.

An upload's memory is budgeted before any array is built. Its shape is read cheaply first
(a CSV's header width and its number of lines; an NPZ's zip entries and .npy headers), and
`memory_estimate` turns it into the bytes that parsing, checking and storing will allocate
at their peak; an estimate over `HPTUNE_MAX_PARSE_BYTES` is refused with a 422 that states
both. Parsing then allocates what the estimate counted: X is built straight as float32 and y
as float64, CSV cells are parsed a block of rows at a time into those arrays (no list of
Python floats), and an NPZ array is read and converted 1 MiB at a time (the source array is
never held whole).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import math
import zipfile
from array import array
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select

from search import JobSpec
from search.datasets import bundled, from_arrays
from search.spec import control_character
from service.db import Database, retrying
from service.errors import Conflict, InvalidSpec, NotFound, QuotaExceeded, TooLarge
from service.models import Job, UploadedDataset, as_utc
from service.settings import Settings
from trainer.datasets import MIN_ROWS, SPLIT

# Targets with at most this many distinct integer values are classes, not a regression target.
MAX_CLASSES = 50
# Most feature columns of a CSV upload (its header has one more, the target): a CSV row is a
# list of cells before it can be checked. An NPZ's width costs only the array memory that
# HPTUNE_MAX_PARSE_BYTES budgets, so it has no bound of its own.
MAX_CSV_FEATURES = 10_000
# Longest CSV column name, in characters (after stripping the spaces around it).
MAX_COLUMN_NAME_CHARS = 200
# Longest CSV data row, in characters per header column: numbers are far shorter; the bound
# keeps one line and its list of cells small whatever the file holds.
MAX_ROW_CHARS_PER_COLUMN = 100
# Most entries an NPZ's zip directory may list: zipfile makes an object of each before
# anything else can be checked.
MAX_NPZ_ENTRIES = 64
# The budget's default (HPTUNE_MAX_PARSE_BYTES), for callers without settings.
DEFAULT_MAX_PARSE_BYTES = 256 << 20

_X_ITEM = 4  # bytes per X value: float32
_Y_ITEM = 8  # bytes per y value: float64 (its stored copy is int64 or float32)
# CSV values parsed into an array('d') before they are checked and copied into X and y.
_CSV_BLOCK_VALUES = 1 << 16
# Bytes of an NPZ array read and converted at a time.
_NPZ_CHUNK_BYTES = 1 << 20
# Bytes of an array handed to the compressor at a time when the checked arrays are stored.
_STORE_CHUNK_BYTES = 1 << 20
_MB = 1e6


def _fail(message: str, field: str = "file") -> InvalidSpec:
    return InvalidSpec(message, field=field)


def memory_estimate(n_rows: int, n_features: int, transient: int = 0) -> int:
    """Bytes that parsing, checking and storing an upload of this shape allocate at their peak,
    besides the upload's own bytes.

    Parsing holds X (float32) and y (float64) plus `transient` bytes (a CSV block and line, an
    NPZ chunk). The checks add np.unique's sorted copy of y and its mask. Storing holds X,
    y's stored copy, a write chunk and the compressed NPZ, which deflate keeps within 0.1%
    (plus headers) of the arrays' size and its buffer may over-allocate by 1/8; the database
    driver may copy that NPZ once more after the arrays are freed.
    """
    x = n_rows * n_features * _X_ITEM
    y = n_rows * _Y_ITEM
    stored = (x + y + (x + y) // 1000 + (64 << 10)) * 9 // 8
    parse = x + y + transient
    check = x + 2 * y + n_rows
    store = x + y + 2 * _STORE_CHUNK_BYTES + stored
    insert = 2 * stored
    return max(parse, check, store, insert)


def csv_memory_estimate(n_lines: int, width: int) -> int:
    """memory_estimate of a CSV with this many lines (one a header) and header columns."""
    return memory_estimate(max(n_lines - 1, 0), width - 1, _csv_transient(width))


def _csv_transient(width: int) -> int:
    # A line (up to 4 bytes a character) and its cells, and a block of parsed values.
    return (4 * _max_row_chars(width) + 80 * 2 * width
            + 2 * _Y_ITEM * (_CSV_BLOCK_VALUES + width))


def _max_row_chars(width: int) -> int:
    return width * MAX_ROW_CHARS_PER_COLUMN + 1024


def npz_memory_estimate(n_rows: int, n_features: int) -> int:
    """memory_estimate of an NPZ whose X has this shape (read and converted 1 MiB at a time)."""
    return memory_estimate(n_rows, n_features, 3 * _NPZ_CHUNK_BYTES)


def _check_budget(estimate: int, limit: int, shape: str) -> None:
    if estimate > limit:
        raise _fail(f"parsing and storing this upload ({shape}) would need an estimated "
                    f"{estimate / _MB:.1f} MB of memory, more than the limit of "
                    f"{limit / _MB:.1f} MB (HPTUNE_MAX_PARSE_BYTES)")


def _check_utf8(raw: bytes) -> None:
    """Refuse text that is not UTF-8, naming the first bad byte, without decoding it whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw)
    step = 1 << 18
    for start in range(0, len(raw), step):
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(view[start:start + step], final=start + step >= len(raw))
        except UnicodeDecodeError as exc:
            raise _fail(f"file is not UTF-8 (invalid byte at position "
                        f"{start - pending + exc.start})") from None


def _count_lines(raw: bytes) -> int:
    """Physical lines as csv counts them (\\n, \\r\\n or a lone \\r ends one): at least its rows."""
    n = raw.count(b"\n")
    if b"\r" in raw:
        n += raw.count(b"\r") - raw.count(b"\r\n")
    return n + 1


class _RowRefused(Exception):
    """A CSV row refused before csv.reader builds its list of cells."""

    def __init__(self, fields: int | None = None, chars: int | None = None) -> None:
        super().__init__(fields, chars)
        self.fields, self.chars = fields, chars


class _BoundedLines:
    """A text stream's lines for csv.reader, a row at most `max_chars` characters and
    `max_fields` comma-separated fields long (counted over its lines until `next_row`).

    csv.reader builds a row's whole list of cells before its width can be checked: 10 MB of
    commas would be a list of ten million strings.
    """

    def __init__(self, stream: io.TextIOBase, max_chars: int, max_fields: int) -> None:
        self.stream, self.max_chars, self.max_fields = stream, max_chars, max_fields
        self.next_row()

    def next_row(self) -> None:
        self._chars = self._commas = 0

    def __iter__(self) -> _BoundedLines:
        return self

    def __next__(self) -> str:
        line = self.stream.readline(self.max_chars - self._chars + 1)
        if not line:
            raise StopIteration
        self._chars += len(line)
        self._commas += line.count(",")
        if self._chars > self.max_chars:
            raise _RowRefused(chars=self.max_chars)
        if self._commas + 1 > self.max_fields:
            raise _RowRefused(fields=self._commas + 1)
        return line


def parse_csv(raw: bytes, target: str | None, max_parse_bytes: int = DEFAULT_MAX_PARSE_BYTES
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Feature matrix (float32), target vector (float64) and feature names of a CSV with a
    header row, refused before parsing if its estimated memory passes `max_parse_bytes`.

    Every problem is reported with its row (1-based, the header is row 1) and column; where a
    file has several, the first in row order.
    """
    if not raw or raw.isspace():
        raise _fail("file is empty")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise _fail(f"file contains a NUL byte at byte {nul}")
    _check_utf8(raw)
    if not target:
        raise _fail("target is required for a CSV upload: the name of the target column",
                    field="target")
    max_columns = MAX_CSV_FEATURES + 1
    lines = _BoundedLines(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig", newline=""),
                          max_chars=max_columns * (MAX_COLUMN_NAME_CHARS + 3),
                          max_fields=max_columns)
    reader = csv.reader(lines)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise _fail("file has no header row") from None
    except _RowRefused as exc:
        if exc.fields is not None:
            raise _fail(f"row 1: {exc.fields} columns, more than {max_columns} (at most "
                        f"{MAX_CSV_FEATURES} features and the target)") from None
        raise _fail(f"row 1: the header is longer than {exc.chars} characters "
                    f"({max_columns} columns of at most {MAX_COLUMN_NAME_CHARS})") from None
    except csv.Error as exc:
        raise _fail(f"row 1: {exc}") from None
    width = len(header)
    if width > max_columns:
        raise _fail(f"row 1: {width} columns, more than {max_columns} (at most "
                    f"{MAX_CSV_FEATURES} features and the target)")
    for i, h in enumerate(header):
        if len(h) > MAX_COLUMN_NAME_CHARS:
            raise _fail(f"row 1: column {i + 1}'s name is {len(h)} characters long, more than "
                        f"{MAX_COLUMN_NAME_CHARS} ({h[:30]!r}...)")
    counts = Counter(header)
    if len(counts) != width:
        dup = next(h for h in header if counts[h] > 1)
        raise _fail(f"row 1: column name {dup!r} appears twice")
    if target not in header:
        raise _fail(f"target column {target!r} is not in the header ({', '.join(header[:20])})",
                    field="target")
    t = header.index(target)
    n_features = width - 1
    # Rows are at most the lines after the header's first.
    n_lines = _count_lines(raw)
    capacity = max(n_lines - 1, 0)
    _check_budget(csv_memory_estimate(n_lines, width), max_parse_bytes,
                  f"up to {capacity} rows x {n_features} features")
    lines.max_chars, lines.max_fields = _max_row_chars(width), 2 * width + 16

    X = np.empty((capacity, n_features), np.float32)
    y = np.empty(capacity, np.float64)
    block = array("d")
    block_rows = array("q")  # the file row number of each row in `block`
    n = 0

    def flush() -> None:
        """Check the block's values and move them into X and y."""
        nonlocal n
        if not block_rows:
            return
        k = len(block_rows)
        values = np.frombuffer(block, dtype=np.float64).reshape(k, width)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            r, c = divmod(int(bad[0]), width)
            raise _fail(f"row {block_rows[r]}, column {header[c]!r}: NaN or infinity is not "
                        f"allowed")
        with np.errstate(over="ignore"):  # overflow to float32 is refused just below
            X[n:n + k, :t] = values[:, :t]
            X[n:n + k, t:] = values[:, t + 1:]
        y[n:n + k] = values[:, t]
        over = np.flatnonzero(~np.isfinite(X[n:n + k]))
        if len(over):
            r, j = divmod(int(over[0]), n_features)
            c = j if j < t else j + 1
            raise _fail(f"row {block_rows[r]}, column {header[c]!r}: {values[r, c]:g} is out "
                        f"of range (features are stored as float32: |value| < 3.4e38)")
        del values  # the view pins `block`, which is emptied next
        n += k
        del block[:]
        del block_rows[:]

    line_no = 1
    while True:
        line_no += 1
        lines.next_row()
        try:
            row = next(reader)
        except StopIteration:
            break
        except _RowRefused as exc:
            flush()  # a problem in an earlier row is reported first
            if exc.fields is not None:
                raise _fail(f"row {line_no}: {exc.fields} fields, expected {width} as in the "
                            f"header") from None
            raise _fail(f"row {line_no}: longer than {exc.chars} characters (at most "
                        f"{MAX_ROW_CHARS_PER_COLUMN} per column)") from None
        except csv.Error as exc:
            flush()
            raise _fail(f"row {line_no}: {exc}") from None
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != width:
            flush()
            raise _fail(f"row {line_no}: {len(row)} fields, expected {width} as in the header")
        try:
            block.fromlist(list(map(float, row)))
        except ValueError:
            flush()
            for col, cell in zip(header, row, strict=True):
                try:
                    float(cell)
                except ValueError:
                    shown = cell if len(cell) <= 30 else cell[:30] + "..."
                    raise _fail(f"row {line_no}, column {col!r}: {shown!r} is not a "
                                f"number") from None
            raise
        block_rows.append(line_no)
        if len(block) >= _CSV_BLOCK_VALUES:
            flush()
    flush()
    if n == 0:
        raise _fail("file has a header but no data rows")
    if n_features == 0:
        raise _fail("file has no feature columns besides the target")
    return X[:n], y[:n], [h for i, h in enumerate(header) if i != t]


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
        raise _fail("file is empty")
    # Every central-directory entry starts with this signature: an upper bound of entries.
    if raw.count(b"PK\x01\x02") > MAX_NPZ_ENTRIES:
        raise _fail(f"NPZ has more than {MAX_NPZ_ENTRIES} entries; it should hold X and y")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            entries = {info.filename.removesuffix(".npy"): info for info in zf.infolist()}
            missing = [k for k in ("X", "y") if k not in entries]
            if missing:
                raise _fail(f"NPZ lacks array(s) {', '.join(missing)}; it has {sorted(entries)}")
            hx = _read_npy_header(zf, entries["X"], "X", max_bytes)
            hy = _read_npy_header(zf, entries["y"], "y", max_bytes - hx.nbytes)
            if len(hx.shape) != 2:
                raise _fail(f"X must be 2-D (rows, features), got shape {list(hx.shape)}")
            if len(hy.shape) != 1:
                raise _fail(f"y must be 1-D, got shape {list(hy.shape)}")
            n_rows, n_features = hx.shape
            if n_rows != hy.shape[0]:
                raise _fail(f"X has {n_rows} rows but y has {hy.shape[0]}")
            if n_features == 0:
                raise _fail("X has no feature columns")
            _check_budget(npz_memory_estimate(n_rows, n_features), max_parse_bytes,
                          f"{n_rows} rows x {n_features} features")
            X = _read_npy_as(zf, hx, np.float32)
            y = _read_npy_as(zf, hy, np.float64)
    except (ValueError, OSError, EOFError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile) as exc:
        raise _fail(f"not a readable NPZ file: {exc}") from None
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
        raise _fail(f"{name} must be real numbers, got dtype {dtype}")
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
    raise _fail(f"array {name}: unsupported .npy format version {version}")


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
                    raise _fail(f"{_npy_place(h, start + int(bad[0]))}: NaN or infinity is "
                                f"not allowed")
            dst = flat[start:start + count]
            with np.errstate(over="ignore"):  # overflow is refused just below
                dst[...] = src
            if narrowing:
                over = np.flatnonzero(~np.isfinite(dst))
                if len(over):
                    k = int(over[0])
                    raise _fail(f"{_npy_place(h, start + k)}: {src[k]:g} is out of range "
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


def infer_task(y: np.ndarray) -> str:
    """multiclass/binary for few integer-valued targets, regression otherwise."""
    return _task_of(np.unique(y))


def _task_of(distinct: np.ndarray) -> str:
    if len(distinct) <= MAX_CLASSES and np.all(distinct == np.round(distinct)):
        return "binary" if len(distinct) == 2 else "multiclass"
    return "regression"


def validate_arrays(X: np.ndarray, y: np.ndarray, task: str) -> None:
    """Refuse data the trainer cannot split or learn from, naming the problem."""
    _check_trainable(len(X), *np.unique(y, return_counts=True), task)


def _check_trainable(n_rows: int, classes: np.ndarray, counts: np.ndarray, task: str) -> None:
    """The checks of trainer.from_arrays, from the class counts alone: it would copy X several
    times over (float64, then each split), which is what the memory budget must not pay for.
    The split sizes follow its rules (tests/service/test_datasets.py compares the two)."""
    if task != "regression" and len(classes) < 2:
        raise _fail(f"the target has a single class ({classes[0]:g}); classification needs two",
                    field="target")
    if n_rows < MIN_ROWS:
        raise _fail(f"dataset cannot be split for training: need at least {MIN_ROWS} rows to "
                    f"split into train/validation/test, got {n_rows}")
    if task == "regression":
        n_val = max(1, round(SPLIT[1] * n_rows))
        n_test = max(1, round(SPLIT[2] * n_rows))
        sizes = (n_rows - n_val - n_test, n_val, n_test)
    else:
        sizes = (0, 0, 0)
        for c in counts.tolist():
            n_val = math.floor(SPLIT[1] * c + 0.5)
            n_test = math.floor(SPLIT[2] * c + 0.5)
            if c - n_val - n_test < 1:  # every class keeps a training row
                n_val = n_test = 0
            sizes = (sizes[0] + c - n_val - n_test, sizes[1] + n_val, sizes[2] + n_test)
    for split, size in zip(("train", "validation", "test"), sizes, strict=True):
        if size < 1:
            raise _fail(f"dataset cannot be split for training: too few rows ({n_rows}) for a "
                        f"non-empty {split} split")


def _compress(X: np.ndarray, y: np.ndarray) -> bytes:
    """The arrays as a compressed NPZ (what numpy.savez_compressed writes), handed to the
    compressor 1 MiB at a time: numpy copies up to 16 MiB of an array per write."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in (("X", X), ("y", y)):
            if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
                arr = np.ascontiguousarray(arr)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array_header_1_0(
                    fh, np.lib.format.header_data_from_array_1_0(arr))
                data = memoryview(np.ravel(arr, order="K")).cast("B")  # no copy: contiguous
                for start in range(0, len(data), _STORE_CHUNK_BYTES):
                    fh.write(data[start:start + _STORE_CHUNK_BYTES])
    return buf.getvalue()  # shares the buffer: no copy


def _check_dataset_quota(session: Any, settings: Settings, owner: str,
                         new_bytes: int | None) -> None:
    """Refuse an upload over the owner's dataset quotas (count, and stored bytes). With
    `new_bytes` None (its size is not known yet) only an owner already at a quota is refused."""
    count, used = session.execute(
        select(func.count(), func.coalesce(func.sum(UploadedDataset.size_bytes), 0))
        .where(UploadedDataset.owner == owner)
    ).one()
    quota = settings.max_datasets_per_owner
    if count + 1 > quota:
        raise QuotaExceeded(f"{owner} already has {count} datasets (quota {quota}, "
                            f"HPTUNE_MAX_DATASETS_PER_OWNER); delete one first", field="file")
    quota = settings.max_dataset_bytes_per_owner
    if new_bytes is None and used >= quota:
        raise QuotaExceeded(f"{owner}'s datasets take {used} bytes, the whole quota of {quota} "
                            f"bytes (HPTUNE_MAX_DATASET_BYTES_PER_OWNER); delete one first",
                            field="file")
    if new_bytes is not None and used + new_bytes > quota:
        raise QuotaExceeded(f"{owner}'s datasets take {used} bytes; this one ({new_bytes} bytes "
                            f"stored) would pass the quota of {quota} bytes "
                            f"(HPTUNE_MAX_DATASET_BYTES_PER_OWNER)", field="file")


def create_dataset(db: Database, owner: str, filename: str, raw: bytes, target: str | None,
                   name: str | None,
                   on_insert: Callable[[Any, int], None] | None = None) -> UploadedDataset:
    """Parse, check and store an upload; answers with the stored row.

    The owner's quotas are checked before parsing (cheaply, to refuse early) and again under
    the owner's lock together with the insert, so that concurrent uploads, on any number of
    API processes, cannot pass them together.
    """
    for field, label, text in (("file", "the file name", filename), ("name", "name", name)):
        bad = control_character(text or "")
        if bad is not None:
            raise _fail(f"{label} must not contain control characters (found {bad})", field)
    settings = db.settings
    with db.session() as s:
        _check_dataset_quota(s, settings, owner, None)
    is_npz = filename.lower().endswith(".npz") or raw[:4] == b"PK\x03\x04"
    if is_npz:
        X, y, features = parse_npz(raw, settings.max_upload_bytes, settings.max_parse_bytes)
    else:
        X, y, features = parse_csv(raw, target, settings.max_parse_bytes)
    classes, counts = np.unique(y, return_counts=True)
    task = _task_of(classes)
    _check_trainable(len(X), classes, counts, task)
    n_rows, n_features = X.shape
    n_classes = len(classes) if task != "regression" else 1
    y = y.astype(np.int64) if task != "regression" else y.astype(np.float32)
    del classes, counts
    content = _compress(X, y)
    del X, y  # the insert below may copy `content` once more
    row = UploadedDataset(
        owner=owner, name=(name or filename or "upload")[:200], filename=filename[:200],
        format="npz" if is_npz else "csv", target=target if not is_npz else None,
        task=task, n_rows=n_rows, n_features=n_features, n_classes=n_classes,
        features=features[:1000], sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content), content=content,
    )
    with db.owner_session(owner) as s:
        _check_dataset_quota(s, settings, owner, len(content))
        s.add(row)
        s.flush()
        if on_insert is not None:
            # In the insert's transaction (idempotency.Claim.record): both commit, or neither.
            on_insert(s, row.id)
        s.expunge(row)
    return row


def get_dataset(db: Database, owner: str | None, dataset_id: int) -> UploadedDataset:
    with db.session() as s:
        row = s.get(UploadedDataset, dataset_id)
    if row is None or (owner is not None and row.owner != owner):
        raise NotFound(f"no dataset {dataset_id}")
    return row


def list_datasets(db: Database, owner: str | None) -> list[UploadedDataset]:
    with db.session() as s:
        q = select(UploadedDataset).order_by(UploadedDataset.id)
        if owner is not None:
            q = q.where(UploadedDataset.owner == owner)
        return list(s.scalars(q))


def dataset_exists(session: Any, dataset_id: int) -> bool:
    """Whether the dataset is stored (read in the caller's session, e.g. under a lock)."""
    return session.scalar(select(UploadedDataset.id)
                          .where(UploadedDataset.id == dataset_id)) is not None


def delete_dataset(db: Database, owner: str | None, dataset_id: int) -> None:
    """Delete an uploaded dataset (`owner` None: any owner's), unless an active job uses it.

    Only its owner's jobs can name it (jobs._check_spec looks datasets up owner-scoped), so
    the check and the delete hold that owner's lock: a job submitted meanwhile either counts
    here or, once the dataset is gone, is refused at submission.
    """
    from service.jobs import ACTIVE  # service.jobs imports this module

    with db.session() as s:
        ds_owner = s.scalar(select(UploadedDataset.owner)
                            .where(UploadedDataset.id == dataset_id))
    if ds_owner is None or (owner is not None and ds_owner != owner):
        raise NotFound(f"no dataset {dataset_id}")
    with db.owner_session(ds_owner) as s:
        active = s.execute(select(Job.id, Job.spec)
                           .where(Job.owner == ds_owner, Job.status.in_(ACTIVE))).all()
        using = [job_id for job_id, spec in active
                 if isinstance(spec, dict) and type(spec.get("dataset")) is int
                 and spec["dataset"] == dataset_id]
        if using:
            raise Conflict(f"dataset {dataset_id} is used by active job(s) "
                           f"{', '.join(map(str, sorted(using)))}; cancel them or let them "
                           f"finish first")
        deleted = s.execute(delete(UploadedDataset)
                            .where(UploadedDataset.id == dataset_id)).rowcount
    if not deleted:
        raise NotFound(f"no dataset {dataset_id}")


def dataset_public(row: UploadedDataset) -> dict[str, Any]:
    return {
        "id": row.id, "name": row.name, "owner": row.owner, "filename": row.filename,
        "format": row.format, "target": row.target, "task": row.task, "n_rows": row.n_rows,
        "n_features": row.n_features, "n_classes": row.n_classes, "sha256": row.sha256,
        "size_bytes": row.size_bytes, "created_at": as_utc(row.created_at),
    }


# Split datasets by (content hash, seed): every trial of a job reuses the same arrays.
_CACHE: dict[tuple[str, int], Any] = {}
_CACHE_MAX = 8


def load_job_dataset(db: Database, spec: JobSpec):
    """The trainer Dataset a job trains on: bundled by name, or uploaded by id (cached by hash)."""
    if isinstance(spec.dataset, str):
        return bundled(spec.dataset, spec.seed)

    def fetch_meta() -> tuple[str, str]:
        with db.session() as s:
            row = s.execute(select(UploadedDataset.sha256, UploadedDataset.task)
                            .where(UploadedDataset.id == spec.dataset)).first()
        if row is None:
            raise NotFound(f"no dataset {spec.dataset}")
        return row.sha256, row.task

    sha, task = retrying(fetch_meta)
    key = (sha, spec.seed)
    if key not in _CACHE:
        def fetch_content() -> bytes:
            with db.session() as s:
                return s.scalar(select(UploadedDataset.content)
                                .where(UploadedDataset.id == spec.dataset))
        with np.load(io.BytesIO(retrying(fetch_content)), allow_pickle=False) as npz:
            data = from_arrays(npz["X"], npz["y"], seed=spec.seed,
                               name=f"upload-{spec.dataset}", task=task)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = data
    return _CACHE[key]
