"""selftrain.provenance: one record of where the ids come from, for every corpus writer."""

from __future__ import annotations

from helpers import manifest_of

from selftrain.curation.replay import replay
from selftrain.models import load_model, load_tokenizer, resolve_bos_id, tokenizer_fingerprint
from selftrain.provenance import provenance


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
