"""Reading and checking example files: every format, the column mapping, and each kind of bad input."""

from __future__ import annotations

import json

import pytest

from hub_peft.errors import InvalidInputError
from hub_peft.examples import MAX_ROWS, check_rows, read_table

ROWS = [{"prompt": "Who are you?", "response": "🤖"}, {"prompt": "Hi, there", "response": "👋, 😊"}]


def test_csv_jsonl_and_json_give_the_same_rows():
    csv_text = 'prompt,response\n"Who are you?",🤖\n"Hi, there","👋, 😊"\n'
    jsonl = "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n\n"
    for data, name in (
        (csv_text, "a.csv"),
        (jsonl, "a.jsonl"),
        (json.dumps(ROWS), "a.json"),
        (json.dumps({"data": ROWS}), "b.json"),
        ("\ufeff" + csv_text, "bom.csv"),
    ):
        assert read_table(data.encode(), name).rows() == ROWS, name


def test_other_column_names_are_guessed_or_mapped():
    table = read_table(b"instruction,output\nq,a\n", "x.csv")
    assert table.guess_mapping() == ("instruction", "output")
    assert table.rows() == [{"prompt": "q", "response": "a"}]
    table = read_table(json.dumps([{"question": "q", "reply": "a", "id": 1}]).encode(), "x.json")
    assert table.guess_mapping() == ("question", None)
    with pytest.raises(InvalidInputError, match=r"Choose which column .* columns \['question', 'reply', 'id'\]"):
        table.rows()
    assert table.rows("question", "reply") == [{"prompt": "q", "response": "a"}]
    with pytest.raises(InvalidInputError, match="two different columns"):
        table.rows("reply", "reply")


@pytest.mark.parametrize(
    ("data", "name", "message"),
    [
        (b"", "empty.jsonl", "is empty"),
        (b"   \n", "blank.csv", "is empty"),
        (b"prompt,response\nq,a\n", "notes.txt", "unsupported file type .txt"),
        (b"\x89PNG\r\n", "image.png", "unsupported file type .png"),
        (b"prompt,response\nq,caf\xe9\n", "latin1.csv", r"not UTF-8 text \(byte 0xe9 at position 21\)"),
        (b"x" * (50 * 2**20), "huge.jsonl", "is 50.0 MB; the limit is 5 MB"),
        (b'{"prompt": "q", "response": "a"}\n{oops\n', "bad.jsonl", "bad.jsonl line 2 is not valid JSON"),
        (b'["q", "a"]', "list.json", "item 1 is a str, not an object"),
        (b'{"prompt": "q"', "broken.json", "is not valid JSON"),
        (b'{"a": 1, "b": 2}', "dict.json", "must hold a JSON list of objects"),
        (b",\nq,a\n", "noheader.csv", "needs a header row"),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v else None,
)
def test_bad_files_get_clear_errors(data, name, message):
    with pytest.raises(InvalidInputError, match=message):
        read_table(data, name)


def test_too_many_rows():
    data = "\n".join(json.dumps({"prompt": f"q{i}", "response": "a"}) for i in range(10_000)).encode()
    with pytest.raises(InvalidInputError, match=f"10,000 examples; the limit is {MAX_ROWS:,}"):
        read_table(data, "big.jsonl")
    with pytest.raises(InvalidInputError, match="10,000 examples"):
        check_rows([{"prompt": "q", "response": "a"}] * 10_000)


def test_check_rows_skips_empty_and_duplicate_rows_and_blocks_long_ones():
    rows = [
        {"prompt": "a", "response": "b"},
        {"prompt": " ", "response": "b"},
        {"prompt": "a", "response": " "},
        {"prompt": "a ", "response": "b"},
        {"prompt": "long " * 50, "response": "b"},
    ]
    preview = check_rows(rows, count_tokens=lambda r: len(r["prompt"].split()) + 2, max_tokens=20)
    assert [p.kind for p in preview.problems] == ["empty", "empty", "duplicate", "too_long"]
    assert preview.problems[2].message == "row 4: duplicate of row 1 (skipped)"
    assert "row 5: 52 tokens, the limit is 20" in preview.problems[3].message
    assert not preview.ok and len(preview.rows) == 2 and preview.tokens == 3 + 52
    assert preview.summary() == "2 examples to train on, 55 tokens, 3 row(s) skipped, 1 row(s) to fix before training."
    assert check_rows(rows[:1]).ok
