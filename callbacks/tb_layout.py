"""What selftrain writes into a TensorBoard run beside Lightning: one readable page, epoch axis.

The paper's third claim is visible only when three families of curves sit side by side:
benchmark deltas (capability), extraction counts (verbatim memory) and likelihood deltas
(probability of the true continuation), each per task or domain, beside the training loss.
This module writes that page, a custom-scalars layout (the CUSTOM SCALARS tab), and a copy of
every evaluation scalar against the epoch.

- **One chart per quantity.** TensorBoard's custom-scalars charts colour a line by its run,
  so several tags of one run in one chart share a colour (the code and license canaries could
  not be told apart). Each evaluated tag gets a chart of its own; a chart holds one line per
  run, so runs compared under one ``--logdir`` get their own colours. Tasks and domains are
  known only once a callback has evaluated, so the layout is written again whenever a tag
  joins (at step 0: TensorBoard keeps the last layout a run holds at a step).
- **The epoch axis.** TensorBoard's x axis is the step. Every evaluation scalar is also
  written, as ``by_epoch/<tag>`` at step = epochs completed, to a sub-run of its own,
  ``<run>/tb/by_epoch/``, with its own purge on resume (:meth:`RunBoard.resume_at`), so the
  step-axis tags of ``<run>/tb`` stay exactly as they are. The page's first category shows
  those; the same charts against the global step follow in a category that opens closed.

:class:`TensorBoardLayout` writes the page when fitting starts (family-wide placeholders until
the first evaluation names its tags); :class:`selftrain.callbacks.epoch_eval.EpochEvaluation`
feeds :func:`run_board` from its logging path, so ``selftrain evaluate`` gets the same page.
Only global rank 0 writes.
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from typing_extensions import override

if TYPE_CHECKING:
    from torch.utils.tensorboard.writer import FileWriter, SummaryWriter

BY_EPOCH = "by_epoch"
"""The sub-run (``<run>/tb/by_epoch/``) and tag prefix of the evaluation scalars by epoch."""

BY_EPOCH_CATEGORY = "evaluations by epoch (x axis: epochs completed)"
TRAINING_CATEGORY = "training (x axis: global step)"
BY_STEP_CATEGORY = "evaluations by global step (x axis: step)"
PLACEHOLDER_CATEGORY = "selftrain: capability vs memorization"

CHARTED: tuple[tuple[str, str, str | None], ...] = (
    (r"benchmark_delta/(?P<part>.+/[^/]+)", "benchmark delta vs base", None),
    (r"extraction/(?:(?P<part>[^/]+)/)?memorized", "extraction: memorized rows", "all domains"),
    (r"likelihood/(?:(?P<part>[^/]+)/)?delta_logprob", "likelihood delta vs base",
     "all domains"),
    (r"extraction/(?:(?P<part>[^/]+)/)?match_rate", "extraction: match rate", "all domains"),
    (r"likelihood/corpus_nll", "training-corpus NLL", None),
)
"""The charted evaluation tags, in page order: (tag regex, quantity, name of the part-less tag).

