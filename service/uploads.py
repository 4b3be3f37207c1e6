"""Upload checks shared by the CSV and NPZ parsers (service.uploads_csv, service.uploads_npz):
the memory budget, the task a target implies, the split check and the stored NPZ. No database
and no HTTP: tests call these functions directly; service.datasets stores what they return.

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

import io
import math
import zipfile

import numpy as np

from service.errors import InvalidSpec
from trainer import Task
from trainer.datasets import MAX_CLASSES_INFERRED, MIN_ROWS, SPLIT

# The budget's default (HPTUNE_MAX_PARSE_BYTES), for callers without settings.
DEFAULT_MAX_PARSE_BYTES = 256 << 20

X_ITEM = 4  # bytes per X value: float32
Y_ITEM = 8  # bytes per y value: float64 (its stored copy is int64 or float32)
# Bytes of an array handed to the compressor at a time when the checked arrays are stored.
_STORE_CHUNK_BYTES = 1 << 20
MB = 1e6


def fail(message: str, field: str = "file") -> InvalidSpec:
    """An upload refused with a 422 naming `field`."""
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
    x = n_rows * n_features * X_ITEM
    y = n_rows * Y_ITEM
    stored = (x + y + (x + y) // 1000 + (64 << 10)) * 9 // 8
    parse = x + y + transient
    check = x + 2 * y + n_rows
    store = x + y + 2 * _STORE_CHUNK_BYTES + stored
    insert = 2 * stored
    return max(parse, check, store, insert)


def check_budget(estimate: int, limit: int, shape: str) -> None:
    if estimate > limit:
        raise fail(f"parsing and storing this upload ({shape}) would need an estimated "
                   f"{estimate / MB:.1f} MB of memory, more than the limit of "
                   f"{limit / MB:.1f} MB (HPTUNE_MAX_PARSE_BYTES)")


def task_of(distinct: np.ndarray) -> Task:
    """multiclass/binary for few integer-valued distinct target values (np.unique of y),
    regression otherwise, by the trainer's rule (trainer.datasets.MAX_CLASSES_INFERRED)."""
    if len(distinct) <= MAX_CLASSES_INFERRED and np.all(distinct == np.round(distinct)):
        return Task.BINARY if len(distinct) == 2 else Task.MULTICLASS
    return Task.REGRESSION


def validate_arrays(X: np.ndarray, y: np.ndarray, task: str) -> None:
    """Refuse data the trainer cannot split or learn from, naming the problem."""
    check_trainable(len(X), *np.unique(y, return_counts=True), task)


def check_trainable(n_rows: int, classes: np.ndarray, counts: np.ndarray, task: str) -> None:
    """The checks of trainer.from_arrays, from the class counts alone: it would copy X several
    times over (float64, then each split), which is what the memory budget must not pay for.
    The split sizes follow its rules (tests/service/test_uploads_parsing.py compares the two)."""
    if task != Task.REGRESSION and len(classes) < 2:
        raise fail(f"the target has a single class ({classes[0]:g}); classification needs two",
                   field="target")
    if n_rows < MIN_ROWS:
        raise fail(f"dataset cannot be split for training: need at least {MIN_ROWS} rows to "
                   f"split into train/validation/test, got {n_rows}")
    if task == Task.REGRESSION:
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
            raise fail(f"dataset cannot be split for training: too few rows ({n_rows}) for a "
                       f"non-empty {split} split")


def compress(X: np.ndarray, y: np.ndarray) -> bytes:
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
