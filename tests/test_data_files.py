"""`jpeft finetune`'s local data files: the forms read, and bad rows named by file and line."""

import collections
import csv
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpeft.finetune import data as jdata

GOOD = [("the market fell", "business"), ("a late goal, then a draw", "sport"), ("new chip", "7")]
EXPECTED = collections.Counter(jdata.Example(text, label) for text, label in GOOD)
JSON_LINES = "\n".join(json.dumps({"text": text, "label": label}) for text, label in GOOD)


def loaded(path, **kwargs) -> collections.Counter:
    """All examples of `path`, train and test together, as a multiset."""
    dataset = jdata.local_file(str(path), test_size=1, seed=0, **kwargs)
    return collections.Counter(dataset.train + dataset.test)


def write(tmp_path, name: str, body: str | bytes):
    path = tmp_path / name
    path.write_bytes(body.encode() if isinstance(body, str) else body)
    return path


def assert_names(tmp_path, name: str, body: str | bytes, line: int, problem: str):
    """Loading the file fails with a message naming the file, the line and the problem."""
    with pytest.raises(jdata.DataError) as caught:
        jdata.local_file(str(write(tmp_path, name, body)), test_size=1, seed=0)
    message = str(caught.value)
    assert name in message and f"line {line}" in message and problem in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name, body, line, problem",
    [
        ("d.csv", "text,label\na,x\nb,y,z\nc,x\n", 3, "3 fields, the header has 2"),
        ("d.csv", 'text,label\na,x\n"b,y\nc,x\n', 3, "1 field, the header has 2; the row runs on"),
        ("d.jsonl", JSON_LINES + '\n{"text": "a" "label": 1}', 4, "not valid JSON (Expecting ','"),
        ("d.jsonl", JSON_LINES + '\n\n["a", "x"]\n', 5, "not a JSON object but a list"),
        ("d.json", '[{"text": "a", "label": "x"},\n{"text": "b" "label": 1}]', 2, "not valid"),
        ("d.json", '[{"text": "a", "label": "x"},\n\n 5]', 3, "not a JSON object but a number"),
        ("d.jsonl", JSON_LINES + '\n{"text": "a", "label": ["x"]}', 4, "'label' is a list"),
        ("d.json", '{\n  "text": "a",\n  "label": "x"\n}\n', 1, "a list of objects, or one"),
    ],
)
def test_bad_structure_is_named_by_file_and_line(tmp_path, name, body, line, problem):
    assert_names(tmp_path, name, body, line, problem)


