"""Per-condition curves from the tidy table: mean and sd over subsets, final and best deltas.

The paper's curves are a mean over disjoint-subset students with a +/-1 sd band; its tables
quote where a condition ends and the best it reached. Both are computed here, once, from
:func:`selftrain.analysis.runs.read_table`'s table, so the figures and the summary show the
same numbers. The sd is the sample sd (``ddof=1``, as pandas and seaborn's ``errorbar="sd"``);
with one subset it is undefined (NaN) and no band is drawn.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

FAMILIES = {
    "benchmark": re.compile(r"^benchmark_delta/(?P<task>[^/]+)/(?P<metric>[^/]+)$"),
    "extraction": re.compile(r"^extraction/(?:(?P<domain>[^/]+)/)?memorized$"),
    "likelihood": re.compile(r"^likelihood/(?:(?P<domain>[^/]+)/)?delta_logprob$"),
}
"""The tag families the report draws: benchmark deltas, extraction counts, log p deltas."""
NAMED_LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "brier", "nll", "loss")
"""Metric names (substrings) taken as lower-is-better only where no lm-eval results say."""


def family_tags(tags: set[str], family: str) -> list[str]:
    """The tags of one family, sorted; a probe family's all-domains tag last.

    Args:
        tags: any tags.
        family: a :data:`FAMILIES` key.
    """
    chosen = [tag for tag in tags if FAMILIES[family].match(tag)]
    return sorted(chosen, key=lambda tag: (tag.count("/") < 2 and family != "benchmark", tag))


def common_tags(table: pd.DataFrame) -> tuple[set[str], dict[str, list[str]]]:
    """The tags every run logged, and for each tag left out, the runs that lack it.

    Args:
        table: the tidy table.

    Returns:
        (tags in every run, {left-out tag: [runs without it]}).
    """
    by_run = table.groupby("run")["tag"].agg(set)
    everywhere = set.intersection(*by_run) if len(by_run) else set()
    left_out = {}
    for tag in sorted(set.union(*by_run) - everywhere if len(by_run) else set()):
        left_out[tag] = sorted(run for run, tags in by_run.items() if tag not in tags)
    return everywhere, left_out


def curves(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and n over a condition's runs at every (tag, epoch).

    Args:
        table: the tidy table.

    Returns:
        Columns condition, tag, epoch, mean, sd, n.
    """
    grouped = table.groupby(["condition", "tag", "epoch"])["value"]
    out = grouped.agg(mean="mean", sd=lambda v: v.std(ddof=1), n="count").reset_index()
    return out.sort_values(["tag", "condition", "epoch"], ignore_index=True)


def lower_is_better(tag: str, directions: dict[str, bool] | None = None) -> bool:
    """Whether the metric of a tag improves downwards.

    Args:
        tag: a ``benchmark_delta/<task>/<metric>`` (or other) tag.
        directions: tag -> higher_is_better, as lm-eval's results files declare it per task
            (:func:`selftrain.analysis.runs.metric_directions`); a tag missing there falls back
            to :data:`NAMED_LOWER_IS_BETTER`.
    """
    if directions and tag in directions:
        return not directions[tag]
    return any(word in tag.rsplit("/", 1)[-1] for word in NAMED_LOWER_IS_BETTER)


def final_and_best(curve: pd.DataFrame, runs_per_condition: dict[str, int],
                   directions: dict[str, bool] | None = None) -> pd.DataFrame:
    """Where each condition ends on each tag, and the best mean it reached after epoch 0.

    The final epoch is the last one every run of the condition reached; the best is taken over
    the epochs after 0 that every run reached (the base itself, epoch 0, is delta 0), in the
    metric's own direction. The best is the extreme of noisy means, biased away from zero by
    construction; the final value is the one to compare.

    Args:
        curve: :func:`curves` rows (one family's tags).
        runs_per_condition: condition -> its number of runs.
        directions: tag -> higher_is_better from lm-eval (see :func:`lower_is_better`).

    Returns:
        Columns tag, condition, final_epoch, final_mean, final_sd, n, best_epoch, best_mean,
        best_sd, best_n.
    """
    rows = []
    for (tag, condition), points in curve.groupby(["tag", "condition"], sort=True):
        complete = points[points["n"] == runs_per_condition[condition]]
        if complete.empty:  # runs of different lengths and none reached: use what there is
            complete = points
        final = complete.loc[complete["epoch"].idxmax()]
        later = complete[complete["epoch"] > 0]
        if later.empty:
            best = final
        else:
            pick = (later["mean"].idxmin() if lower_is_better(tag, directions)
                    else later["mean"].idxmax())
            best = later.loc[pick]
        rows.append({"tag": tag, "condition": condition,
                     "final_epoch": int(final["epoch"]), "final_mean": float(final["mean"]),
                     "final_sd": float(final["sd"]), "n": int(final["n"]),
                     "best_epoch": int(best["epoch"]), "best_mean": float(best["mean"]),
                     "best_sd": float(best["sd"]), "best_n": int(best["n"])})
    return pd.DataFrame(rows, columns=["tag", "condition", "final_epoch", "final_mean",
                                       "final_sd", "n", "best_epoch", "best_mean", "best_sd",
                                       "best_n"])


GENERATION = re.compile(r"^(?P<chain>.+)@g(?P<generation>\d+)$")
"""``self_t1.0@g3``: a condition of generation 3 (``selftrain sweep`` names them so)."""


def by_generation(finals: pd.DataFrame) -> pd.DataFrame:
    """Final rows regrouped by generation: ``X`` is generation 1 of chain X, ``X@gN`` is N.

    Only chains with a later generation are kept; empty when there are none.

    Args:
        finals: :func:`final_and_best` rows of any families.

    Returns:
        Columns chain, generation, tag, final_mean, final_sd, n.
    """
    rows = []
    for row in finals.itertuples():
        match = GENERATION.match(row.condition)
        chain, generation = ((match["chain"], int(match["generation"])) if match
                             else (row.condition, 1))
        rows.append({"chain": chain, "generation": generation, "tag": row.tag,
                     "final_mean": row.final_mean, "final_sd": row.final_sd, "n": row.n})
    table = pd.DataFrame(rows, columns=["chain", "generation", "tag", "final_mean", "final_sd",
                                        "n"])
    later = set(table.loc[table["generation"] > 1, "chain"])
    return (table[table["chain"].isin(later)]
            .sort_values(["tag", "chain", "generation"], ignore_index=True))


def base_values(curve: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(tag, condition) -> mean at epoch 0 (the base model), where there is one."""
    base = curve[curve["epoch"] == 0]
    return {(row.tag, row.condition): float(row.mean) for row in base.itertuples()}


def relative_change(final: float, base: float) -> float:
    """(final - base) / base, NaN when the base is 0."""
    return (final - base) / base if base else float(np.nan)
