"""Corpus proxies beside realised gains, and how far their rank correlation can be trusted.

The paper's second finding is negative: benchmark proximity (max cosine similarity of corpus
samples to benchmark items) and the corpus's mean NLL under the student do not predict which
corpora help. ``selftrain proxies`` measures both per sample (``<dir>/samples.parquet``, with
``<dir>/summary.json``), and a third, relational one where the corpus recorded its source's
log-probabilities: a per-token estimate of KL(source || student). This module reads those dirs
and joins them to each run that trained on their corpus (by the resolved corpus path): a run's
proxies are the means over the samples of its own subset (rows chosen as the data module
chooses them), and its gain is its own final delta, so C corpora x K subsets give up to C x K
points. It then computes the Spearman rank correlation between each proxy and the gain, and
what it can show:

- the permutation p-value, exact up to :data:`EXACT_MAX_N` points (every ordering of the gains)
  and from random orderings above, beside the smallest p that n points allow at all (2 / n!
  without ties: n = 5 cannot go below 1/60);
- a 95% confidence interval for rho (Fisher's z with the Bonett-Wright standard error);
- Holm's correction over every correlation the report ran (m of them, named), since testing
  proxies x benchmarks at once makes some small p-value likely by chance;
- a verdict fixed before any run: a relation is shown when its Holm-adjusted p is below
  :data:`ALPHA`; *no* relation (the paper's finding 2) only when the interval excludes
  |rho| >= :data:`NO_RELATION_EFFECT`; anything else is "not resolved".
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr

from selftrain.corpus import Corpus, select_subset
from selftrain.errors import SelftrainError

FORMAT = "selftrain-proxies/1"
ALPHA = 0.05
"""Family-wise error rate of the Holm-corrected tests."""
NO_RELATION_EFFECT = 0.5
"""|rho| a claim of no relation must exclude: its 95% interval must lie inside (-0.5, 0.5)."""
EXACT_MAX_N = 10
"""Up to this n the permutation p-value enumerates every ordering (10! = 3,628,800)."""
PERMUTATIONS = 20_000
PROXIES = {"max_similarity": "mean max similarity", "fraction_above": "fraction above threshold",
           "nll": "mean NLL (student)", "kl": "KL(source‖student) per token"}
"""Proxy key -> how the tables name it."""


@dataclass
class Proxies:
    """One ``selftrain proxies`` dir.

    Args:
        path: the dir, as given.
        summary: its ``summary.json``.
        samples: its ``samples.parquet``, or None when absent (the summary's histograms are
            drawn instead).
    """

    path: str
    summary: dict[str, Any]
    samples: pd.DataFrame | None

    @property
    def corpus(self) -> Path | None:
        """The corpus the proxies were measured on, resolved."""
        value = self.summary.get("corpus")
        return Path(os.path.realpath(value)) if isinstance(value, str) and value else None

    @property
    def label(self) -> str:
        """Source, temperature and kind of the corpus, as a condition is named."""
        parts = [str(self.summary.get("source_model") or "")]
        if isinstance(self.summary.get("temperature"), (int, float)):
            parts.append(f"T={self.summary['temperature']:g}")
        split = self.summary.get("split") if isinstance(self.summary.get("split"), dict) else {}
        kind = self.summary.get("corpus_kind")
        parts.append(f"{kind} {split['side']}" if kind and split.get("side") else str(kind or ""))
        return " ".join(p for p in parts if p) or Path(self.path).name

    def value(self, proxy: str, rows: list[int] | None = None) -> float:
        """A proxy's value: over the whole corpus, or the mean over some of its samples.

        Args:
            proxy: a :data:`PROXIES` key.
            rows: positions of the samples to average (a run's subset); None: the corpus-level
                value of ``summary.json``. Without ``samples.parquet`` (or its column) the
                corpus-level value is all there is.
        """
        column = "max_similarity" if proxy == "fraction_above" else proxy
        if rows is not None and self.samples is not None and column in self.samples:
            values = self.samples[column].to_numpy(float)[rows]
            if proxy == "fraction_above":
                threshold = self.summary.get("threshold")
                if not isinstance(threshold, (int, float)):
                    return math.nan
                return float(np.mean(values >= threshold)) if len(values) else math.nan
            values = values[np.isfinite(values)]
            return float(values.mean()) if len(values) else math.nan
        if proxy == "fraction_above":
            value = self.summary.get("fraction_above")
        else:
            value = (self.summary.get(proxy) or {}).get("mean")
        return float(value) if isinstance(value, (int, float)) else math.nan

    @property
    def cells_corpus(self) -> Path | None:
        """The proxy-cells corpus written beside these proxies (``--cells_out``), resolved."""
        cells = self.summary.get("cells")
        value = cells.get("corpus") if isinstance(cells, dict) else None
        return Path(os.path.realpath(value)) if isinstance(value, str) and value else None

    def rows_of(self, run: Any) -> list[int] | None:
        """Positions of a run's training samples: its cell of a cells corpus, else its subset.

        Args:
            run: a :class:`selftrain.analysis.runs.Run` trained on this corpus or its cells.
        """
        if (run.corpus is not None and run.corpus == self.cells_corpus and run.subset is not None
                and self.samples is not None and "cell" in self.samples):
            return np.flatnonzero(self.samples["cell"].to_numpy() == run.subset).tolist()
        return self.subset_rows(run.subset, run.get("data.num_subsets"), run.manifest)

    def subset_rows(self, subset: int | None, num_subsets: int | None,
                    manifest: dict[str, Any] | None) -> list[int] | None:
        """Positions of a run's training subset among the samples (None: every sample).

        Chosen by :func:`selftrain.corpus.select_subset`, as the data module chooses a run's
        rows; None when the samples were not kept or the subset cannot be told.

        Args:
            subset: the run's ``data.subset``.
            num_subsets: the run's ``data.num_subsets``.
            manifest: the corpus manifest (its ``num_subsets``).
        """
        if subset is None or self.samples is None:
            return None
        columns = {"id": self.samples["id"].tolist()} if "id" in self.samples else {}
        if "subset" in self.samples and self.samples["subset"].notna().all():
            columns["subset"] = self.samples["subset"].astype(int).tolist()
        if not columns:
            return None
        try:
            return select_subset(Corpus(Path(self.path), columns, manifest), subset,
                                 num_subsets, self.path)
        except SelftrainError:
            return None


def load_proxies(paths: list[str] | None) -> list[Proxies]:
    """Read the ``--proxies`` dirs.

    Args:
        paths: dirs written by ``selftrain proxies``.

    Raises:
        SelftrainError: a dir without a readable ``summary.json`` of this format, or with a
            ``samples.parquet`` that cannot be read.
    """
    loaded = []
    for given in paths or []:
        folder = Path(given)
        summary_file = folder / "summary.json"
        if not summary_file.is_file():
            raise SelftrainError(f"--proxies {given}: no summary.json there; pass a dir written "
                                 "by `selftrain proxies --out DIR`")
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, ValueError) as error:
            raise SelftrainError(f"--proxies {given}: summary.json is not readable JSON "
                                 f"({error}); rerun selftrain proxies for it") from None
        if not isinstance(summary, dict) or summary.get("format") != FORMAT:
            raise SelftrainError(f"--proxies {given}: summary.json is not of format {FORMAT}; "
                                 "rerun selftrain proxies for it")
        samples = None
        if (folder / "samples.parquet").is_file():
            try:
                samples = pd.read_parquet(folder / "samples.parquet")
            except Exception as error:  # pyarrow raises several types for a damaged file
                raise SelftrainError(f"--proxies {given}: samples.parquet is not readable "
                                     f"({type(error).__name__}); rerun selftrain proxies for it"
                                     ) from None
        loaded.append(Proxies(given, summary, samples))
    return loaded


def join(proxies: list[Proxies], runs: list[Any], gains: dict[str, dict[str, float]]
         ) -> pd.DataFrame:
    """One row per (proxies dir, run trained on its corpus): the run's proxies and its gains.

    A run's proxies are the means over the samples of its own subset (of its own cell, for a
    run on the corpus's proxy cells); a corpus no run trained on gets one row with its
    corpus-level values and no gains.

    Args:
        proxies: the proxies dirs.
        runs: the report's runs (:class:`selftrain.analysis.runs.Run`: label, condition,
            corpus, subset, config, manifest).
        gains: run label -> benchmark tag -> the run's final delta.

    Returns:
        Columns proxies, corpus, subset (``all`` for the whole corpus), run, condition (None:
        no run trained on it), each proxy key, and one column per benchmark tag.
    """
    rows = []
    for item in proxies:
        matched = [run for run in runs if run.corpus is not None
                   and run.corpus in (item.corpus, item.cells_corpus)]
        base = {"proxies": item.path, "corpus": item.label}
        if not matched:
            rows.append({**base, "subset": "all", "run": None, "condition": None,
                         **{key: item.value(key) for key in PROXIES}})
        for run in matched:
            chosen = item.rows_of(run)
            rows.append({**base, "subset": "all" if chosen is None else run.subset,
                         "run": run.label, "condition": run.condition,
                         **{key: item.value(key, chosen) for key in PROXIES},
                         **gains.get(run.label, {})})
    return pd.DataFrame(rows)


def permutation_p(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, str]:
    """Two-sided permutation p-value of Spearman's rho: how often a reordering is as extreme.

    Args:
        x: one variable.
        y: the other, same length.
        seed: for the random reorderings when n is above :data:`EXACT_MAX_N`.

    Returns:
        (p, how it was computed).
    """
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    scale = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    observed = abs(float(rx @ ry)) / scale
    n = len(x)
    if n <= EXACT_MAX_N:
        null = _exact_null(tuple(rx), tuple(sorted(ry)))
        extreme = int(np.count_nonzero(null / scale >= observed - 1e-12))
        return extreme / null.size, f"exact, all {null.size:,} orderings"
    rng = np.random.default_rng(seed)
    orderings = np.array([rng.permutation(ry) for _ in range(PERMUTATIONS)])
    extreme = int(np.count_nonzero(np.abs(orderings @ rx) / scale >= observed - 1e-12))
    return (extreme + 1) / (PERMUTATIONS + 1), f"{PERMUTATIONS:,} random orderings"


@functools.cache
def _exact_null(rx: tuple[float, ...], ry: tuple[float, ...]) -> np.ndarray:
    """|sum rx * ry[order]| over every ordering of ry (enumerated in chunks; cached per ranks)."""
    x = np.asarray(rx)
    values, orderings = [], itertools.permutations(ry)
    while chunk := list(itertools.islice(orderings, 500_000)):
        values.append(np.abs(np.asarray(chunk) @ x))
    return np.concatenate(values)


def smallest_p(x: np.ndarray, y: np.ndarray) -> float:
    """The smallest two-sided permutation p these ranks allow (2 / n! without ties)."""
    n = len(x)
    if n <= EXACT_MAX_N:
        rx, ry = rankdata(x), rankdata(y)
        rx, ry = rx - rx.mean(), ry - ry.mean()
        null = _exact_null(tuple(rx), tuple(sorted(ry)))
        return float(np.count_nonzero(null >= null.max() - 1e-9) / null.size)
    return 2 / math.factorial(n)


def rho_interval(rho: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval for Spearman's rho: Fisher's z, Bonett-Wright standard error.

    ``se = sqrt((1 + rho**2 / 2) / (n - 3))`` on ``atanh(rho)`` (Bonett & Wright 2000); NaN
    below n = 4. A perfect ranking (|rho| = 1) gives no interval from z; it is clipped.

    Args:
        rho: Spearman's rho.
        n: pairs.
        level: coverage.
    """
    if n < 4 or math.isnan(rho):
        return math.nan, math.nan
    from scipy.stats import norm

    z = math.atanh(max(-0.999999, min(0.999999, rho)))
    half = norm.ppf(0.5 + level / 2) * math.sqrt((1 + rho ** 2 / 2) / (n - 3))
    return math.tanh(z - half), math.tanh(z + half)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count in m).

    Args:
        p_values: the raw p-values of every test run together.
    """
    finite = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [math.nan] * len(p_values)
    m, running = len(finite), 0.0
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(n: int, rho: float, p_holm: float, interval: tuple[float, float], floor: float,
            tests: int) -> str:
    """What a rank correlation over n points (runs) can and cannot say, in words.

    Args:
        n: points.
        rho: Spearman's rho.
        p_holm: its Holm-adjusted permutation p.
        interval: its 95% interval.
        floor: the smallest p n points allow.
        tests: how many correlations the report ran (Holm's m).
    """
    if n < 3:
        return f"n = {n}: too few points to rank"
    if math.isnan(rho):
        return "undefined: the proxy or the gain is the same for every corpus"
    if p_holm < ALPHA:
        return f"a monotone relation (Holm-adjusted p = {p_holm:.3g} over {tests} tests)"
    low, high = interval
    if not math.isnan(low) and -NO_RELATION_EFFECT < low and high < NO_RELATION_EFFECT:
        return (f"no relation as strong as |ρ| = {NO_RELATION_EFFECT:g} (95% interval "
                f"[{low:.2f}, {high:.2f}])")
    reach = (f"; n = {n} allows p >= {floor:.3g}, so after Holm over {tests} tests nothing "
             f"could pass" if floor * tests >= ALPHA else "")
    shown = "no interval below n = 4" if math.isnan(low) else f"95% interval [{low:.2f}, " \
        f"{high:.2f}]"
    return f"not resolved ({shown}{reach})"


def correlations(joined: pd.DataFrame, tags: list[str]) -> pd.DataFrame:
    """Spearman rho between each proxy and each benchmark's final delta, over the runs.

    Args:
        joined: :func:`join` rows.
        tags: the benchmark-delta tags.

    Returns:
        Columns proxy, tag, n, rho, low, high, p, p_min, p_holm, tests, method, verdict.
    """
    rows = []
    matched = joined[joined["condition"].notna()] if not joined.empty else joined
    for proxy, tag in itertools.product(PROXIES, tags):
        if matched.empty or tag not in matched:
            continue
        pairs = matched[[proxy, tag]].dropna()
        n = len(pairs)
        if n == 0:
            continue
        x, y = pairs[proxy].to_numpy(float), pairs[tag].to_numpy(float)
        constant = n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0
        rho = math.nan if constant else float(spearmanr(x, y).statistic)
        p, method = (math.nan, "") if constant else permutation_p(x, y)
        low, high = rho_interval(rho, n)
        rows.append({"proxy": PROXIES[proxy], "tag": tag, "n": n, "rho": rho, "low": low,
                     "high": high, "p": p, "p_min": math.nan if constant else smallest_p(x, y),
                     "method": method})
    tests = sum(not math.isnan(row["p"]) for row in rows)
    for row, adjusted in zip(rows, holm([row["p"] for row in rows]), strict=True):
        row.update(p_holm=adjusted, tests=tests,
                   verdict=verdict(row["n"], row["rho"], adjusted, (row["low"], row["high"]),
                                   row["p_min"], tests))
    return pd.DataFrame(rows, columns=["proxy", "tag", "n", "rho", "low", "high", "p", "p_min",
                                       "p_holm", "tests", "method", "verdict"])
