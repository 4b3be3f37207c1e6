"""Upload parsing in process: parse_csv and parse_npz called directly, their error messages,
the memory estimate (stated, checked before the work, and not exceeded), linear header
checks, and the split check against trainer.from_arrays."""

from __future__ import annotations

import io
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from service import uploads
from service.datasets import create_dataset
from service.db import Database
from service.errors import InvalidSpec, TooLarge
from service.migrate import upgrade
from service.models import UploadedDataset
from service.settings import Settings
from service.uploads import memory_estimate
from service.uploads_csv import MAX_CSV_FEATURES, csv_memory_estimate, parse_csv
from service.uploads_npz import npz_memory_estimate, parse_npz
from trainer import from_arrays


def _csv(rows) -> bytes:
    return "\n".join(",".join(map(str, r)) for r in rows).encode()


def _npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _error(fn, *args, **kwargs) -> InvalidSpec:
    with pytest.raises(InvalidSpec) as info:
        fn(*args, **kwargs)
    return info.value


TAIL = [[i, i % 2] for i in range(20)]

# (case, raw, target, field, the whole message or its start)
CSV_ERRORS = [
    ("empty", b"", "label", "file", "file is empty"),
    ("blank", b" \n\t\r\n", "label", "file", "file is empty"),
    ("nul", b"a,label\n1,0\n\x00,1\n", "label", "file", "file contains a NUL byte at byte 12"),
    ("latin1", "a,label\n1,0\n\xe9,1\n".encode("latin-1"), "label", "file",
     "file is not UTF-8 (invalid byte at position 12)"),
    ("no-target", _csv([["a", "label"], [1, 0]]), None, "target",
     "target is required for a CSV upload"),
    ("bom-only", b"\xef\xbb\xbf", "label", "file", "file has no header row"),
    ("duplicate", _csv([["a", "b", "b", "a", "label"], [1, 2, 3, 4, 0]]), "label", "file",
     "row 1: column name 'a' appears twice"),
    ("target-missing", _csv([["a", "label"], [1, 0]]), "missing", "target",
     "target column 'missing' is not in the header (a, label)"),
    ("ragged", _csv([["a", "b", "label"], [1, 2, 0], [1, 1], *[[i, i, i % 2] for i in range(9)]]),
     "label", "file", "row 3: 2 fields, expected 3 as in the header"),
    ("non-numeric", _csv([["a", "label"], [1, 0], ["x1", 1], *TAIL]), "label", "file",
     "row 3, column 'a': 'x1' is not a number"),
    ("long-cell", _csv([["a", "label"], [1, 0], ["y" * 40, 1], *TAIL]), "label", "file",
     f"row 3, column 'a': '{'y' * 30}...' is not a number"),
    ("empty-cell", _csv([["a", "label"], [1, 0], ["", 1], *TAIL]), "label", "file",
     "row 3, column 'a': '' is not a number"),
    ("nan", _csv([["a", "label"], [1, 0], ["nan", 1], *TAIL]), "label", "file",
     "row 3, column 'a': NaN or infinity is not allowed"),
    ("inf-target", _csv([["a", "label"], [1, 0], [1, 1], [0, "-inf"], *TAIL]), "label", "file",
     "row 4, column 'label': NaN or infinity is not allowed"),
    ("header-only", b"a,label\n", "label", "file", "file has a header but no data rows"),
    ("target-only", _csv([["label"], [0], [1]]), "label", "file",
     "file has no feature columns besides the target"),
    # The first problem in row order, whatever its kind, even within one parsed block.
    ("nan-before-text", _csv([["a", "label"], [1, 0], ["inf", 1], [1, 0], ["x", 1], *TAIL]),
     "label", "file", "row 3, column 'a': NaN or infinity"),
    ("nan-before-ragged", _csv([["a", "label"], [1, 0], ["nan", 1], [1], *TAIL]),
     "label", "file", "row 3, column 'a': NaN or infinity"),
    # Row numbers count blank rows and every line ending csv knows.
    ("blank-rows", b"a,label\n1,0\n\n \n x ,1\n", "label", "file",
     "row 5, column 'a': ' x ' is not a number"),
    ("cr-endings", b"a,label\r1,0\rx,1\r", "label", "file",
     "row 3, column 'a': 'x' is not a number"),
    ("crlf-endings", b"a,label\r\n1,0\r\nx,1\r\n", "label", "file",
     "row 3, column 'a': 'x' is not a number"),
    ("float32-overflow", _csv([["a", "label"], [1, 0], ["1e39", 1], *TAIL]), "label", "file",
     "row 3, column 'a': 1e+39 is out of range"),
    ("too-many-columns", _csv([[f"c{i}" for i in range(MAX_CSV_FEATURES + 1)] + ["label"]]),
     "label", "file", f"row 1: {MAX_CSV_FEATURES + 2} columns, more than {MAX_CSV_FEATURES + 1}"),
    ("long-name", _csv([["a" * 201, "label"], [1, 0]]), "label", "file",
     "row 1: column 1's name is 201 characters long, more than 200"),
    ("wide-row", _csv([["a", "label"], [1, 0], [1] * 600]), "label", "file",
     "row 3: 600 fields, expected 2 as in the header"),
    ("comma-flood", _csv([["a", "label"], [1, 0]]) + b"\n" + b"," * 100_000, "label", "file",
     "row 3: longer than 1224 characters"),
    ("long-row", _csv([["a", "label"], [1, 0], ["1" * 200_000, 1]]), "label", "file",
     "row 3: longer than 1224 characters"),
]


