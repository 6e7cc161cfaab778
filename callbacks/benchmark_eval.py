"""`BenchmarkEval`: lm-eval benchmarks on the in-memory student, tracked as deltas from the base.

The paper's capability curves are lm-eval scores after every epoch, as the change from the
frozen base model. This callback hands the student that is training (``pl_module.model``, no
reload, no second copy of the weights) to lm-eval as ``HFLM(pretrained=model)`` and logs
``benchmark/<task>/<metric>`` and ``benchmark_delta/<task>/<metric>`` (vs the epoch-0 pass,
so every delta curve starts at exactly 0). The base scores live in the callback's state, so
they survive ``--ckpt_path last``. lm-eval's full results go to
``<run>/eval/benchmark/epoch=<E>-step=<S>.json``, and its per-item results, compactly (document
id, target, per-choice log-likelihoods or the generated answer, each metric's item value), to
``epoch=<E>-step=<S>.items.parquet`` beside it, so that the report's deltas carry the standard
error of the paired per-item difference (:mod:`selftrain.analysis.items`).

Choices worth knowing:

- **Per-task cadence.** ``tasks`` maps a name to its few-shot count, or to
  ``{num_fewshot: N, every_n_epochs: K}``, as in-loop evaluation suites do: cheap
  log-likelihood tasks every epoch, long generation tasks every K-th. A task without its own
  ``every_n_epochs`` takes the callback's. The callback evaluates after any epoch at which some
  task is due (its epoch count a multiple of the task's K), and then only the due tasks; every
  task runs at epoch 0 and at the last epoch, so every delta curve starts at 0 and every task
  has the final model. A task's curves have points only at its epochs, and each results JSON
  lists the tasks it ran (``config.evaluated``). Which tasks are due depends only on the epoch
  and the config, so a resumed run evaluates the same tasks at the same epochs.
  ``selftrain evaluate`` (outside training) evaluates every task on every model.

- **Metric names.** lm-eval keys are ``<metric>,<filter>``: filter ``none`` gives the bare
  metric (``acc``), any other filter ``<metric>_<filter>`` (``exact_match_strict-match``);
  ``alias`` and counts are skipped. Standard errors, where lm-eval computes them (only with
  ``bootstrap_iters`` > 0, and never for perplexities or bits per byte), are logged as
  ``benchmark_stderr/<task>/<metric>``, without deltas; the results JSON has them all. Group
  rows that lm-eval aggregates (e.g. ``mmlu``) are logged beside their subtasks, under the
  group's name.
- **Reproducible few-shot.** Each task (or group / tag, as listed in ``tasks``) is evaluated
  on its own after re-seeding python, numpy, torch and the few-shot sampler with ``seed``, so
  every epoch sees the same prompts, whatever else is listed and however many ranks run. The
  training RNG state is saved before and restored after, so evaluating never changes training.
- **Local data paths.** For task YAMLs under ``include_path`` a relative data file that exists
  next to its YAML is read from there, so ``configs/tasks`` works from any working directory
  (:mod:`selftrain.curation.lm_eval_tasks` finds, indexes and loads the tasks; the results
  bookkeeping is in :mod:`selftrain.callbacks.benchmark_results`).
- **DDP.** ``HFLM`` given a model object assumes one process (rank 0 of 1, no collectives),
  and ``simple_evaluate`` returns nothing where ``LOCAL_RANK`` != 0, so this calls lm-eval's
  ``evaluate`` per task instead. The listed tasks are split across ranks (rank r takes tasks r,
  r+P, ...), each rank evaluates its share on its own replica (DDP replicas hold identical
  weights), and ``all_gather_object`` gives every rank all results; rank 0 writes the JSON.
  Splitting whole tasks (not documents) keeps each task's result identical to a one-process
  run and needs no lm-eval distributed plumbing; it is faster than rank-0-only whenever more
  than one task is listed, and a failure on one rank is gathered and raised on all of them,
  so no rank is left waiting. Under FSDP every rank evaluates a gathered, unsharded copy
  (see ``EpochEvaluation.evaluation_mode``); DeepSpeed and model parallel are refused.
- **Code execution.** Tasks marked ``unsafe_code`` (HumanEval, MBPP, ...) run only with
  ``allow_code_execution``; otherwise they are skipped with one warning.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from selftrain.callbacks.benchmark_results import (
    benchmark_metrics,
    gather_parts,
    item_rows,
    items_path,
    merge_results,
    metric_scores,
    stderr_metrics,
    write_results,
)
from selftrain.callbacks.epoch_eval import EpochEvaluation, training_ends
from selftrain.curation.lm_eval_tasks import (
    check_generation,
    check_names,
    code_tasks,
    load_units,
    task_manager,
)
from selftrain.errors import SelftrainError
from selftrain.io import copy_atomic

TASK_KEYS = ("num_fewshot", "every_n_epochs")
"""What a task's mapping in ``tasks`` may set."""


