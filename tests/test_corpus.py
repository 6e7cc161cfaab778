"""selftrain.corpus: one provenance record for every corpus writer, and the atomic writer."""

from __future__ import annotations

import pytest
from helpers import manifest_of

from selftrain.corpus import CorpusWriter, provenance, read_corpus, stamp
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
