"""selftrain.corpus: one provenance record for every corpus writer, the atomic writer, and the
readers every command shares (parquet, JSON lines, the row checks, seeds)."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import manifest_of

from selftrain.corpus import (
    CorpusWriter,
    check_rows,
    check_seed,
    provenance,
    read_corpus,
    read_json_records,
    read_parquet,
    stamp,
)
from selftrain.curation.replay import replay
from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer, resolve_bos_id, tokenizer_fingerprint

ROW = {"id": 0, "text": "a", "input_ids": [1, 2], "num_tokens": 2, "finished": True,
       "subset": 0, "source": "test"}


def test_provenance_of_a_sampled_corpus_is_what_generate_records(qwen_corpus):
    tokenizer, model = load_tokenizer("tiny:qwen2"), load_model("tiny:qwen2")
    bos_id, bos_source = resolve_bos_id(tokenizer, model.config)
    record = provenance(tokenizer, "tiny:qwen2", bos_id, bos_source, tokenizer.eos_token_id,
                        source_config=model.config)
    assert list(record) == ["source", "tokenizer", "bos_token_id", "bos_source", "eos_token_id"]
    assert record["source"] == {"model": "tiny:qwen2", "revision": "tiny:qwen2@seed1234",
                                "family": "qwen2"}
    assert record["tokenizer"] == {"name": "tiny:qwen2", "vocab_size": len(tokenizer),
                                   "fingerprint": tokenizer_fingerprint(tokenizer)}
    assert (record["bos_source"], record["eos_token_id"]) == ("tokenizer.eos_token_id", bos_id)
    manifest = manifest_of(qwen_corpus)
    assert {key: manifest[key] for key in record} == record
    generation = manifest["generation"]  # the resumable plan holds the same resolved values
    assert (generation["revision"], generation["tokenizer_fingerprint"],
            generation["resolved_bos_token_id"], generation["eos_token_id"]) == (
        record["source"]["revision"], record["tokenizer"]["fingerprint"], bos_id,
        record["eos_token_id"])


def test_provenance_of_real_text_for_a_student_is_what_replay_records(qwen_corpus, tmp_path):
    source = tmp_path / "real.txt"
    source.write_text("\n\n".join(f"paragraph {i} " + "words " * (i % 40) for i in range(400)))
    out = replay(str(qwen_corpus), str(tmp_path / "rep"), str(source), "tiny:llama")
    tokenizer = load_tokenizer("tiny:llama")
    record = provenance(tokenizer, "tiny:llama", *resolve_bos_id(tokenizer),
                        tokenizer.eos_token_id)
    assert list(record) == ["student", "tokenizer", "bos_token_id", "bos_source",
                            "eos_token_id"]
    assert record["student"] == "tiny:llama" and "source" not in record
    assert record["bos_source"] == "tokenizer.bos_token_id"
    assert record["tokenizer"]["fingerprint"] != manifest_of(qwen_corpus)["tokenizer"][
        "fingerprint"]
    manifest = manifest_of(out)
    assert {key: manifest[key] for key in record} == record


def test_stamp_puts_format_version_and_time_first():
    stamped = stamp({"kind": "synthetic", "seed": 3})
    assert list(stamped) == ["format", "tool_version", "created", "kind", "seed"]
    assert stamped["format"] == "selftrain-corpus/1" and stamped["seed"] == 3


def test_writer_replaces_a_corpus_only_once_the_new_one_is_complete(tmp_path):
    out = tmp_path / "corpus"
    with CorpusWriter(out) as writer:
        writer.add([ROW])
        writer.finish({"seed": 1})
    with pytest.raises(SelftrainError, match="--overwrite"), CorpusWriter(out):
        pass
    with pytest.raises(RuntimeError), CorpusWriter(out, overwrite=True) as writer:
        writer.add([{**ROW, "text": "b"}] * 3)
        raise RuntimeError("killed before finish")
    assert read_corpus(out).columns["text"] == ["a"] and manifest_of(out)["seed"] == 1
    with CorpusWriter(out, shard_size=2, overwrite=True) as writer:
        writer.add([{**ROW, "id": i, "text": "b"} for i in range(3)])
        writer.finish({"seed": 2})
    manifest = manifest_of(out)
    assert read_corpus(out).columns["text"] == ["b"] * 3
    assert (manifest["seed"], manifest["counts"]["written"]) == (2, 3)
    assert len(list((out / "data").glob("*.parquet"))) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]  # no staging or old copy left


# --- the shared readers ------------------------------------------------------------------------


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


def test_negative_ids_in_a_parquet_corpus_are_refused(tmp_path):
    pq.write_table(pa.table({"input_ids": pa.array([[5, 6], [7, -2]], pa.list_(pa.int32()))}),
                   tmp_path / "c.parquet")
    with pytest.raises(SelftrainError, match=r"row 2 has input_ids \[7, -2\]"):
        read_corpus(tmp_path / "c.parquet")


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, True])
def test_seeds_outside_the_signed_64_bit_range_are_refused(seed):
    check_seed(0, "--seed")
    check_seed(2**63 - 1, "--seed")
    with pytest.raises(SelftrainError, match=r"^--seed \S+: a seed is an integer in 0\.\."):
        check_seed(seed, "--seed")
