"""Streaming text readers for the CLI: .txt (one text per line), .jsonl (a field) and .csv (a column).

Each reader is a generator, so a file of any size is read one line at a time. Files are decoded
line by line ourselves (not by ``open(encoding=...)``) so a bad byte is reported with its line
number instead of a bare ``UnicodeDecodeError`` somewhere in a buffer.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterator

FORMATS = (".txt", ".jsonl", ".csv")
DEFAULT_COLUMN = "text"
# Python's csv refuses fields over 128 KiB by default; a long document in one cell is legitimate.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024


class InputError(ValueError):
    """A problem with the user's input file; the message names the file, the line and the fix."""


def input_format(path: str | os.PathLike) -> str:
    """Returns ``.txt``, ``.jsonl`` or ``.csv`` for ``path``, or raises :class:`InputError`."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{path}: unsupported input type {suffix or '(no extension)'!r}; use a .txt file "
                         "(one text per line), .jsonl (one JSON object per line) or .csv (with a header row)")
    return suffix


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    # Yields (line number, text with its line ending). "\n" never occurs inside a UTF-8 multi-byte
    # sequence, so splitting the bytes on it before decoding is safe.
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{path}: line {number} is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                    f"{err.start + 1}); convert the file to UTF-8, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path} > fixed{path.suffix}`") from None


def _read_txt(path: Path) -> Iterator[str]:
    for _, line in _decoded_lines(path):
        text = line.rstrip("\r\n")
        if text.strip():  # blank lines separate nothing worth embedding
            yield text


def _read_jsonl(path: Path, column: str) -> Iterator[str]:
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                             "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object; "
                             f"write one object per line, e.g. {{\"{column}\": \"...\"}}")
        if column not in record:
            raise InputError(f"{path}: line {number} has no field {column!r} (it has {sorted(record)}); "
                             "pick the field with --column NAME")
        value = record[column]
        if not isinstance(value, str):
            raise InputError(f"{path}: line {number}: field {column!r} is a JSON {type(value).__name__}, "
                             "not a string")
        if "\\u" in line and not _valid_unicode(value):
            raise InputError(f"{path}: line {number}: field {column!r} holds a lone surrogate escape such as "
                             "\"\\ud800\" (half of a UTF-16 pair), which is not valid Unicode; fix the escape")
        yield value


def _valid_unicode(text: str) -> bool:
    # Lines are decoded from valid UTF-8, so only a JSON \uXXXX escape can bring in a lone surrogate.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_csv(path: Path, column: str) -> Iterator[str]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.reader((line for _, line in _decoded_lines(path)))
    try:
        header = next(reader, None)
        if header is None:
            raise InputError(f"{path}: the file is empty; a .csv needs a header row naming its columns")
        if column not in header:
            raise InputError(f"{path}: no column {column!r} in the header {header}; "
                             "pick the column with --column NAME")
        index = header.index(column)
        for row in reader:
            if not row:
                continue  # csv gives [] for a blank line
            if index >= len(row):
                raise InputError(f"{path}: line {reader.line_num} has {len(row)} fields, so no {column!r} "
                                 f"(column {index + 1} of the header)")
            yield row[index]
    except csv.Error as err:
        raise InputError(f"{path}: line {reader.line_num} is not valid CSV ({err})") from None


def read_texts(path: str | os.PathLike, column: str | None = None) -> Iterator[str]:
    """Yields the texts of a file, one at a time, in file order.

    Args:
        path: A ``.txt`` file (one text per line; blank lines are skipped), a ``.jsonl`` file (one
            object per line; blank lines skipped) or a ``.csv`` file with a header row.
        column: The JSON field or CSV column holding the text (default ``"text"``). Not allowed
            for ``.txt``.

    Raises:
        InputError: Missing file, unsupported type, non-UTF-8 bytes, bad JSON/CSV, or a missing
            field/column; the message names the file and line. Raised lazily, when the bad line
            is reached.
    """
    path = Path(path)
    if not path.exists():  # checked before the type: "does not exist" is the more useful message
        raise InputError(f"input file {str(path)!r} does not exist")
    if path.is_dir():
        raise InputError(f"input {str(path)!r} is a folder; pass a .txt, .jsonl or .csv file")
    kind = input_format(path)
    if kind == ".txt":
        if column is not None:
            raise InputError(f"{path}: --column applies to .jsonl and .csv input; a .txt file has one text per line")
        return _read_txt(path)
    reader = _read_jsonl if kind == ".jsonl" else _read_csv
    return reader(path, DEFAULT_COLUMN if column is None else column)


def count_texts(path: str | os.PathLike, column: str | None = None) -> int:
    """Reads the whole file once and returns how many texts it holds.

    Cheap next to embedding them, and it finds every input error before any model time is spent.
    """
    return sum(1 for _ in read_texts(path, column))
