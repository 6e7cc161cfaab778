"""Many runs read back as one tidy table: which runs there are, their conditions, their scalars.

``selftrain report`` compares runs, and a run is only comparable once we know what it was: its
student, the corpus it trained on (source model, temperature, kind, from the corpus manifest)
and its subset. This module finds the run dirs (a dir holding ``tb/config.yaml`` or TensorBoard
event files under ``tb/``; any other dir is searched for them), reads each run's saved
LightningCLI config and corpus manifest, groups the runs into conditions, and reads every
evaluation scalar into one tidy :class:`pandas.DataFrame` with the columns
``run, condition, subset, tag, step, epoch, value`` (the epoch of each evaluation comes from
``eval/epochs_completed``, logged at the same global step).

Runs are one condition when their configs agree on everything but the subset and what does not
change the experiment: where the run lives, seeds, the length of training, the evaluation
callbacks and probes, and the hardware. ``--conditions`` names conditions explicitly instead.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from selftrain.analysis.tb import read_scalars
from selftrain.curation.lm_eval_tasks import metric_name
from selftrain.errors import SelftrainError

EPOCH_TAG = "eval/epochs_completed"
"""The epoch axis: logged by every evaluation callback at the evaluation's global step."""
EVAL_PREFIXES = ("benchmark/", "benchmark_delta/", "benchmark_stderr/", "extraction/",
                 "likelihood/")
"""The evaluation tags the report reads (the training curves stay in TensorBoard)."""
DATA_PREFIX = "data/"
"""What a fit logs once about its training rows (read into :attr:`Run.data`)."""
IGNORED_KEYS = ("data.subset", "seed_everything", "data.seed", "data.num_workers", "ckpt_path",
                "overwrite", "weights_only", "trainer.callbacks", "trainer.logger",
                "trainer.max_epochs", "trainer.max_steps", "trainer.max_time",
                "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
                "trainer.enable_progress_bar", "trainer.default_root_dir", "checkpoint", "probes",
                "leak_check", "base_evaluations")
"""Config keys (and key prefixes) that do not make two runs different conditions."""


@dataclass
class Run:
    """One run dir and what its config says about it.

    Args:
        path: the run dir, resolved.
        label: how the run is shown (the path as found, relative to the working dir if inside).
        config: the saved LightningCLI config (``tb/config.yaml``); empty if there is none.
        manifest: the corpus manifest, or None when it could not be read.
    """

    path: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    condition: str = ""
    notes: list[str] = field(default_factory=list)
    directions: dict[str, bool] = field(default_factory=dict)
    """``benchmark_delta/<task>/<metric>`` -> higher_is_better, from the run's lm-eval results
    files (:func:`metric_directions`)."""
    data: dict[str, float] = field(default_factory=dict)
    """What the run trained on, logged once by ``selftrain fit`` (``data/*``: rows, tokens,
    probe leak rows and windows); filled by :func:`read_table`."""

    @property
    def tb(self) -> Path:
        """The run's TensorBoard dir."""
        return self.path / "tb"

    def get(self, dotted: str) -> Any:
        """A config value by dotted key (``data.corpus``), None when absent."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def student(self) -> str | None:
        """``model.model``: the student spec."""
        value = self.get("model.model")
        return None if value is None else str(value)

    @property
    def subset(self) -> int | None:
        """``data.subset``: the corpus subset it trained on."""
        value = self.get("data.subset")
        return value if isinstance(value, int) else None

    @property
    def corpus(self) -> Path | None:
        """``data.corpus`` resolved (a relative path against the working dir).

        Of a list of corpora (``mode: accumulate`` of a sweep), the last: the newest.
        """
        value = self.get("data.corpus")
        value = value[-1] if isinstance(value, list) and value else value
        return Path(os.path.realpath(value)) if isinstance(value, str) and value else None

    @property
    def source(self) -> str | None:
        """The corpus's source model (or the datasets of a replay corpus)."""
        source = (self.manifest or {}).get("source")
        if isinstance(source, dict) and source.get("model"):
            return str(source["model"])
        if isinstance(source, dict) and source.get("datasets"):
            return ", ".join(str(name) for name in source["datasets"])
        return None

    @property
    def temperature(self) -> float | None:
        """The corpus's sampling temperature."""
        value = ((self.manifest or {}).get("sampling") or {}).get("temperature")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def kind(self) -> str | None:
        """The corpus kind, with the side of a proximity split (``proximity-split below``).

        ``selftrain proxies --split_out`` records the side under the manifest's ``proximity``.
        """
        manifest = self.manifest or {}
        kind = manifest.get("kind")
        side = next((record["side"] for record in (manifest.get("proximity"),
                                                    manifest.get("split"))
                     if isinstance(record, dict) and record.get("side")), None)
        return None if kind is None else f"{kind} {side}" if side else str(kind)


