"""Reading a local data file row by row, with every bad row named by its file and line.

json (a list of objects, or JSON lines), jsonl and csv (with a header) are read with the standard
library, keeping values as written. Each record becomes a `Row` with its physical lines and what
is wrong with its shape; `row_problem` adds what is wrong with the values a job needs (absent,
null, empty, a list), and bytes that are not UTF-8 are reported by offset and line.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import re
from pathlib import Path

JSON_BETWEEN_ITEMS = re.compile(r"[ \t\n\r]*,?[ \t\n\r]*")  # what may separate a list's items


class DataError(ValueError):
    """A data file or column problem, reported to the user in one line."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One record of a data file: its physical lines (1-based, as an editor numbers them), its
    fields, and what is wrong with its shape ("" if nothing)."""

    first: int
    last: int
    fields: dict
    problem: str = ""


def read_text(path: str) -> tuple[str, dict[int, int]]:
    """The file as text (a UTF-8 BOM dropped) and {line: byte offset} of its bytes that are not
    UTF-8; those lines are decoded with replacement characters, to be reported, never used."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"data file {path} could not be read: {err.strerror}") from None
    offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    lines, undecodable = [], {}
    for number, line in enumerate(data[offset:].split(b"\n"), 1):
        try:
            lines.append(line.decode())
        except UnicodeDecodeError as err:
            undecodable[number] = offset + err.start
            lines.append(line.decode(errors="replace"))
        offset += len(line) + 1
    return "\n".join(lines), undecodable


def not_utf8(path: str, line: int, undecodable: dict[int, int]) -> str:
    """The message for the bytes of `line` that are not UTF-8."""
    offset = undecodable[line]
    return f"{path}: bytes at offset {offset} (line {line}) are not UTF-8; save it as UTF-8"


def file_error(path: str, line: int, problem: str, undecodable: dict[int, int]) -> DataError:
    """A problem that makes the whole file unreadable; bytes that are not UTF-8 on that line are
    the likelier cause, so they are named instead."""
    if line in undecodable:
        return DataError(not_utf8(path, line, undecodable))
    return DataError(f"{path} line {line}: {problem}")


def csv_rows(path: str, text: str, undecodable: dict[int, int]) -> tuple[list[Row], list[str]]:
    """The rows under the header line, and the header's names; blank rows are left out."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header, rows, last = None, [], 0
    try:
        for record in reader:
            first, last = last + 1, reader.line_num
            if not any(field.strip() for field in record):
                continue
            if header is None:
                if first in undecodable:
                    raise DataError(not_utf8(path, first, undecodable))
                header = record
                continue
            problem = csv_shape_problem(len(record), len(header), first, last)
            rows.append(Row(first, last, dict(zip(header, record, strict=False)), problem))
    except csv.Error as err:  # in practice a field over csv's size limit: a quote left open
        problem = f"{err}, reading on to line {reader.line_num}; is a quote not closed?"
        raise file_error(path, last + 1, problem, undecodable) from None
    return rows, header or []


def csv_shape_problem(fields: int, header: int, first: int, last: int) -> str:
    """Too many fields is an error; too few only when they spill over lines (an unclosed quote).
    Otherwise the missing trailing fields are absent values, an error only if a needed one."""
    if fields > header:
        hint = "quote fields that contain commas"
    elif fields < header and last > first:
        hint = f"the row runs on to line {last}: is a quote not closed?"
    else:
        return ""
    return f"{fields} field{'s' * (fields != 1)}, the header has {header}; {hint}"


def json_rows(path: str, text: str, undecodable: dict[int, int]) -> tuple[list[Row], list[str]]:
    """The objects of a JSON list, or of a JSON-lines file (one per line, blank lines left out),
    and the keys they use, in order of appearance."""
    if text.lstrip().startswith("["):
        rows = json_list_rows(path, text, undecodable)
    else:
        rows = [
            Row(number, number, *json_line_fields(line))
            for number, line in enumerate(text.split("\n"), 1)
            if line.strip()
        ]
    return rows, list(dict.fromkeys(key for row in rows for key in row.fields))


def json_line_fields(line: str) -> tuple[dict, str]:
    """The object on one line of a JSON-lines file and its problem, as for `Row`."""
    try:
        return json_object_fields(json.loads(line))
    except json.JSONDecodeError as err:
        return {}, f"not valid JSON ({err.msg}: column {err.colno})"


def json_list_rows(path: str, text: str, undecodable: dict[int, int]) -> list[Row]:
    """One row per item of a JSON list, with the lines the item spans."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        problem = f"not valid JSON ({err.msg}: column {err.colno})"
        raise file_error(path, err.lineno, problem, undecodable) from None
    decoder, rows = json.JSONDecoder(), []
    end = text.index("[") + 1
    last = 1 + text.count("\n", 0, end)
    for item in items:  # the text is valid JSON: find where each item lies, for its line numbers
        start = JSON_BETWEEN_ITEMS.match(text, end).end()
        first = last + text.count("\n", end, start)
        end = decoder.raw_decode(text, start)[1]
        last = first + text.count("\n", start, end)
        rows.append(Row(first, last, *json_object_fields(item)))
    return rows


def json_object_fields(value) -> tuple[dict, str]:
    """A JSON value as `Row` fields and problem: only an object gives fields."""
    if isinstance(value, dict):
        return value, ""
    return {}, f"not a JSON object but {json_kind(value)}"


def json_kind(value) -> str:
    """How JSON names the type of a parsed value: 'a list', 'a number', ..."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true/false"}
    return "null" if value is None else kinds.get(type(value), "a number")


def value_problem(fields: dict, column: str) -> str:
    """What is wrong with a row's value for `column` ("" if nothing): absent, null, empty or
    blank, or a list/object; other scalars (numbers as labels) are used as their `str`."""
    if column not in fields:
        return f"no {column!r}"
    value = fields[column]
    if value is None:
        return f"{column!r} is null"
    if isinstance(value, (list, dict)):
        return f"{column!r} is {json_kind(value)}, not text or a number"
    if not str(value).strip():
        return f"empty {column!r}"
    return ""


def row_problem(path: str, row: Row, columns: tuple[str, ...], undecodable: dict[int, int]) -> str:
    """What is wrong with `row`, as a message naming the file and the line ("" if nothing)."""
    bad_line = next((n for n in range(row.first, row.last + 1) if n in undecodable), None)
    if bad_line is not None:
        return not_utf8(path, bad_line, undecodable)
    problem = row.problem or next(filter(None, (value_problem(row.fields, c) for c in columns)), "")
    return f"{path} line {row.first}: {problem}" if problem else ""