@pytest.mark.parametrize(("case", "raw", "target", "field", "message"), CSV_ERRORS,
                         ids=[c[0] for c in CSV_ERRORS])
def test_csv_errors_name_row_and_column(case, raw, target, field, message):
    err = _error(parse_csv, raw, target)
    assert err.field == field, err.message
    assert err.message.startswith(message), err.message


def test_utf8_position_is_absolute_across_decoding_chunks():
    # Two-byte characters straddle the decoder's chunk edges; the bad byte lies beyond them.
    head = b"a,label\n" + b"1,0\n" * 10
    pad = "\u00e9".encode() * ((1 << 20) // 2 + 7)
    raw = head + b"x,\"" + pad + b"\"\n" + b"\xff,1\n"
    bad = raw.index(b"\xff")
    assert bad > 1 << 20
    err = _error(parse_csv, raw, "label")
    assert err.message == f"file is not UTF-8 (invalid byte at position {bad})"
    bom = _error(parse_csv, b"\xef\xbb\xbfa,label\n\xc3(,1\n", "label")
    assert bom.message == "file is not UTF-8 (invalid byte at position 11)"


def test_csv_values_match_a_reference_parser():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(5_000, 6)) * 10.0 ** rng.integers(-5, 6, size=(5_000, 6))
    table[:, 3] = rng.integers(0, 3, size=5_000)
    names = ["a", "b", "c", "label", "d", "e"]
    raw = (",".join(names) + "\r\n"
           + "\r\n".join(",".join(map(repr, row)) for row in table.tolist())).encode()
    # A byte-order mark and padded names are accepted; blank rows are skipped.
    raw = b"\xef\xbb\xbf" + raw.replace(b"a,b", b" a , b", 1) + b"\r\n\r\n"
    X, y, features = parse_csv(raw, "label")
    assert features == ["a", "b", "c", "d", "e"]
    assert X.dtype == np.float32 and y.dtype == np.float64
    assert X.flags.c_contiguous and X.shape == (5_000, 5)
    np.testing.assert_array_equal(X, np.delete(table, 3, axis=1).astype(np.float32))
    np.testing.assert_array_equal(y, table[:, 3])


