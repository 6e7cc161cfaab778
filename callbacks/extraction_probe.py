"""`ExtractionProbe`: how many held-out sequences the student still reproduces verbatim.

The paper's third finding is that capability and memorization decouple: while benchmark
scores hold, verbatim extraction of held-out text falls by more than 95%. This callback
measures extraction the way Biderman et al. (2023) and Pythia's memorized-sequence sets do:
each probe row's first ``prefix_tokens`` tokens are the prefix, the student greedily decodes
``suffix_tokens`` tokens, and the row is *memorized* iff every one equals the true
continuation. Per domain it logs

- ``extraction/<domain>/memorized``: the count of exactly reproduced rows, and
- ``extraction/<domain>/match_rate``: the mean share of continuation tokens the greedy
  continuation reproduces, position by position (Pythia's memorization score),

plus ``extraction/memorized`` and ``extraction/match_rate`` over all rows when the set has
more than one domain (two-part tags, so no domain name can collide with them).

Greedy decoding reproduces the continuation up to the first position whose argmax, given
the true tokens before it, is not the true token. So *memorized* comes from one
teacher-forced forward over prefix + continuation, the one the likelihood tracker needs too
(:meth:`~selftrain.callbacks.probe_eval.ProbeEvaluation.teacher_forced`, shared within an
evaluation). The match rate also counts matches after the first divergence, where the
model continues from its own tokens: only the rows not settled by that pass (those that
diverge before their last token) are decoded greedily. ``match_rate: false`` skips that
decoding and the match-rate tags. A row whose memorized status rests on a near-tie of the
true token and the best other one (bf16 rounds the pass and step-by-step decoding
differently) is decoded either way, so its counts are the ones greedy decoding gives.

Rows are sharded over ranks and gathered exactly (:class:`selftrain.probes.metrics.RowResults`),
so the numbers do not depend on the world size. With ``save_rows`` rank 0 also writes one
parquet per evaluation, ``<run>/eval/extraction/epoch=E-step=S.parquet``, telling which
rows were reproduced and which were forgotten.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pyarrow as pa
import torch
from typing_extensions import override

from selftrain.callbacks.probe_eval import ProbeEvaluation
from selftrain.io import write_parquet_atomic
from selftrain.probes.metrics import per_domain
from selftrain.probes.windows import greedy_counts, needs_decoding


class ExtractionProbe(ProbeEvaluation):
    """Prefix-completion extraction: greedy continuation of each probe prefix, exact match.

    Args:
        probe_set: parquet or jsonl file of probe rows (``text`` or ``input_ids``, ``domain``);
            null: the run's probe set, ``--probes.probe_set``, with its window.
        prefix_tokens: tokens of each row given to the student as the prefix.
        suffix_tokens: tokens the student decodes greedily and must reproduce.
        batch_size: probe rows per forward pass.
        every_n_epochs: evaluate after every n-th training epoch; the last epoch always is.
        run_at_start: evaluate the base model before the first optimizer step (epoch 0).
        save_rows: write per-row results of each evaluation to
            ``<run>/eval/extraction/epoch=E-step=S.parquet`` (rank 0).
        match_rate: log ``extraction/<domain>/match_rate``, which greedily decodes the rows
            that diverge before their last token; false: the memorized counts only, from the
            teacher-forced pass alone (no decoding).
    """

    name = "extraction"

    def __init__(
        self,
        probe_set: str | None = None,
        prefix_tokens: int = 32,
        suffix_tokens: int = 32,
        batch_size: int = 32,
        every_n_epochs: int = 1,
        run_at_start: bool = True,
        save_rows: bool = True,
        match_rate: bool = True,
    ) -> None:
        super().__init__(probe_set, prefix_tokens, suffix_tokens, batch_size, every_n_epochs,
                         run_at_start)
        self.save_rows = save_rows
        self.match_rate = match_rate

    @override
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
                 step: int) -> dict[str, float]:
        probes = self.probes
        extracted, matched = self._greedy_counts(trainer, pl_module, step)
        memorized = extracted == self.suffix_tokens
        domains = (probes.domain_index, len(probes.domains))
        counts = per_domain(memorized.double(), *domains, "sum")
        rate = None if matched is None else matched.double() / self.suffix_tokens
        rates = None if rate is None else per_domain(rate, *domains, "mean")
        metrics: dict[str, float] = {}
        for i, domain in enumerate(probes.domains):
            metrics[f"extraction/{domain}/memorized"] = float(counts[i])
            if rates is not None:
                metrics[f"extraction/{domain}/match_rate"] = float(rates[i])
        if len(probes.domains) > 1:
            metrics["extraction/memorized"] = float(memorized.sum())
            if rate is not None:
                metrics["extraction/match_rate"] = float(rate.mean())
        if self.save_rows and trainer.is_global_zero:
            self._write_rows(trainer, epoch, step, extracted, matched, memorized)
        return metrics

    def _greedy_counts(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[N]`` extracted and matched (None with ``match_rate`` off) tokens per row.

        The teacher-forced pass settles most rows; the others are decoded, dealt evenly over
        the ranks first. Every rank holds the same pass, so all skip or all decode.

        Args:
            trainer: the Trainer the student is attached to.
            pl_module: the student.
            step: the global step the student was trained to.
        """
        probes, forced = self.probes, self.teacher_forced(trainer, pl_module, step)
        decode = needs_decoding(forced.extracted, self.suffix_tokens, forced.close,
                                self.match_rate)
        if not decode.any():
            return forced.extracted, forced.extracted.clone() if self.match_rate else None
        order = torch.cat([decode.nonzero().squeeze(-1), (~decode).nonzero().squeeze(-1)])
        counts = self.measure_rows(trainer, pl_module, "greedy", lambda rows: torch.stack(
            greedy_counts(pl_module.model, probes.input_ids[rows], self.prefix_tokens,
                          forced.extracted[rows], decode[rows], self.batch_size),
            dim=-1).double(), width=2, order=order).round().long()
        return counts[:, 0], counts[:, 1] if self.match_rate else None

    def _write_rows(self, trainer: L.Trainer, epoch: int, step: int, extracted: torch.Tensor,
                    matched: torch.Tensor | None, memorized: torch.Tensor) -> Path:
        """Per-row results of one evaluation, written atomically.

        ``matched_tokens``: greedy matches, position by position (null with ``match_rate``
        off); ``extracted_tokens``: leading tokens reproduced before the first divergence.
        """
        probes = self.probes
        target = (self.run_dir(trainer) / "eval" / self.name
                  / f"epoch={epoch}-step={step}.parquet")
        target.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({
            "row": pa.array(range(len(probes)), pa.int64()),
            "domain": pa.array([probes.domains[i] for i in probes.domain_index.tolist()],
                               pa.string()),
            "matched_tokens": pa.array(matched.tolist() if matched is not None
                                       else [None] * len(probes), pa.int32()),
            "extracted_tokens": pa.array(extracted.tolist(), pa.int32()),
            "memorized": pa.array(memorized.tolist(), pa.bool_()),
        })
        write_parquet_atomic(table, target)
        return target
