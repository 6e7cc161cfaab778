"""`selftrain evaluate`: a config's evaluation callbacks, once, outside training.

Evaluating inside ``fit`` can cost more than training (a 40-epoch run with seven lm-eval tasks
per epoch), so users export every epoch and evaluate the exports later, in parallel jobs; they
also evaluate models ``fit`` never trained (the base, a merged model) and check that offline
numbers equal the ones logged in training. This command runs the very callbacks ``fit`` runs
(``BenchmarkEval``, ``ExtractionProbe``, ``LikelihoodTracker``: the config's
``trainer.callbacks`` and ``probes``) on

- every ``hf/epoch=N`` export of a run dir (``--run``), each at the epoch and global step it
  was exported at, after the run's base model (its ``model.model``) at epoch 0, or
- one model spec (``--model``), at ``--epoch``, after the config's base model at epoch 0.

The base comes first because every delta is against it, exactly as in training: the same
callback objects measure the base and keep it. Each model is attached to a Lightning Trainer
through ``trainer.validate`` (one placeholder batch, so Lightning runs its hooks), so the
device and precision are the Trainer's, as in ``fit``; one process, one device.

The same TensorBoard tags, ``eval/<name>.jsonl`` records and per-evaluation files land in the
run (``--run`` without ``--out``, when it holds no evaluations yet) or in a new run dir
(``--out``, with the config as ``tb/config.yaml`` so ``selftrain report`` groups it). Everything
is written in a hidden staging dir first and moved in once every evaluation has finished, so a
failed or interrupted evaluation leaves nothing behind. ``eval/evaluate.json`` records what was
evaluated and every file added, which is what ``--overwrite true`` removes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from selftrain import __version__
from selftrain.callbacks.benchmark_eval import BenchmarkEval
from selftrain.callbacks.epoch_eval import EpochEvaluation
from selftrain.callbacks.likelihood_tracker import LikelihoodTracker
from selftrain.callbacks.probe_eval import mark_shared, share_probe_set
from selftrain.callbacks.tb_layout import close_boards
from selftrain.digests import verify_model_dir
from selftrain.errors import SelftrainError
from selftrain.io import fsync_dir, publish_dir, staging_dir, write_json_atomic, write_text_atomic
from selftrain.outputs import refuse_foreign, refuse_input_overlap, refuse_unwritable
from selftrain.precision import trainer_precision
from selftrain.training.data import CorpusDataModule
from selftrain.training.export import EXPORT_INFO
from selftrain.training.module import StudentLM

log = logging.getLogger(__name__)

RECORD = "evaluate.json"
"""``<out>/eval/evaluate.json``: what ``selftrain evaluate`` evaluated and the files it added."""


@dataclass(frozen=True)
class Target:
    """One model to evaluate and where it sits on the run's axes.

    Args:
        epoch: epochs completed (``eval/epochs_completed``); 0 is the base model.
        model: its model spec (hub name, local dir, ``embedded:``, ``tiny:``).
        step: the global step its evaluations are logged at.
    """

    epoch: int
    model: str
    step: int


def evaluate(
    run: str | None = None,
    model: str | None = None,
    fit_config: str | None = None,
    out: str | None = None,
    epochs: list[int] | None = None,
    epoch: int = 1,
    accelerator: str | None = None,
    precision: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Run a config's evaluation callbacks once on a run's exports or on one model.

    Args:
        run: a run dir made by ``selftrain fit``: its base model (epoch 0) and every
            ``hf/epoch=N`` export are evaluated, with the run's student and corpus.
        model: a model spec to evaluate instead (hub name, local dir, ``embedded:``,
            ``tiny:``); needs ``--fit_config`` and ``--out``.
        fit_config: the ``selftrain fit`` config whose ``trainer.callbacks`` and ``probes``
            are run (with ``--model``: also its base ``model.model``, corpus and precision);
            default: the run's own ``tb/config.yaml``.
        out: run dir to write into (``tb/``, ``eval/``); default: ``--run`` itself, which
            must then hold no evaluations yet.
        epochs: only these epochs of the run (0 is the base); default: all. The base is
            measured for the deltas either way, and recorded only when 0 is listed.
        epoch: with ``--model``: the epoch it is logged at (its global step is the same
            number).
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``); default: the
            config's.
        precision: Lightning precision (``auto``, ``32-true``, ``bf16-mixed``, ...); default:
            the config's, as in training. ``auto`` is bf16-mixed where the device computes
            bf16 natively, else 32-true.
        overwrite: replace the evaluations an earlier ``selftrain evaluate`` wrote to
            ``--out``.

    Returns:
        The run dir written to.
    """
    if (run is None) == (model is None):
        raise SelftrainError("selftrain evaluate: give --run RUN_DIR (evaluates its hf/epoch=N "
                             "exports) or --model SPEC (with --fit_config and --out)")
    run_dir = Path(run) if run is not None else None
    if run_dir is not None and not (run_dir / "tb" / "config.yaml").is_file():
        raise SelftrainError(f"--run {run}: not a run dir of selftrain fit (no tb/config.yaml); "
                             "point it at the --trainer.default_root_dir of a fit")
    if model is not None and (fit_config is None or out is None):
        missing = "--fit_config" if fit_config is None else "--out"
        raise SelftrainError(f"--model {model}: needs {missing} (the fit config whose "
                             "callbacks to run, and a new run dir to write)")
    if epoch < 0:
        raise SelftrainError(f"--epoch {epoch}: must be >= 0")
    config_path = Path(fit_config) if fit_config else run_dir / "tb" / "config.yaml"
    flag = "--fit_config" if fit_config else "--run"
    eval_config = _read_config(config_path, flag)
    run_config = _read_config(run_dir / "tb" / "config.yaml", "--run") if run_dir else eval_config
    base = _section(run_config, "model", flag).get("model")
    if not isinstance(base, str):
        raise SelftrainError(f"{flag} {config_path}: names no model.model (the base student)")
    targets = (_run_targets(run_dir, base, epochs) if run_dir is not None
               else _model_targets(base, model, epoch))
    for target in targets:  # a damaged export is refused before any evaluation starts
        if Path(target.model).is_dir():
            source = ("--model" if target.model == model else
                      f"{flag} (its model.model)" if target.epoch == 0 else "--run")
            verify_model_dir(Path(target.model), source)
    out_dir = Path(out) if out is not None else run_dir
    callbacks = build_callbacks(eval_config, config_path, flag)
    replaced = _check_out(out_dir, run_dir, callbacks, overwrite, config_path)

    staging = staging_dir(out_dir)
    try:
        records = _evaluate_all(targets, callbacks, run_config, eval_config, staging,
                                accelerator, precision,
                                record_base=epochs is None or 0 in epochs or model is not None)
        if out_dir != run_dir and model is None:  # the run's config, as fit wrote it
            write_text_atomic((run_dir / "tb" / "config.yaml").read_text(encoding="utf-8"),
                              staging / "tb" / "config.yaml")
        elif out_dir != run_dir:  # the config, with the model evaluated as its student
            config = {**eval_config, "model": {**_section(eval_config, "model", flag),
                                               "model": model}}
            write_text_atomic(yaml.safe_dump(config, sort_keys=False),
                              staging / "tb" / "config.yaml")
        _publish(staging, out_dir, run_dir, replaced, records, run, model, config_path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("evaluated %d model(s) into %s", len(records), out_dir)
    return out_dir


def build_callbacks(config: dict[str, Any], path: Path, flag: str) -> list[EpochEvaluation]:
    """The evaluation callbacks of a fit config, built as ``selftrain fit`` builds them.

    Args:
        config: the parsed fit config (a ``trainer.callbacks`` list and ``probes``).
        path: where it was read, for messages.
        flag: the flag that named it.
    """
    from jsonargparse import ArgumentParser, Namespace

    from selftrain.callbacks.probe_eval import SharedProbeSet

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback] | None, default=None)
    parser.add_class_arguments(SharedProbeSet, "probes", instantiate=False)
    raw = _section(config, "trainer", flag).get("callbacks") or []
    raw = [raw] if isinstance(raw, dict) else raw
    probes = config.get("probes") or {}
    try:
        parsed = parser.parse_object({"callbacks": raw, "probes": probes})
    except Exception as error:
        first = " ".join(str(error).split())[:300]
        raise SelftrainError(f"{flag} {path}: its trainer.callbacks or probes do not parse "
                             f"({first}); fix the config") from None
    shared = parsed.probes if isinstance(parsed.probes, Namespace) else None
    share_probe_set(parsed.callbacks, shared)
    built = parser.instantiate_classes(parsed).callbacks or []
    mark_shared(built, shared)
    evaluations = [callback for callback in built if isinstance(callback, EpochEvaluation)]
    if not evaluations:
        raise SelftrainError(f"{flag} {path}: its trainer.callbacks hold no evaluation callback "
                             "(BenchmarkEval, ExtractionProbe, LikelihoodTracker); pass "
                             "--fit_config with the callbacks to run")
    return evaluations


