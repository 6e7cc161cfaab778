"""One run per run dir: what a run dir holds, which checkpoint resumes it, and whose it is.

A run dir (``--trainer.default_root_dir``) holds one training run: ``tb/``, ``checkpoints/``,
``eval/`` and ``hf/``. A second ``selftrain fit`` into it would mix two runs (``last-v1.ckpt``
beside ``last.ckpt``, two runs' curves in one TensorBoard, duplicate evaluation lines), so it
is refused unless the command resumes the run (``--ckpt_path last``) or asks to start it over
(``--overwrite true``).

A run dir is recognised by what only a run writes: the marker every run writes first
(:data:`RUN_MARKER`), LightningCLI's saved config, or a checkpoint's run identity, never by the
names of its subfolders. A folder of other files is refused whatever the flags, and
``--overwrite`` deletes only the files a run wrote (:func:`run_files`).

Every checkpoint records the run's identity (:func:`run_identity`: a fingerprint of the
training rows, the student's spec and revision, the tokenizer's fingerprint) under
:data:`IDENTITY_KEY`; a resume whose corpus, student or tokenizer differs is refused in one
line. Settings that may change on resume (epochs, the callbacks' cadence) are not part of it.

What ``fit``, ``validate`` and ``test`` do with their run dir is decided by :func:`plan_run`,
from the flags and what the run dir holds, before anything is built or written; a fit acts on
its :class:`RunPlan` (:func:`prepare_fit`) only once everything else is checked.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from selftrain.digests import SIDECAR_SUFFIX, digest_file, verify
from selftrain.errors import SelftrainError
from selftrain.io import is_temp_name, remove, write_json_atomic
from selftrain.outputs import dir_entries, listing, refuse_input_overlap, refuse_unwritable

log = logging.getLogger(__name__)

RUN_ENTRIES = ("tb", "checkpoints", "eval", "hf")
"""What ``selftrain fit`` writes into a run dir (``checkpoints`` unless moved elsewhere)."""
RUN_MARKER = "selftrain_run.json"
"""Written first into every run dir (command, version, time): a run dir is one because of it."""
IDENTITY_KEY = "selftrain_run"
"""Where a checkpoint keeps the identity of the run that wrote it."""
ROOT_FLAG = "--trainer.default_root_dir"
"""The flag a run dir comes from, named in messages."""
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values Lightning resolves itself (``last`` is resolved here where it can be)."""
IDENTITY_FIELDS = {"student": "--model.model (with --model.revision)",
                   "tokenizer": "the student's tokenizer",
                   "corpus": "--data.corpus (with --data.subset, --data.max_length)"}
"""Identity field -> the flags that decide it, named when a resume is refused."""
_LAST = re.compile(r"^last(-.*)?$")
"""Lightning's ``--ckpt_path last`` candidates: ``last.ckpt``, ``last-v1.ckpt``, ..."""
_TB_FILE = re.compile(r"^(events\.out\.tfevents\..+|hparams\.yaml|config(\.resumed-at-step=\d+)?"
                      r"\.yaml)$")
"""What TensorBoard and the saved config put in ``tb/`` and its sub-runs."""
_EVAL_FILE = re.compile(r"^([\w.-]+\.jsonl|[\w.-]+_base\.pt|evaluate\.json)$")
"""What the evaluation callbacks and ``selftrain evaluate`` put in ``eval/``."""
_EVAL_EPOCH_FILE = re.compile(r"^epoch=\d+-step=\d+\.\w+$")
"""A per-evaluation file in ``eval/<name>/``."""
_EXPORT_STAGING = re.compile(r"^\.epoch=\d+\.(partial-|previous-).+$")
"""An HF export's staging or replaced dir (:mod:`selftrain.io`), left behind by a kill."""