class BenchmarkEval(EpochEvaluation):
    """lm-eval tasks on the student at epoch 0 and after every n-th epoch, as deltas from base.

    Args:
        tasks: lm-eval task, group or tag name -> num_fewshot (null: the task's own default),
            or -> ``{num_fewshot: N, every_n_epochs: K}`` to evaluate that task only after
            every K-th epoch (and at epoch 0 and the last epoch); either key may be left out.
        include_path: directories of extra lm-eval task YAMLs (e.g. ``configs/tasks``).
        limit: evaluate only the first N documents of every task (a float in (0, 1): that
            share of them); for quick curves, not for numbers to publish.
        batch_size: lm-eval batch size.
        every_n_epochs: evaluate after every n-th training epoch the tasks that set no
            ``every_n_epochs`` of their own; the last epoch always is.
        run_at_start: evaluate the base model before the first optimizer step (epoch 0); the
            deltas need it.
        allow_code_execution: run tasks that execute model-written code (``unsafe_code`` in
            their config, e.g. HumanEval); sets ``HF_ALLOW_CODE_EVAL=1``. Use a sandbox.
        seed: seed of python, numpy, torch and the few-shot sampler for every evaluation, so
            every epoch sees the same few-shot prompts.
        bootstrap_iters: lm-eval bootstrap iterations for stderrs (0: no stderrs, fastest); any
            value > 0 gives closed-form stderrs of means (``acc``, ``exact_match``) at no cost,
            logged as ``benchmark_stderr/<task>/<metric>``.
        max_length: context length given to lm-eval; None: the model config's.
        fast_generation: run greedy generation tasks on selftrain's prompted, slot-refilling
            decoder (:class:`selftrain.probes.fast_generation.FastHFLM`) instead of HFLM's
            padded batches: answers equal HFLM's in float32; under bf16 a few near-ties
            round the other way, as HFLM's own answers do across batch sizes. Faster on the
            machines measured (docs/benchmarks.md); false gives lm-eval's own path.
    """

    name = "benchmark"
    adopts_base = True  # epoch 0 depends on the base model and the task settings alone

    def __init__(
        self,
        tasks: dict[str, int | dict[str, int | None] | None],
        include_path: str | list[str] | None = None,
        limit: int | float | None = None,
        batch_size: int = 8,
        every_n_epochs: int = 1,
        run_at_start: bool = True,
        allow_code_execution: bool = False,
        seed: int = 1234,
        bootstrap_iters: int = 0,
        max_length: int | None = None,
        fast_generation: bool = True,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, run_at_start=run_at_start)
        shots_of, every_of = self._parse_tasks(tasks, every_n_epochs)
        if isinstance(limit, float) and limit >= 1 and limit.is_integer():
            limit = int(limit)  # 8.0 is 8 documents, as in lm-eval (a parser may give 8.0)
        if limit is not None and (isinstance(limit, bool) or limit <= 0
                                  or (isinstance(limit, float) and limit >= 1)):
            raise SelftrainError(f"{self.flag('limit')} {limit}: give a number of documents "
                                 "(an integer >= 1), a share in (0, 1), or null for all")
        for flag, value, low in (("batch_size", batch_size, 1),
                                 ("bootstrap_iters", bootstrap_iters, 0),
                                 ("max_length", max_length, 1)):
            if value is not None and value < low:
                raise SelftrainError(f"{self.flag(flag)} {value}: must be >= {low}")
        paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
        self.tasks = shots_of
        """Task, group or tag name -> num_fewshot (None: the task's own)."""
        self.task_every_n_epochs = every_of
        """Task, group or tag name -> evaluate it after every this many epochs."""
        self.include_path = [str(Path(path).resolve()) for path in paths]  # cwd may change
        self._include_given = paths
        self.limit = limit
        self.batch_size = batch_size
        self.allow_code_execution = allow_code_execution
        self.seed = seed
        self.bootstrap_iters = bootstrap_iters
        self.max_length = max_length
        self._context_checked = False
        self.fast_generation = fast_generation
        self.skipped: list[str] = []
        self._units: dict[str, dict] = {}  # task name -> lm-eval's loaded task dict
        self._tokenizer = None
        self._base: dict[str, float] | None = None
        self._due: list[str] | None = None  # the tasks of the evaluation in progress

    def _parse_tasks(self, tasks: Any, every_n_epochs: int
                     ) -> tuple[dict[str, int | None], dict[str, int]]:
        """``tasks`` as name -> num_fewshot and name -> every_n_epochs; raise on bad entries.

        Args:
            tasks: the ``tasks`` argument: name -> num_fewshot, or -> a mapping of ``TASK_KEYS``.
            every_n_epochs: the cadence of the tasks that set none.
        """
        if not isinstance(tasks, dict) or not tasks:
            raise SelftrainError(f"{self.flag('tasks')} {tasks!r}: give a mapping of lm-eval "
                                 "task names to few-shot counts, e.g. {arc_easy: 0}")
        shots_of, every_of = {}, {}
        for task, value in tasks.items():
            if not isinstance(task, str) or not task.strip():
                raise SelftrainError(f"{self.flag('tasks')} {task!r}: task names must be "
                                     "non-empty strings")
            entry = value if isinstance(value, dict) else {"num_fewshot": value}
            unknown = sorted(str(key) for key in entry if key not in TASK_KEYS)
            if unknown:
                raise SelftrainError(f"{self.flag('tasks')} {task}: unknown key "
                                     f"{unknown[0]!r}; a task's mapping takes "
                                     f"{' and '.join(TASK_KEYS)}")
            shots = entry.get("num_fewshot")
            if shots is not None and not _is_count(shots, 0):
                raise SelftrainError(f"{self.flag('tasks')} {task}: {shots!r}: num_fewshot "
                                     "must be an integer >= 0, or null for the task's default")
            every = entry.get("every_n_epochs")
            if every is not None and not _is_count(every, 1):
                raise SelftrainError(f"{self.flag('tasks')} {task}: every_n_epochs {every!r}: "
                                     "must be an integer >= 1 (the task is evaluated after "
                                     "every that many epochs, and at epoch 0 and the last)")
            shots_of[task] = shots
            every_of[task] = every_n_epochs if every is None else every
        return shots_of, every_of

    def due(self, epoch: int, last: bool = False) -> list[str]:
        """The tasks evaluated after ``epoch`` epochs: all at 0 and the last, else those due.

        Args:
            epoch: epochs completed.
            last: the epoch ends training.
        """
        return [task for task, every in self.task_every_n_epochs.items()
                if epoch == 0 or last or epoch % every == 0]

    @property
    def settings(self) -> dict[str, Any]:
        """What the scores depend on; the base is only comparable under the same settings."""
        return {"tasks": self.tasks, "limit": self.limit, "seed": self.seed,
                "max_length": self.max_length, "fast_generation": self.fast_generation}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(tasks=sorted(self.tasks))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base": self._base, "settings": self.settings}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        base, settings = state_dict.get("base"), state_dict.get("settings")
        if settings is not None:  # checkpoints from before the switch generated with HFLM
            settings = {"fast_generation": False, **settings}
        if base is not None and settings != self.settings:
            changed = sorted(k for k in self.settings if (settings or {}).get(k)
                             != self.settings[k])
            raise SelftrainError(f"{self.flag(changed[0] if changed else 'tasks')}: differs "
                                 f"from the run's checkpoint ({', '.join(changed)} changed), so "
                                 "deltas from its base model would be wrong; resume with the "
                                 "settings it started with, or start a new run")
        self._base = base

    @override
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find and load every task, apply its few-shot count; raise on anything unusable."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (DeepSpeedStrategy, ModelParallelStrategy)):
            raise SelftrainError(f"{type(self).__name__}: --trainer.strategy "
                                 f"{type(trainer.strategy).__name__} shards the weights in a way "
                                 "lm-eval cannot be given a whole student; use ddp or fsdp")
        for given, path in zip(self._include_given, self.include_path, strict=True):
            if not Path(path).is_dir():
                raise SelftrainError(f"{self.flag('include_path')} {given}: no such directory; "
                                     "point it at a folder of lm-eval task YAMLs "
                                     "(e.g. configs/tasks)")
        manager = task_manager(self.include_path, names=list(self.tasks))
        check_names(manager, self.tasks, self.flag)
        self._gate_code_execution(manager)
        self._units = load_units(manager, self.tasks, self.skipped, self.flag)
        check_generation(self._units, self.max_length, self.flag)  # the model is not loaded yet

    def _check_context(self, pl_module: L.LightningModule) -> None:
        """Each generation cap against the student's context, once its model is loaded."""
        if not self._context_checked:
            config = pl_module.model.config.get_text_config()
            check_generation(self._units, self.max_length or getattr(
                config, "max_position_embeddings", None), self.flag)
            self._context_checked = True

    def _gate_code_execution(self, manager) -> None:
        """Skip tasks that run model-written code, with one warning, unless allowed."""
        unsafe = code_tasks(manager, self.tasks)
        if unsafe and self.allow_code_execution:
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # read by HF evaluate's code_eval metric
        elif unsafe:
            if len(unsafe) == len(self.tasks):
                raise SelftrainError(f"{self.flag('tasks')}: every task ({', '.join(unsafe)}) "
                                     "executes model-written code; set "
                                     f"{self.flag('allow_code_execution')} true to run them")
            self.skipped = unsafe
            rank_zero_warn(f"{self.flag('tasks')}: skipping {', '.join(unsafe)}: they execute "
                           f"model-written code; set {self.flag('allow_code_execution')} true "
                           "to run them (in a sandbox)")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_context(pl_module)
        if self.run_at_start and trainer.global_step > 0 and self._base is None:
            raise SelftrainError(f"{self.flag('run_at_start')}: this run resumes at step "
                                 f"{trainer.global_step} but its checkpoint has no base-model "
                                 f"scores for {', '.join(self.tasks)}, so deltas cannot be "
                                 "computed; start a new run, or set it false to log absolute "
                                 "scores only")
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        due = [name for name in self.due(epoch, last=training_ends(trainer))
               if name not in self.skipped]
        if not due:
            return
        self._due = due
        try:
            self.evaluate_at(trainer, pl_module, epoch=epoch, step=trainer.global_step)
        finally:
            self._due = None

    @override
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
                 step: int) -> dict[str, float]:
        """Evaluate the tasks due after this epoch (outside an epoch's end: every task)."""
        self._check_context(pl_module)
        rank, world = trainer.global_rank, trainer.world_size
        due = self._due if self._due is not None else list(self.tasks)
        evaluated = [name for name in due if name in self._units]  # not the skipped ones
        mine = evaluated[rank::world]
        part, error = {}, None
        try:
            part = self._evaluate_tasks(pl_module, mine)
        except Exception as caught:
            if world == 1:
                raise
            error = caught
        parts = gather_parts(part, error, rank, world, type(self).__name__)
        results = merge_results(parts)
        scores = metric_scores(results["results"])
        if epoch == 0:
            self._base = dict(scores)
        metrics = benchmark_metrics(scores, self._base, epoch, self.flag("tasks"))
        metrics.update(stderr_metrics(results["results"]))
        if trainer.is_global_zero:
            self._write(trainer, pl_module, epoch, step, results, evaluated)
        return metrics

    @override
    def adopt_base(self, trainer: L.Trainer, pl_module: L.LightningModule,
                   base_dir: Path) -> None:
        """The base's scores from ``base_dir``'s epoch-0 results, made under these settings."""
        found = sorted((base_dir / "eval" / self.name).glob("epoch=0-step=*.json"))
        if not found:
            raise SelftrainError(f"--base_evaluations {base_dir}: has no epoch-0 benchmark "
                                 f"results (eval/{self.name}/epoch=0-step=*.json)")
        document = json.loads(found[-1].read_text())
        theirs = document.get("config") or {}
        ours = {"include_path": self.include_path, **self.settings}
        changed = [key for key, value in ours.items()
                   if key in theirs and json.loads(json.dumps(value)) != theirs[key]]
        if changed:
            raise SelftrainError(f"--base_evaluations {base_dir}: its base was evaluated with "
                                 f"other {self.flag(changed[0])} ({', '.join(changed)} differ "
                                 f"in {found[-1]}), so deltas from it would be wrong; evaluate "
                                 "the base again under this config")
        self._base = metric_scores(document["results"])
        if trainer.is_global_zero:
            target = self.run_dir(trainer) / "eval" / self.name / found[-1].name
            copy_atomic(found[-1], target)
            if document.get("items"):
                copy_atomic(items_path(found[-1]), items_path(target))

    def _evaluate_tasks(self, pl_module: L.LightningModule, names: list[str]) -> dict:
        """lm-eval's results for some of the tasks, each evaluated on its own, re-seeded."""
        if not names:
            return {}
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        if self._tokenizer is None:  # HFLM sets a pad token; keep the student's tokenizer as is
            self._tokenizer = copy.deepcopy(pl_module.load_tokenizer())
        with _quiet("lm_eval.models.huggingface"):
            if self.fast_generation:
                from selftrain.probes.fast_generation import FastHFLM as HFLM
            lm = HFLM(pretrained=pl_module.model, tokenizer=self._tokenizer, backend="causal",
                      batch_size=self.batch_size, max_length=self.max_length)
        parts = []
        with _training_rng_kept():
            for name in names:
                loaded = self._units[name]
                _seed_all(self.seed)
                for task_obj in loaded["tasks"].values():
                    task_obj.set_fewshot_seed(seed=self.seed)
                result = evaluate(lm=lm, task_dict=loaded, limit=self.limit,
                                  bootstrap_iters=self.bootstrap_iters, log_samples=True,
                                  confirm_run_unsafe_code=self.allow_code_execution)
                aggregations = {task: {metric: getattr(how, "__name__", str(how))
                                       for metric, how in task_obj.aggregation().items()}
                                for task, task_obj in loaded["tasks"].items()}
                result["items"] = item_rows(result.pop("samples", {}) or {}, aggregations)
                parts.append(result)
        return merge_results(parts)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int, step: int,
               results: dict, evaluated: list[str]) -> Path:
        """lm-eval's results and this callback's settings as JSON, per-item rows beside it.

        Args:
            trainer: the running Trainer.
            pl_module: the student.
            epoch: epochs completed.
            step: the global step the student was trained to.
            results: the merged results of this evaluation.
            evaluated: the task names evaluated this time (the due ones, less the skipped).
        """
        config = {"model": getattr(pl_module.hparams, "model", None), "tasks": self.tasks,
                  "every_n_epochs": self.task_every_n_epochs, "evaluated": evaluated,
                  "skipped": self.skipped, "include_path": self.include_path,
                  "limit": self.limit, "batch_size": self.batch_size, "seed": self.seed,
                  "bootstrap_iters": self.bootstrap_iters, "max_length": self.max_length,
                  "fast_generation": self.fast_generation}
        target = self.run_dir(trainer) / "eval" / self.name / f"epoch={epoch}-step={step}.json"
        return write_results(target, results, config, epoch, step)


def _is_count(value: Any, low: int) -> bool:
    """An integer (not a bool) >= ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _seed_all(seed: int) -> None:
    """Seed python, numpy and torch as lm-eval's simple_evaluate does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def _training_rng_kept() -> Iterator[None]:
    """Restore python, numpy and torch (CPU and CUDA) RNG states afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a logger's warnings (HFLM warns every time it is given a model object)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
