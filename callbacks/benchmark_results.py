"""lm-eval results as :class:`~selftrain.callbacks.BenchmarkEval` keeps them: scores, deltas, files.

lm-eval returns one nested results dict per evaluated task; the callback evaluates tasks one at
a time and splits them over ranks, so this module gathers the parts from every rank, merges
them back into one dict, turns its rows into flat ``<task>/<metric>`` scores (and standard
errors, where lm-eval gives them), computes the deltas from the base model's scores, and writes
the merged results as one JSON file per evaluation, with lm-eval's per-item results beside it in
a compact parquet table (:func:`item_rows`), so that any two evaluations of the same items can
be compared item by item (:mod:`selftrain.analysis.items`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from selftrain.curation.lm_eval_tasks import metric_name
from selftrain.errors import SelftrainError
from selftrain.io import write_json_atomic, write_parquet_atomic

ITEMS_SUFFIX = ".items.parquet"
"""The per-item table beside each results JSON: ``epoch=<E>-step=<S>.items.parquet``."""

ITEM_SCHEMA = pa.schema([
    ("task", pa.string()), ("doc_id", pa.int64()), ("filter", pa.string()),
    ("metric", pa.string()), ("aggregation", pa.string()), ("value", pa.float64()),
    ("weight", pa.float64()), ("target", pa.string()),
    ("loglikelihoods", pa.list_(pa.float64())), ("answer", pa.string())])
"""One row per (task, document, filter, metric): the metric's per-item value and what it came
from. ``aggregation`` is the name of lm-eval's aggregation of that metric (``mean``,
``bits_per_byte``, ``brier_score``, ...). ``value``/``weight``: the item's value with weight 1,
or, for the perplexity family (whose item is a pair), the document's log-likelihood and its
word or byte count. ``brier_score`` items are each item's squared error (the aggregate is their
mean). ``loglikelihoods``: each request's log-likelihood (per choice; one for a rolling
document), ``answer``: the generated text (generation tasks)."""

MERGED_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
               "higher_is_better", "n-samples")
"""The per-task maps of an lm-eval results dict, united by :func:`merge_results`."""


def merge_results(parts: list[dict]) -> dict:
    """One lm-eval results dict from several (disjoint tasks): its per-task maps united.

    The parts' ``items`` (:func:`item_rows`, where kept) are concatenated under ``items``.
    """
    merged: dict[str, Any] = {key: {k: v for part in parts for k, v in part.get(key, {}).items()}
                              for key in MERGED_KEYS}
    merged["items"] = [row for part in parts for row in part.get("items", [])]
    return merged


def item_rows(samples: dict[str, list[dict]], aggregations: dict[str, dict[str, str]]
              ) -> list[dict[str, Any]]:
    """lm-eval's logged samples as compact :data:`ITEM_SCHEMA` rows (no documents, no prompts).

    Args:
        samples: ``results["samples"]`` of ``evaluate(..., log_samples=True)``: task -> examples.
        aggregations: task -> metric -> the name of lm-eval's aggregation of it.
    """
    rows = []
    for task, examples in samples.items():
        for example in examples:
            responses = list(example.get("filtered_resps") or [])
            likelihoods = [_loglikelihood(response) for response in responses]
            filter_name = str(example.get("filter", "none"))
            common = {"task": task, "doc_id": int(example["doc_id"]), "filter": filter_name,
                      "target": str(example.get("target")),
                      "loglikelihoods": likelihoods if likelihoods and None not in likelihoods
                      else None,
                      "answer": next((r for r in responses if isinstance(r, str)), None)}
            for metric in example.get("metrics", []):
                value = _item_value(example.get(metric))
                if value is None:
                    continue
                rows.append({**common, "metric": metric_name(metric, filter_name),
                             "aggregation": aggregations.get(task, {}).get(metric, ""),
                             "value": value[0], "weight": value[1]})
    return rows


def _loglikelihood(response: Any) -> float | None:
    """A loglikelihood request's response (``(ll, is_greedy)``, or a rolling ``ll``) as a float."""
    if isinstance(response, (tuple, list)) and response:
        response = response[0]
    if isinstance(response, (int, float, np.number)) and not isinstance(response, bool):
        return float(response)
    return None


def _item_value(value: Any) -> tuple[float, float] | None:
    """An item's metric value as (value, weight); None where it has no numeric per-item form.

    A number is itself with weight 1; the perplexity family's ``(loglikelihood, count)`` is
    that pair; brier's ``(gold, probabilities)`` is the item's squared error, weight 1.
    """
    if isinstance(value, (bool, int, float, np.number)):
        return float(value), 1.0
    if isinstance(value, (tuple, list)) and len(value) == 2:
        first, second = value
        if _is_number(first) and _is_number(second):
            return float(first), float(second)
        if _is_number(first) and np.ndim(second) == 1:
            probabilities = np.asarray(second, dtype=float)
            gold = np.zeros_like(probabilities)
            gold[int(first)] = 1.0
            return float(np.sum((probabilities - gold) ** 2)), 1.0
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


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
            scores[f"{task}/{metric_name(metric, filter_name)}"] = float(value)
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
            name = metric_name(metric[:-len("_stderr")], filter_name)
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
    """lm-eval's merged results with the run's settings as JSON, and its per-item rows beside it.

    The items (``results["items"]``, :func:`item_rows`) go to ``<target stem>`` +
    :data:`ITEMS_SUFFIX` first, so a results JSON never names items that are not there.

    Args:
        target: the JSON file; both files are written atomically.
        results: :func:`merge_results` of one evaluation.
        config: what the scores depend on (model, tasks, limit, seed, ...).
        epoch: epochs completed.
        step: the global step.
    """
    import lm_eval
    import transformers
    from lm_eval.utils import handle_non_serializable

    items = results.get("items")
    if items:
        write_parquet_atomic(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), items_path(target))
    document = {**{k: v for k, v in results.items() if (v or k != "groups") and k != "items"},
                "config": config, "epoch": epoch, "global_step": step, "date": time.time(),
                "lm_eval_version": lm_eval.__version__,
                "transformers_version": transformers.__version__,
                "items": items_path(target).name if items else None}
    write_json_atomic(document, target, default=handle_non_serializable, ensure_ascii=False)
    return target


def items_path(results_json: Path) -> Path:
    """The per-item table beside a results JSON (``E-S.json`` -> ``E-S.items.parquet``)."""
    return results_json.with_name(results_json.stem + ITEMS_SUFFIX)
