"""The one reader of user files: .txt (one text per line), .jsonl (objects), .csv/.tsv (header row), stdin.

Every reader is a generator, so a file of any size is read one line at a time. Files are decoded
line by line ourselves (not by ``open(encoding=...)``) so a bad byte is reported with the file,
its line number and the fix instead of a bare ``UnicodeDecodeError`` somewhere in a buffer. The
embedding commands (:func:`read_records`), the fine-tuning readers (:func:`read_rows`,
``bertkit.train.data``) and config readers (:func:`read_text`) all go through here and raise one
error class, :class:`InputError`.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

FORMATS = (".txt", ".jsonl", ".csv", ".tsv")
STDIN = "-"  # `-i -`: read .txt lines from standard input
DEFAULT_COLUMN = "text"
# Python's csv refuses fields over 128 KiB by default; a long document in one cell is legitimate.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024


class InputError(ValueError):
    """A problem with the user's input file; the message names the file, the line and the fix."""


def input_format(path: str | os.PathLike) -> str:
    """Returns ``.txt``, ``.jsonl``, ``.csv`` or ``.tsv`` for ``path`` (stdin is ``.txt``), or raises."""
    if str(path) == STDIN:
        return ".txt"
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{path}: unsupported input type {suffix or '(no extension)'!r}; use a .txt file "
                         "(one text per line), .jsonl (one JSON object per line) or .csv/.tsv (with a header row)")
    return suffix


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():  # checked before the type: "does not exist" is the more useful message
        raise InputError(f"input file {str(path)!r} does not exist")
    if path.is_dir():
        raise InputError(f"input {str(path)!r} is a folder; pass a .txt, .jsonl, .csv or .tsv file")
    return path


def _utf8_error(path, number: int, raw: bytes, err: UnicodeDecodeError) -> InputError:
    suffix = Path(str(path)).suffix
    return InputError(f"{path}: line {number} is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                      f"{err.start + 1}); convert the file to UTF-8, e.g. "
                      f"`iconv -f latin1 -t utf-8 {path} > fixed{suffix}`")


