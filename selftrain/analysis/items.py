"""Paired per-item comparisons of benchmark evaluations: the standard error a delta deserves.

A fine-tuned student and its base are evaluated on the same items, so their scores are not two
independent samples: item difficulty is shared, and the standard error of the change is that of
the per-item differences, usually far below either score's own SE. ``BenchmarkEval`` keeps each
evaluation's per-item rows (``eval/<callback>/epoch=<E>-step=<S>.items.parquet``, see
:data:`selftrain.callbacks.benchmark_results.ITEM_SCHEMA`); this module reads them and computes
the paired difference of a metric between two evaluations, pooled over a condition's runs.

Two forms, by lm-eval's aggregation of the metric:

- **Means** (``mean``: acc, acc_norm, exact_match; ``brier_score``, a mean of per-item squared
  errors): with ``d_i`` the item's difference averaged over the runs, the delta is
  ``mean(d)`` and its SE ``sd(d) / sqrt(n)``.
- **Bits per byte** over documents (a ratio, not a mean: ``-sum(loglik) / sum(bytes) / ln 2``):
  the same documents have the same bytes, so the delta is ``sum(d_i) / sum(bytes_i)`` with
  ``d_i`` the document's change of ``-loglik / ln 2``, and its SE is the ratio estimator's
  (linearised over documents): ``sqrt(n / (n - 1) * sum((d_i - delta * bytes_i)^2)) / sum(bytes)``.

Other aggregations (perplexities, corpus-level F1 or BLEU) have no per-item form here: no paired
SE. Averaging the differences over runs before taking the SE gives the item-sampling error of
the condition's mean delta; the spread over runs (subsets) is reported beside it as their sd.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from selftrain.callbacks.benchmark_results import ITEMS_SUFFIX

MEAN_AGGREGATIONS = ("mean", "brier_score")
"""lm-eval aggregations that are the mean of the item values: paired SE of a mean."""

RATIO_AGGREGATIONS = ("bits_per_byte",)
"""lm-eval aggregations that are a ratio over documents: paired SE of a ratio estimator."""

_STEP = re.compile(r"-step=(\d+)" + re.escape(ITEMS_SUFFIX) + "$")


@dataclass(frozen=True)
class Paired:
    """One metric's change between two evaluations, paired over its items.

    Args:
        delta: the change of the metric (after - before), mean over the runs.
        se: the standard error of that change over items (NaN with fewer than 2 items).
        n: the number of items (documents, for bits per byte).
        form: ``items`` (a mean over items) or ``documents`` (bits per byte, a ratio estimator).
    """

    delta: float
    se: float
    n: int
    form: str


def items_file(eval_dir: Path, epoch: int) -> Path | None:
    """The per-item table of the evaluation after ``epoch`` epochs (the latest step if several).

    Args:
        eval_dir: a run's ``eval`` dir.
        epoch: epochs completed.
    """
    found = sorted(eval_dir.glob(f"*/epoch={epoch}-step=*{ITEMS_SUFFIX}"),
                   key=lambda path: int(_STEP.search(path.name).group(1)))
    return found[-1] if found else None


def metric_items(table: pd.DataFrame, tag: str) -> pd.DataFrame:
    """The rows of one ``benchmark_delta/<task>/<metric>`` tag, indexed by document id.

    Args:
        table: a per-item table.
        tag: the delta tag (``benchmark_delta/selftrain_facts/acc``).
    """
    task, metric = tag.split("/", 1)[1].rsplit("/", 1)
    rows = table[(table["task"] == task) & (table["metric"] == metric)]
    return rows.set_index("doc_id").sort_index()


def paired(pairs: list[tuple[pd.DataFrame, pd.DataFrame]]) -> Paired | None:
    """The change of one metric from ``before`` to ``after``, paired over items, pooled over runs.

    Args:
        pairs: per run, (before, after) rows of one metric (:func:`metric_items`).

    Returns:
        None when the metric has no per-item form, or the runs do not share the same items
        (then no paired SE can be given).
    """
    changes = _changes(pairs)
    return None if changes is None else _estimate(*changes)


def between(first: list[tuple[pd.DataFrame, pd.DataFrame]],
            second: list[tuple[pd.DataFrame, pd.DataFrame]]) -> Paired | None:
    """The first condition's change minus the second's, paired over the items both were scored on.

    Each condition's per-item change from its base is averaged over its runs, and the SE is
    that of the per-item difference of those changes: the item-sampling error of the gap
    between the two conditions (the spread over runs is separate).

    Args:
        first: per run of the first condition, (before, after) rows of one metric.
        second: the same for the second condition.

    Returns:
        None as :func:`paired`, or when the conditions were scored on different items.
    """
    a, b = _changes(first), _changes(second)
    if a is None or b is None or a[2] != b[2] or not a[3].equals(b[3]):
        return None
    if a[2] in RATIO_AGGREGATIONS and not np.array_equal(a[1], b[1]):
        return None
    return _estimate(a[0] - b[0], a[1], a[2], a[3])


def _changes(pairs: list[tuple[pd.DataFrame, pd.DataFrame]]
             ) -> tuple[np.ndarray, np.ndarray, str, pd.Index] | None:
    """Per item, the change averaged over runs; the item weights; the aggregation; the items.

    For means the change is ``after - before`` of the item values; for bits per byte it is the
    document's change of ``-loglik / ln 2`` (bits), its weight the document's bytes.
    """
    if not pairs:
        return None
    items = pairs[0][0].index
    aggregations = {str(a) for before, after in pairs for a in (*before["aggregation"],
                                                                 *after["aggregation"])}
    if len(aggregations) != 1 or any(not before.index.equals(items)
                                     or not after.index.equals(items)
                                     for before, after in pairs):
        return None
    (aggregation,) = aggregations
    if aggregation in MEAN_AGGREGATIONS:
        change = np.mean([after["value"].to_numpy() - before["value"].to_numpy()
                          for before, after in pairs], axis=0)
        return change, np.ones(len(items)), aggregation, items
    if aggregation in RATIO_AGGREGATIONS:
        weights = pairs[0][0]["weight"].to_numpy()
        if any(not np.array_equal(side["weight"].to_numpy(), weights)
               for pair in pairs for side in pair):
            return None
        change = np.mean([(before["value"].to_numpy() - after["value"].to_numpy()) / math.log(2)
                          for before, after in pairs], axis=0)
        return change, weights, aggregation, items
    return None


def _estimate(change: np.ndarray, weights: np.ndarray, aggregation: str,
              items: pd.Index) -> Paired:
    """The metric's change and its SE over items, from per-item changes (see the module doc)."""
    n = len(items)
    if aggregation in MEAN_AGGREGATIONS:
        se = float(np.std(change, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        return Paired(float(change.mean()), se, n, "items")
    total = float(weights.sum())
    delta = float(change.sum()) / total
    residual = change - delta * weights
    se = math.sqrt(n / (n - 1) * float(np.sum(residual ** 2))) / total if n > 1 else math.nan
    return Paired(delta, se, n, "documents")
