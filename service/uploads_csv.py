"""CSV uploads: a header row, then rows of numbers; parsed a block of rows at a time into
float32 X and float64 y, every problem reported with its row and column (service.uploads
states the memory budget this keeps to)."""

from __future__ import annotations

import codecs
import csv
import io
from array import array
from collections import Counter
from typing import Any

import numpy as np

from service.uploads import DEFAULT_MAX_PARSE_BYTES, Y_ITEM, check_budget, fail, memory_estimate

# Most feature columns of a CSV upload (its header has one more, the target): a CSV row is a
# list of cells before it can be checked. An NPZ's width costs only the array memory that
# HPTUNE_MAX_PARSE_BYTES budgets, so it has no bound of its own.
MAX_CSV_FEATURES = 10_000
# Longest CSV column name, in characters (after stripping the spaces around it).
MAX_COLUMN_NAME_CHARS = 200
# Longest CSV data row, in characters per header column: numbers are far shorter; the bound
# keeps one line and its list of cells small whatever the file holds.
MAX_ROW_CHARS_PER_COLUMN = 100
# CSV values parsed into an array('d') before they are checked and copied into X and y.
_CSV_BLOCK_VALUES = 1 << 16


def csv_memory_estimate(n_lines: int, width: int) -> int:
    """memory_estimate of a CSV with this many lines (one a header) and header columns."""
    return memory_estimate(max(n_lines - 1, 0), width - 1, _csv_transient(width))


def _csv_transient(width: int) -> int:
    # A line (up to 4 bytes a character) and its cells, and a block of parsed values.
    return (4 * _max_row_chars(width) + 80 * 2 * width
            + 2 * Y_ITEM * (_CSV_BLOCK_VALUES + width))