def is_run(path: Path) -> bool:
    """Whether a dir is a run dir: ``tb/config.yaml`` or TensorBoard event files under ``tb/``."""
    tb = path / "tb"
    return (tb / "config.yaml").is_file() or any(tb.glob("events.out.tfevents.*"))


def find_runs(paths: list[str]) -> list[Path]:
    """The run dirs given, a dir that is not a run searched recursively (hidden dirs skipped).

    Args:
        paths: the ``--runs`` values.

    Raises:
        SelftrainError: a path is not a dir, or holds no run.
    """
    if not paths:
        raise SelftrainError("--runs []: no run dirs given; pass the --trainer.default_root_dir "
                             "of each fit, or a dir holding them")
    found: dict[Path, None] = {}
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise SelftrainError(f"--runs {given}: no such directory; pass run dirs (the "
                                 "--trainer.default_root_dir of a fit) or dirs holding them")
        before = len(found)
        for folder, dirs, _ in os.walk(root):
            here = Path(folder)
            if is_run(here):
                found[Path(os.path.realpath(here))] = None
                dirs.clear()  # a run's own subdirs (tb, hf, checkpoints) hold no other runs
            else:
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if len(found) == before:
            raise SelftrainError(f"--runs {given}: no run dir in it (a run dir holds "
                                 "tb/config.yaml or tb/events.out.tfevents.*); pass the "
                                 "--trainer.default_root_dir of a fit")
    return list(found)


