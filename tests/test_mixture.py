"""Mixtures of corpora by token share: the plan, and an epoch of the data module."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from helpers import DEBUG_CORPUS, write_jsonl

from selftrain.training.mixture import mixture_plan


def lengths(count: int, seed: int, low: int = 5, high: int = 60) -> list[int]:
    return np.random.default_rng(seed).integers(low, high, size=count).tolist()


@pytest.mark.parametrize("weights,tokens", [([1, 1], None), ([0.2, 0.8], 30_000),
                                            ([3, 1, 0], 10_000)])
def test_each_corpus_gets_its_token_share_within_one_percent(weights, tokens):
    corpora = [lengths(400, 0), lengths(900, 1), lengths(50, 2)][:len(weights)]
    taken, records = mixture_plan(corpora, weights, tokens, seed=0)
    got = [sum(corpora[j][i] for i in chosen) for j, chosen in enumerate(taken)]
    total = sum(got)
    for j, w in enumerate(weights):
        assert abs(got[j] / total - w / sum(weights)) < 0.01
        assert records[j]["tokens"] == got[j] and records[j]["rows"] == len(taken[j])
    if tokens is not None:
        assert abs(total - tokens) <= max(max(c) for c in corpora) * len(weights)


def test_without_a_budget_nothing_repeats_and_the_scarce_corpus_is_used_whole():
    corpora = [lengths(100, 3), lengths(1000, 4)]
    taken, records = mixture_plan(corpora, [1, 1], None, seed=0)
    assert sorted(taken[0]) == list(range(100))  # the scarce corpus sets the budget
    assert len(set(taken[1])) == len(taken[1]) < 1000
    assert all(record["passes"] <= 1 for record in records)


def test_a_budget_beyond_a_corpus_repeats_it_evenly():
    corpus = lengths(50, 5)
    (taken,), (record,) = mixture_plan([corpus], [1], 3 * sum(corpus), seed=0)
    counts = Counter(taken)
    assert set(counts) == set(range(50)) and max(counts.values()) - min(counts.values()) <= 1
    assert record["passes"] == pytest.approx(3, abs=0.05)


def test_an_epoch_of_the_data_module_holds_the_shares(tmp_path):
    from selftrain.training.data import CorpusDataModule

    real = write_jsonl(tmp_path / "real.jsonl", ({"text": f"real document {i} " * (i % 7 + 1)}
                                                 for i in range(300)))
    data = CorpusDataModule([DEBUG_CORPUS, str(real)], tokenizer="tiny:qwen2", max_length=64,
                            batch_size=8, mixture_weights=[0.25, 0.75], mixture_tokens=40_000)
    data.load()
    tokens = Counter()
    for batch_rows in data.train_dataloader().batch_sampler:  # epoch 0, as fit trains it
        for index in batch_rows:
            tokens[data.rows[index]["corpus"]] += len(data.rows[index]["input_ids"])
    total = sum(tokens.values())
    assert abs(tokens[1] / total - 0.75) < 0.01 and abs(tokens[0] / total - 0.25) < 0.01
    assert abs(total - 40_000) < 128
    mixture = data.stats["mixture"]
    assert [record["corpus"] for record in mixture] == [DEBUG_CORPUS, str(real)]
    assert mixture[1]["passes"] > 1  # 300 short documents fill 30,000 tokens only repeated
