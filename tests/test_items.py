"""Per-item benchmark results: lm-eval's samples kept compactly, paired SEs computed from them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from lm_eval.api.metrics import bits_per_byte, brier_score

from selftrain.analysis.items import metric_items, paired
from selftrain.callbacks.benchmark_results import item_rows


def test_item_rows_keep_each_metric_in_the_form_its_aggregation_needs():
    samples = {
        "mc": [{"doc_id": 3, "target": 1, "filter": "none", "metrics": ["acc", "brier_score"],
                "filtered_resps": [(-2.0, False), (-1.0, True), (-3.0, False)],
                "acc": 1.0, "brier_score": (1, [0.2, 0.7, 0.1])}],
        "rolling": [{"doc_id": 0, "target": "", "filter": "none", "metrics": ["bits_per_byte"],
                     "filtered_resps": [-50.0], "bits_per_byte": (-50.0, 40)}],
        "gen": [{"doc_id": 7, "target": "42", "filter": "strict-match",
                 "metrics": ["exact_match", "bleu"], "filtered_resps": ["41"],
                 "exact_match": 0.0, "bleu": {"not": "a number"}}]}
    aggregations = {"mc": {"acc": "mean", "brier_score": "brier_score"},
                    "rolling": {"bits_per_byte": "bits_per_byte"},
                    "gen": {"exact_match": "mean", "bleu": "bleu"}}
    rows = {(r["task"], r["metric"]): r for r in item_rows(samples, aggregations)}
    assert set(rows) == {("mc", "acc"), ("mc", "brier_score"), ("rolling", "bits_per_byte"),
                         ("gen", "exact_match_strict-match")}  # bleu has no per-item number
    assert rows["mc", "acc"]["loglikelihoods"] == [-2.0, -1.0, -3.0]
    assert rows["mc", "brier_score"]["value"] == pytest.approx(
        brier_score([(1, [0.2, 0.7, 0.1])]))  # lm-eval's aggregate of one item
    assert (rows["rolling", "bits_per_byte"]["value"],
            rows["rolling", "bits_per_byte"]["weight"]) == (-50.0, 40.0)
    generated = rows["gen", "exact_match_strict-match"]
    assert (generated["answer"], generated["target"], generated["loglikelihoods"]) == (
        "41", "42", None)


def frame(metric: str, aggregation: str, values, weights=None, ids=None) -> pd.DataFrame:
    ids = range(len(values)) if ids is None else ids
    weights = np.ones(len(values)) if weights is None else weights
    table = pd.DataFrame({"task": "t", "doc_id": list(ids), "filter": "none", "metric": metric,
                          "aggregation": aggregation, "value": values, "weight": weights})
    return metric_items(table, f"benchmark_delta/t/{metric}")


def test_paired_mean_is_the_se_of_the_run_averaged_item_differences():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, (2, 50)).astype(float)
    after = np.where(rng.random((2, 50)) < 0.2, 1 - base, base)
    result = paired([(frame("acc", "mean", base[r]), frame("acc", "mean", after[r]))
                     for r in range(2)])
    change = (after - base).mean(axis=0)
    assert result.delta == pytest.approx(after.mean() - base.mean())
    assert result.se == pytest.approx(change.std(ddof=1) / math.sqrt(50))
    assert (result.n, result.form) == (50, "items")
    unpaired = math.sqrt(after[0].var(ddof=1) / 50)  # the score's own SE is larger
    assert result.se < unpaired


def test_paired_bits_per_byte_is_lm_evals_ratio_and_its_se_agrees_with_the_jackknife():
    rng = np.random.default_rng(1)
    n = 400
    size = rng.integers(50, 2000, n).astype(float)
    before = -size * rng.uniform(0.5, 1.0, n)
    after = before + size * rng.normal(-0.05, 0.1, n)
    result = paired([(frame("bits_per_byte", "bits_per_byte", before, size),
                      frame("bits_per_byte", "bits_per_byte", after, size))])
    expected = (bits_per_byte(list(zip(after, size, strict=True)))
                - bits_per_byte(list(zip(before, size, strict=True))))
    assert result.delta == pytest.approx(expected)
    assert (result.n, result.form) == (n, "documents")
    leave_one_out = []
    for i in range(n):  # an independent SE: the jackknife over documents
        keep = np.arange(n) != i
        leave_one_out.append(
            bits_per_byte(list(zip(after[keep], size[keep], strict=True)))
            - bits_per_byte(list(zip(before[keep], size[keep], strict=True))))
    leave_one_out = np.array(leave_one_out)
    jackknife = math.sqrt((n - 1) / n * np.sum((leave_one_out - leave_one_out.mean()) ** 2))
    assert result.se == pytest.approx(jackknife, rel=0.05)


def test_no_paired_se_without_the_same_items_or_a_per_item_form():
    same = frame("acc", "mean", [1.0, 0.0, 1.0])
    other_items = frame("acc", "mean", [1.0, 0.0, 1.0], ids=[0, 1, 5])
    assert paired([(same, other_items)]) is None
    assert paired([(same, same), (other_items, other_items)]) is None
    perplexity = frame("word_perplexity", "weighted_perplexity", [-5.0, -6.0], [3.0, 4.0])
    assert paired([(perplexity, perplexity)]) is None
    assert paired([]) is None
