import json

import datasets
import pytest
from conftest import make_corpus

from selftrain.corpus import read_corpus
from selftrain.errors import SelftrainError
from selftrain.models import load_tokenizer, tokenizer_fingerprint


def test_corpus_dir_schema_and_bos(qwen_corpus):
    manifest = json.loads((qwen_corpus / "manifest.json").read_text())
    corpus = read_corpus(qwen_corpus)
    bos = manifest["bos_token_id"]
    assert manifest["bos_source"] == "tokenizer.eos_token_id"  # Qwen2-style: no BOS token
    assert len(corpus) == manifest["counts"]["written"] == manifest["counts"]["requested"] == 48
    assert all(ids[0] == bos for ids in corpus.columns["input_ids"])
    assert all(ids[1] != bos or fin for ids, fin in  # no second BOS added by a tokenizer
               zip(corpus.columns["input_ids"], corpus.columns["finished"], strict=True))
    assert corpus.columns["num_tokens"] == [len(ids) for ids in corpus.columns["input_ids"]]
    assert sorted(corpus.columns["id"]) == list(range(48))
    assert set(corpus.columns["subset"]) == {0, 1}
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(
        load_tokenizer("tiny:qwen2"))
    assert manifest["sampling"]["temperature"] == 1.0 and manifest["seed"] == 0


def test_finished_rows_end_on_eos_and_text_matches_ids(qwen_corpus):
    corpus = read_corpus(qwen_corpus)
    tokenizer = load_tokenizer("tiny:qwen2")
    eos = tokenizer.eos_token_id
    for ids, finished, text in zip(corpus.columns["input_ids"], corpus.columns["finished"],
                                   corpus.columns["text"], strict=True):
        assert (ids[-1] == eos) == finished
        body = ids[1:-1] if finished else ids[1:]
        assert tokenizer.decode(body, skip_special_tokens=True) == text


def test_padded_vocab_ids_are_never_sampled(tmp_path):
    out = make_corpus(tmp_path / "c", num_samples=32, max_new_tokens=32)
    vocab = len(load_tokenizer("tiny:qwen2"))  # the model's embedding has 7 padded rows more
    assert max(max(ids) for ids in read_corpus(out).columns["input_ids"]) < vocab


def test_loads_with_datasets_parquet(qwen_corpus, tmp_path):
    files = sorted(str(p) for p in (qwen_corpus / "data").glob("*.parquet"))
    loaded = datasets.load_dataset("parquet", data_files=files, split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert len(loaded) == 48
    assert {"id", "text", "input_ids", "num_tokens", "finished", "subset"} <= set(
        loaded.column_names)


def test_same_seed_same_corpus(tmp_path):
    a = read_corpus(make_corpus(tmp_path / "a", num_samples=16, seed=3))
    b = read_corpus(make_corpus(tmp_path / "b", num_samples=16, seed=3))
    c = read_corpus(make_corpus(tmp_path / "c", num_samples=16, seed=4))
    assert a.columns["input_ids"] == b.columns["input_ids"]
    assert a.columns["input_ids"] != c.columns["input_ids"]


def test_existing_out_dir_is_refused_and_left_alone(qwen_corpus):
    before = sorted(p.name for p in qwen_corpus.rglob("*"))
    with pytest.raises(SelftrainError, match="--overwrite"):
        make_corpus(qwen_corpus)
    assert sorted(p.name for p in qwen_corpus.rglob("*")) == before


@pytest.mark.parametrize("kwargs, flag", [
    ({"temperature": 0.0}, "--temperature"),
    ({"num_samples": 0}, "--num_samples"),
    ({"max_new_tokens": 0}, "--max_new_tokens"),
    ({"model": "tiny:nope"}, "--model"),
])
def test_bad_flags_fail_before_writing(tmp_path, kwargs, flag):
    params = {"num_samples": 4, "max_new_tokens": 4, **kwargs}
    with pytest.raises(SelftrainError, match=flag):
        make_corpus(tmp_path / "out", **params)
    assert not any(tmp_path.iterdir())
