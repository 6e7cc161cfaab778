"""`BenchmarkEval`: lm-eval benchmarks on the in-memory student, tracked as deltas from the base.

The paper's capability curves are lm-eval scores after every epoch, as the change from the
frozen base model. This callback hands the student that is training (``pl_module.model``, no
reload, no second copy of the weights) to lm-eval as ``HFLM(pretrained=model)`` and logs
``benchmark/<task>/<metric>`` and ``benchmark_delta/<task>/<metric>`` (vs the epoch-0 pass,
so every delta curve starts at exactly 0). The base scores live in the callback's state, so
they survive ``--ckpt_path last``. lm-eval's full results (no per-sample logs) go to
``<run>/eval/benchmark/epoch=<E>-step=<S>.json``.

Choices worth knowing:

- **Metric names.** lm-eval keys are ``<metric>,<filter>``: filter ``none`` gives the bare
  metric (``acc``), any other filter ``<metric>_<filter>`` (``exact_match_strict-match``);
  stderr entries, ``alias`` and counts are skipped. Group rows that lm-eval aggregates (e.g.
  ``mmlu``) are logged beside their subtasks, under the group's name.
- **Reproducible few-shot.** Each task (or group / tag, as listed in ``tasks``) is evaluated
  on its own after re-seeding python, numpy, torch and the few-shot sampler with ``seed``, so
  every epoch sees the same prompts, whatever else is listed and however many ranks run. The
  training RNG state is saved before and restored after, so evaluating never changes training.
- **Local data paths.** lm-eval hands ``dataset_kwargs.data_files`` to ``datasets`` as they
  are, relative to the working directory. For task YAMLs under ``include_path`` a relative
  data file that exists next to its YAML is made absolute first, so ``configs/tasks`` works
  from any working directory (paths that only exist relative to the cwd keep working).
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
import dataclasses
import difflib
import glob
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from selftrain.callbacks.epoch_eval import EpochEvaluation
from typing_extensions import override

from selftrain.errors import SelftrainError

_MERGED_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                "higher_is_better", "n-samples")


class BenchmarkEval(EpochEvaluation):
    """lm-eval tasks on the student at epoch 0 and after every n-th epoch, as deltas from base.

    Args:
        tasks: lm-eval task, group or tag name -> num_fewshot (null: the task's own default).
        include_path: directories of extra lm-eval task YAMLs (e.g. ``configs/tasks``).
        limit: evaluate only the first N documents of every task (a float in (0, 1): that
            share of them); for quick curves, not for numbers to publish.
        batch_size: lm-eval batch size.
        every_n_epochs: evaluate after every n-th training epoch; the last epoch always is.
        run_at_start: evaluate the base model before the first optimizer step (epoch 0); the
            deltas need it.
        allow_code_execution: run tasks that execute model-written code (``unsafe_code`` in
            their config, e.g. HumanEval); sets ``HF_ALLOW_CODE_EVAL=1``. Use a sandbox.
        seed: seed of python, numpy, torch and the few-shot sampler for every evaluation, so
            every epoch sees the same few-shot prompts.
        bootstrap_iters: lm-eval bootstrap iterations for stderrs (0: no stderrs, fastest).
        max_length: context length given to lm-eval; None: the model config's.
    """

    name = "benchmark"

    def __init__(
        self,
        tasks: dict[str, int | None],
        include_path: str | list[str] | None = None,
        limit: int | float | None = None,
        batch_size: int = 8,
        every_n_epochs: int = 1,
        run_at_start: bool = True,
        allow_code_execution: bool = False,
        seed: int = 1234,
        bootstrap_iters: int = 0,
        max_length: int | None = None,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, run_at_start=run_at_start)
        if not isinstance(tasks, dict) or not tasks:
            raise SelftrainError(f"{self.flag('tasks')} {tasks!r}: give a mapping of lm-eval "
                                 "task names to few-shot counts, e.g. {arc_easy: 0}")
        for task, shots in tasks.items():
            if not isinstance(task, str) or not task.strip():
                raise SelftrainError(f"{self.flag('tasks')} {task!r}: task names must be "
                                     "non-empty strings")
            if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int)
                                      or shots < 0):
                raise SelftrainError(f"{self.flag('tasks')} {task}: {shots!r}: num_fewshot "
                                     "must be an integer >= 0, or null for the task's default")
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
        self.tasks = dict(tasks)
        self.include_path = [str(Path(path).resolve()) for path in paths]  # cwd may change
        self._include_given = paths
        self.limit = limit
        self.batch_size = batch_size
        self.allow_code_execution = allow_code_execution
        self.seed = seed
        self.bootstrap_iters = bootstrap_iters
        self.max_length = max_length
        self.skipped: list[str] = []
        self._units: dict[str, dict] = {}  # task name -> lm-eval's loaded task dict
        self._tokenizer = None
        self._base: dict[str, float] | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """What the scores depend on; the base is only comparable under the same settings."""
        return {"tasks": self.tasks, "limit": self.limit, "seed": self.seed,
                "max_length": self.max_length}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(tasks=sorted(self.tasks))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"base": self._base, "settings": self.settings}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base, settings = state_dict.get("base"), state_dict.get("settings")
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
        manager = _task_manager(tuple(self.include_path), tuple(self.tasks))
        self._check_names(manager)
        self._gate_code_execution(manager)
        seen: dict[str, str] = {}
        for task, shots in self.tasks.items():
            if task in self.skipped:
                continue
            loaded = self._load(manager, task)
            for leaf, task_obj in loaded["tasks"].items():
                if leaf in seen:
                    raise SelftrainError(f"{self.flag('tasks')}: {leaf} is in both {seen[leaf]} "
                                         f"and {task}; list it once")
                seen[leaf] = task
                self._set_fewshot(task, leaf, task_obj, shots)
            self._units[task] = loaded

    def _check_names(self, manager) -> None:
        """Every name must be an lm-eval task, group or tag; suggest close ones if not."""
        for task in self.tasks:
            if task not in manager.all_tasks:
                close = difflib.get_close_matches(task, manager.all_tasks, n=3, cutoff=0.6)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise SelftrainError(f"{self.flag('tasks')} {task!r}: no such lm-eval task, "
                                     f"group or tag; {hint}List names with `lm-eval ls tasks`, "
                                     f"or add the folder of its YAML to "
                                     f"{self.flag('include_path')}")

    def _gate_code_execution(self, manager) -> None:
        """Skip tasks that run model-written code, with one warning, unless allowed."""
        unsafe = [task for task in self.tasks if _declares_unsafe(manager.task_index, task)]
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

    def _load(self, manager, task: str) -> dict:
        try:
            return manager.load([task])
        except Exception as error:  # datasets raises many types for unreachable data
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            raise SelftrainError(f"{self.flag('tasks')} {task}: lm-eval could not load it "
                                 f"({reason}); make its data reachable (offline: in the HF "
                                 "cache) or use a local task YAML") from error

    def _set_fewshot(self, task: str, leaf: str, task_obj, shots: int | None) -> None:
        """Apply the few-shot count as simple_evaluate would; check the pool holds enough."""
        default = task_obj.get_config("num_fewshot")
        if shots not in (None, 0) and default == 0:
            raise SelftrainError(f"{self.flag('tasks')} {task}: {leaf} is zero-shot by its "
                                 f"config and lm-eval would ignore {shots}; set it to 0 or null")
        shots = (default or 0) if shots is None else shots
        task_obj.set_config(key="num_fewshot", value=shots)
        pool, split = _fewshot_pool(task_obj)
        if shots > pool:
            source = f"its '{split}' split" if split else "its few-shot samples"
            raise SelftrainError(f"{self.flag('tasks')} {task}: {shots}-shot needs {shots} "
                                 f"examples but {leaf} has {pool} in {source}; "
                                 f"lower it to at most {pool}")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_at_start and trainer.global_step > 0 and self._base is None:
            raise SelftrainError(f"{self.flag('run_at_start')}: this run resumes at step "
                                 f"{trainer.global_step} but its checkpoint has no base-model "
                                 f"scores for {', '.join(self.tasks)}, so deltas cannot be "
                                 "computed; start a new run, or set it false to log absolute "
                                 "scores only")
        super().on_train_start(trainer, pl_module)

    @override
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int
                 ) -> dict[str, float]:
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(self._units)[rank::world]
        part, error = {}, None
        try:
            part = self._evaluate_tasks(pl_module, mine)
        except Exception as caught:
            if world == 1:
                raise
            error = caught
        parts = [part]
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * world
            message = None if error is None else f"rank {rank}: {type(error).__name__}: {error}"
            torch.distributed.all_gather_object(gathered, (part, message))
            if error is not None:
                raise error
            failures = [failure for _, failure in gathered if failure]
            if failures:
                raise RuntimeError(f"{type(self).__name__} failed on " + "; ".join(failures))
            parts = [gathered_part for gathered_part, _ in gathered]
        elif error is not None:
            raise error
        results = _merge(parts)
        scores = metric_scores(results["results"])
        if epoch == 0:
            self._base = dict(scores)
        metrics = {f"benchmark/{key}": value for key, value in scores.items()}
        if self._base is not None:
            missing = sorted(set(scores) - set(self._base))
            if missing:
                raise SelftrainError(f"{self.flag('tasks')}: the base-model scores lack "
                                     f"{', '.join(missing)}; resume with the tasks the run "
                                     "started with, or start a new run")
            metrics.update({f"benchmark_delta/{key}": 0.0 if epoch == 0 else
                            value - self._base[key] for key, value in scores.items()})
        if trainer.is_global_zero:
            self._write(trainer, pl_module, epoch, results)
        return metrics

    def _evaluate_tasks(self, pl_module: L.LightningModule, names: list[str]) -> dict:
        """lm-eval's results for some of the tasks, each evaluated on its own, re-seeded."""
        if not names:
            return {}
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        if self._tokenizer is None:  # HFLM sets a pad token; keep the student's tokenizer as is
            self._tokenizer = copy.deepcopy(pl_module.load_tokenizer())
        with _quiet("lm_eval.models.huggingface"):
            lm = HFLM(pretrained=pl_module.model, tokenizer=self._tokenizer, backend="causal",
                      batch_size=self.batch_size, max_length=self.max_length)
        parts = []
        with _training_rng_kept():
            for name in names:
                loaded = self._units[name]
                _seed_all(self.seed)
                for task_obj in loaded["tasks"].values():
                    task_obj.set_fewshot_seed(seed=self.seed)
                parts.append(evaluate(lm=lm, task_dict=loaded, limit=self.limit,
                                      bootstrap_iters=self.bootstrap_iters, log_samples=False,
                                      confirm_run_unsafe_code=self.allow_code_execution))
        return _merge(parts)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
               results: dict) -> Path:
        """lm-eval's results (no per-sample logs) as JSON, written atomically."""
        import lm_eval
        import transformers
        from lm_eval.utils import handle_non_serializable

        step = trainer.global_step
        document = {**{k: v for k, v in results.items() if v or k != "groups"},
                    "config": {"model": getattr(pl_module.hparams, "model", None),
                               "tasks": self.tasks, "skipped": self.skipped,
                               "include_path": self.include_path, "limit": self.limit,
                               "batch_size": self.batch_size, "seed": self.seed,
                               "bootstrap_iters": self.bootstrap_iters,
                               "max_length": self.max_length},
                    "epoch": epoch, "global_step": step, "date": time.time(),
                    "lm_eval_version": lm_eval.__version__,
                    "transformers_version": transformers.__version__}
        target = self.run_dir(trainer) / "eval" / self.name / f"epoch={epoch}-step={step}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(document, out, indent=2, default=handle_non_serializable,
                          ensure_ascii=False)
            os.replace(staging, target)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
        return target


