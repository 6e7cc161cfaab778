"""lm-eval tasks from local folders: the one place that builds a ``TaskManager`` for selftrain.

Two stages read lm-eval tasks: decontamination takes the texts of benchmark items
(:mod:`selftrain.curation.benchmarks`) and ``selftrain.callbacks.BenchmarkEval`` scores the
student on them. Both index the same way, here:

- **Local folders first.** Indexing lm-eval's own 10k+ task YAMLs takes seconds, so
  :func:`task_manager` indexes only the local folders when every requested name is found
  there, and adds the built-in tasks otherwise (or as asked).
- **Local data paths.** lm-eval hands ``dataset_kwargs.data_files`` to ``datasets`` as they
  are, relative to the working directory. With ``anchor`` a relative data file that exists
  next to its task YAML is made absolute, so a folder such as ``configs/tasks`` works from any
  working directory (paths that only exist relative to the cwd keep working). lm-eval has no
  public hook to change a task's config once indexed, so a folder whose tasks need it is
  indexed through a mirror instead: a temporary folder of one YAML per original that pulls the
  original in with lm-eval's own ``include:`` key and sets the anchored ``dataset_kwargs``;
  functions, includes, groups and tags all come from the originals.

Only public lm-eval API is used: ``TaskManager(include_path, include_defaults)``, ``load`` and
``task_index`` (its entries' ``yaml_path``, ``cfg`` and ``tags``), and the task YAML format's
``include:``. Checked against lm_eval 0.4.13.
"""

from __future__ import annotations

import difflib
import glob
import os
import tempfile
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from selftrain.errors import SelftrainError

_MIRRORS: list[tempfile.TemporaryDirectory] = []
"""The mirrors of this process; each is removed when the interpreter exits."""


def task_manager(include_path: Sequence[str] = (), names: Sequence[str] = (),
                 defaults: bool | None = None, anchor: bool = True):
    """An lm-eval ``TaskManager`` over local task folders, and lm-eval's tasks if needed.

    Managers are cached per arguments, so repeated calls (every epoch, every benchmark) index
    once.

    Args:
        include_path: folders of task YAMLs (their subfolders too).
        names: the task, group or tag names that will be loaded.
        defaults: index lm-eval's built-in tasks too (True), never (False), or only when some
            name is not found in ``include_path`` (None).
        anchor: make relative ``data_files`` that exist next to their YAML absolute.
    """
    include = tuple(str(path) for path in include_path)
    if defaults is None:
        if include:
            local = _indexed(include, False, anchor)
            if set(names) <= set(local.all_tasks):
                return local
        defaults = True
    return _indexed(include, defaults, anchor)


@lru_cache(maxsize=8)
def _indexed(include_path: tuple[str, ...], defaults: bool, anchor: bool):
    from lm_eval.tasks import TaskManager

    roots = [_anchored(path) if anchor else path for path in include_path]
    return TaskManager(include_path=roots or None, include_defaults=defaults)


@lru_cache(maxsize=16)
def _anchored(root: str) -> str:
    """``root``, or a mirror of it whose tasks read their local data files by absolute path."""
    from lm_eval.tasks import TaskManager

    folder = Path(root)
    wrappers: dict[Path, dict[str, Any]] = {}
    for entry in TaskManager(include_path=root, include_defaults=False).task_index.values():
        if entry.yaml_path is None or Path(entry.yaml_path) in wrappers:  # a tag: no file
            continue
        path = Path(entry.yaml_path)
        wrappers[path] = {"include": str(path.absolute()),
                          **_anchored_kwargs(entry.cfg, path.absolute().parent)}
    if not any("dataset_kwargs" in wrapper for wrapper in wrappers.values()):
        return root
    import yaml

    mirror = tempfile.TemporaryDirectory(prefix="selftrain-tasks-")
    _MIRRORS.append(mirror)
    for path, wrapper in wrappers.items():
        try:
            text = yaml.safe_dump(wrapper, sort_keys=False)
        except yaml.YAMLError:  # kwargs YAML cannot write back: the task reads them as they are
            text = yaml.safe_dump({"include": wrapper["include"]})
        target = Path(mirror.name) / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return mirror.name


def _anchored_kwargs(config: dict[str, Any] | None, folder: Path) -> dict[str, Any]:
    """``{"dataset_kwargs": ...}`` with the data files found under ``folder``, if any are."""
    if not isinstance(config, dict) or "task" not in config or "group" in config:
        return {}
    kwargs = config.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    anchored = _anchor(files, folder)
    if files is None or anchored == files:
        return {}
    return {"dataset_kwargs": {**kwargs, "data_files": anchored}}


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


def metric_name(metric: str, filter_name: str) -> str:
    """lm-eval's metric and filter as one name: ``acc`` (filter ``none``), else ``acc_<filter>``."""
    return metric if filter_name == "none" else f"{metric}_{filter_name}"


def check_names(manager, names: Iterable[str], flag: Callable[[str], str]) -> None:
    """Every name must be an lm-eval task, group or tag; suggest close ones if not.

    Args:
        manager: a :func:`task_manager`.
        names: task, group or tag names.
        flag: how an argument of the caller is spelled in messages (``tasks`` ->
            ``BenchmarkEval.tasks``).
    """
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise SelftrainError(f"{flag('tasks')} {name!r}: no such lm-eval task, group or tag; "
                                 f"{hint}List names with `lm-eval ls tasks`, or add the folder "
                                 f"of its YAML to {flag('include_path')}")