def decoded_lines(path: str | os.PathLike, strip_newline: bool = False) -> Iterator[tuple[int, str]]:
    """Yields (line number, text with its line ending, or without if ``strip_newline``) of a UTF-8 file,
    or of stdin for ``"-"``.

    "\\n" never occurs inside a UTF-8 multi-byte sequence, so splitting the bytes on it before
    decoding is safe. A byte order mark at the start is dropped. A line costs its bytes and its text
    while it is decoded, then its text only (no copies: a 50 MB line is not held three times).
    """
    stdin = str(path) == STDIN
    handle = sys.stdin.buffer if stdin else open(_check_file(path), "rb")
    name = "<stdin>" if stdin else path
    try:
        for number, raw in enumerate(handle, start=1):
            end = len(raw)
            while strip_newline and end and raw[end - 1] in (10, 13):  # rstrip("\\r\\n") without a copy
                end -= 1
            try:
                text = str(memoryview(raw)[:end], "utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _utf8_error(name, number, raw, err) from None
            raw = None  # noqa: F841 -- only the text stays alive while the caller works on it
            yield number, text
    finally:
        if not stdin:
            handle.close()


def read_text(path: str | os.PathLike) -> str:
    """A whole (small) UTF-8 file as one string; a bad byte is reported with its line."""
    return "".join(line for _, line in decoded_lines(path))


def read_json(path: str | os.PathLike) -> Any:
    """A whole JSON file; bad UTF-8 or bad JSON is reported with the file and line."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: line {err.lineno} is not valid JSON ({err.msg} at column {err.colno})") from None


def _json_objects(path: Path, example_field: str) -> Iterator[tuple[int, dict]]:
    for number, line in decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                             "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object; "
                             f"write one object per line, e.g. {{\"{example_field}\": \"...\"}}")
        yield number, record


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    # (line number, fields); the header is the first row.
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.reader((line for _, line in decoded_lines(path)),
                        delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        for row in reader:
            if row:  # csv gives [] for a blank line
                yield reader.line_num, row
    except csv.Error as err:
        raise InputError(f"{path}: line {reader.line_num} is not valid {path.suffix[1:].upper()} ({err})") from None


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yields (line number, record) of a .jsonl (one object per line) or .csv/.tsv file (header row).

    CSV/TSV rows become ``{column: cell}``; a row with fewer cells than the header is an error.
    """
    path = _check_file(path)
    kind = path.suffix.lower()
    if kind not in (".jsonl", ".json", ".csv", ".tsv"):
        raise InputError(f"{path}: unknown extension {path.suffix!r}; use .csv, .tsv or .jsonl")
    if kind in (".jsonl", ".json"):
        yield from _json_objects(path, DEFAULT_COLUMN)
        return
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise InputError(f"{path}: the file is empty; a {kind} file needs a header row naming its columns")
    header = first[1]
    for number, row in rows:
        if len(row) < len(header):
            raise InputError(f"{path}: line {number} has {len(row)} fields but the header has {len(header)} "
                             f"({header})")
        yield number, dict(zip(header, row))


def _valid_unicode(text: str) -> bool:
    # Lines are decoded from valid UTF-8, so only a JSON \uXXXX escape can bring in a lone surrogate.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _jsonl_records(path: Path, column: str) -> Iterator[tuple[str, Any]]:
    for number, record in _json_objects(path, column):
        if column not in record:
            raise InputError(f"{path}: line {number} has no field {column!r} (it has {sorted(record)}); "
                             "pick the field with --column NAME")
        value = record[column]
        if not isinstance(value, str):
            raise InputError(f"{path}: line {number}: field {column!r} is a JSON {type(value).__name__}, "
                             "not a string")
        if not _valid_unicode(value):
            raise InputError(f"{path}: line {number}: field {column!r} holds a lone surrogate escape such as "
                             "\"\\ud800\" (half of a UTF-16 pair), which is not valid Unicode; fix the escape")
        yield value, record.get("id")


def _csv_records(path: Path, column: str) -> Iterator[tuple[str, Any]]:
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise InputError(f"{path}: the file is empty; a {path.suffix} file needs a header row naming its columns")
    header = first[1]
    if column not in header:
        raise InputError(f"{path}: no column {column!r} in the header {header}; pick the column with --column NAME")
    index = header.index(column)
    for number, row in rows:
        if index >= len(row):
            raise InputError(f"{path}: line {number} has {len(row)} fields, so no {column!r} "
                             f"(column {index + 1} of the header)")
        yield row[index], None


def _txt_records(path) -> Iterator[tuple[str, Any]]:
    # Every line is a text, blank ones included (embedded as "", as sentence-transformers does), so
    # row i of the output is always line i + 1 of the file.
    for _, line in decoded_lines(path, strip_newline=True):
        yield line, None


def read_records(path: str | os.PathLike, column: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yields (text, id) for every record of a file, in file order; id is a .jsonl record's ``"id"`` or None.

    Args:
        path: A ``.txt`` file (one text per line; a blank line is the empty text), ``"-"`` (stdin,
            read as .txt), a ``.jsonl`` file (one object per line; blank lines skipped) or a
            ``.csv``/``.tsv`` file with a header row.
        column: The JSON field or CSV/TSV column holding the text (default ``"text"``). Not allowed
            for ``.txt``.

    Raises:
        InputError: Missing file, unsupported type, non-UTF-8 bytes, bad JSON/CSV, or a missing
            field/column; the message names the file and line. Raised lazily, when the bad line
            is reached.
    """
    if str(path) != STDIN:
        _check_file(path)
    kind = input_format(path)
    if kind == ".txt":
        if column is not None:
            raise InputError(f"{path}: --column applies to .jsonl, .csv and .tsv input; a .txt file has one "
                             "text per line")
        return _txt_records(path)
    reader = _jsonl_records if kind == ".jsonl" else _csv_records
    return reader(Path(path), DEFAULT_COLUMN if column is None else column)


def read_texts(path: str | os.PathLike, column: str | None = None) -> Iterator[str]:
    """Yields the texts of :func:`read_records`, one at a time, in file order."""
    return (text for text, _ in read_records(path, column))


def count_texts(path: str | os.PathLike, column: str | None = None) -> int:
    """Reads the whole file once and returns how many texts it holds.

    Cheap next to embedding them, and it finds every input error before any model time is spent.
    """
    return sum(1 for _ in read_records(path, column))
