"""Per-row mean token NLL of a corpus under a student, fed as the data module feeds it.

The paper's second proxy asks whether a corpus the student finds likely (low NLL) helps it
more. The number only means something if the student sees what training shows it, so the ids
come from :mod:`selftrain.training.rows` exactly as :class:`CorpusDataModule` makes them (the
stored ``input_ids`` when the tokenizer matches, else ``text`` retokenized with the student's
BOS), cut to ``max_length``; a row with fewer than 2 tokens (the data module drops it) gets NaN.
Rows are sorted by length and packed into batches under a token budget, and the sums come from
:func:`selftrain.probes.windows.token_nll_rows`, the likelihood tracker's maths.

The same sums give the relational proxy (:func:`source_kl`): where the corpus recorded each
sampled token's log-probability under the source's sampling distribution q, the per-sample
``(log q(x) - log p_student(x)) / tokens`` is a Monte Carlo estimate of KL(q || student) per
source token (its mean over samples drawn from q). With the student's own ids, token by token
up to the cut at ``max_length``; with retokenized text, over the whole text (EOS included on
both sides), so a row cut at ``max_length`` gets NaN. q is the tempered, truncated
distribution: at T != 1 (or with top-k / top-p) this is KL(q || student), not the source
model's own KL.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from selftrain.corpus import Corpus
from selftrain.errors import SelftrainError
from selftrain.models import (
    check_token_id,
    load_model,
    load_tokenizer,
    pad_token_id,
    tokenizer_fingerprint,
)
from selftrain.precision import autocast_dtype
from selftrain.probes.windows import token_nll_rows
from selftrain.training.rows import retokenize, reuse_ids, stored_ids


def token_budget_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Row indices sorted by length, cut into batches whose padded size stays in the budget.

    A batch holds as many rows as fit ``rows x longest <= batch_tokens`` (at least one).

    Args:
        lengths: tokens per row.
        batch_tokens: padded tokens per batch.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    return batches + ([current] if current else [])


class StudentNll:
    """A student loaded once, scoring chunks of corpus rows.

    Args:
        spec: the student's model spec (``--student``).
        corpus_path: the corpus, named in messages.
        manifest: the corpus manifest (its tokenizer fingerprint decides id reuse).
        has_ids: whether the corpus rows have ``input_ids``.
        max_length: tokens per row, BOS included; longer rows are cut (``--data.max_length``).
        batch_tokens: padded tokens per forward pass.
        precision: ``auto``, ``32`` or ``bf16``.
        device: where the student runs.
        same_tokenizer: ``--data.same_tokenizer``; None compares fingerprints.
        bos_token_id: ``--data.bos_token_id`` when retokenizing (None: the student's).
    """

    def __init__(self, spec: str, corpus_path: Path, manifest: dict | None, has_ids: bool,
                 max_length: int, batch_tokens: int, precision: str, device: torch.device,
                 same_tokenizer: bool | None, bos_token_id: int | None) -> None:
        self.spec = spec
        self.tokenizer = load_tokenizer(spec, flag="--student")
        check_token_id(bos_token_id, len(self.tokenizer), "--bos_token_id")
        probe = Corpus(corpus_path, {"input_ids": []} if has_ids else {}, manifest)
        self.reuse = reuse_ids(probe, same_tokenizer,
                               lambda: tokenizer_fingerprint(self.tokenizer), str(corpus_path),
                               "--corpus")
        self.model = load_model(spec, flag="--student").to(device).eval()
        self.device, self.dtype = device, autocast_dtype(precision, device)
        self.precision = "bf16" if self.dtype is torch.bfloat16 else "32"  # as resolved
        self.path, self.max_length, self.batch_tokens = corpus_path, max_length, batch_tokens
        self.bos_token_id, self.pad_id = bos_token_id, pad_token_id(self.tokenizer)

    def full_ids(self, chunk: Corpus) -> list[list[int]]:
        """The chunk's rows as the student's ids, before the cut at ``max_length``."""
        keep, path = list(range(len(chunk))), str(self.path)
        if self.reuse:
            return stored_ids(chunk, keep, len(self.tokenizer), path, "--corpus")
        return retokenize(chunk, keep, self.tokenizer, self.bos_token_id, path, "--corpus")

    def score(self, chunk: Corpus) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: the student's NLL sum, its predicted tokens, its length before the cut.

        Sums and counts are NaN for rows under 2 tokens; the length is in the student's ids
        before the cut at ``max_length``.

        Args:
            chunk: corpus rows.
        """
        full = self.full_ids(chunk)
        rows = [list(ids[: self.max_length]) for ids in full]
        sums = np.full(len(rows), math.nan, dtype=np.float64)
        counts = np.full(len(rows), math.nan, dtype=np.float64)
        scored = [i for i, ids in enumerate(rows) if len(ids) >= 2]
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype
                    else nullcontext())
        with torch.inference_mode(), autocast:
            for batch in token_budget_batches([len(rows[i]) for i in scored], self.batch_tokens):
                indices = [scored[b] for b in batch]
                batch_sums, batch_counts = token_nll_rows(
                    self.model, [rows[i] for i in indices], self.pad_id,
                    batch_size=len(indices))
                sums[indices], counts[indices] = batch_sums.numpy(), batch_counts.numpy()
        if not np.isfinite(sums[scored]).all():
            raise SelftrainError(f"--student {self.spec}: its NLL on {self.path} is not finite "
                                 "(inf or NaN); try --precision 32")
        return sums, counts, np.array([len(ids) for ids in full], dtype=np.int64)


def source_kl(source_logprobs: list[list[float] | None], sums: np.ndarray, counts: np.ndarray,
              lengths: np.ndarray, same_ids: bool, max_length: int) -> np.ndarray:
    """Per sample, ``(log q(x) - log p_student(x))`` per source token (NaN where not measurable).

    Args:
        source_logprobs: each row's recorded log-probabilities of its sampled tokens under the
            source's sampling distribution (None: not recorded).
        sums: the student's NLL sum per row (:meth:`StudentNll.score`).
        counts: the student's predicted tokens per row.
        lengths: the row's length in the student's ids before the cut at ``max_length``.
        same_ids: the student reads the stored ids (token by token alignment); else the text
            was retokenized, and only rows not cut at ``max_length`` are comparable.
        max_length: the cut.
    """
    out = np.full(len(source_logprobs), math.nan, dtype=np.float64)
    for i, recorded in enumerate(source_logprobs):
        if recorded is None or not len(recorded) or math.isnan(counts[i]):
            continue
        if same_ids:  # the stored ids are BOS + the sampled tokens: one logprob per target
            scored = int(counts[i])
            if scored > len(recorded):
                continue
            out[i] = (float(np.sum(recorded[:scored], dtype=np.float64)) + sums[i]) / scored
        elif lengths[i] <= max_length:
            out[i] = (float(np.sum(recorded, dtype=np.float64)) + sums[i]) / len(recorded)
    return out
