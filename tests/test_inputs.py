"""selftrain.inputs: the readers every command shares (JSON lines, parquet), row checks, seeds."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selftrain.errors import SelftrainError
from selftrain.inputs import check_rows, check_seed, read_json_records, read_parquet


def test_json_records_of_lines_and_of_a_json_document(tmp_path):
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    document = tmp_path / "rows.json"
    document.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    one = tmp_path / "one.json"
    one.write_text('{\n  "text": "a"\n}\n')
    assert read_json_records(lines, "--x") == read_json_records(document, "--x") == [
        {"text": "a"}, {"text": "b"}]
    assert read_json_records(one, "--x") == [{"text": "a"}]


@pytest.mark.parametrize("name, content, message", [
    ("rows.jsonl", '{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
    ("rows.jsonl", '{"text": "a"}\n"b"\n', "line 2 is not a JSON object"),
    ("rows.json", '[{"text": "a"},\n  {"text": ]', "line 1 is not valid JSON"),
    ("rows.json", '[{"text": "a"}, 3]', "record 2 is not a JSON object"),
    ("rows.jsonl", b"\xff\xfe", "not UTF-8 text"),
])
def test_json_records_name_the_file_and_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SelftrainError, match=message) as error:
        read_json_records(path, "--corpus")
    assert str(error.value).startswith(f"--corpus {path}: ") and "\n" not in str(error.value)


def test_a_damaged_parquet_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(SelftrainError) as error:
        read_parquet(path, "--corpus", "regenerate it")
    assert str(error.value) == (f"--corpus {path}: not a readable parquet file (Parquet magic "
                                "bytes not found in footer); regenerate it")


@pytest.mark.parametrize("columns, message", [
    ({"text": ["a", 5]}, "row 2 has text 5, not a string"),
    ({"input_ids": [[1, 2], [3, -1]]}, "row 2 has input_ids [3, -1], not a list of token ids"),
    ({"input_ids": [[1, True]]}, "row 1 has input_ids [1, true]"),
    ({"input_ids": [[1], "12"]}, 'row 2 has input_ids "12"'),
])
def test_rows_hold_string_text_and_token_ids(tmp_path, columns, message):
    check_rows({"text": ["a", None], "input_ids": [[0], None]}, tmp_path, "--x")
    with pytest.raises(SelftrainError, match=re.escape(message)):
        check_rows(columns, tmp_path, "--x")


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, True])
def test_seeds_outside_the_signed_64_bit_range_are_refused(seed):
    check_seed(0, "--seed")
    check_seed(2**63 - 1, "--seed")
    with pytest.raises(SelftrainError, match=r"^--seed \S+: a seed is an integer in 0\.\."):
        check_seed(seed, "--seed")