def _read_config(path: Path, flag: str) -> dict[str, Any]:
    """A fit config file as a dict (one line naming the flag when it is not one)."""
    if not path.is_file():
        raise SelftrainError(f"{flag} {path}: no such file; give a selftrain fit config")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first = " ".join(str(error).split())[:200]
        raise SelftrainError(f"{flag} {path}: not a readable YAML file ({first})") from None
    if not isinstance(config, dict):
        raise SelftrainError(f"{flag} {path}: not a selftrain fit config (a YAML mapping)")
    return config


def _section(config: dict[str, Any], key: str, flag: str) -> dict[str, Any]:
    """One top-level section of a fit config (``model``, ``data``, ``trainer``)."""
    section = config.get(key) or {}
    if not isinstance(section, dict):
        raise SelftrainError(f"{flag}: its {key} section is not a mapping; fix the config")
    return section


def _run_targets(run_dir: Path, base: str, epochs: list[int] | None) -> list[Target]:
    """The base at epoch 0 and every export of a run (those of ``epochs`` when given)."""
    exports = {}
    for folder in sorted((run_dir / "hf").glob("epoch=*")):
        info_path = folder / EXPORT_INFO
        if not info_path.is_file():
            continue  # an export still being written lives in a hidden staging dir instead
        info = yaml.safe_load(info_path.read_text(encoding="utf-8"))
        exports[int(info["epoch"])] = Target(int(info["epoch"]), str(folder),
                                             int(info["global_step"]))
    if not exports:
        raise SelftrainError(f"--run {run_dir}: holds no hf/epoch=N exports to evaluate; train "
                             "with --model.export_hf every_epoch (or last), or evaluate a model "
                             "with --model")
    available = {0: Target(0, base, 0), **exports}
    wanted = sorted(available) if epochs is None else sorted(set(epochs))
    unknown = [value for value in wanted if value not in available]
    if unknown or not wanted:
        raise SelftrainError(f"--epochs {epochs}: {run_dir} has epochs "
                             f"{', '.join(map(str, sorted(available)))} (0 is the base); pick "
                             "among them")
    chosen = [available[value] for value in wanted]
    return chosen if chosen[0].epoch == 0 else [available[0], *chosen]


