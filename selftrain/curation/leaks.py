"""Held-out probe windows that leak into training text, found by a shared token n-gram.

Extraction of held-out text is the memorization finding; extraction of text the student trained
on is not. A planted model's BOS samples can reproduce its canaries, so a self corpus may hold
the very windows its probes test. A probe window (prefix and suffix together, token ids) *leaks*
into a training row when the two share one n-gram of ``n`` tokens (8 by default), hashed as
decontamination hashes words (:func:`selftrain.curation.decontaminate.token_ngram_hashes`).

Two places use it: ``selftrain decontaminate --probe_sets`` drops the rows (in the probe set's
tokenizer), and ``selftrain fit`` refuses to train on them (in the student's, on the very rows
it would train on) unless ``--leak_check.allow_probe_leaks true``; either way the counts are
recorded with the corpus or the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.curation.ngrams import HashIndex, distinct, token_ngram_hashes
from selftrain.errors import SelftrainError
from selftrain.models import load_tokenizer, tokenizer_fingerprint
from selftrain.probe_file import read_probe_rows

DEFAULT_NGRAM = 8
"""Tokens per n-gram: 8 tokens are about 5 words, shorter than decontamination's 8 words."""

_BATCH_TOKENS = 1 << 22
"""Training tokens hashed at once (bounds memory on large corpora)."""


@dataclass
class LeakCheck:
    """The training rows checked against the run's probe sets before the first step.

    Args:
        ngram: tokens per n-gram; a probe window and a training row that share one leak.
        allow_probe_leaks: train even where rows share an n-gram with a probe window (the
            counts are still logged); off: such a fit is refused before anything is written.
    """

    ngram: int = DEFAULT_NGRAM
    allow_probe_leaks: bool = False


@dataclass
class Leaks:
    """Which training rows and which probe windows share an n-gram.

    Args:
        rows: ``[R]`` bool, per training row.
        windows: ``[W]`` bool, per probe window.
        ngram: tokens per n-gram.
    """

    rows: np.ndarray
    windows: np.ndarray
    ngram: int

    def record(self) -> dict[str, int]:
        """The counts, as a manifest or a run records them."""
        return {"ngram_tokens": self.ngram, "rows": int(self.rows.size),
                "rows_leaking": int(self.rows.sum()), "windows": int(self.windows.size),
                "windows_leaked": int(self.windows.sum())}


def check_ngram(ngram: int, flag: str) -> None:
    """Refuse an n below 1 in one line.

    Args:
        ngram: tokens per n-gram.
        flag: the flag it came from.
    """
    if ngram < 1:
        raise SelftrainError(f"{flag} {ngram}: must be >= 1 (tokens per n-gram; 8 is usual)")


def find_leaks(rows: Sequence[Sequence[int]], windows: Sequence[Sequence[int]],
               ngram: int = DEFAULT_NGRAM) -> Leaks:
    """The training rows that share a token n-gram with a probe window, and those windows.

    Args:
        rows: training rows, token ids.
        windows: probe windows (prefix + suffix), token ids in the same tokenizer.
        ngram: tokens per n-gram.
    """
    window_hashes, window_owner = token_ngram_hashes(windows, ngram)
    leaking = np.zeros(len(rows), dtype=bool)
    leaked = np.zeros(len(windows), dtype=bool)
    if window_hashes.size == 0:
        return Leaks(leaking, leaked, ngram)
    index = HashIndex(distinct(window_hashes))
    shared = [np.empty(0, dtype=np.uint64)]
    for start, stop in _batches(rows):
        hashes, owner = token_ngram_hashes(rows[start:stop], ngram)
        positions, found = index.find(hashes)
        leaking[owner[positions] + start] = True
        shared.append(index.table[found])
    leaked[window_owner[np.isin(window_hashes, np.concatenate(shared))]] = True
    return Leaks(leaking, leaked, ngram)


def _batches(rows: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Consecutive row ranges of about :data:`_BATCH_TOKENS` tokens each."""
    ranges, start, tokens = [], 0, 0
    for i, row in enumerate(rows):
        tokens += len(row)
        if tokens >= _BATCH_TOKENS:
            ranges.append((start, i + 1))
            start, tokens = i + 1, 0
    if start < len(rows):
        ranges.append((start, len(rows)))
    return ranges


def probe_windows(path: str, flag: str, tokenizer_spec: str | None = None
                  ) -> tuple[list[list[int]], Any, str]:
    """A probe set's windows in one tokenizer: the ids it stores, or its text tokenized.

    Args:
        path: probe-set parquet (``selftrain probeset`` / ``plant``) or jsonl.
        flag: the flag it came from, named in errors.
        tokenizer_spec: the tokenizer to compare in; None: the model the probe set records.

    Returns:
        (windows, the tokenizer, its spec).
    """
    columns, metadata = read_probe_rows(path, flag)
    count = len(next(iter(columns.values()), []))
    if count == 0:
        raise SelftrainError(f"{flag} {path}: the probe set is empty; nothing to check against")
    spec = tokenizer_spec or metadata.get("model")
    if spec is None:
        raise SelftrainError(f"{flag} {path}: records no model whose tokenizer cut its windows; "
                             "pass --tokenizer SPEC")
    tokenizer = load_tokenizer(str(spec), flag="--tokenizer" if tokenizer_spec else flag)
    stored = columns.get("input_ids")
    if stored is not None and (metadata.get("tokenizer_fingerprint")
                               == tokenizer_fingerprint(tokenizer) or "text" not in columns):
        windows = [list(ids or []) for ids in stored]
    elif "text" in columns:
        texts = [text if isinstance(text, str) else "" for text in columns["text"]]
        windows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        raise SelftrainError(f"{flag} {path}: rows need a 'text' or 'input_ids' column")
    return windows, tokenizer, str(spec)


def corpus_ids(columns: dict[str, list], manifest: dict[str, Any] | None, tokenizer
               ) -> list[list[int]]:
    """A corpus's rows in ``tokenizer``: its stored ids where they are that tokenizer's.

    Args:
        columns: the corpus's columns.
        manifest: its manifest (the tokenizer fingerprint of its ids), or None.
        tokenizer: the tokenizer to compare in.
    """
    stored = ((manifest or {}).get("tokenizer") or {}).get("fingerprint")
    if "input_ids" in columns and stored == tokenizer_fingerprint(tokenizer):
        return [list(ids or []) for ids in columns["input_ids"]]
    texts = [text if isinstance(text, str) else "" for text in columns.get("text", [])]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def refuse_leaks(leaks: Leaks, corpus: str, probe_set: Path | str, allow: bool) -> None:
    """Refuse training rows that hold probe windows, in one line with the command that cleans.

    Args:
        leaks: what :func:`find_leaks` found.
        corpus: the training corpus (``--data.corpus``), named with the fix.
        probe_set: the probe set.
        allow: ``--leak_check.allow_probe_leaks``: only count, do not refuse.
    """
    record = leaks.record()
    if allow or not record["rows_leaking"]:
        return
    raise SelftrainError(
        f"--data.corpus {corpus}: {record['rows_leaking']} of {record['rows']} training rows "
        f"share a {leaks.ngram}-token n-gram with {record['windows_leaked']} of the "
        f"{record['windows']} held-out windows of {probe_set}; remove them with `selftrain "
        f"decontaminate --corpus CORPUS --probe_sets {probe_set} --out CLEAN` and train on "
        "CLEAN, or pass --leak_check.allow_probe_leaks true to train on them knowingly")