A chart is titled ``<quantity> — <part>`` (a task/metric or a domain), the all-domain tag
first; other evaluation tags (raw benchmark scores, log-probs, timings) are on the SCALARS
tab only.
"""

PLACEHOLDERS: dict[str, list[str]] = {
    "benchmark delta vs base": [r"^benchmark_delta/.*$"],
    "extraction: memorized rows": [r"^extraction/([^/]+/)?memorized$"],
    "likelihood delta vs base": [r"^likelihood/([^/]+/)?delta_logprob$"],
    "extraction: match rate": [r"^extraction/([^/]+/)?match_rate$"],
    "training-corpus NLL": [r"^likelihood/corpus_nll$"],
}
"""Family-wide charts of a run whose evaluations have not named their tags yet."""


def charts(tags: Iterable[str]) -> list[tuple[str, str]]:
    """The page's per-quantity charts for these evaluation tags, in page order.

    Args:
        tags: step-axis evaluation tags (``extraction/code/memorized``, ...).

    Returns:
        (chart title, tag) pairs: one chart per charted tag.
    """
    found: list[tuple[int, int, str, str, str]] = []
    for tag in set(tags):
        for order, (pattern, quantity, whole) in enumerate(CHARTED):
            match = re.fullmatch(pattern, tag)
            if match:
                part = match.groupdict().get("part")
                label = part if part is not None else whole
                title = f"{quantity} — {label}" if label else quantity
                found.append((order, part is not None, label or "", title, tag))
                break
    return [(title, tag) for *_, title, tag in sorted(found)]


def _only(tag: str) -> str:
    """A custom-scalars regex selecting exactly ``tag`` (the plugin matches at the start)."""
    return f"^{re.escape(tag)}$"


def layout(tags: Iterable[str], val_loss: bool = False) -> layout_pb2.Layout:
    """The custom-scalars page of a run with these evaluation tags.

    Args:
        tags: the run's step-axis evaluation tags; none yet: family-wide placeholder charts.
        val_loss: chart ``val/loss`` too (a run with a held-out corpus).

    Returns:
        The layout: evaluations by epoch, training, evaluations by step (closed).
    """
    def category(title: str, items: Iterable[tuple[str, str]], closed: bool = False
                 ) -> layout_pb2.Category:
        return layout_pb2.Category(title=title, closed=closed, chart=[
            layout_pb2.Chart(title=name, multiline=layout_pb2.MultilineChartContent(tag=[rx]))
            for name, rx in items])

    per_tag = charts(tags)
    training = [("train/loss", _only("train/loss"))]
    if val_loss:
        training.append(("val/loss", _only("val/loss")))
    if not per_tag:
        return layout_pb2.Layout(category=[
            layout_pb2.Category(title=PLACEHOLDER_CATEGORY, chart=[
                layout_pb2.Chart(title=name, multiline=layout_pb2.MultilineChartContent(tag=rx))
                for name, rx in PLACEHOLDERS.items()]),
            category(TRAINING_CATEGORY, training)])
    return layout_pb2.Layout(category=[
        category(BY_EPOCH_CATEGORY, [(title, _only(f"{BY_EPOCH}/{tag}"))
                                     for title, tag in per_tag]),
        category(TRAINING_CATEGORY, training),
        category(BY_STEP_CATEGORY, [(f"{title} (by step)", _only(tag))
                                    for title, tag in per_tag], closed=True),
    ])


def layout_summary(page: layout_pb2.Layout) -> Summary:
    """The event summary that carries a custom-scalars layout (as torch's ``custom_scalars``).

    Args:
        page: the layout.
    """
    tensor = TensorProto(dtype="DT_STRING", string_val=[page.SerializeToString()],
                         tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor,
                                        metadata=metadata.create_summary_metadata())])


def resume_epoch(checkpoint: Mapping[str, Any]) -> int:
    """Where the by-epoch sub-run is purged from when fitting resumes from ``checkpoint``.

    The main event file is purged from the checkpoint's global step S, and each evaluation
    callback logs again the records of its history at or after S; the by-epoch sub-run keeps
    the epochs of the records before S (over all callbacks) and drops the rest.

    Args:
        checkpoint: the checkpoint (``global_step``, and each EpochEvaluation's
            ``{"history": [records]}`` under ``callbacks``).

    Returns:
        1 + the last epoch evaluated before S; 0 if none was.
    """
    step = int(checkpoint["global_step"])
    kept = [int(record["epoch"]) for state in checkpoint.get("callbacks", {}).values()
            if isinstance(state, Mapping) and isinstance(state.get("history"), list)
            for record in state["history"]
            if isinstance(record, Mapping) and "epoch" in record and "global_step" in record
            and int(record["global_step"]) < step]
    return max(kept) + 1 if kept else 0


class RunBoard:
    """selftrain's own writes into one TensorBoard run: the layout and the by-epoch sub-run.

    Args:
        logger: the run's TensorBoard logger (its ``log_dir`` is ``<run>/tb``).
    """

    def __init__(self, logger: TensorBoardLogger) -> None:
        self._logger = weakref.ref(logger)  # the registry's key: a strong one would keep it
        self.tags: set[str] = set()
        """The evaluation tags charted so far."""
        self.val_loss = False
        self.purge_epoch: int | None = None
        """Set on resume: the by-epoch sub-run drops what was logged at or after it."""
        self._writer: Any = None

    def logger(self) -> TensorBoardLogger:
        """The run's logger."""
        logger = self._logger()
        if logger is None:
            raise RuntimeError("the TensorBoard logger of this run is gone")
        return logger

    @property
    def by_epoch_dir(self) -> Path:
        """``<run>/tb/by_epoch``."""
        return Path(self.logger().log_dir) / BY_EPOCH

    def resume_at(self, epoch: int) -> None:
        """Purge the by-epoch sub-run from ``epoch`` on when it is opened (a resumed fit).

        Args:
            epoch: :func:`resume_epoch` of the checkpoint resumed from.
        """
        if self._writer is None:
            self.purge_epoch = epoch

    def writer(self) -> Any:
        """The by-epoch sub-run's writer, opened (with the resume's purge) on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            if self.purge_epoch is not None:
                wait_to_sort_last(self.by_epoch_dir)
            self._writer = SummaryWriter(str(self.by_epoch_dir), purge_step=self.purge_epoch)
        return self._writer

    def log_by_epoch(self, scalars: Mapping[str, float], epoch: int) -> None:
        """Write ``by_epoch/<tag>`` at step ``epoch`` for each scalar, flushed.

        Args:
            scalars: tag -> value (step-axis tag names; the prefix is added here).
            epoch: epochs completed.
        """
        writer = self.writer()
        for tag, value in scalars.items():
            writer.add_scalar(f"{BY_EPOCH}/{tag}", float(value), global_step=epoch)
        writer.flush()

    def chart(self, tags: Iterable[str], val_loss: bool = False) -> None:
        """Chart these evaluation tags too; the layout is written again if any is new.

        Args:
            tags: step-axis evaluation tags.
            val_loss: the run logs ``val/loss``.
        """
        new = {tag for tag in tags if charts([tag])} - self.tags
        if new or (val_loss and not self.val_loss):
            self.tags |= new
            self.val_loss = self.val_loss or val_loss
            self.write_layout()

    def write_layout(self) -> None:
        """Write the run's layout at step 0 (it replaces the one written before), flushed."""
        experiment = self.logger().experiment
        _event_file(experiment).add_summary(layout_summary(layout(self.tags, self.val_loss)), 0)
        experiment.flush()

    def close(self) -> None:
        """Close the by-epoch writer (a later write opens a new event file)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _event_file(experiment: SummaryWriter) -> FileWriter:
    """A SummaryWriter's open event file, its public ``file_writer``.

    ``SummaryWriter`` writes a ``Summary`` proto only through its event file; the layout is
    one (``add_custom_scalars`` takes no category that opens closed). Lightning closes the
    writer when a fit or a validate ends (the logger's ``finalize``) and the writer opens its
    event file again on its next write: where nothing was written since, an empty layout is
    that write, and the page written after it at the same step replaces it.

    Args:
        experiment: the logger's ``SummaryWriter``.
    """
    if experiment.file_writer is None:
        experiment.add_custom_scalars({})
    return experiment.file_writer


def wait_to_sort_last(folder: Path) -> None:
    """Wait, if need be, until a new event file's name sorts after every one in ``folder``.

    TensorBoard reads a run's event files in name order. A name starts with the second it was
    made in; within one second it ends in a process-wide counter, which sorts as text
    (``.10`` before ``.9``), so a resume's purge written in the same second as the crashed
    file could be read before the events it purges.

    Args:
        folder: the (sub-)run's directory.
    """
    seconds = [int(parts[3]) for path in folder.glob("events.out.tfevents.*")
               if len(parts := path.name.split(".")) > 4 and parts[3].isdigit()]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)


_BOARDS: weakref.WeakKeyDictionary[TensorBoardLogger, RunBoard] = weakref.WeakKeyDictionary()


def run_board(logger: TensorBoardLogger) -> RunBoard:
    """The one :class:`RunBoard` of a logger, shared by every callback that writes to it.

    Args:
        logger: a TensorBoard logger of the Trainer.
    """
    board = _BOARDS.get(logger)
    if board is None:
        board = _BOARDS[logger] = RunBoard(logger)
    return board


def tensorboard_loggers(trainer: L.Trainer) -> list[TensorBoardLogger]:
    """The Trainer's TensorBoard loggers, on global rank 0 (none elsewhere: rank 0 writes).

    Args:
        trainer: the Trainer.
    """
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def close_boards(trainer: L.Trainer) -> None:
    """Close the by-epoch writers of the Trainer's TensorBoard loggers.

    Args:
        trainer: the Trainer.
    """
    for logger in tensorboard_loggers(trainer):
        board = _BOARDS.pop(logger, None)
        if board is not None:
            board.close()


class TensorBoardLayout(Callback):
    """Writes the run's custom-scalars page into every TensorBoard logger (global rank 0).

    At fit start with the evaluation tags known so far (a resumed run's), placeholders if
    none; again when the evaluations name new tags, and when ``val/loss`` first appears.
    """

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in tensorboard_loggers(trainer):
            run_board(logger).write_layout()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        for logger in tensorboard_loggers(trainer):
            run_board(logger).chart((), val_loss=True)