def _model_targets(base: str, model: str, epoch: int) -> list[Target]:
    """The config's base at epoch 0, then ``--model`` at ``--epoch`` (once if they coincide)."""
    if model == base or epoch == 0:
        return [Target(0, model, 0)]
    return [Target(0, base, 0), Target(epoch, model, epoch)]


def _check_out(out: Path, run_dir: Path | None, callbacks: list[EpochEvaluation],
               overwrite: bool, config_path: Path) -> list[Path]:
    """Refuse an ``--out`` evaluate may not write; list the earlier evaluation it replaces."""
    flag = "--out" if out != run_dir else "--run"
    refuse_unwritable(out, flag, beside=out != run_dir)
    if out != run_dir:
        refuse_input_overlap(out, [("--fit_config", config_path.parent)] if run_dir is None
                             else [("--run", run_dir)])
        if refuse_foreign(out, ("eval",), ("eval", "tb")) and not (out / "eval" / RECORD).is_file():
            raise SelftrainError(f"--out {out}: holds a run selftrain evaluate did not write; "
                                 "choose a new or empty directory")
    earlier = out / "eval" / RECORD
    logged = [name for name in {callback.name for callback in callbacks}
              if (out / "eval" / f"{name}.jsonl").exists()]
    if not earlier.is_file():
        if logged:
            raise SelftrainError(f"{flag} {out}: already holds the evaluations its training "
                                 f"logged (eval/{logged[0]}.jsonl); evaluate into a new run dir "
                                 "with --out")
        return []
    if not overwrite:
        raise SelftrainError(f"{flag} {out}: already holds evaluations of selftrain evaluate "
                             f"({earlier}); pass --overwrite true to replace them, or choose "
                             "a new --out")
    written = yaml.safe_load(earlier.read_text(encoding="utf-8")).get("files", [])
    return [out / name for name in written] + [earlier]