def _merge(parts: list[dict]) -> dict:
    """One lm-eval results dict from several (disjoint tasks): its per-task maps united."""
    return {key: {k: v for part in parts for k, v in part.get(key, {}).items()}
            for key in _MERGED_KEYS}


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


def _task_manager(include_path: tuple[str, ...], names: tuple[str, ...]):
    """The include path's tasks, plus lm-eval's own unless every name is found locally.

    Indexing lm-eval's 10k+ task YAMLs takes seconds, so it is skipped when it is not needed.
    """
    if include_path:
        local = _indexed(include_path, defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return _indexed(include_path, defaults=True)


@lru_cache(maxsize=4)
def _indexed(include_path: tuple[str, ...], defaults: bool):
    """A TaskManager over these folders (and lm-eval's tasks), local data paths anchored."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=list(include_path) or None, include_defaults=defaults)
    _anchor_data_files(manager.task_index, [Path(p) for p in include_path])
    return manager


def _anchor_data_files(index: dict, roots: list[Path]) -> None:
    """Make local tasks' relative ``data_files`` absolute, against their YAML's folder.

    Index entries of YAMLs under ``roots`` whose data files exist next to the YAML are swapped
    for entries that carry the loaded config (functions resolved as lm-eval does) with absolute
    paths; lm-eval builds a task from such an entry exactly as from its YAML.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    for name, entry in list(index.items()):
        path = entry.yaml_path
        if path is None or entry.cfg is None or "task" not in entry.cfg or "group" in entry.cfg:
            continue
        if not any(Path(path).is_relative_to(root) for root in roots):
            continue
        kwargs = entry.cfg.get("dataset_kwargs")
        files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
        anchored = _anchor(files, Path(path).parent)
        if files is None or anchored == files:
            continue
        try:
            config = load_yaml(path, resolve_func=True)
        except Exception:  # leave it to lm-eval to report, if the task is ever asked for
            continue
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": anchored}
        index[name] = dataclasses.replace(entry, yaml_path=None, cfg=config)


def _anchor(files: Any, folder: Path) -> Any:
    """``data_files`` (a path, list or split -> paths) with paths found under ``folder``."""
    if isinstance(files, dict):
        return {split: _anchor(value, folder) for split, value in files.items()}
    if isinstance(files, list):
        return [_anchor(value, folder) for value in files]
    if (isinstance(files, str) and "://" not in files and not os.path.isabs(files)
            and glob.glob(str(folder / files))):
        return str(folder / files)
    return files


def _declares_unsafe(index: dict, name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a task, or any task of a group or tag, has ``unsafe_code`` in its config."""
    entry = index.get(name)
    if entry is None or name in seen:
        return False
    seen = seen | {name}
    if entry.cfg is None:  # a tag: the names of its tasks
        return any(_declares_unsafe(index, member, seen) for member in entry.tags)
    if "group" not in entry.cfg:
        return bool(entry.cfg.get("unsafe_code", False))
    members = entry.cfg.get("task") or []
    for member in members if isinstance(members, list) else [members]:
        if isinstance(member, dict):
            if member.get("unsafe_code") or _declares_unsafe(
                    index, member.get("task") or member.get("group") or "", seen):
                return True
        elif isinstance(member, str) and _declares_unsafe(index, member, seen):
            return True
    return False


def _fewshot_pool(task_obj) -> tuple[int, str | None]:
    """How many few-shot examples a task can draw per document, and from which split.

    The pool is the fewshot split, else the training, else the validation docs (as lm-eval
    picks them); drawn from the split being evaluated, it is one smaller, since a document is
    never its own example.
    """
    config, fewshot = task_obj.config, getattr(task_obj, "fewshot_cfg", None)
    if fewshot is None:  # a Python-defined task without lm-eval's few-shot config
        return len(list(task_obj.fewshot_docs() or [])), None
    docs = task_obj.fewshot_docs()
    pool = 0 if docs is None else len(list(docs))
    split = fewshot.split or (None if fewshot.samples is not None else
                              config.training_split or config.validation_split
                              or config.test_split)
    evaluated = config.test_split if task_obj.has_test_docs() else config.validation_split
    if split is not None and split == evaluated:
        pool -= 1
    return max(pool, 0), split


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
