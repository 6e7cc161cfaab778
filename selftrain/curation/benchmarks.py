"""Benchmark items as texts, from local jsonl, local lm-eval task YAMLs or lm-eval task names.

`selftrain decontaminate` compares corpus samples with the texts of benchmark items. An item is
the list of its texts (kept apart, so n-grams never run from a question into its answer):
every string of a jsonl row, or an lm-eval doc's text, target and choices. lm-eval tasks are
loaded through :func:`selftrain.curation.lm_eval_tasks.task_manager`: a local task YAML with
its own directory as the include path, a task name from ``include_path`` or lm-eval's built-in
tasks. A relative data path in a task YAML is read next to the YAML when the file is there (as
``BenchmarkEval`` reads it), else as lm-eval reads it, relative to the working dir.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

from selftrain.curation.lm_eval_tasks import task_manager
from selftrain.errors import SelftrainError
from selftrain.inputs import read_json_records, read_text

_JSON_SUFFIXES = (".jsonl", ".json")
_YAML_SUFFIXES = (".yaml", ".yml")


def load_benchmark(spec: str, include_path: str | None = None,
                   limit: int | None = None) -> tuple[str, list[list[str]]]:
    """A benchmark's name and items; each item is the list of its texts.

    Args:
        spec: a .jsonl / .json file, an lm-eval task .yaml, or an lm-eval task name.
        include_path: extra lm-eval task directory.
        limit: at most this many items.

    Raises:
        SelftrainError: missing, unreadable or empty file; unknown task; unreachable data.
    """
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES + _YAML_SUFFIXES and not path.is_file():
        raise SelftrainError(f"--benchmarks {spec}: no such file; pass an existing .jsonl/.json "
                             "file, an lm-eval task .yaml or a task name")
    if suffix in _JSON_SUFFIXES:
        name, items = path.stem, _json_items(path, spec, limit)
    elif suffix in _YAML_SUFFIXES:
        paths = [str(path.resolve().parent)] + ([include_path] if include_path else [])
        name, items = _task_items(_yaml_task_name(path, spec), spec, paths, False, limit)
    elif path.exists():
        raise SelftrainError(f"--benchmarks {spec}: unsupported file type; use .jsonl, .json or "
                             "an lm-eval task .yaml")
    else:
        name, items = _task_items(spec, spec, [include_path] if include_path else [], None, limit)
    if not items:
        raise SelftrainError(f"--benchmarks {spec}: no item has any text; point it at a "
                             "non-empty benchmark")
    return name, items


def _strings(value: Any) -> list[str]:
    """Every non-blank string in a value, looking inside lists and objects."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [text for element in value for text in _strings(element)]
    return []


def _json_items(path: Path, spec: str, limit: int | None) -> list[list[str]]:
    """The items of a .jsonl / .json benchmark: every string of each row, in order."""
    if not read_text(path, "--benchmarks").strip():
        raise SelftrainError(f"--benchmarks {spec}: the file is empty; point it at a benchmark "
                             "with items")
    rows = read_json_records(path, "--benchmarks", objects=False)
    items = (texts for texts in map(_strings, rows) if texts)
    return list(islice(items, limit))


def _yaml_task_name(path: Path, spec: str) -> str:
    """The ``task`` (or ``group``) key of a task YAML; lm-eval's ``!function`` tags ignored."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SelftrainError(f"--benchmarks {spec}: not a readable YAML file ({error}); fix "
                             "it") from error
    name = (config.get("task") or config.get("group")) if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise SelftrainError(f"--benchmarks {spec}: no 'task' (or 'group') name in it; an "
                             "lm-eval task YAML needs one")
    return name


def _task_items(name: str, spec: str, include: list[str], defaults: bool | None,
                limit: int | None) -> tuple[str, list[list[str]]]:
    """Items of an lm-eval task or group: every doc's text, target and choices (strings).

    ``defaults`` None means: index the built-in tasks only if ``include`` lacks ``name``.
    """
    manager = task_manager(include, names=[name], defaults=defaults)
    if name not in manager.all_tasks and defaults is False:
        raise SelftrainError(f"--benchmarks {spec}: lm-eval could not index task {name!r} from "
                             "it; check the YAML against lm-eval's task format")
    if name not in manager.all_tasks:
        raise SelftrainError(f"--benchmarks {spec}: not a file and not an lm-eval task name; "
                             "check the name (`lm-eval ls tasks`) or pass --include_path")
    try:
        tasks = manager.load([name])["tasks"]
    except Exception as error:  # datasets raises many types for an unreachable hub dataset
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise SelftrainError(f"--benchmarks {spec}: the task's data could not be loaded "
                             f"({reason}); if it is unreachable (offline, not in the hub cache), "
                             "pass a local .jsonl or a task YAML on local data instead") from error
    items: list[list[str]] = []
    for task in tasks.values():
        has_choices = getattr(getattr(task, "config", None), "doc_to_choice", None) is not None
        for doc in islice(task.eval_docs, None if limit is None else limit - len(items)):
            parts = [task.doc_to_text(doc), task.doc_to_target(doc)]
            texts = _strings(parts + ([task.doc_to_choice(doc)] if has_choices else []))
            if texts:
                items.append(texts)
    return name, items