class _OneBatch(L.LightningDataModule):
    """The training rows (for the corpus NLL) and one placeholder validation batch.

    Lightning runs a ``validate`` call's hooks only when there is a batch to validate.
    """

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__()
        self.rows = rows

    @override
    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader([0])


class _EvaluatedStudent(StudentLM):
    """The student as ``fit`` loads it, with nothing to do per validation batch."""

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None


class _EvaluateOnce(Callback):
    """Runs the evaluation callbacks on the attached student, at one epoch and step."""

    def __init__(self, evaluations: list[EpochEvaluation]) -> None:
        self.evaluations = evaluations
        self.target: Target | None = None
        self.record = True

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = self.target
        for callback in self.evaluations:
            callback.ensure_checked(trainer, pl_module)
            if self.record:
                callback.evaluate_at(trainer, pl_module, epoch=target.epoch, step=target.step)
            elif _needs_base(callback):  # the base for the deltas, not recorded
                callback.measure(trainer, pl_module, epoch=target.epoch, step=target.step)


def _needs_base(callback: EpochEvaluation) -> bool:
    """Whether a callback's deltas need its epoch-0 measurement of the base model."""
    return isinstance(callback, (BenchmarkEval, LikelihoodTracker))


def _evaluate_all(targets: list[Target], callbacks: list[EpochEvaluation],
                  run_config: dict[str, Any], eval_config: dict[str, Any], staging: Path,
                  accelerator: str | None, precision: str | None, record_base: bool
                  ) -> list[dict[str, Any]]:
    """Evaluate every target in order into ``staging``; one record per recorded target."""
    trainer_config = _section(run_config, "trainer", "--run")
    model_args = {key: value for key, value in _section(run_config, "model", "--run").items()
                  if key != "model"}
    if isinstance(model_args.get("betas"), list):
        model_args["betas"] = tuple(model_args["betas"])
    rows = _training_rows(run_config, callbacks)
    driver = _EvaluateOnce(callbacks)
    chosen = {"accelerator": accelerator or trainer_config.get("accelerator") or "auto"}
    chosen["precision"] = trainer_precision(
        precision or trainer_config.get("precision") or "auto", chosen["accelerator"],
        "--precision")
    try:
        trainer = _trainer(chosen, staging, driver)
    except (ValueError, MisconfigurationException) as error:
        first = " ".join(str(error).split())[:300]
        raise SelftrainError(f"--accelerator {chosen['accelerator']} --precision "
                             f"{chosen['precision']}: Lightning refuses them here ({first}); "
                             "pass --accelerator and --precision this machine has") from None
    data = _OneBatch(rows)
    records = []
    for index, target in enumerate(targets):
        driver.target, driver.record = target, index > 0 or record_base
        start = time.perf_counter()
        try:
            student = _EvaluatedStudent(model=target.model, **model_args)
            trainer.validate(student, datamodule=data, verbose=False)
        except SelftrainError as error:
            raise SelftrainError(f"evaluating epoch {target.epoch} ({target.model}): {error}"
                                 ) from None
        del student
        seconds = time.perf_counter() - start
        log.info("epoch %d (%s, step %d): %s in %.1f s", target.epoch, target.model,
                 target.step, "evaluated" if driver.record else "base measured for the deltas",
                 seconds)
        if driver.record:
            records.append({"epoch": target.epoch, "model": target.model,
                            "global_step": target.step, "seconds": round(seconds, 3)})
    close_boards(trainer)  # the by-epoch sub-run's events are complete before they move
    return records


