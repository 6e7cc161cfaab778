"""`TensorBoardLayout`: one custom-scalars page that shows the decoupling at a glance.

The paper's third claim is visible only when three families of curves sit side by side:
benchmark deltas (capability), extraction counts (verbatim memory) and likelihood deltas
(probability of the true continuation), each per task or domain, beside the training loss.
This callback writes a custom-scalars layout into each TensorBoard run (the CUSTOM SCALARS
tab); its charts select tags by regular expression, so new tasks and domains join by
themselves.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

LAYOUT: dict[str, dict[str, list]] = {
    "selftrain: capability vs memorization": {
        "benchmark delta vs base": ["Multiline", [r"benchmark_delta/.*"]],
        "extraction: memorized rows": ["Multiline", [r"extraction/([^/]+/)?memorized"]],
        "likelihood delta vs base": ["Multiline", [r"likelihood/([^/]+/)?delta_logprob"]],
        "extraction: match rate": ["Multiline", [r"extraction/([^/]+/)?match_rate"]],
        "training-corpus NLL": ["Multiline", [r"likelihood/corpus_nll"]],
        "train loss": ["Multiline", [r"train/loss", r"val/loss"]],
    },
}
"""category -> chart title -> ["Multiline", [tag regexes]] (torch's add_custom_scalars form)."""


class TensorBoardLayout(Callback):
    """Writes :data:`LAYOUT` into every TensorBoard logger of the run (global rank 0)."""

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(LAYOUT)