@pytest.mark.parametrize(
    "name, body, line, problem",
    [
        ("d.csv", "text,label\na,x\nb,\nc,x\n", 3, "empty 'label'"),
        ("d.csv", "text,label\na,x\n\n  ,y\n", 4, "empty 'text'"),
        ("d.csv", "text,label,note\na,x,n\nb\n", 3, "no 'label'"),
        ("d.jsonl", JSON_LINES + '\n{"text": "a", "label": null}', 4, "'label' is null"),
        ("d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}', 2, "no 'completion'"),
        ("d.json", '[{"text": "a", "label": 1},\n {"text": "b",\n  "label": " "}]', 2, "empty"),
    ],
)
def test_empty_values_are_named_by_file_and_line(tmp_path, name, body, line, problem):
    assert_names(tmp_path, name, body, line, problem)


@pytest.mark.parametrize(
    "name, body, line",
    [
        ("d.csv", "text,label\na,x\ncafé,y\n".encode("latin-1"), 3),
        ("d.csv", "téxt,label\na,x\n".encode("latin-1"), 1),
        ("d.csv", "text,label\na,x\n".encode("utf-16"), 1),
        ("d.jsonl", (JSON_LINES + '\n{"text": "b\xff", "label": "y"}').encode("latin-1"), 4),
        ("d.json", b'[{"text": "a", "label": "x"},\n{"text": "b\x80", "label": "y"}]', 2),
    ],
)
def test_bytes_not_utf8_are_named_by_file_offset_and_line(tmp_path, name, body, line):
    offset = next(i for i, byte in enumerate(body) if byte >= 0x80)
    assert_names(tmp_path, name, body, line, f"bytes at offset {offset} ")


@pytest.mark.parametrize("form", ["csv", "jsonl"])
def test_skip_bad_rows_keeps_exactly_the_good_rows(tmp_path, form):
    rows = [*GOOD[:2], ("", "x"), ("b", ""), ("c", "y\xff")]  # empty text, empty label, not UTF-8
    if form == "csv":
        body, first_bad = csv_text(rows) + "d,x,extra\nnew chip,7\n", 4
    else:
        lines = [json.dumps({"text": t, "label": a}, ensure_ascii=False) for t, a in rows]
        lines += ['{"text": "d" "label": "x"}', '{"text": "new chip", "label": 7}']
        body, first_bad = "\n".join(lines), 3
    path = write(tmp_path, f"d.{form}", body.encode("latin-1"))
    with pytest.raises(jdata.DataError, match=f"d.{form} line {first_bad}: empty 'text'"):
        loaded(path)
    assert loaded(path, skip_bad_rows=True) == EXPECTED
    dataset = jdata.local_file(str(path), test_size=1, seed=0, skip_bad_rows=True)
    assert dataset.skipped_rows == 4 and dataset.labels == ("7", "business", "sport")


def test_skip_bad_rows_still_refuses_a_file_without_good_rows(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\ncafé,x\nthé,y\n".encode("latin-1"))
    no_good_rows = r"d.csv has no good rows; the first of 2: .*offset 14 \(line 2\)"
    with pytest.raises(jdata.DataError, match=no_good_rows):
        jdata.local_file(str(path), test_size=1, seed=0, skip_bad_rows=True)
    header_not_utf8 = write(tmp_path, "h.csv", "téxt,label\na,x\nb,y\n".encode("latin-1"))
    with pytest.raises(jdata.DataError, match=r"h.csv: bytes at offset 1 \(line 1\)"):
        jdata.local_file(str(header_not_utf8), test_size=1, seed=0, skip_bad_rows=True)


def csv_text(rows, newline="\n") -> str:
    """A text/label CSV as `csv.writer` writes it; it quotes a value holding a line break only
    when the break's characters are in `newline`, so values with a bare "\r" need "\r\n"."""
    out = io.StringIO()
    csv.writer(out, lineterminator=newline).writerows([("text", "label"), *rows])
    return out.getvalue()


GOOD_FORMS = {
    "a.csv": csv_text(GOOD),
    "crlf_bom_blank_lines.csv": "\ufeff" + csv_text(GOOD, "\r\n").replace("\r\n", "\r\n\r\n", 1),
    "list.json": json.dumps([{"text": text, "label": label} for text, label in GOOD], indent=2),
    "one_line_list.jsonl": json.dumps([{"label": label, "text": text} for text, label in GOOD]),
    "lines.json": JSON_LINES,
    "blank_lines_crlf_bom.jsonl": "\ufeff\r\n" + JSON_LINES.replace("\n", "\r\n\n") + "\n\n",
    "number_label.jsonl": JSON_LINES.replace('"7"', "7"),
    "extra_columns.csv": "note,text,label\nn,the market fell,business\n"
    'm,"a late goal, then a draw",sport\n,new chip,7\n',
}


@pytest.mark.parametrize("name", GOOD_FORMS)
def test_supported_forms_load_the_same_examples(tmp_path, name):
    assert loaded(write(tmp_path, name, GOOD_FORMS[name])) == EXPECTED


def test_prompt_completion_is_chosen_over_text_label_and_gives_free_text(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "text": "t", "label": "l"}] * 3
    dataset = jdata.local_file(
        str(write(tmp_path, "d.jsonl", "\n".join(map(json.dumps, rows)))), 1, 0
    )
    assert set(dataset.train + dataset.test) == {jdata.Example("p", "c")}
    assert dataset.labels == () and dataset.skipped_rows == 0


VALUE = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12).filter(str.strip)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(VALUE, VALUE), min_size=2, max_size=5))
def test_any_text_round_trips_through_csv_and_json_lines(tmp_path_factory, rows):
    """Commas, quotes, newlines and line separators inside values: written by the standard
    writers, read back as exactly those examples."""
    folder = tmp_path_factory.mktemp("round_trip")
    expected = collections.Counter(jdata.Example(text, label) for text, label in rows)
    lines = (json.dumps({"text": t, "label": a}, ensure_ascii=False) for t, a in rows)
    assert loaded(write(folder, "d.csv", csv_text(rows, "\r\n"))) == expected
    assert loaded(write(folder, "d.jsonl", "\n".join(lines))) == expected