def _trainer(chosen: dict[str, str], staging: Path, driver: Callback) -> L.Trainer:
    """One device, the chosen accelerator and precision, logging into ``staging/tb``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        **chosen,
        devices=1,
        logger=TensorBoardLogger(save_dir=staging, name="tb", version="",
                                 default_hp_metric=False),
        callbacks=[driver],
        default_root_dir=staging,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_autolog_hparams=False,
        inference_mode=False,  # the callbacks enter no_grad themselves, as in training
        num_sanity_val_steps=0,
    )


def _training_rows(run_config: dict[str, Any], callbacks: list[EpochEvaluation]
                   ) -> list[dict[str, Any]]:
    """The run's training rows as ``fit`` fed them, when a callback measures them."""
    if not any(isinstance(callback, LikelihoodTracker) and callback.corpus_sample > 0
               for callback in callbacks):
        return []
    model = _section(run_config, "model", "--run")
    data = CorpusDataModule(**{**_section(run_config, "data", "--run"),
                               "tokenizer": model["model"], "revision": model.get("revision")})
    data.load()
    return data.rows


def _publish(staging: Path, out: Path, run_dir: Path | None, replaced: list[Path],
             records: list[dict[str, Any]], run: str | None, model: str | None,
             config_path: Path) -> None:
    """Move the staged evaluation into ``out``: a new run dir whole, or file by file.

    Into the run itself, nothing of the training's is written over: the logger's
    ``tb/hparams.yaml`` (empty, evaluate logs no hyperparameters) stays in staging, and any
    other staged file whose name the run already holds, and which is not an earlier
    evaluation's being replaced, stops the command before anything moves.
    """
    if out == run_dir:
        (staging / "tb" / "hparams.yaml").unlink(missing_ok=True)
    files = sorted(str(path.relative_to(staging)) for path in staging.rglob("*")
                   if path.is_file())
    if out == run_dir:
        taken = [name for name in files
                 if (out / name).exists() and out / name not in replaced]
        if taken:
            raise SelftrainError(f"--run {out}: already holds {taken[0]}, which this "
                                 "evaluation would write over; evaluate into a new dir with "
                                 "--out")
    summary = {"run": str(run_dir.resolve()) if run_dir else None, "model": model,
               "fit_config": str(config_path.resolve()), "evaluations": records,
               "files": [name for name in files if name != f"eval/{RECORD}"],
               "tool_version": __version__,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(summary, staging / "eval" / RECORD)
    if out != run_dir:
        publish_dir(staging, out, replace=True)
        return
    for path in replaced:
        path.unlink(missing_ok=True)
    for name in files + [f"eval/{RECORD}"]:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)
        fsync_dir(target.parent)