def code_tasks(manager, names: Iterable[str]) -> list[str]:
    """The names whose task, or some task of whose group or tag, executes model-written code."""
    return [name for name in names if _declares_unsafe(manager.task_index, name)]


def load_units(manager, tasks: dict[str, int | None], skip: Collection[str],
               flag: Callable[[str], str]) -> dict[str, dict]:
    """Load every task, group or tag (one unit each) with its few-shot count applied.

    Args:
        manager: a :func:`task_manager` that indexes every name.
        tasks: name -> num_fewshot (None: the task's own default).
        skip: names not to load.
        flag: how an argument of the caller is spelled in messages.

    Returns:
        name -> ``TaskManager.load([name])``, ready for lm-eval's ``evaluate``.

    Raises:
        SelftrainError: unreachable data, a task listed twice (alone or in a group), or a
            few-shot count the task ignores or cannot draw.
    """
    units: dict[str, dict] = {}
    seen: dict[str, str] = {}
    for name, shots in tasks.items():
        if name in skip:
            continue
        loaded = _load(manager, name, flag)
        for leaf, task_obj in loaded["tasks"].items():
            if leaf in seen:
                raise SelftrainError(f"{flag('tasks')}: {leaf} is in both {seen[leaf]} and "
                                     f"{name}; list it once")
            seen[leaf] = name
            _set_fewshot(name, leaf, task_obj, shots, flag)
        units[name] = loaded
    return units


HFLM_MAX_GEN_TOKS = 256
"""lm-eval's HFLM cap on generated tokens when a task's ``generation_kwargs`` sets none."""


def check_generation(units: dict[str, dict], max_length: int | None,
                     flag: Callable[[str], str]) -> None:
    """Refuse a generation task whose stop strings or length cap cannot work, before training.

    Prompts are left-truncated to the context minus the cap, so a prompt never overflows the
    context; a cap that fills the whole context leaves no room for one.

    Args:
        units: :func:`load_units`' result.
        max_length: the context given to lm-eval (None: unknown, not checked).
        flag: how an argument of the caller is spelled in messages.

    Raises:
        SelftrainError: ``until`` is empty or not strings, or ``max_gen_toks`` is below 1 or
            at least ``max_length``.
    """
    for loaded in units.values():
        for leaf, task_obj in loaded["tasks"].items():
            if task_obj.config.output_type != "generate_until":
                continue
            kwargs = dict(task_obj.config.generation_kwargs or {})
            until = kwargs.get("until")
            words = [until] if isinstance(until, str) else until
            if until is not None and not (isinstance(words, list | tuple) and words and all(
                    isinstance(word, str) and word for word in words)):
                raise SelftrainError(
                    f"{flag('tasks')} {leaf}: generation_kwargs.until {until!r}: give a stop "
                    "string or a list of non-empty strings, or leave it out to stop at EOS")
            cap = kwargs.get("max_gen_toks", HFLM_MAX_GEN_TOKS)
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise SelftrainError(f"{flag('tasks')} {leaf}: generation_kwargs.max_gen_toks "
                                     f"{cap!r}: give an integer >= 1")
            if max_length is not None and cap >= max_length:
                raise SelftrainError(
                    f"{flag('tasks')} {leaf}: max_gen_toks {cap} leaves no room for a prompt "
                    f"in a context of {max_length} tokens; lower its generation_kwargs."
                    f"max_gen_toks or raise {flag('max_length')}")


def _load(manager, name: str, flag: Callable[[str], str]) -> dict:
    try:
        return manager.load([name])
    except Exception as error:  # datasets raises many types for unreachable data
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise SelftrainError(f"{flag('tasks')} {name}: lm-eval could not load it ({reason}); "
                             "make its data reachable (offline: in the HF cache) or use a "
                             "local task YAML") from error


def _set_fewshot(name: str, leaf: str, task_obj, shots: int | None,
                 flag: Callable[[str], str]) -> None:
    """Apply the few-shot count as simple_evaluate would; check the pool holds enough."""
    default = task_obj.get_config("num_fewshot")
    if shots not in (None, 0) and default == 0:
        raise SelftrainError(f"{flag('tasks')} {name}: {leaf} is zero-shot by its config and "
                             f"lm-eval would ignore {shots}; set it to 0 or null")
    shots = (default or 0) if shots is None else shots
    task_obj.set_config(key="num_fewshot", value=shots)
    pool, split = _fewshot_pool(task_obj)
    if shots > pool:
        source = f"its '{split}' split" if split else "its few-shot samples"
        raise SelftrainError(f"{flag('tasks')} {name}: {shots}-shot needs {shots} examples but "
                             f"{leaf} has {pool} in {source}; lower it to at most {pool}")


def _declares_unsafe(index: dict, name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a task, or any task of a group or tag, has ``unsafe_code`` in its config.

    Args:
        index: a TaskManager's ``task_index``.
        name: a task, group or tag name.
        seen: names already visited (groups may nest).
    """
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