@pytest.mark.serial  # CPU seconds against a fixed bound
def test_duplicate_column_check_is_linear():
    # The last two of 10,001 names repeat: a per-name header.count() scanned all 10^8 pairs.
    names = [f"column_{i}" for i in range(MAX_CSV_FEATURES)] + [f"column_{MAX_CSV_FEATURES - 1}"]
    raw = (",".join(names) + "\n" + ",".join(["1"] * len(names)) + "\n").encode()
    t0 = time.process_time()
    err = _error(parse_csv, raw, "column_0")
    took = time.process_time() - t0
    assert err.message == f"row 1: column name 'column_{MAX_CSV_FEATURES - 1}' appears twice"
    assert took < 0.25, f"{took:.2f} CPU s for a {len(names)}-column header"
    # 16,000 columns are refused from the header line, before any list of them is built.
    wide = (",".join(f"c{i}" for i in range(16_000)) + "\n").encode()
    t0 = time.process_time()
    err = _error(parse_csv, wide, "c0")
    assert time.process_time() - t0 < 0.25
    assert err.message.startswith(f"row 1: 16000 columns, more than {MAX_CSV_FEATURES + 1}")


def test_csv_estimate_is_refused_before_parsing_and_states_both_figures():
    n, width = 20_000, 40
    raw = (",".join(f"c{i}" for i in range(width)) + "\n"
           + ("1," * (width - 1) + "0\n") * n).encode()
    tracemalloc.start()
    try:
        err = _error(parse_csv, raw, "c0", max_parse_bytes=2_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Every line ends with a newline: one more line than rows, counted as a possible row.
    estimate = csv_memory_estimate(n + 2, width)
    assert estimate >= memory_estimate(n + 1, width - 1) > 6_000_000  # X: 3.1 MB as float32
    assert err.field == "file"
    assert f"up to {n + 1} rows x {width - 1} features" in err.message, err.message
    assert "limit of 2.0 MB (HPTUNE_MAX_PARSE_BYTES)" in err.message, err.message
    assert f"estimated {estimate / 1e6:.1f} MB" in err.message, err.message
    # Refused before the arrays were built: far less than the estimate was allocated.
    assert peak < 1_000_000, peak


def test_npz_estimate_is_refused_before_unpacking():
    n = 400_000
    raw = _npz(compressed=True, X=np.zeros((n, 10), np.int8), y=np.zeros(n, np.int8))
    tracemalloc.start()
    try:
        err = _error(parse_npz, raw, 20 << 20, max_parse_bytes=10_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.field == "file"
    assert f"{n} rows x 10 features" in err.message
    assert f"estimated {npz_memory_estimate(n, 10) / 1e6:.1f} MB" in err.message, err.message
    assert "limit of 10.0 MB" in err.message
    assert peak < 1_000_000, peak


def test_npz_converts_in_chunks_straight_to_float32():
    """The int8 bomb in small: X is built as float32 without a float64 copy and without
    holding the inflated int8 array, so the parse peaks near X (float32) + y (float64)."""
    n = 600_000
    raw = _npz(compressed=True, X=np.zeros((n, 10), np.int8),
               y=(np.arange(n) % 2).astype(np.int8))
    tracemalloc.start()
    try:
        X, y, _ = parse_npz(raw, 20 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert X.dtype == np.float32 and y.dtype == np.float64 and X.shape == (n, 10)
    arrays = X.nbytes + y.nbytes  # 24 + 4.8 MB; a float64 X alone would be 48 MB
    assert peak < arrays + 4_000_000, (peak, arrays)
    assert peak <= npz_memory_estimate(n, 10)


@pytest.mark.parametrize("dtype", ["int8", "uint16", ">i4", "float16", "float32", "<f8", ">f8"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_npz_values_and_layouts(dtype, order):
    rng = np.random.default_rng(1)
    src = np.asarray(rng.integers(0, 100, size=(300_000, 3)), dtype=dtype, order=order)
    y = (np.arange(300_000) % 3).astype(">i8")
    X, y_out, features = parse_npz(_npz(X=src, y=y), 20 << 20)
    np.testing.assert_array_equal(X, src.astype(np.float32))
    np.testing.assert_array_equal(y_out, y.astype(np.float64))
    assert features == ["x0", "x1", "x2"]


def _npz_entries(**npy: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in npy.items():
            zf.writestr(f"{name}.npy", data)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


X_NAN = np.ones((30, 4))
X_NAN[7, 2] = np.inf
X_NAN[9, 1] = np.nan
X_BIG = np.ones((30, 2))
X_BIG[3, 1] = 1e300

# (case, raw, message start)
NPZ_ERRORS = [
    ("empty", b"", "file is empty"),
    ("lacks-y", _npz(X=np.ones((30, 2))), "NPZ lacks array(s) y; it has ['X']"),
    ("x-1d", _npz(X=np.ones(30), y=np.zeros(30)), "X must be 2-D (rows, features), got shape [30]"),
    ("y-2d", _npz(X=np.ones((30, 2)), y=np.zeros((30, 1))), "y must be 1-D, got shape [30, 1]"),
    ("rows", _npz(X=np.ones((30, 2)), y=np.zeros(29)), "X has 30 rows but y has 29"),
    ("no-features", _npz(X=np.ones((30, 0)), y=np.zeros(30)), "X has no feature columns"),
    ("x-nan", _npz(X=X_NAN, y=np.zeros(30)), "X row 7, column 2: NaN or infinity is not allowed"),
    ("x-nan-fortran", _npz(X=np.asfortranarray(X_NAN), y=np.zeros(30)),
     "X row 9, column 1: NaN or infinity is not allowed"),
    ("y-nan", _npz(X=np.ones((30, 2)), y=np.array([0.0, 1.0, np.nan] + [0.0] * 27)),
     "y row 2: NaN or infinity is not allowed"),
    ("x-overflow", _npz(X=X_BIG, y=np.zeros(30)), "X row 3, column 1: 1e+300 is out of range"),
    ("object", _npz(X=np.array([{"a": 1}] * 30, dtype=object), y=np.zeros(30)),
     "X must be real numbers, got dtype object"),
    ("complex", _npz(X=np.ones((30, 2), complex), y=np.zeros(30)),
     "X must be real numbers, got dtype complex128"),
    ("garbage", b"PK\x03\x04garbage", "not a readable NPZ file"),
    ("truncated", _npz_entries(X=_npy(np.ones((30, 2)))[:-8], y=_npy(np.zeros(30))),
     "not a readable NPZ file: EOF: array X has 59 of the 60 values its header claims"),
    ("version", _npz_entries(X=b"\x93NUMPY\x03\x00" + _npy(np.ones((3, 2)))[8:],
                             y=_npy(np.zeros(3))),
     "array X: unsupported .npy format version (3, 0)"),
    ("many-entries", _npz_entries(**{f"a{i}": b"" for i in range(65)}),
     "NPZ has more than 64 entries"),
]


@pytest.mark.parametrize(("case", "raw", "message"), NPZ_ERRORS, ids=[c[0] for c in NPZ_ERRORS])
def test_npz_errors(case, raw, message):
    err = _error(parse_npz, raw, 20 << 20)
    assert err.field == "file"
    assert err.message.startswith(message), err.message


def test_npz_too_large_unpacked_is_413_from_the_header():
    raw = _npz(compressed=True, X=np.zeros((20_000, 50)), y=np.zeros(20_000))
    with pytest.raises(TooLarge, match="array X unpacks to 8000128 bytes, more than the 20000"):
        parse_npz(raw, 20_000)
    with pytest.raises(TooLarge, match="array y unpacks to 160128 bytes, more than the 100000 "):
        parse_npz(raw, 8_100_000)


@pytest.mark.parametrize("counts", [
    (10,), (5, 5), (1, 9), (1, 1, 8), (2, 2, 2, 2, 2), (3, 3, 4), (6, 1, 1, 1, 1),
    (3, 3, 3, 1), (4, 4, 2), (20, 1), (2, 2, 2, 2, 2, 2), (3, 3, 3, 3), (4, 3, 3),
])
def test_split_check_agrees_with_the_trainer(counts):
    y = np.repeat(np.arange(len(counts)), counts).astype(np.float64)
    X = np.zeros((len(y), 1), np.float32)
    task = "binary" if len(counts) == 2 else "multiclass"
    try:
        from_arrays(X, y, seed=0, name="check", task=task)
        trainer_error = None
    except ValueError as exc:
        trainer_error = str(exc)
    try:
        uploads.validate_arrays(X, y, task)
        ours = None
    except InvalidSpec as exc:
        ours = exc.message
    assert (ours is None) == (trainer_error is None), (ours, trainer_error)
    if ours is not None and len(counts) > 1:
        assert ours.endswith(trainer_error), (ours, trainer_error)


@pytest.mark.parametrize("n", range(1, 25))
def test_regression_split_check_agrees_with_the_trainer(n):
    y = np.linspace(0.1, 0.9, n)
    X = np.zeros((n, 1), np.float32)
    try:
        from_arrays(X, y, seed=0, name="check", task="regression")
        trainer_error = None
    except ValueError as exc:
        trainer_error = str(exc)
    try:
        uploads.validate_arrays(X, y, "regression")
        ours = None
    except InvalidSpec as exc:
        ours = exc.message
    assert (ours is None) == (trainer_error is None), (ours, trainer_error)
    if ours is not None:
        assert ours.endswith(trainer_error)


@pytest.fixture
def db(tmp_path):
    database = Database(Settings(database_url=f"sqlite:///{tmp_path / 'hptune.db'}"), role="test")
    upgrade(database)
    yield database
    database.dispose()


@pytest.mark.parametrize("kind", ["csv", "npz"])
def test_whole_upload_stays_within_its_estimate(db, kind):
    """tracemalloc counts numpy's buffers: parse, checks, compression and the insert
    together allocate no more than memory_estimate says (incompressible values: the
    compressed copy is as large as the arrays)."""
    rng = np.random.default_rng(2)
    n, f = 40_000, 8
    table = np.round(rng.normal(size=(n, f + 1)), 4)  # exact in the CSV's text
    table[:, -1] = rng.integers(0, 2, size=n)
    if kind == "csv":
        raw = (",".join([f"f{i}" for i in range(f)] + ["label"]) + "\n" + "\n".join(
            ",".join(f"{v:.7g}" for v in row) for row in table.tolist())).encode()
        estimate = csv_memory_estimate(n + 1, f + 1)
    else:
        raw = _npz(X=table[:, :f], y=table[:, -1])
        estimate = npz_memory_estimate(n, f)
    tracemalloc.start()
    try:
        row = create_dataset(db, "alice", f"d.{kind}", raw, "label", None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (row.n_rows, row.n_features, row.task) == (n, f, "binary")
    assert row.size_bytes > 0.6 * n * (4 * f + 8)  # random floats compress little
    assert peak <= estimate, (peak, estimate)
    with db.session() as s:
        stored = s.get(UploadedDataset, row.id)
        with np.load(io.BytesIO(stored.content)) as npz:
            np.testing.assert_array_equal(npz["X"], table[:, :f].astype(np.float32))
            np.testing.assert_array_equal(npz["y"], table[:, -1].astype(np.int64))


def test_wide_npz_is_bounded_by_the_budget_not_by_a_column_count():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 30_000), dtype=np.float32)
    X_out, _, features = parse_npz(_npz(X=X, y=np.arange(20) % 2), 20 << 20)
    np.testing.assert_array_equal(X_out, X)
    assert len(features) == 30_000


def test_stored_npz_keeps_a_fortran_ordered_upload_intact(db):
    rng = np.random.default_rng(3)
    X = np.asfortranarray(rng.normal(size=(50, 3)))
    y = np.arange(50) % 2
    row = create_dataset(db, "alice", "f.npz", _npz(X=X, y=y), None, None)
    with db.session() as s:
        content = s.get(UploadedDataset, row.id).content
    with np.load(io.BytesIO(content)) as npz:
        np.testing.assert_array_equal(npz["X"], X.astype(np.float32))
        np.testing.assert_array_equal(npz["y"], y)
        assert npz["y"].dtype == np.int64
