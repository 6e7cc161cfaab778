"""selftrain.training.data (and .rows): CorpusDataModule's rows from a corpus.

Stored ids reused under the same tokenizer, retokenized with the student's BOS under another,
the vocabulary check, subsets, plain jsonl and txt files, truncation, packing, bad arguments.
"""

import json
import logging

import pytest
from helpers import write_jsonl, write_text_corpus

from selftrain.corpus import read_corpus
from selftrain.errors import SelftrainError
from selftrain.models import load_tokenizer
from selftrain.training.data import CorpusDataModule


def setup_dm(corpus, **kwargs):
    dm = CorpusDataModule(corpus=str(corpus), **{"tokenizer": "tiny:qwen2", **kwargs})
    dm.setup("fit")
    return dm


def test_same_tokenizer_reuses_source_ids(qwen_corpus):
    dm = setup_dm(qwen_corpus, max_length=1000)
    assert dm.stats["retokenized"] is False
    stored = read_corpus(qwen_corpus).columns["input_ids"]
    assert sorted(r["input_ids"] for r in dm.rows) == sorted(stored)


def test_other_tokenizer_retokenizes_with_student_bos(llama_corpus):
    dm = setup_dm(llama_corpus, max_length=1000)  # llama corpus, qwen2 student
    student = load_tokenizer("tiny:qwen2")
    assert dm.stats["retokenized"] is True
    assert all(r["input_ids"][0] == student.eos_token_id for r in dm.rows)  # Qwen2 BOS = EOS
    texts = read_corpus(llama_corpus).columns["text"]
    first = dm.rows[0]["input_ids"]
    body = first[1:-1] if first[-1] == student.eos_token_id and len(first) > 1 else first[1:]
    assert student.decode(body) in texts


def test_declared_equal_tokenizers_with_foreign_ids_fail_clearly(llama_corpus):
    # the llama corpus holds its BOS id 256 and EOS 257: 257 is outside qwen2's 257 tokens
    with pytest.raises(SelftrainError, match="outside the student's vocabulary") as error:
        setup_dm(llama_corpus, same_tokenizer=True)
    assert "--data.same_tokenizer false" in str(error.value)


def test_subsets_are_disjoint_and_complete(qwen_corpus):
    a = setup_dm(qwen_corpus, subset=0, max_length=1000)
    b = setup_dm(qwen_corpus, subset=1, max_length=1000)
    assert a.stats["rows"] + b.stats["rows"] == 48
    assert not {tuple(r["input_ids"]) for r in a.rows} & {tuple(r["input_ids"]) for r in b.rows}


def test_plain_jsonl_and_txt(tmp_path):
    jsonl = write_text_corpus(tmp_path / "c.jsonl", rows=10)
    assert setup_dm(jsonl).stats["rows"] == 10
    txt = tmp_path / "c.txt"
    txt.write_text("one line of text\n\nanother line\n")
    assert setup_dm(txt).stats["rows"] == 2


def test_max_length_truncates(qwen_corpus):
    dm = setup_dm(qwen_corpus, max_length=8)
    assert max(len(r["input_ids"]) for r in dm.rows) == 8


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_length": 1}, "--data.max_length"),
    ({"batch_size": 0}, "--data.batch_size"),
    ({"corpus": "/nonexistent/corpus"}, "--data.corpus"),
    ({"subset": 3, "num_subsets": 2}, "--data.subset"),
    ({"group_batches": -1}, "--data.group_batches -1"),
    ({"pad_to_multiple_of": 0}, "--data.pad_to_multiple_of 0"),
    ({"num_workers": -1}, "--data.num_workers -1"),
    ({"min_real_token_fraction": 1.5}, "--data.min_real_token_fraction 1.5"),
    ({"seed": -1}, "--data.seed -1"),
    ({"seed": 2**64}, "--data.seed 18446744073709551616"),
    ({"bos_token_id": -1}, "--data.bos_token_id -1"),
    ({"tokenizer": "tiny:nope"}, "--model.model 'tiny:nope'"),
])
def test_bad_arguments_fail_in_init(qwen_corpus, kwargs, fragment):
    with pytest.raises(SelftrainError, match=fragment):
        CorpusDataModule(**{"corpus": str(qwen_corpus), **kwargs})


def test_empty_or_unfinished_corpus_fails_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelftrainError, match="no data/\\*.parquet shards"):
        setup_dm(tmp_path / "empty")
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(SelftrainError, match="the corpus is empty"):
        setup_dm(tmp_path / "blank.jsonl")
    (tmp_path / "nocol.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SelftrainError, match="'text' or 'input_ids'"):
        setup_dm(tmp_path / "nocol.jsonl")


def test_a_corpus_of_mostly_empty_rows_is_refused_a_few_are_dropped(tmp_path, caplog):
    rows = [{"text": "the cat sat on the mat." if i % 4 else ""} for i in range(40)]
    few = write_jsonl(tmp_path / "few.jsonl", rows)  # 10 of 40 empty: dropped, and said so
    with caplog.at_level(logging.INFO):
        assert setup_dm(few).stats["dropped"] == 10
    assert "dropped 10 of 40 rows" in caplog.text
    most = write_jsonl(tmp_path / "most.jsonl", [{"text": "" if i % 4 else "a cat."}
                                                 for i in range(40)])
    with pytest.raises(SelftrainError, match=r"most.jsonl: 30 of 40 selected rows have no "
                                             r"token to train on"):
        setup_dm(most)


def test_bos_outside_the_students_vocabulary_is_refused_at_load(llama_corpus):
    with pytest.raises(SelftrainError, match=r"^--data.bos_token_id 257: a token id must be "
                                             r"in 0..256"):
        setup_dm(llama_corpus, bos_token_id=257)


def test_the_students_revision_reaches_its_tokenizer(qwen_corpus, monkeypatch):
    import selftrain.training.data as data

    seen = []
    real = data.load_tokenizer
    monkeypatch.setattr(data, "load_tokenizer",
                        lambda spec, **kwargs: seen.append(kwargs) or real(spec, **kwargs))
    setup_dm(qwen_corpus, revision="v1.0")
    assert seen == [{"revision": "v1.0", "flag": "--model.model"}]


def test_packing_packs_the_same_batches_without_padding(qwen_corpus, recwarn):
    kwargs = {"max_length": 1000, "batch_size": 4, "min_real_token_fraction": 1.0,
              "eval_corpus": str(qwen_corpus)}
    padded = setup_dm(qwen_corpus, **kwargs)
    assert padded.stats["packing"] is False and padded.stats["real_token_fraction"] < 1.0
    assert any("real-token fraction" in str(w.message) for w in recwarn)
    recwarn.clear()
    packed = setup_dm(qwen_corpus, packing=True, **kwargs)
    assert packed.stats["packing"] is True and packed.stats["real_token_fraction"] == 1.0
    assert packed.stats["padded_real_token_fraction"] == padded.stats["real_token_fraction"]
    assert not [w for w in recwarn if "real-token fraction" in str(w.message)]  # nothing padded
    for loaders in ((padded.train_dataloader(), packed.train_dataloader()),
                    (padded.val_dataloader(), packed.val_dataloader())):
        batches = list(zip(*loaders, strict=True))
        assert len(batches) == 12
        for pad, pack in batches:  # same documents in the same order, end to end
            assert "attention_mask" not in pack and pack["input_ids"].shape[0] == 1
            real = pad["input_ids"][pad["attention_mask"].bool()]
            assert pack["input_ids"][0].tolist() == real.tolist()
            assert (pack["labels"] != -100).sum() == (pad["labels"] != -100).sum() - len(
                pad["input_ids"])
