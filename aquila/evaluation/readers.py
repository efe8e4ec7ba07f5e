"""Low-level readers that keep line numbers, so every bad row is reported as `file:line: what was expected`."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aquila.errors import AquilaError

Row = tuple[str, Any]  # (where, value): where is "path:line" or "path: item N"


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")  # CMMLU/Excel csv files often start with a BOM
    except FileNotFoundError:
        raise AquilaError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise AquilaError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise AquilaError(f"{path}: empty file (no items)")
    return text


def read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(first line number, fields) of each non-blank csv record; quoted fields may span lines."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))  # only \n, \r\n, \r end lines (not U+2028 etc.)
    rows, start = [], 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise AquilaError(f"{path}:{start}: malformed csv ({e})") from None
    if not rows:
        raise AquilaError(f"{path}: empty file (no items)")
    return rows


def read_csv_dicts(path: Path, required: Sequence[str]) -> list[Row]:
    """Rows of a csv with a header line, as {column: value}; `required` columns must be in the header
    (case-insensitive; keys are returned as the required names) and every row must have every header column."""
    rows = read_csv_rows(path)
    (header_line, header), body = rows[0], rows[1:]
    columns = [h.strip() for h in header]
    lower = {c.lower(): i for i, c in enumerate(columns)}
    missing = [c for c in required if c.lower() not in lower]
    if missing:
        raise AquilaError(
            f"{path}:{header_line}: header has no column {', '.join(missing)} (header: {', '.join(columns)})"
        )
    if not body:
        raise AquilaError(f"{path}: empty file (a header but no items)")
    out = []
    for line, fields in body:
        if len(fields) < len(columns):
            raise AquilaError(
                f"{path}:{line}: expected {len(columns)} columns ({', '.join(columns)}), got {len(fields)}"
            )
        row = {c: fields[i] for i, c in enumerate(columns)}
        row.update({c: fields[lower[c.lower()]] for c in required})
        out.append((f"{path}:{line}", row))
    return out


def read_json_records(path: Path) -> list[Row]:
    """JSON objects from a jsonl file (one per line) or from a .json file holding one JSON array."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AquilaError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        records = [(f"{path}: item {i}", obj) for i, obj in enumerate(data)]
    else:
        records = []
        for line_no, line in enumerate(text.split("\n"), 1):  # JSON strings may hold U+2028: split on \n only
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise AquilaError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not records:
        raise AquilaError(f"{path}: empty file (no items)")
    for where, obj in records:
        if not isinstance(obj, dict):
            raise AquilaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return records


def field(where: str, record: dict, *names: str, kind: type | tuple[type, ...] = str) -> Any:
    """The first of `names` present in `record`, checked against `kind`."""
    for name in names:
        if name in record:
            value = record[name]
            if not isinstance(value, kind) or (kind is str and isinstance(value, bool)):
                kinds = kind if isinstance(kind, tuple) else (kind,)
                expected = " or ".join(k.__name__ for k in kinds)
                raise AquilaError(f"{where}: field {name!r} should be {expected}, got {type(value).__name__}")
            return value
    raise AquilaError(f"{where}: missing field {' or '.join(repr(n) for n in names)}")


def first_existing(directory: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None
