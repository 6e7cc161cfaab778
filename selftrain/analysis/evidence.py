"""Corpus proxies beside realised gains, and how far their rank correlation can be trusted.

The paper's second finding is negative: benchmark proximity (max cosine similarity of corpus
samples to benchmark items) and the corpus's mean NLL under the student do not predict which
corpora help. ``selftrain proxies`` measures both per corpus (``<dir>/summary.json`` and
``<dir>/samples.parquet``); this module reads those dirs, joins each to the runs that trained on
its corpus (by the resolved corpus path) and computes the Spearman rank correlation between each
proxy and the gain, with an exact permutation p-value for small n (every ordering of the gains)
and a plain verdict: with fewer than :data:`MIN_EVIDENCE_N` corpora a correlation is not
evidence either way, whatever its value.
"""

from __future__ import annotations

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

from selftrain.errors import SelftrainError

FORMAT = "selftrain-proxies/1"
MIN_EVIDENCE_N = 10
"""Below this many corpora the report says a rank correlation is not evidence either way."""
EXACT_MAX_N = 8
"""Up to this n the permutation p-value enumerates every ordering (8! = 40320)."""
PERMUTATIONS = 20_000
PROXIES = {"max_similarity": "mean max similarity", "fraction_above": "fraction above threshold",
           "nll": "mean NLL (student)"}
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

    def value(self, proxy: str) -> float:
        """A proxy's corpus-level value (mean max similarity, fraction above, mean NLL)."""
        if proxy == "fraction_above":
            value = self.summary.get("fraction_above")
        else:
            value = (self.summary.get(proxy) or {}).get("mean")
        return float(value) if isinstance(value, (int, float)) else math.nan


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


def join(proxies: list[Proxies], corpora: dict[str, Path | None],
         finals: pd.DataFrame) -> pd.DataFrame:
    """One row per (proxies dir, condition trained on its corpus): the proxies and the gains.

    Args:
        proxies: the proxies dirs.
        corpora: condition -> its corpus (resolved), None when its runs differ or have none.
        finals: :func:`selftrain.analysis.curves.final_and_best` rows of the benchmark deltas.

    Returns:
        Columns proxies, corpus, condition (None: no run trained on it), each proxy key, and
        one column per benchmark tag with the condition's final mean delta.
    """
    gains = finals.pivot(index="condition", columns="tag", values="final_mean") \
        if not finals.empty else pd.DataFrame()
    rows = []
    for item in proxies:
        matched = [c for c, corpus in corpora.items() if corpus is not None
                   and corpus == item.corpus]
        for condition in matched or [None]:
            row = {"proxies": item.path, "corpus": item.label, "condition": condition}
            row.update({key: item.value(key) for key in PROXIES})
            if condition is not None and condition in gains.index:
                row.update(gains.loc[condition].to_dict())
            rows.append(row)
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
        orderings = np.array(list(itertools.permutations(ry)))
        method = f"exact, all {len(orderings)} orderings"
    else:
        rng = np.random.default_rng(seed)
        orderings = np.array([rng.permutation(ry) for _ in range(PERMUTATIONS)])
        method = f"{PERMUTATIONS} random orderings"
    extreme = np.abs(orderings @ rx) / scale >= observed - 1e-12
    if n <= EXACT_MAX_N:
        return float(extreme.mean()), method
    return float((extreme.sum() + 1) / (len(orderings) + 1)), method


def verdict(n: int, rho: float, p: float) -> str:
    """What a rank correlation over n corpora can and cannot say, in words."""
    if n < 3:
        return f"n = {n}: too few corpora to rank"
    if math.isnan(rho):
        return "undefined: the proxy or the gain is the same for every corpus"
    if n < MIN_EVIDENCE_N:
        floor = 2 / math.factorial(n)
        return (f"n = {n} corpora: not evidence either way (even a perfect ranking has "
                f"p >= {floor:.3g})")
    if p < 0.05:
        return "a monotone relation (p < 0.05)"
    return "no evidence of a monotone relation (which is not evidence of none)"


def correlations(joined: pd.DataFrame, tags: list[str]) -> pd.DataFrame:
    """Spearman rho between each proxy and each benchmark's final delta, over the conditions.

    Args:
        joined: :func:`join` rows.
        tags: the benchmark-delta tags.

    Returns:
        Columns proxy, tag, n, rho, p, method, verdict.
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
        p, method = (math.nan, "") if constant or n < 3 else permutation_p(x, y)
        rows.append({"proxy": PROXIES[proxy], "tag": tag, "n": n, "rho": rho, "p": p,
                     "method": method, "verdict": verdict(n, rho, p)})
    return pd.DataFrame(rows, columns=["proxy", "tag", "n", "rho", "p", "method", "verdict"])
