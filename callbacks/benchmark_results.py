"""lm-eval results as :class:`~selftrain.callbacks.BenchmarkEval` keeps them: scores, deltas, files.

lm-eval returns one nested results dict per evaluated task; the callback evaluates tasks one at
a time and splits them over ranks, so this module gathers the parts from every rank, merges
them back into one dict, turns its rows into flat ``<task>/<metric>`` scores (and standard
errors, where lm-eval gives them), computes the deltas from the base model's scores, and writes
the merged results (no per-sample logs) as one JSON file per evaluation.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selftrain.errors import SelftrainError
from selftrain.io import write_json_atomic

MERGED_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
               "higher_is_better", "n-samples")
"""The per-task maps of an lm-eval results dict, united by :func:`merge_results`."""


def merge_results(parts: list[dict]) -> dict:
    """One lm-eval results dict from several (disjoint tasks): its per-task maps united."""
    return {key: {k: v for part in parts for k, v in part.get(key, {}).items()}
            for key in MERGED_KEYS}


def gather_parts(part: dict, error: Exception | None, rank: int, world: int,
                 owner: str) -> list[dict]:
    """Every rank's results part, in rank order; a failure on any rank is raised on all.

    Args:
        part: this rank's results (its share of the tasks).
        error: what this rank's evaluation raised, if anything.
        rank: this process's global rank.
        world: the number of processes.
        owner: the callback's name, for the message of a failure on another rank.
    """
    parts = [part]
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * world
        message = None if error is None else f"rank {rank}: {type(error).__name__}: {error}"
        torch.distributed.all_gather_object(gathered, (part, message))
        if error is not None:
            raise error
        failures = [failure for _, failure in gathered if failure]
        if failures:
            raise RuntimeError(f"{owner} failed on " + "; ".join(failures))
        parts = [gathered_part for gathered_part, _ in gathered]
    elif error is not None:
        raise error
    return parts


def metric_scores(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``<task>/<metric>`` -> value from lm-eval's ``results`` rows.

    ``acc,none`` becomes ``acc``, ``exact_match,strict-match`` ``exact_match_strict-match``;
    stderrs, ``alias`` and other non-metric entries are left out.
    """
    scores = {}
    for task, row in results.items():
        for key, value in row.items():
            metric, comma, filter_name = key.partition(",")
            if (not comma or "_stderr" in metric or isinstance(value, bool)
                    or not isinstance(value, (int, float, np.number))):
                continue
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            scores[f"{task}/{name}"] = float(value)
    return scores


def stderr_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``benchmark_stderr/<task>/<metric>`` -> standard error, for the scores that have one.

    lm-eval writes ``<metric>_stderr,<filter>`` beside each metric: a number only when
    ``bootstrap_iters`` > 0 and the metric's aggregation has a standard error (closed form for
    means such as ``acc`` and ``exact_match``, bootstrapped for a few others), else ``"N/A"``,
    which is left out here, as is anything not finite. Perplexities, ``bits_per_byte`` and
    ``brier_score`` never have one. Names follow :func:`metric_scores` (``acc_stderr,none`` ->
    ``<task>/acc``); stderrs get no deltas.
    """
    stderrs = {}
    for task, row in results.items():
        for key, value in row.items():
            metric, comma, filter_name = key.partition(",")
            if (not comma or not metric.endswith("_stderr") or isinstance(value, bool)
                    or not isinstance(value, (int, float, np.number))
                    or not math.isfinite(value)):
                continue
            metric = metric[:-len("_stderr")]
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            stderrs[f"benchmark_stderr/{task}/{name}"] = float(value)
    return stderrs


def benchmark_metrics(scores: dict[str, float], base: dict[str, float] | None, epoch: int,
                      flag: str) -> dict[str, float]:
    """The logged tags: ``benchmark/<key>``, and ``benchmark_delta/<key>`` when there is a base.

    Args:
        scores: this evaluation's :func:`metric_scores`.
        base: the base model's scores (epoch 0), or None when they were never measured.
        epoch: epochs completed; at 0 every delta is exactly 0.
        flag: how the callback's ``tasks`` argument is spelled in messages.

    Raises:
        SelftrainError: the base lacks some of the scores (the run started with other tasks).
    """
    metrics = {f"benchmark/{key}": value for key, value in scores.items()}
    if base is not None:
        missing = sorted(set(scores) - set(base))
        if missing:
            raise SelftrainError(f"{flag}: the base-model scores lack {', '.join(missing)}; "
                                 "resume with the tasks the run started with, or start a new run")
        metrics.update({f"benchmark_delta/{key}": 0.0 if epoch == 0 else value - base[key]
                        for key, value in scores.items()})
    return metrics


def write_results(target: Path, results: dict, config: dict[str, Any], epoch: int,
                  step: int) -> Path:
    """lm-eval's merged results (no per-sample logs) with the run's settings, as JSON.

    Args:
        target: the file, written atomically.
        results: :func:`merge_results` of one evaluation.
        config: what the scores depend on (model, tasks, limit, seed, ...).
        epoch: epochs completed.
        step: the global step.
    """
    import lm_eval
    import transformers
    from lm_eval.utils import handle_non_serializable

    document = {**{k: v for k, v in results.items() if v or k != "groups"},
                "config": config, "epoch": epoch, "global_step": step, "date": time.time(),
                "lm_eval_version": lm_eval.__version__,
                "transformers_version": transformers.__version__}
    write_json_atomic(document, target, default=handle_non_serializable, ensure_ascii=False)
    return target