def _max_row_chars(width: int) -> int:
    return width * MAX_ROW_CHARS_PER_COLUMN + 1024


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
            raise fail(f"file is not UTF-8 (invalid byte at position "
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
    _check_csv_text(raw, target)
    max_columns = MAX_CSV_FEATURES + 1
    lines = _BoundedLines(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig", newline=""),
                          max_chars=max_columns * (MAX_COLUMN_NAME_CHARS + 3),
                          max_fields=max_columns)
    reader = csv.reader(lines)
    header = _read_header(reader, target)
    width = len(header)
    n_features = width - 1
    # Rows are at most the lines after the header's first.
    n_lines = _count_lines(raw)
    capacity = max(n_lines - 1, 0)
    check_budget(csv_memory_estimate(n_lines, width), max_parse_bytes,
                 f"up to {capacity} rows x {n_features} features")
    lines.max_chars, lines.max_fields = _max_row_chars(width), 2 * width + 16
    rows = _CsvRows(header, header.index(target), capacity)
    _read_rows(reader, lines, rows)
    if rows.n == 0:
        raise fail("file has a header but no data rows")
    if n_features == 0:
        raise fail("file has no feature columns besides the target")
    return rows.X[:rows.n], rows.y[:rows.n], [h for i, h in enumerate(header) if i != rows.t]


def _check_csv_text(raw: bytes, target: str | None) -> None:
    """Refuse an empty file, a NUL byte, text that is not UTF-8, and a missing target name."""
    if not raw or raw.isspace():
        raise fail("file is empty")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise fail(f"file contains a NUL byte at byte {nul}")
    _check_utf8(raw)
    if not target:
        raise fail("target is required for a CSV upload: the name of the target column",
                   field="target")


def _read_header(reader: Any, target: str) -> list[str]:
    """The header row's column names (stripped), refused for its width, a name's length, a
    repeated name, or a missing target column."""
    max_columns = MAX_CSV_FEATURES + 1
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise fail("file has no header row") from None
    except _RowRefused as exc:
        if exc.fields is not None:
            raise fail(f"row 1: {exc.fields} columns, more than {max_columns} (at most "
                       f"{MAX_CSV_FEATURES} features and the target)") from None
        raise fail(f"row 1: the header is longer than {exc.chars} characters "
                   f"({max_columns} columns of at most {MAX_COLUMN_NAME_CHARS})") from None
    except csv.Error as exc:
        raise fail(f"row 1: {exc}") from None
    width = len(header)
    if width > max_columns:
        raise fail(f"row 1: {width} columns, more than {max_columns} (at most "
                   f"{MAX_CSV_FEATURES} features and the target)")
    for i, h in enumerate(header):
        if len(h) > MAX_COLUMN_NAME_CHARS:
            raise fail(f"row 1: column {i + 1}'s name is {len(h)} characters long, more than "
                       f"{MAX_COLUMN_NAME_CHARS} ({h[:30]!r}...)")
    counts = Counter(header)
    if len(counts) != width:
        dup = next(h for h in header if counts[h] > 1)
        raise fail(f"row 1: column name {dup!r} appears twice")
    if target not in header:
        raise fail(f"target column {target!r} is not in the header ({', '.join(header[:20])})",
                   field="target")
    return header


class _CsvRows:
    """X and y of a CSV, filled a block of parsed rows at a time: a block's values are checked
    (finite, and within float32 for X) when it is flushed into the arrays."""

    def __init__(self, header: list[str], t: int, capacity: int) -> None:
        self.header, self.t, self.width = header, t, len(header)
        self.X = np.empty((capacity, self.width - 1), np.float32)
        self.y = np.empty(capacity, np.float64)
        self.block = array("d")
        self.block_rows = array("q")  # the file row number of each row in `block`
        self.n = 0

    def add(self, row: list[str], line_no: int) -> None:
        """Parse a row of `width` cells into the block, naming the first cell that is not a
        number (after flushing, so that a problem in an earlier row is reported first)."""
        try:
            self.block.fromlist(list(map(float, row)))
        except ValueError:
            self.flush()
            for col, cell in zip(self.header, row, strict=True):
                try:
                    float(cell)
                except ValueError:
                    shown = cell if len(cell) <= 30 else cell[:30] + "..."
                    raise fail(f"row {line_no}, column {col!r}: {shown!r} is not a "
                               f"number") from None
            raise
        self.block_rows.append(line_no)
        if len(self.block) >= _CSV_BLOCK_VALUES:
            self.flush()

    def flush(self) -> None:
        """Check the block's values and move them into X and y."""
        if not self.block_rows:
            return
        k, n, t, width, header = len(self.block_rows), self.n, self.t, self.width, self.header
        values = np.frombuffer(self.block, dtype=np.float64).reshape(k, width)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            r, c = divmod(int(bad[0]), width)
            raise fail(f"row {self.block_rows[r]}, column {header[c]!r}: NaN or infinity is "
                       f"not allowed")
        with np.errstate(over="ignore"):  # overflow to float32 is refused just below
            self.X[n:n + k, :t] = values[:, :t]
            self.X[n:n + k, t:] = values[:, t + 1:]
        self.y[n:n + k] = values[:, t]
        over = np.flatnonzero(~np.isfinite(self.X[n:n + k]))
        if len(over):
            r, j = divmod(int(over[0]), width - 1)
            c = j if j < t else j + 1
            raise fail(f"row {self.block_rows[r]}, column {header[c]!r}: {values[r, c]:g} is "
                       f"out of range (features are stored as float32: |value| < 3.4e38)")
        del values  # the view pins `block`, which is emptied next
        self.n += k
        del self.block[:]
        del self.block_rows[:]


def _read_rows(reader: Any, lines: _BoundedLines, rows: _CsvRows) -> None:
    """Every data row into `rows`, refusing the first bad one with its row number; blank rows
    are skipped."""
    width = rows.width
    line_no = 1
    while True:
        line_no += 1
        lines.next_row()
        try:
            row = next(reader)
        except StopIteration:
            break
        except _RowRefused as exc:
            rows.flush()  # a problem in an earlier row is reported first
            if exc.fields is not None:
                raise fail(f"row {line_no}: {exc.fields} fields, expected {width} as in the "
                           f"header") from None
            raise fail(f"row {line_no}: longer than {exc.chars} characters (at most "
                       f"{MAX_ROW_CHARS_PER_COLUMN} per column)") from None
        except csv.Error as exc:
            rows.flush()
            raise fail(f"row {line_no}: {exc}") from None
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != width:
            rows.flush()
            raise fail(f"row {line_no}: {len(row)} fields, expected {width} as in the header")
        rows.add(row, line_no)
    rows.flush()
