"""The damage gate of ``selftrain plant``: a planted base must still be the model it came from.

Every gain a student shows is measured from the planted base. If planting itself hurt the base
(its held-out bits per byte, its benchmarks), later training partly repairs that damage, and the
repair favours any corpus that is not the damaged model's own text: the relational finding
would be confounded from the start. So ``plant`` scores the base before and after planting on
the same lm-eval tasks and publishes the planted model only when no metric got worse by more
than it may:

- a metric with an item standard error (``acc``, ``exact_match``: lm-eval's closed form, with
  ``bootstrap_iters`` > 0): by at most one SE of the unplanted model's score;
- ``bits_per_byte``, which has none (lm-eval pools every byte): by at most ``tolerance``
  (default 0.03 bits per byte);
- any other metric without one (the perplexities, exponentials of bits per byte): recorded,
  not gated.

"Worse" follows the task's own ``higher_is_better`` from lm-eval (a task that does not declare
it for a metric is refused). The numbers go into ``plant.json`` either way.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selftrain.curation.lm_eval_tasks import check_names, load_units, metric_name, task_manager
from selftrain.errors import SelftrainError

DEFAULT_TOLERANCE = 0.03
"""Largest allowed rise of held-out bits per byte."""


@dataclass
class DamageGate:
    """The tasks a planted base is checked on, and how much worse it may get.

    Args:
        tasks: lm-eval task names -> few-shot count (None: the task's default); empty: no gate.
        include_path: folders of local lm-eval task YAMLs (e.g. ``configs/tasks``).
        limit: items per task (None: all).
        tolerance: worst allowed rise of held-out bits per byte (>= 0).
        allow_damage: publish a plant that fails the gate anyway (the figures are recorded).
        batch_size: lm-eval batch size.
    """

    tasks: dict[str, int | None] = field(default_factory=dict)
    include_path: list[str] = field(default_factory=list)
    limit: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    allow_damage: bool = False
    batch_size: int = 8

    def check(self) -> None:
        """Refuse bad settings in one line, before any model is loaded."""
        if not self.tolerance >= 0:
            raise SelftrainError(f"--gate.tolerance {self.tolerance}: must be >= 0 (the largest "
                                 "allowed rise of held-out bits per byte)")
        if self.limit is not None and self.limit < 1:
            raise SelftrainError(f"--gate.limit {self.limit}: must be >= 1, or null for all")
        for path in self.include_path:
            if not Path(path).is_dir():
                raise SelftrainError(f"--gate.include_path {path}: no such directory; point it "
                                     "at a folder of lm-eval task YAMLs (e.g. configs/tasks)")

    def load(self) -> dict[str, dict]:
        """The tasks, loaded and checked (an unknown name is refused in one line)."""
        manager = task_manager(self.include_path, names=list(self.tasks))
        check_names(manager, self.tasks, _flag)
        return load_units(manager, dict(self.tasks), (), _flag)


def _flag(name: str) -> str:
    return f"--gate.{name}"


@dataclass
class Score:
    """One metric of one task: its value, its item SE (None: lm-eval gives none), direction."""

    value: float
    stderr: float | None
    higher_is_better: bool


def score_tasks(model: torch.nn.Module, tokenizer, units: dict[str, dict], gate: DamageGate,
                seed: int = 0) -> dict[str, Score]:
    """``<task>/<metric>`` -> :class:`Score` of a model on the gate's tasks.

    Args:
        model: the model (eval mode is set here).
        tokenizer: its tokenizer (copied: lm-eval sets a pad token on it).
        units: :meth:`DamageGate.load`'s tasks.
        gate: the gate (limit, batch size).
        seed: lm-eval's few-shot and sampling seed.
    """
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    model.eval()
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal",
              batch_size=gate.batch_size)
    scores: dict[str, Score] = {}
    for loaded in units.values():
        for task_obj in loaded["tasks"].values():
            task_obj.set_fewshot_seed(seed=seed)
        results = evaluate(lm=lm, task_dict=loaded, limit=gate.limit, bootstrap_iters=100,
                           log_samples=False)
        scores.update(_scores(results))
    return scores


def _scores(results: dict[str, Any]) -> dict[str, Score]:
    found = {}
    for task, row in results["results"].items():
        directions = results.get("higher_is_better", {}).get(task, {})
        for key, value in row.items():
            metric, comma, filter_name = key.partition(",")
            if (not comma or metric.endswith("_stderr") or isinstance(value, bool)
                    or not isinstance(value, (int, float))):
                continue
            if metric not in directions:
                raise SelftrainError(f"--gate.tasks: task {task} does not say whether higher "
                                     f"{metric} is better (higher_is_better); give its metric "
                                     "list higher_is_better or leave the task out of the gate")
            stderr = row.get(f"{metric}_stderr,{filter_name}")
            found[f"{task}/{metric_name(metric, filter_name)}"] = Score(
                float(value), float(stderr) if isinstance(stderr, (int, float))
                and math.isfinite(stderr) else None, bool(directions[metric]))
    return found


def judge(before: dict[str, Score], after: dict[str, Score], tolerance: float
          ) -> dict[str, Any]:
    """The gate's verdict: per metric, how much worse it got and how much it may.

    Args:
        before: the unplanted model's scores.
        after: the planted model's.
        tolerance: allowed rise of bits per byte.

    Returns:
        ``{"passed": bool, "metrics": {name: {before, after, worse_by, allowed, rule,
        passed}}}``: ``worse_by`` > 0 means worse in the metric's own direction.
    """
    metrics = {}
    for name, old in before.items():
        new = after[name]
        worse = (old.value - new.value) if old.higher_is_better else (new.value - old.value)
        if old.stderr is not None:
            allowed, rule = old.stderr, "one item SE of the unplanted score"
        elif name.rsplit("/", 1)[-1] == "bits_per_byte":
            allowed, rule = tolerance, "tolerance"
        else:
            allowed, rule = math.inf, "not gated: no item SE"
        metrics[name] = {"before": round(old.value, 6), "after": round(new.value, 6),
                         "higher_is_better": old.higher_is_better, "worse_by": round(worse, 6),
                         "allowed": None if math.isinf(allowed) else round(allowed, 6),
                         "rule": rule, "passed": bool(worse <= allowed + 1e-12)}
    return {"passed": all(m["passed"] for m in metrics.values()), "tolerance": tolerance,
            "metrics": metrics}


def failure_line(verdict: dict[str, Any]) -> str:
    """One line naming every metric that failed the gate, with its figures."""
    failed = [f"{name} {m['before']:.4g} -> {m['after']:.4g} (worse by {m['worse_by']:.3g}, "
              f"allowed {m['allowed']:.3g})" for name, m in verdict["metrics"].items()
              if not m["passed"]]
    return ("plant: the planted model fails the damage gate: " + "; ".join(failed)
            + "; nothing written: plant with more rehearsal (--rehearsal_ratio) or a lower --lr, "
              "or pass --gate.allow_damage true to publish it anyway")