def _label(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_manifest(corpus: Path) -> dict[str, Any] | None:
    """A corpus dir's ``manifest.json``, or None when it cannot be read (moved, damaged)."""
    try:
        manifest = json.loads((corpus / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def load_runs(paths: list[Path]) -> list[Run]:
    """Read each run's saved config and its corpus manifest.

    Args:
        paths: run dirs from :func:`find_runs`.

    Raises:
        SelftrainError: a ``tb/config.yaml`` that is not a YAML mapping.
    """
    runs = []
    for path in paths:
        run = Run(path, _label(path))
        config_file = run.tb / "config.yaml"
        if config_file.is_file():
            try:
                config = yaml.safe_load(config_file.read_text())
            except (OSError, yaml.YAMLError) as error:
                raise SelftrainError(f"--runs {run.label}: {config_file} is not readable YAML "
                                     f"({type(error).__name__}); restore it or leave the run out"
                                     ) from None
            run.config = config if isinstance(config, dict) else {}
        else:
            run.notes.append(f"{run.label}: no tb/config.yaml; its condition is its dir name")
        run.directions = metric_directions(path / "eval")
        if run.corpus is not None:
            run.manifest = read_manifest(run.corpus)
            if run.manifest is None and not run.corpus.is_file():  # a plain file has none
                run.notes.append(f"{run.label}: corpus manifest {run.corpus}/manifest.json not "
                                 "readable (moved?); the corpus is named by its path")
        runs.append(run)
    return runs


def metric_directions(eval_dir: Path) -> dict[str, bool]:
    """``benchmark_delta/<task>/<metric>`` -> higher_is_better, as lm-eval declared it.

    Read from the ``higher_is_better`` map of every BenchmarkEval results file
    (``eval/<callback>/epoch=N-step=S.json``), which lm-eval keys by metric (``exact_match``)
    where the tags carry metric and filter (``exact_match_flexible-extract``). Unreadable files
    are skipped (the report then falls back to metric names, and says so).

    Args:
        eval_dir: the run's ``eval`` dir.
    """
    found: dict[str, bool] = {}
    for path in sorted(eval_dir.glob("*/epoch=*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(document, dict):
            continue
        declared, results = document.get("higher_is_better"), document.get("results")
        if not isinstance(declared, dict) or not isinstance(results, dict):
            continue
        for task, row in results.items():
            metrics = declared.get(task)
            if not isinstance(metrics, dict) or not isinstance(row, dict):
                continue
            for key in row:
                metric, comma, filter_name = key.partition(",")
                if comma and metric in metrics:
                    tag = f"benchmark_delta/{task}/{metric_name(metric, filter_name)}"
                    found[tag] = bool(metrics[metric])
    return found


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        flat: dict[str, str] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(node, sort_keys=True, default=str)}


def identity(run: Run) -> dict[str, str]:
    """The config keys that make a condition: all but :data:`IGNORED_KEYS` and run paths."""
    keys = {}
    for key, value in _flatten(run.config).items():
        if any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS):
            continue
        if str(run.path) in value:  # the run's own dirs (logger, checkpoints)
            continue
        keys[key] = value
    if run.corpus is not None:
        keys["data.corpus"] = str(run.corpus)
    return keys if run.config else {"run": str(run.path)}


def describe(run: Run) -> dict[str, str]:
    """The parts of a condition's name: student, source, temperature, corpus kind.

    A run on a mixture (``data.mixture_weights``) shows its weights and token budget after its
    kind: an SBP mixture and its repetition baseline differ there.
    """
    corpus = run.corpus
    source = run.source or (f"corpus {corpus.name}" if corpus is not None else None)
    kind = run.kind or ""
    weights = run.get("data.mixture_weights")
    if weights:
        shown = "/".join(f"{w:g}" for w in weights)
        kind = f"{kind} mixture {shown} of {run.get('data.mixture_tokens') or 'all'} tokens"
    parts = {"student": run.student or "", "source": source or "",
             "temperature": f"T={run.temperature:g}" if run.temperature is not None else "",
             "kind": kind.strip()}
    if not run.config:
        parts["source"] = run.path.name
    return parts


def name_conditions(runs: list[Run], explicit: dict[str, str] | None = None) -> None:
    """Set each run's ``condition``: an explicit name, else one built from its config.

    A built name holds the parts (student, source, temperature, kind) that vary between the
    conditions, and, where two conditions would share a name, the config keys that tell them
    apart.

    Args:
        runs: the runs, configs read.
        explicit: ``--conditions``: run dir (or a dir holding runs) -> name; the deepest wins.

    Raises:
        SelftrainError: an ``--conditions`` key that matches no run.
    """
    named: dict[Path, str] = {}
    roots = sorted(((Path(os.path.realpath(key)), key, str(name))
                    for key, name in (explicit or {}).items()), key=lambda item: len(item[0].parts))
    for root, key, name in roots:  # shallow first, so a deeper key overrides
        matched = [run for run in runs if run.path == root or root in run.path.parents]
        if not matched:
            raise SelftrainError(f"--conditions {key}: matches none of the runs found; use a run "
                                 "dir given in --runs (or a dir holding some)")
        named.update({run.path: name for run in matched})
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.path in named:
            run.condition = named[run.path]
        else:
            groups.setdefault(json.dumps(identity(run), sort_keys=True), []).append(run)
    _name_groups(list(groups.values()))


def _name_groups(groups: list[list[Run]]) -> None:
    parts = [describe(group[0]) for group in groups]
    varying = [k for k in ("student", "source", "temperature", "kind")
               if len({p[k] for p in parts}) > 1]
    names = []
    for part in parts:
        shown = varying or ["student", "source", "temperature", "kind"]
        student = f"{part['student']} <- " if "student" in shown and part["student"] else ""
        rest = " ".join(part[k] for k in shown if k != "student" and part[k])
        names.append((student + rest).strip() or "run")
    keys = [identity(group[0]) for group in groups]
    for name in set(names):
        clash = [i for i, n in enumerate(names) if n == name]
        if len(clash) < 2:
            continue
        differing = sorted({k for i in clash for j in clash for k in set(keys[i]) | set(keys[j])
                            if keys[i].get(k) != keys[j].get(k)})
        for i in clash:
            extra = ", ".join(f"{k}={_short(keys[i].get(k))}" for k in differing[:3])
            names[i] = f"{name} ({extra})"
    for group, name in zip(groups, names, strict=False):
        for run in group:
            run.condition = name


def _short(value: str | None) -> str:
    if value is None:
        return "unset"
    text = value.strip('"')
    return Path(text).name if "/" in text else text


def read_table(runs: list[Run]) -> pd.DataFrame:
    """Every evaluation scalar of the runs, tidy: run, condition, subset, tag, step, epoch, value.

    The epoch of each point is the ``eval/epochs_completed`` value logged at its global step;
    points at steps without one (not an evaluation) are left out. Each run's ``data/*`` scalars
    go to its :attr:`Run.data`.

    Args:
        runs: runs with their conditions named.
    """
    columns: dict[str, list[Any]] = {name: [] for name in
                                     ("run", "condition", "subset", "tag", "step", "epoch",
                                      "value")}
    for run in runs:
        scalars = read_scalars(run.tb)
        epochs = {step: value for step, value in scalars.get(EPOCH_TAG, [])}
        subset = run.subset if run.subset is not None else math.nan
        run.data = {tag.split("/", 1)[1]: float(points[-1][1]) for tag, points in scalars.items()
                    if tag.startswith(DATA_PREFIX) and points}
        for tag, points in scalars.items():
            if not tag.startswith(EVAL_PREFIXES):
                continue
            for step, value in points:
                if step not in epochs:
                    continue
                columns["run"].append(run.label)
                columns["condition"].append(run.condition)
                columns["subset"].append(subset)
                columns["tag"].append(tag)
                columns["step"].append(int(step))
                columns["epoch"].append(int(round(epochs[step])))
                columns["value"].append(float(value))
    return pd.DataFrame(columns)
