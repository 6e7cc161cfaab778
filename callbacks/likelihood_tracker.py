"""`LikelihoodTracker`: log p(true continuation | prefix) against the base model, per epoch.

Extraction (:mod:`selftrain.callbacks.extraction_probe`) only says whether greedy decoding still
hits every token; the paper also reports that the log-probability of the true continuation falls
relative to the base model, a smooth signal that moves before exact matches vanish. For each
probe row (prefix y, continuation x) this callback logs, per domain,

- ``likelihood/<domain>/logprob``: mean over the domain's rows of log p(x | y), summed over
  the continuation's tokens, under the current student, and
- ``likelihood/<domain>/delta_logprob``: mean of (current - base) over the same rows,

plus ``likelihood/logprob`` / ``likelihood/delta_logprob`` over all rows when there is more
than one domain, and ``likelihood/corpus_nll``: the mean per-token NLL of a fixed, seeded
sample of the training corpus (how well the student fits what it trains on).

The base values are measured once per run: the epoch-0 evaluation *is* the base model, so
its numbers become the base (``delta_logprob`` is exactly 0 there). They are cached in
``<run>/eval/likelihood_base.pt`` (with the probe set's fingerprint and the student spec)
and kept in the callback's checkpoint state, so a resumed run reads them instead of
measuring a model it no longer has. Rows are sharded over ranks and gathered exactly
(:class:`selftrain.probes.metrics.RowResults`), so every number is independent of the world
size.

log p(x | y) comes from the teacher-forced forward over each window that the extraction probe
needs as well (:meth:`~selftrain.callbacks.probe_eval.ProbeEvaluation.teacher_forced`): with
both callbacks on one probe set and window, an evaluation runs it once per row, not twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from selftrain.callbacks.probe_eval import ProbeEvaluation, student_tokenizer
from selftrain.errors import SelftrainError
from selftrain.io import atomic_file
from selftrain.models import pad_token_id
from selftrain.probes.metrics import RowResults, per_domain
from selftrain.probes.windows import shard_rows, token_nll_rows


class LikelihoodTracker(ProbeEvaluation):
    """Log-probability of each probe's true continuation, and its change from the base model.

    Args:
        probe_set: parquet or jsonl file of probe rows (``text`` or ``input_ids``, ``domain``);
            null: the run's probe set, ``--probes.probe_set``, with its window.
        prefix_tokens: tokens of each row used as the prefix y.
        suffix_tokens: tokens of the true continuation x scored after the prefix.
        batch_size: probe rows per forward pass; the corpus sample is batched to the same
            number of tokens per pass.
        corpus_sample: training rows whose mean per-token NLL is logged as
            ``likelihood/corpus_nll``; 0 disables it.
        corpus_seed: seed of the (fixed) choice of those rows.
        every_n_epochs: evaluate after every n-th training epoch; the last epoch always is.
        run_at_start: evaluate the base model before the first optimizer step (epoch 0);
            the base is measured then anyway, since every delta needs it.
    """

    name = "likelihood"

    def __init__(
        self,
        probe_set: str | None = None,
        prefix_tokens: int = 32,
        suffix_tokens: int = 32,
        batch_size: int = 32,
        corpus_sample: int = 256,
        corpus_seed: int = 0,
        every_n_epochs: int = 1,
        run_at_start: bool = True,
    ) -> None:
        super().__init__(probe_set, prefix_tokens, suffix_tokens, batch_size, every_n_epochs,
                         run_at_start)
        if corpus_sample < 0:
            raise SelftrainError(f"{self.flag('corpus_sample')} {corpus_sample}: must be >= 0 "
                                 "(0 disables the corpus NLL)")
        self.corpus_sample = corpus_sample
        self.corpus_seed = corpus_seed
        self.student: str | None = None
        self.base: torch.Tensor | None = None
        """``[N]`` float64 log p(x | y) of every probe row under the base model."""
        self.base_computations = 0
        """How many times this instance measured the base model (once per fresh run)."""
        self._restored: dict[str, Any] | None = None
        self._sample: torch.Tensor | None = None
        self._nll: tuple[RowResults, RowResults] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(probe_set=self.probe_set,
                                        prefix_tokens=self.prefix_tokens,
                                        suffix_tokens=self.suffix_tokens)

    @override
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the probe set (bad rows fail before training) and note the student."""
        super().check(trainer, pl_module)
        self.student = student_spec(pl_module)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.corpus_sample > 0 and not isinstance(
                getattr(trainer.datamodule, "rows", None), list):
            raise SelftrainError(f"{self.flag('corpus_sample')} {self.corpus_sample}: needs "
                                 "selftrain's CorpusDataModule (its training rows); set it to 0 "
                                 "to disable the corpus NLL")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # a fresh run: the student now is the base model
            self.base = None
            if not self.run_at_start:
                self._measure_base(trainer, pl_module)
        else:
            self.base = self._resumed_base(trainer)
        super().on_train_start(trainer, pl_module)

    @override
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
                 step: int) -> dict[str, float]:
        current = self._probe_logprobs(trainer, pl_module, step)
        if self.base is None:  # epoch 0 of a fresh run: this measurement is the base
            self._set_base(trainer, current)
        probes = self.probes
        delta = current - self.base
        means = per_domain(current, probes.domain_index, len(probes.domains))
        deltas = per_domain(delta, probes.domain_index, len(probes.domains))
        metrics: dict[str, float] = {}
        for i, domain in enumerate(probes.domains):
            metrics[f"likelihood/{domain}/logprob"] = float(means[i])
            metrics[f"likelihood/{domain}/delta_logprob"] = float(deltas[i])
        if len(probes.domains) > 1:
            metrics["likelihood/logprob"] = float(current.mean())
            metrics["likelihood/delta_logprob"] = float(delta.mean())
        if self.corpus_sample > 0:
            metrics["likelihood/corpus_nll"] = self._corpus_nll(trainer, pl_module)
        return metrics

    def _probe_logprobs(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
                        ) -> torch.Tensor:
        """``[N]`` log p(x | y) of every probe row (the evaluation's shared teacher-forced pass).

        Args:
            trainer: the Trainer the student is attached to.
            pl_module: the student.
            step: the global step the student was trained to.
        """
        return self.teacher_forced(trainer, pl_module, step).logprobs

    def _corpus_nll(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Mean per-token NLL of the fixed corpus sample (token-weighted over all ranks)."""
        rows = trainer.datamodule.rows
        if self._sample is None:
            generator = torch.Generator().manual_seed(self.corpus_seed)
            chosen = torch.randperm(len(rows), generator=generator)[: self.corpus_sample]
            self._sample = chosen.sort().values
        if self._nll is None:
            self._nll = (RowResults(len(self._sample)), RowResults(len(self._sample)))
        sums, counts = (metric.to(pl_module.device) for metric in self._nll)
        mine = shard_rows(len(self._sample), trainer.global_rank, trainer.world_size)
        sequences = [rows[int(self._sample[i])]["input_ids"] for i in mine]
        order = sorted(range(len(sequences)), key=lambda j: len(sequences[j]))
        budget = self.batch_size * (self.prefix_tokens + self.suffix_tokens)
        padding = pad_token_id(student_tokenizer(pl_module))
        for group in _token_batches([len(sequences[j]) for j in order], budget):
            picked = [order[j] for j in group]
            nll, tokens = token_nll_rows(pl_module.model, [sequences[j] for j in picked],
                                         padding, batch_size=len(picked))
            sums.update(mine[picked], nll)
            counts.update(mine[picked], tokens.double())
        if not sequences:  # every rank takes part in the gather, even with nothing to add
            empty = torch.zeros(0, dtype=torch.long)
            sums.update(empty, empty.double())
            counts.update(empty, empty.double())
        total, tokens = float(sums.compute().sum()), float(counts.compute().sum())
        sums.reset()
        counts.reset()
        return total / max(tokens, 1.0)

    def _measure_base(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure the base model outside an evaluation (when ``run_at_start`` is off)."""
        with self.evaluation_mode(trainer, pl_module):
            self._set_base(trainer, self._probe_logprobs(trainer, pl_module,
                                                         trainer.global_step))

    def _set_base(self, trainer: L.Trainer, values: torch.Tensor) -> None:
        self.base = values.detach().cpu().double().clone()
        self.base_computations += 1
        self._write_cache(trainer)

    def _identity(self) -> dict[str, Any]:
        """What a stored base must match: the probe windows and the student."""
        return {"fingerprint": self.probes.fingerprint(), "student": self.student}

    def _matches(self, state: dict[str, Any] | None) -> bool:
        """Whether a stored base belongs to these probes and this student."""
        if not isinstance(state, dict) or not isinstance(state.get("logprobs"), torch.Tensor):
            return False
        return (all(state.get(key) == value for key, value in self._identity().items())
                and tuple(state["logprobs"].shape) == (len(self.probes),))

    def cache_path(self, trainer: L.Trainer) -> Path:
        """Where the base log-probs of this run are cached."""
        return self.run_dir(trainer) / "eval" / f"{self.name}_base.pt"

    def _write_cache(self, trainer: L.Trainer) -> None:
        """Write the base to the run dir atomically (global rank 0)."""
        if not trainer.is_global_zero:
            return
        with atomic_file(self.cache_path(trainer)) as staging:
            torch.save({**self._identity(), "probe_set": self.probe_set,
                        "logprobs": self.base}, staging)

    def _resumed_base(self, trainer: L.Trainer) -> torch.Tensor:
        """The base of a resumed run: from the run dir's cache, else from the checkpoint."""
        path = self.cache_path(trainer)
        cached = None
        if path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a damaged cache is as good as none: use the checkpoint's
                cached = None
        if self._matches(cached):
            return cached["logprobs"].double()
        if self._matches(self._restored):
            self.base = self._restored["logprobs"].double()
            self._write_cache(trainer)  # so the next resume finds it in the run dir again
            return self.base
        raise SelftrainError(
            f"{self.flag('probe_set')} {self.probe_set}: resuming at step {trainer.global_step} "
            f"but the base model's log-probs of these probes are neither in {path} nor in the "
            "checkpoint (another probe set or student?); start a fresh run to measure them")

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.base is None or self.probes is None:
            return super().state_dict()
        return {**super().state_dict(), **self._identity(), "logprobs": self.base}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restored = dict(state_dict) if "logprobs" in state_dict else None


def _token_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of ascending-length rows whose padded size fits ``budget`` tokens."""
    groups: list[list[int]] = []
    for index, length in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * length <= budget:  # length: the group's longest
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def student_spec(pl_module: L.LightningModule) -> str:
    """The student's model spec (StudentLM's ``model`` hyperparameter), else its class name."""
    spec = getattr(pl_module, "hparams", {}).get("model")
    return str(spec) if spec is not None else type(pl_module).__name__

