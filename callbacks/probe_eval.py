"""`ProbeEvaluation`: what the extraction and likelihood callbacks share.

Both read one probe set with the student's tokenizer before training (so a bad file fails
before any epoch), take the same window arguments, and measure the rows the same way: each
rank measures its shard (rows r, r + W, ...) and a :class:`~selftrain.probes.metrics.RowResults`
gathers every rank's values back into row order, so the numbers do not depend on the world
size. Subclasses say what to measure per row.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from selftrain.callbacks.epoch_eval import EpochEvaluation

from selftrain.errors import SelftrainError
from selftrain.probes.metrics import RowResults
from selftrain.probes.windows import ProbeSet, load_probe_set, shard_rows


class ProbeEvaluation(EpochEvaluation):
    """Base class: a probe set, its window, and exact sharded per-row measurement.

    Args:
        probe_set: parquet or jsonl file of probe rows (``text`` or ``input_ids``, ``domain``).
        prefix_tokens: tokens of each row used as the prefix.
        suffix_tokens: tokens of the continuation after the prefix.
        batch_size: probe rows per forward pass.
        every_n_epochs: evaluate after every n-th training epoch; the last epoch always is.
        run_at_start: evaluate the base model before the first optimizer step (epoch 0).
    """

    def __init__(self, probe_set: str, prefix_tokens: int, suffix_tokens: int,
                 batch_size: int, every_n_epochs: int, run_at_start: bool) -> None:
        super().__init__(every_n_epochs=every_n_epochs, run_at_start=run_at_start)
        for arg, value in (("prefix_tokens", prefix_tokens), ("suffix_tokens", suffix_tokens),
                           ("batch_size", batch_size)):
            if value < 1:
                raise SelftrainError(f"{self.flag(arg)} {value}: must be >= 1")
        if not str(probe_set).strip():
            raise SelftrainError(f"{self.flag('probe_set')} is empty: give a parquet or jsonl "
                                 "file of probe rows")
        self.probe_set = str(probe_set)
        self.prefix_tokens = prefix_tokens
        self.suffix_tokens = suffix_tokens
        self.batch_size = batch_size
        self.probes: ProbeSet | None = None
        self._gathers: dict[str, RowResults] = {}

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the probe set with the student's tokenizer (bad rows fail before training)."""
        self.probes = load_probe_set(self.probe_set, student_tokenizer(pl_module),
                                     self.prefix_tokens, self.suffix_tokens,
                                     flag=self.flag("probe_set"))

    def measure_rows(self, trainer: L.Trainer, pl_module: L.LightningModule, key: str,
                     measure: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``[N]`` per-row values of every probe row, gathered over ranks in row order.

        Args:
            trainer: the running Trainer (rank and world size).
            pl_module: the student (its device holds the gather's state).
            key: which measurement (one RowResults each, reused every evaluation).
            measure: row indices of this rank's shard -> one value per row.
        """
        probes = self.probes
        assert probes is not None, "check() loads the probe set before the first evaluation"
        metric = self._gathers.setdefault(key, RowResults(len(probes))).to(pl_module.device)
        rows = shard_rows(len(probes), trainer.global_rank, trainer.world_size)
        metric.update(rows, measure(rows))  # every rank, even with an empty shard
        values = metric.compute()
        metric.reset()
        return values


def student_tokenizer(pl_module: L.LightningModule):
    """The student's tokenizer, usable before its weights are loaded."""
    load = getattr(pl_module, "load_tokenizer", None)
    tokenizer = load() if callable(load) else getattr(pl_module, "tokenizer", None)
    if tokenizer is None:
        raise SelftrainError(f"{type(pl_module).__name__} has no tokenizer; the probes need "
                             "the student's tokenizer (use selftrain's StudentLM)")
    return tokenizer
