"""selftrain.training.rows: build_rows, the training rows of corpora, without a data module.

Stored ids reused under the same tokenizer, retokenized with the student's BOS under another,
the vocabulary check, subsets, plain jsonl and txt files, truncation, rows without a token to
predict dropped or the corpus refused, a held-out corpus taken whole, corpora concatenated or
mixed by token share.
"""

import json
import logging

import pytest
from helpers import DEBUG_CORPUS, write_jsonl, write_text_corpus

from selftrain.corpus import read_corpus
from selftrain.errors import SelftrainError
from selftrain.models import load_tokenizer
from selftrain.training.rows import RowSettings, build_rows


@pytest.fixture(scope="module")
def student():
    """The tiny:qwen2 student's tokenizer."""
    return load_tokenizer("tiny:qwen2")


def rows_of(corpus, student, **settings):
    return build_rows(str(corpus), student, RowSettings(**settings))


def test_same_tokenizer_reuses_source_ids(qwen_corpus, student):
    plan = rows_of(qwen_corpus, student, max_length=1000)
    assert plan.reused is True and plan.dropped == 0
    stored = read_corpus(qwen_corpus).columns["input_ids"]
    assert sorted(r["input_ids"] for r in plan.rows) == sorted(stored)


def test_other_tokenizer_retokenizes_with_student_bos(llama_corpus, student):
    plan = rows_of(llama_corpus, student, max_length=1000)  # llama corpus, qwen2 student
    assert plan.reused is False
    assert all(r["input_ids"][0] == student.eos_token_id for r in plan.rows)  # BOS = EOS
    texts = read_corpus(llama_corpus).columns["text"]
    first = plan.rows[0]["input_ids"]
    body = first[1:-1] if first[-1] == student.eos_token_id and len(first) > 1 else first[1:]
    assert student.decode(body) in texts


def test_declared_equal_tokenizers_with_foreign_ids_fail_clearly(llama_corpus, student):
    # the llama corpus holds its BOS id 256 and EOS 257: 257 is outside qwen2's 257 tokens
    with pytest.raises(SelftrainError, match="outside the student's vocabulary") as error:
        rows_of(llama_corpus, student, same_tokenizer=True)
    assert "--data.same_tokenizer false" in str(error.value)


def test_subsets_are_disjoint_and_complete(qwen_corpus, student):
    a = rows_of(qwen_corpus, student, subset=0, max_length=1000)
    b = rows_of(qwen_corpus, student, subset=1, max_length=1000)
    assert len(a.rows) + len(b.rows) == 48 and a.selected + b.selected == 48
    assert not {tuple(r["input_ids"]) for r in a.rows} & {tuple(r["input_ids"]) for r in b.rows}


def test_plain_jsonl_and_txt(tmp_path, student):
    jsonl = write_text_corpus(tmp_path / "c.jsonl", rows=10)
    assert len(rows_of(jsonl, student).rows) == 10
    txt = tmp_path / "c.txt"
    txt.write_text("one line of text\n\nanother line\n")
    assert len(rows_of(txt, student).rows) == 2


def test_max_length_truncates(qwen_corpus, student):
    plan = rows_of(qwen_corpus, student, max_length=8)
    assert max(len(r["input_ids"]) for r in plan.rows) == 8


def test_empty_or_unfinished_corpus_fails_clearly(tmp_path, student):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelftrainError, match="no data/\\*.parquet shards"):
        rows_of(tmp_path / "empty", student)
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(SelftrainError, match="the corpus is empty"):
        rows_of(tmp_path / "blank.jsonl", student)
    (tmp_path / "nocol.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SelftrainError, match="'text' or 'input_ids'"):
        rows_of(tmp_path / "nocol.jsonl", student)


def test_a_corpus_of_mostly_empty_rows_is_refused_a_few_are_dropped(tmp_path, caplog, student):
    rows = [{"text": "the cat sat on the mat." if i % 4 else ""} for i in range(40)]
    few = write_jsonl(tmp_path / "few.jsonl", rows)  # 10 of 40 empty: dropped, and said so
    with caplog.at_level(logging.INFO):
        plan = rows_of(few, student)
    assert (plan.selected, plan.dropped, len(plan.rows)) == (40, 10, 30)
    assert "dropped 10 of 40 rows" in caplog.text
    most = write_jsonl(tmp_path / "most.jsonl", [{"text": "" if i % 4 else "a cat."}
                                                 for i in range(40)])
    with pytest.raises(SelftrainError, match=r"--data.corpus .*most.jsonl: 30 of 40 selected "
                                             r"rows have no token to train on"):
        rows_of(most, student)


def test_the_held_out_corpus_is_taken_whole_and_named_by_its_flag(qwen_corpus, tmp_path,
                                                                   student):
    plan = build_rows(str(qwen_corpus), student, RowSettings(subset=0, max_length=1000),
                      eval_corpus=str(qwen_corpus))
    assert len(plan.rows) < len(plan.eval_rows) == 48
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(SelftrainError, match="^--data.eval_corpus "):
        build_rows(str(qwen_corpus), student, RowSettings(), eval_corpus=str(blank))


def test_corpora_are_concatenated_or_mixed_by_token_share(tmp_path, student):
    real = write_text_corpus(tmp_path / "real.jsonl", rows=20)
    corpora = [DEBUG_CORPUS, str(real)]
    alone = [rows_of(path, student, max_length=64).rows for path in corpora]
    together = build_rows(corpora, student, RowSettings(max_length=64))
    assert together.rows == alone[0] + alone[1] and together.mixture == []
    mixed = build_rows(corpora, student, RowSettings(max_length=64, mixture_weights=[1, 1],
                                                     mixture_tokens=4_000))
    assert [record["corpus"] for record in mixed.mixture] == corpora
    tokens = [sum(len(r["input_ids"]) for r in mixed.rows if r["corpus"] == j) for j in (0, 1)]
    assert abs(tokens[0] - tokens[1]) < 128 and abs(sum(tokens) - 4_000) < 128
    assert mixed.mixture[1]["passes"] > 1  # 20 short rows fill 2,000 tokens only repeated


def test_ended_only_keeps_the_documents_that_ended_on_eos(qwen_corpus, tmp_path, student,
                                                          caplog):
    finished = read_corpus(qwen_corpus).columns["finished"]
    assert 0 < sum(finished) < len(finished)  # the tiny source ends some, not all
    stored = read_corpus(qwen_corpus).columns["input_ids"]
    with caplog.at_level(logging.INFO):
        plan = rows_of(qwen_corpus, student, max_length=1000, ended_only=True)
    assert sorted(r["input_ids"] for r in plan.rows) == sorted(
        ids for ids, ended in zip(stored, finished, strict=True) if ended)
    assert f"{len(finished) - sum(finished)} of {len(finished)} documents dropped" in caplog.text
    # real text is taken whole, and so is a held-out corpus, sampled or not
    text = write_text_corpus(tmp_path / "text.jsonl", rows=8)
    held_out = build_rows(str(text), student, RowSettings(max_length=1000, ended_only=True),
                          eval_corpus=str(qwen_corpus))
    assert len(held_out.rows) == 8 and len(held_out.eval_rows) == len(finished)