def write_run_marker(root: Path, command: str) -> None:
    """Mark ``root`` as a run dir of this project, before anything else of the run is written.

    An existing marker stays as it is (a resume, or ``validate`` in a fit's run dir).

    Args:
        root: the run dir.
        command: the subcommand that first wrote there (``fit``, ``validate``, ``test``).
    """
    from selftrain import __version__

    marker = root / RUN_MARKER
    if not marker.is_file():
        write_json_atomic({"command": command, "tool_version": __version__,
                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                          marker)


def is_run_dir(root: Path, checkpoint_dir: Path) -> bool:
    """Whether ``root`` holds a run of this project, by what only a run writes there.

    Its marker (:data:`RUN_MARKER`), a ``tb/config.yaml`` that LightningCLI saved (a run of a
    version before the marker), or a checkpoint that records a run identity. Names of
    subfolders alone (``tb/``, ``eval/``, ``hf/``) are not enough: a user's folder may have them.

    Args:
        root: the candidate run dir.
        checkpoint_dir: where the run's checkpoints go.
    """
    if (root / RUN_MARKER).is_file():
        return True
    try:
        config = yaml.safe_load((root / "tb" / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        config = None
    if isinstance(config, dict) and {"trainer", "model", "data"} <= set(config):
        return True
    last = find_last_checkpoint(checkpoint_dir)
    if last is None:
        return False
    try:
        return IDENTITY_KEY in read_checkpoint_meta(last)
    except SelftrainError:
        return False


def run_files(root: Path, checkpoint_dir: Path) -> list[Path]:
    """Every file and dir in ``root`` that a run of this project wrote, and nothing else.

    The marker, TensorBoard's files and saved configs in ``tb/`` (and its sub-runs),
    checkpoints (and their temp files), the evaluation callbacks' files in ``eval/``, and HF
    exports (a dir holding ``selftrain_export.json``) with their staging leftovers. A user's
    ``eval/score.py`` or ``hf/README.md`` is none of these.

    Args:
        root: the run dir.
        checkpoint_dir: the run's checkpoint dir (its ``*.ckpt``, their digests and temp
            files count).
    """
    from selftrain.models import EXPORT_INFO

    found = [root / RUN_MARKER] if (root / RUN_MARKER).is_file() else []
    tb = root / "tb"
    if tb.is_dir():
        found += sorted(path for path in tb.rglob("*") if path.is_file()
                        and (_TB_FILE.match(path.name) or is_temp_name(path.name)))
    if checkpoint_dir.is_dir():
        found += sorted(path for path in checkpoint_dir.iterdir()
                        if path.suffix == ".ckpt" or is_temp_name(path.name)
                        or path.name.endswith(f".ckpt{SIDECAR_SUFFIX}")
                        or path.name.startswith(".last"))
    evaluations = root / "eval"
    if evaluations.is_dir():
        for path in sorted(evaluations.iterdir()):
            if path.is_file() and (_EVAL_FILE.match(path.name) or is_temp_name(path.name)):
                found.append(path)
            elif path.is_dir():
                found += sorted(entry for entry in path.iterdir() if entry.is_file()
                                and _EVAL_EPOCH_FILE.match(entry.name))
    exports = root / "hf"
    if exports.is_dir():
        found += sorted(path for path in exports.iterdir() if path.is_dir() and (
            (path / EXPORT_INFO).is_file() or _EXPORT_STAGING.match(path.name)))
    return found


def earlier_run(root: Path, checkpoint_dir: Path) -> list[str]:
    """What of an earlier run a run dir holds (:func:`run_files`), as names for messages.

    Args:
        root: the run dir.
        checkpoint_dir: where the run's checkpoints go (``<root>/checkpoints`` by default).

    Returns:
        Paths relative to ``root`` where they lie under it (empty: no earlier run).
    """
    return [str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            for path in run_files(root, checkpoint_dir)]


def remove_earlier_run(root: Path, checkpoint_dir: Path) -> None:
    """Delete what an earlier run wrote in a run dir (``--overwrite true``); nothing else.

    Only :func:`run_files` go, then the folders they leave empty; a user's file in ``eval/``
    or ``hf/`` stays where it is, and so does its folder.

    Args:
        root: the run dir.
        checkpoint_dir: the run's checkpoint dir; outside ``root`` only its ``*.ckpt``
            (and their digests) go.
    """
    written = run_files(root, checkpoint_dir)
    for path in sorted(written, key=lambda path: len(path.parts), reverse=True):
        remove(path)
    folders = {folder for path in written for folder in path.parents
               if folder.is_relative_to(root) and folder != root}
    for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def remove_export_leftovers(root: Path) -> list[str]:
    """Delete the staging dirs a killed HF export left in ``<root>/hf``; only those.

    Args:
        root: the run dir.

    Returns:
        The names removed.
    """
    exports = root / "hf"
    if not exports.is_dir():
        return []
    leftovers = sorted(path for path in exports.iterdir() if _EXPORT_STAGING.match(path.name))
    for path in leftovers:
        remove(path)
    return [path.name for path in leftovers]


def run_inputs(config: Any) -> list[tuple[str, str | None]]:
    """What a fit, validate or test reads from disk, with its flag: no run dir may touch them.

    Args:
        config: the subcommand's parsed config (a jsonargparse Namespace).
    """
    data, model = config.get("data") or {}, config.get("model") or {}
    corpora = data.get("corpus")
    corpora = corpora if isinstance(corpora, list) else [corpora]
    probes = config.get("probes") or {}
    return [*(("--data.corpus", corpus) for corpus in corpora),
            ("--data.eval_corpus", data.get("eval_corpus")),
            ("--model.model", model.get("model")),
            ("--probes.probe_set", probes.get("probe_set"))]


def refuse_foreign_root(root: Path, checkpoint_dir: Path, flag: str) -> None:
    """Refuse a run dir that holds files but no run of this project (a user's folder).

    Whatever ``--overwrite`` says: a run writes only into an empty or new dir, or one that
    already holds a run (:func:`is_run_dir`).

    Args:
        root: the run dir.
        checkpoint_dir: the run's checkpoint dir.
        flag: the flag ``root`` came from, named in the message.
    """
    names = dir_entries(root)
    if names and not is_run_dir(root, checkpoint_dir):
        raise SelftrainError(f"{flag} {root}: holds files but no selftrain run "
                             f"({listing(names)}); choose a new or empty directory")


def find_last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The checkpoint ``--ckpt_path last`` resumes: the newest ``last*.ckpt`` (Lightning's rule).

    Args:
        checkpoint_dir: the run's checkpoint dir.
    """
    if not checkpoint_dir.is_dir():
        return None
    candidates = [path for path in checkpoint_dir.iterdir()
                  if path.suffix == ".ckpt" and _LAST.match(path.stem)]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


def read_checkpoint_meta(path: Path, flag: str = "--ckpt_path", weights_only: bool = True
                         ) -> dict[str, Any]:
    """A checkpoint's state without loading its tensors: step, identity, callbacks' state.

    A full checkpoint is memory-mapped (its tensors are not read); a sharded one (a
    directory) keeps everything but the weights in ``meta.pt``.

    Args:
        path: the checkpoint file or sharded checkpoint dir.
        flag: the flag the path came from, named in error messages.
        weights_only: load tensors and plain values only; False unpickles the file, which
            runs any code it carries (``--weights_only false``, for trusted checkpoints).

    Raises:
        SelftrainError: the path is missing, or not a readable checkpoint.
    """
    import torch

    if not path.exists():
        raise SelftrainError(f"{flag} {path}: no such checkpoint; give a checkpoint file, or "
                             "last to resume the run dir's newest one")
    source = path / "meta.pt" if path.is_dir() else path
    try:
        meta = torch.load(source, map_location="cpu", weights_only=weights_only,
                          mmap=not path.is_dir())
    except Exception as error:  # torch raises RuntimeError, EOFError, pickle errors, OSError
        if (weights_only and isinstance(error, pickle.UnpicklingError)
                and "weights_only" in str(error)):  # torch's own refusal, not a damaged file
            raise SelftrainError(f"{flag} {path}: holds objects beyond tensors and plain values,"
                                 " which load only by unpickling; if you trust the file, pass "
                                 "--weights_only false") from None
        raise SelftrainError(f"{flag} {path}: not a readable checkpoint ({type(error).__name__}"
                             "); it is truncated or not a checkpoint: give another one, or "
                             "start over") from None
    if not isinstance(meta, dict) or "global_step" not in meta:
        raise SelftrainError(f"{flag} {path}: not a Lightning checkpoint (no global_step); "
                             "give a checkpoint `selftrain fit` wrote")
    return meta


def is_local_checkpoint(ckpt: str | None) -> bool:
    """Whether a ``--ckpt_path`` names a local file (not a keyword Lightning resolves, not a URL).

    Args:
        ckpt: the flag's value.
    """
    return ckpt is not None and ckpt not in CKPT_KEYWORDS and "://" not in str(ckpt)


def read_verified_meta(path: Path, weights_only: bool = True) -> dict[str, Any]:
    """A ``--ckpt_path``'s state (:func:`read_checkpoint_meta`), its digest checked first.

    A checkpoint saved without a digest (another tool, an older version) still reads, with a
    warning that it is not verified.

    Args:
        path: the checkpoint file or sharded checkpoint dir.
        weights_only: as :func:`read_checkpoint_meta`.
    """
    verified = verify(path, "--ckpt_path")  # before anything reads it
    meta = read_checkpoint_meta(path, weights_only=weights_only)
    if not verified:
        log.warning("--ckpt_path %s: no digest was saved with it (%s); it reads as a "
                    "checkpoint but is not verified", path, digest_file(path).name)
    return meta


@dataclass(frozen=True)
class RunPlan:
    """What a fit, validate or test does with its run dir, decided before anything is built.

    Args:
        ckpt_path: the checkpoint to load: ``--ckpt_path``, with ``last`` resolved to the run
            dir's newest ``last*.ckpt`` where there is one; None: a fit from step 0.
        resume_meta: that checkpoint's state without its tensors; None where no local
            checkpoint is loaded (none given, or one Lightning resolves: ``best``, a URL).
        start_over: the fit removes an earlier run from the run dir before it writes
            (``--overwrite true``, or ``--ckpt_path last`` after a run that died before its
            first checkpoint).
    """

    ckpt_path: str | None
    resume_meta: dict[str, Any] | None = None
    start_over: bool = False

    @property
    def resume_step(self) -> int | None:
        """The global step the checkpoint was saved at (None: no checkpoint is loaded)."""
        return None if self.resume_meta is None else int(self.resume_meta["global_step"])


def plan_run(subcommand: str | None, root: Path, checkpoint_dir: Path, ckpt_path: str | None,
             overwrite: bool = False, inputs: Iterable[tuple[str, str | None]] = (),
             first_rank: bool = True,
             read_meta: Callable[[Path], dict[str, Any]] = read_verified_meta) -> RunPlan:
    """Check the run dir and the checkpoint to load, and decide what happens to them.

    Nothing is written. Refused in one line: a run dir that cannot be written, that is, holds
    or lies inside an input, or that holds files but no run; ``--overwrite true`` together
    with a fit's ``--ckpt_path``; a fit into a run dir that holds a run, unless it resumes it
    (``--ckpt_path last``) or starts it over (``--overwrite true``); a fit from another run
    dir's checkpoint into one that holds a run; a checkpoint ``read_meta`` refuses.

    Args:
        subcommand: ``fit``, ``validate`` or ``test`` (None: a CLI built without running).
        root: the run dir (``--trainer.default_root_dir``).
        checkpoint_dir: where the run's checkpoints go (``--checkpoint.dirpath``).
        ckpt_path: ``--ckpt_path``.
        overwrite: ``--overwrite``.
        inputs: (flag, path) of what the command reads (:func:`run_inputs`), which the run
            dir may not touch.
        first_rank: this process is global rank 0, which alone judges what the run dir holds
            (the other ranks of a DDP launch may start after rank 0 wrote the run's marker).
        read_meta: reads a local checkpoint's state, refusing one that is missing or damaged.
    """
    refuse_unwritable(root, ROOT_FLAG, beside=False)
    refuse_input_overlap(root, inputs, flag=ROOT_FLAG)
    if first_rank:
        refuse_foreign_root(root, checkpoint_dir, ROOT_FLAG)
    fit = subcommand == "fit"
    if fit and ckpt_path is not None and overwrite:
        raise SelftrainError(f"--overwrite true with --ckpt_path {ckpt_path}: one starts the run "
                             "over, the other resumes it; pass only the one you mean")
    start_over = False
    if ckpt_path == "last":
        found = find_last_checkpoint(checkpoint_dir)
        if found is not None:  # the file Lightning would pick, named so that it is checked
            ckpt_path = str(found)
        elif fit:
            log.info("--ckpt_path last: no checkpoint in %s yet; starting from step 0",
                     checkpoint_dir)
            # what a run that died before its first checkpoint logged is redone from step 0
            ckpt_path, start_over = None, True
    meta = read_meta(Path(ckpt_path)) if is_local_checkpoint(ckpt_path) else None
    if fit and first_rank and not start_over:
        start_over = _starts_over(root, checkpoint_dir, ckpt_path, meta, overwrite)
    return RunPlan(ckpt_path, meta, start_over)


def _starts_over(root: Path, checkpoint_dir: Path, ckpt_path: str | None,
                 meta: dict[str, Any] | None, overwrite: bool) -> bool:
    """Refuse a fit that would mix two runs in ``root``; whether an earlier run is removed."""
    if meta is not None:
        if (earlier_run(root, checkpoint_dir)
                and Path(ckpt_path).resolve().parent != checkpoint_dir.resolve()):
            raise SelftrainError(f"--ckpt_path {ckpt_path}: is not this run dir's checkpoint, "
                                 f"and {root} already holds a run; resume that one with "
                                 "--ckpt_path last, or continue from this checkpoint in a new "
                                 "run dir")
        return False
    found = earlier_run(root, checkpoint_dir)
    if found and not overwrite:
        raise SelftrainError(
            f"{ROOT_FLAG} {root}: already holds a run ({', '.join(found[:4])}); resume it "
            "with --ckpt_path last, start it over with --overwrite true, or give a new run dir")
    return bool(found)


def prepare_fit(plan: RunPlan, root: Path, checkpoint_dir: Path) -> None:
    """Act on a fit's plan in its run dir, then mark it; on global rank 0, once all is checked.

    A resume removes what a killed HF export left (:func:`remove_export_leftovers`); a
    start-over removes the earlier run (:func:`remove_earlier_run`).

    Args:
        plan: :func:`plan_run`'s plan for this fit.
        root: the run dir.
        checkpoint_dir: the run's checkpoint dir.
    """
    if plan.resume_meta is not None:
        removed = remove_export_leftovers(root)
        if removed:
            log.info("removed what a killed HF export left in %s/hf: %s", root,
                     ", ".join(removed))
    elif plan.start_over:
        log.info("starting %s over: removing the earlier run's %s", root,
                 ", ".join(earlier_run(root, checkpoint_dir)))
        remove_earlier_run(root, checkpoint_dir)
    write_run_marker(root, "fit")


def rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    """A short hash of the training rows' token ids, in order (what the run trains on).

    Args:
        rows: the data module's rows (``input_ids`` lists, and a synthesizer row's
            ``loss_from``, the first position trained on).
    """
    digest = hashlib.sha256()
    for row in rows:
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.tobytes())
        if "loss_from" in row:
            digest.update(b"loss_from" + int(row["loss_from"]).to_bytes(8, "little"))
    return digest.hexdigest()[:16]


def run_identity(model_spec: str, revision: str | None, tokenizer_fingerprint: str,
                 rows: list[dict[str, Any]]) -> dict[str, str]:
    """What a run is: the rows it trains on, its student, its tokenizer.

    Args:
        model_spec: ``--model.model``.
        revision: ``--model.revision``.
        tokenizer_fingerprint: the student's tokenizer fingerprint.
        rows: the training rows.
    """
    student = model_spec if revision is None else f"{model_spec}@{revision}"
    return {"student": student, "tokenizer": tokenizer_fingerprint,
            "corpus": rows_fingerprint(rows)}


def check_identity(saved: dict[str, str] | None, current: dict[str, str], path: Path,
                   fields: tuple[str, ...] = tuple(IDENTITY_FIELDS)) -> None:
    """Refuse a checkpoint another run wrote (another corpus, student or tokenizer).

    Args:
        saved: the checkpoint's :data:`IDENTITY_KEY` entry (None: it records none).
        current: :func:`run_identity` of this command.
        path: the checkpoint, named in the message.
        fields: the identity fields to compare (validate and test check the student only).
    """
    if saved is None:
        raise SelftrainError(f"--ckpt_path {path}: records no selftrain run identity (another "
                             "program or an older selftrain wrote it); give a checkpoint this "
                             "version of `selftrain fit` wrote")
    for field in fields:
        if saved.get(field) != current.get(field):
            raise SelftrainError(
                f"--ckpt_path {path}: was written by a run with another {field} "
                f"({saved.get(field)}; this command gives {current.get(field)}); resume with the "
                f"run's own {IDENTITY_FIELDS[field]}, or train in a new run dir")
