"""Mixtures of corpora by token share: real and synthetic data together, or real data repeated.

SBP trains on real and synthetic documents together at a fixed token budget, and its baseline
spends the same budget on the real corpus alone, repeated. :func:`mixture_plan` gives each
corpus its share ``w_j / sum(w)`` of an epoch's tokens: corpus j's rows are taken in a seeded
order (cycled, so repeated, only when its share asks for more tokens than it has) until its
tokens reach the share, overshooting by at most one row. Without a budget the epoch is the
largest one that repeats nothing: the corpus that runs out first at its share sets it.

The plan is fixed for the run (the batch sampler reshuffles its order every epoch), so a
resumed run sees the same rows, and ``--data.corpus [real]`` with ``--data.mixture_weights
[1]`` and ``--data.mixture_tokens`` N is the repetition baseline of an SBP mixture of N tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from selftrain.errors import SelftrainError
from selftrain.training.checks import available_memory


def check_weights(weights: Sequence[float], corpora: int, flag: str) -> None:
    """Refuse weights that are not one finite value >= 0 per corpus with a positive sum.

    Args:
        weights: the mixture weights.
        corpora: how many corpora they weigh.
        flag: the flag they came from.
    """
    shown = list(weights)
    if len(weights) != corpora:
        raise SelftrainError(f"{flag} {shown}: {len(weights)} weight(s) for {corpora} "
                             "corpora in --data.corpus; give one weight per corpus")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise SelftrainError(f"{flag} {shown}: weights are finite numbers >= 0 (token shares)")
    if not sum(weights) > 0:
        raise SelftrainError(f"{flag} {shown}: the weights sum to {sum(weights)}; they must sum "
                             "to a positive number (shares are w / sum(w))")


PLANNED_ROW_BYTES = 64
"""Memory one planned row costs at least: its index in the plan (measured 28 bytes) and its
place in the epoch's row list and the batch sampler's order."""


def check_budget(lengths: Sequence[Sequence[int]], shares: Sequence[float], tokens: int) -> None:
    """Refuse a token budget whose plan alone would not fit in the machine's free memory.

    A budget of 10^15 tokens used to grow a plan for minutes, gigabytes deep, before the
    first step; the number of rows it needs is known from the corpora's mean row lengths.

    Args:
        lengths: per corpus, the token count of each of its rows.
        shares: per corpus, its share of the tokens.
        tokens: the epoch's token budget.
    """
    rows = sum(share * tokens * len(corpus) / max(sum(corpus), 1)
               for corpus, share in zip(lengths, shares, strict=True) if share and corpus)
    free = available_memory()
    if free is None or rows * PLANNED_ROW_BYTES <= free:
        return
    raise SelftrainError(f"--data.mixture_tokens {tokens:,}: an epoch of that many tokens is "
                         f"about {rows:,.0f} rows of these corpora, whose plan alone needs "
                         f"{rows * PLANNED_ROW_BYTES / 2**30:,.1f} GiB, more than the "
                         f"{free / 2**30:,.1f} GiB this machine has free; give a budget near "
                         "the corpora's size (leave it out for the largest epoch that repeats "
                         "nothing)")


def mixture_plan(lengths: Sequence[Sequence[int]], weights: Sequence[float],
                 tokens: int | None, seed: int) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Which rows of each corpus an epoch holds, so corpus j gets its share of the tokens.

    Args:
        lengths: per corpus, the token count of each of its rows.
        weights: per corpus, its weight (checked by :func:`check_weights`).
        tokens: the epoch's token budget; None takes the largest without repetition.
        seed: orders each corpus's rows (corpus j uses ``(seed, j)``).

    Returns:
        (per corpus the row indices taken, repeats included; per corpus a record of its
        ``weight``, ``share``, ``target_tokens``, ``tokens``, ``rows`` and ``passes``, the
        times its rows were used on average).
    """
    total = float(sum(weights))
    shares = [w / total for w in weights]
    available = [int(sum(rows)) for rows in lengths]
    if tokens is None:
        tokens = int(min(available[j] / shares[j] for j in range(len(shares)) if shares[j]))
    else:  # the largest epoch without repetition fits by construction: only a budget is checked
        check_budget(lengths, shares, tokens)
    taken: list[list[int]] = []
    records = []
    for j, (rows, share) in enumerate(zip(lengths, shares, strict=True)):
        target = share * tokens
        if target > 0 and not rows:
            raise SelftrainError(f"--data.mixture_weights: corpus {j + 1} has weight "
                                 f"{weights[j]} but no rows to train on; give it weight 0 or "
                                 "leave it out")
        order = np.random.default_rng([seed, j]).permutation(len(rows))
        chosen, got = [], 0
        while got + 0.5 < target:
            index = int(order[len(chosen) % len(rows)])
            chosen.append(index)
            got += rows[index]
        taken.append(chosen)
        records.append({"weight": weights[j], "share": round(share, 6),
                        "target_tokens": round(target), "tokens": got, "rows": len(chosen),
                        "passes": round(len(chosen) / max(len(rows), 1), 3)})
    return taken, records
