"""Readers for the fine-tuning file formats; every error names the file, the line and the fix.

* classify: CSV (with a header) or JSONL with ``text``, optional ``text_pair``, and ``label``.
* ner: CoNLL: one token per line, its tag in the last column, a blank line between sentences.
* qa: SQuAD v1.1 / v2.0 JSON.
* multiple-choice: JSONL with ``context``, ``endings`` (list), ``label`` (index of the right ending)
  and an optional ``question`` (prepended to each ending, as SWAG's second segment).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..io_readers import InputError, decoded_lines, read_json, read_rows


# One reader and one error class for every user file (bertkit.io_readers): a bad byte, bad JSON or a
# short CSV row is reported with the file and line, as `bertkit embed` reports it.
DataError = InputError


def _open(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for CSV/TSV (header on line 1) or JSONL (one object per line)."""
    return read_rows(path)


def _require(path: Path, number: int, row: dict, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if row.get(c) is None]
    if missing:
        raise DataError(f"{path}:{number}: missing column(s) {missing}; the row has {sorted(row)}. "
                        f"Rename your columns to {list(columns)} (classify: or pass --text-column/--label-column).")


def _parse_label(value: Any) -> Any:
    """Class name (str), float (regression) or list of names (multi-label) from a cell or JSON value."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return text
        else:
            try:
                number = float(text)
            except ValueError:
                return text
            return text if number.is_integer() else number  # "1" is a class name, "0.7" a score
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else value
    raise DataError(f"label {value!r} is neither a class name, a number nor a list")


def read_classification(path: str | os.PathLike, text: str = "text", label: str = "label") -> list[dict]:
    """Reads ``text`` [, ``text_pair``], ``label`` rows; labels parsed by :func:`_parse_label`.

    ``text`` and ``label`` name the columns (JSON fields) that hold them, if not "text" and "label".

    Returns:
        Rows ``{"text", "text_pair" (or None), "label", "line"}``.
    """
    path = _open(path)
    rows = []
    for number, row in _rows(path):
        _require(path, number, row, (text, label))
        try:
            parsed = _parse_label(row[label])
        except DataError as err:
            raise DataError(f"{path}:{number}: {err}") from None
        pair = row.get("text_pair")
        rows.append({"text": str(row[text]), "text_pair": None if pair in (None, "") else str(pair),
                     "label": parsed, "line": number})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_conll(path: str | os.PathLike) -> list[dict]:
    """Reads CoNLL sentences: whitespace-separated columns, token first, tag last.

    ``-DOCSTART-`` lines are skipped. Returns ``{"words", "tags", "line"}`` per sentence.
    """
    path = _open(path)
    sentences, words, tags, start = [], [], [], 1
    for number, line in decoded_lines(path):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sentences.append({"words": words, "tags": tags, "line": start})
            words, tags = [], []
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{number}: {line.strip()!r} has one column; CoNLL needs the token "
                            "first and its tag in the last column (e.g. 'Paris B-LOC'), and a blank "
                            "line between sentences")
        if not words:
            start = number
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        sentences.append({"words": words, "tags": tags, "line": start})
    if not sentences:
        raise DataError(f"{path}: no sentences")
    return sentences


def read_squad(path: str | os.PathLike) -> list[dict]:
    """Reads SQuAD v1.1/v2.0 JSON into ``{"id", "question", "context", "answers", "is_impossible"}``.

    ``answers`` is a list of ``(text, answer_start)``; for v2 unanswerable questions it is empty.
    """
    path = _open(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected SQuAD JSON {{\"data\": [{{\"paragraphs\": [...]}}]}}")
    examples = []
    for a, article in enumerate(data["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if "context" not in para or "qas" not in para:
                raise DataError(f"{where} needs 'context' and 'qas'")
            context = para["context"]
            for qa in para["qas"]:
                if "id" not in qa or "question" not in qa:
                    raise DataError(f"{where}: a question lacks 'id' or 'question'")
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else [(ans["text"], int(ans["answer_start"])) for ans in qa.get("answers", [])]
                for text, start in answers:
                    if context[start:start + len(text)] != text:
                        raise DataError(f"{where}, question {qa['id']}: answer {text!r} is not at "
                                        f"answer_start={start} of the context; fix answer_start")
                examples.append({"id": str(qa["id"]), "question": qa["question"], "context": context,
                                 "answers": answers, "is_impossible": impossible or not answers})
    if not examples:
        raise DataError(f"{path}: no questions")
    return examples


def read_multiple_choice(path: str | os.PathLike) -> list[dict]:
    """Reads JSONL/CSV rows with ``context``, ``endings`` (list), integer ``label``, optional ``question``."""
    path = _open(path)
    rows, width = [], None
    for number, row in _rows(path):
        _require(path, number, row, ("context", "endings", "label"))
        endings = row["endings"]
        if isinstance(endings, str):  # CSV cell holding a JSON list
            try:
                endings = json.loads(endings)
            except json.JSONDecodeError:
                endings = None
        if not isinstance(endings, list) or len(endings) < 2:
            raise DataError(f"{path}:{number}: 'endings' must be a list of at least 2 strings")
        width = width or len(endings)
        if len(endings) != width:
            raise DataError(f"{path}:{number}: {len(endings)} endings but earlier rows have {width}; every "
                            "row needs the same number of choices")
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < width:
            raise DataError(f"{path}:{number}: label {row['label']!r} must be the index (0..{width - 1}) of "
                            "the correct ending")
        rows.append({"context": str(row["context"]), "question": str(row.get("question") or ""),
                     "endings": [str(e) for e in endings], "label": label, "line": number})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
