"""Per-row mean token NLL of a corpus under a student, fed as the data module feeds it.

The paper's second proxy asks whether a corpus the student finds likely (low NLL) helps it
more. The number only means something if the student sees what training shows it, so the ids
come from :mod:`selftrain.training.rows` exactly as :class:`CorpusDataModule` makes them (the
stored ``input_ids`` when the tokenizer matches, else ``text`` retokenized with the student's
BOS), cut to ``max_length``; a row with fewer than 2 tokens (the data module drops it) gets NaN.
Rows are sorted by length and packed into batches under a token budget, and the sums come from
:func:`selftrain.probes.windows.token_nll_rows`, the likelihood tracker's maths.
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

    def ids(self, chunk: Corpus) -> list[list[int]]:
        """The chunk's rows as the student's ids, cut to ``max_length``."""
        keep, path = list(range(len(chunk))), str(self.path)
        if self.reuse:
            sequences = stored_ids(chunk, keep, len(self.tokenizer), path, "--corpus")
        else:
            sequences = retokenize(chunk, keep, self.tokenizer, self.bos_token_id, path,
                                   "--corpus")
        return [list(ids[: self.max_length]) for ids in sequences]

    def __call__(self, chunk: Corpus) -> np.ndarray:
        """Mean NLL per predicted token of each row of ``chunk`` (NaN below 2 tokens)."""
        rows = self.ids(chunk)
        out = np.full(len(rows), math.nan, dtype=np.float64)
        scored = [i for i, ids in enumerate(rows) if len(ids) >= 2]
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype
                    else nullcontext())
        with torch.inference_mode(), autocast:
            for batch in token_budget_batches([len(rows[i]) for i in scored], self.batch_tokens):
                indices = [scored[b] for b in batch]
                sums, counts = token_nll_rows(self.model, [rows[i] for i in indices],
                                              self.pad_id, batch_size=len(indices))
                out[indices] = (sums / counts).numpy()
        if not np.isfinite(out[scored]).all():
            raise SelftrainError(f"--student {self.spec}: its NLL on {self.path} is not finite "
                                 "(inf or NaN); try --precision 32")
        return out
