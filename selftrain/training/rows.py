"""The training rows: corpora as the student's token ids, cut, checked and mixed.

:func:`build_rows` is what :class:`selftrain.training.data.CorpusDataModule` trains on, as a
function of the corpora, the student's tokenizer and the ``--data.*`` settings that shape rows
(:class:`RowSettings`); the data module keeps only the loaders and their state. Per corpus:

- rows of one of K disjoint subsets are kept if asked (:func:`selftrain.corpus.select_subset`:
  the corpus's own ``subset`` column, or row i -> i mod K for another K); in a list of corpora,
  one a model sampled for a single student is taken whole;
- the stored ``input_ids`` are reused when they are the student's (same tokenizer
  fingerprint, or declared so) and checked against its vocabulary; otherwise ``text`` is
  retokenized with the student's tokenizer, the student's BOS id prepended and EOS appended to
  rows that finished;
- each row is cut to ``max_length``; a row left without a token to predict is dropped, and a
  corpus most of whose rows are is refused;
- a pairs dir (``selftrain pairs``) becomes synthesizer rows, ``BOS d1 SEP d2 EOS``
  (:mod:`selftrain.synthesis.layout`).

Several corpora are concatenated, or mixed by token share (:mod:`selftrain.training.mixture`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from selftrain.corpus import Corpus, read_corpus, select_subset
from selftrain.errors import SelftrainError
from selftrain.models import resolve_bos_id, tokenizer_fingerprint
from selftrain.synthesis.layout import (
    DEFAULT_SEPARATOR,
    d1_budget,
    is_pairs_dir,
    pair_row,
    read_pairs,
    separator_ids,
)
from selftrain.training.mixture import mixture_plan

__all__ = ["RowPlan", "RowSettings", "build_rows", "retokenize", "reuse_ids", "stored_ids"]

SAMPLED = ("synthetic", "sbp")
"""Corpus kinds a model sampled: in a list, one sampled for a single student is taken whole."""


@dataclass(frozen=True)
class RowSettings:
    """The ``--data.*`` settings that shape the rows (``CorpusDataModule``'s, same names).

    Args:
        max_length: longest row in tokens, BOS included; longer rows are cut.
        subset: keep subset k only (0..K-1); None keeps every row.
        num_subsets: K; None takes the corpus's own ``subset`` column.
        same_tokenizer: whether the corpus ids are the student's; None compares fingerprints.
        bos_token_id: the BOS id used when retokenizing; None: the student's.
        pair_separator: text between d1 and d2 in the rows of a pairs dir.
        mixture_weights: one weight per corpus, mixed by token share; None concatenates.
        mixture_tokens: an epoch's tokens under ``mixture_weights``; None: the largest budget
            that repeats no corpus.
        seed: seed of the mixture's choice of rows.
        ended_only: keep only the rows of a sampled corpus (``kind`` synthetic or sbp) that
            ended on EOS (``finished``); other corpora, and the held-out one, are taken whole.
    """

    max_length: int = 512
    subset: int | None = None
    num_subsets: int | None = None
    same_tokenizer: bool | None = None
    bos_token_id: int | None = None
    pair_separator: str = DEFAULT_SEPARATOR
    mixture_weights: list[float] | None = None
    mixture_tokens: int | None = None
    seed: int = 0
    ended_only: bool = False


@dataclass
class RowPlan:
    """What :func:`build_rows` makes of the corpora.

    Args:
        rows: the epoch's training rows (``input_ids``; ``corpus``, the index of the corpus a
            row came from, when mixed by weight), repeated where a mixture asks for it.
        eval_rows: the held-out corpus's rows; empty without one.
        selected: training rows selected (the subset, or all) over every corpus.
        dropped: of those, rows without a token to predict.
        reused: every training corpus's stored ids were reused (none retokenized).
        mixture: per corpus, its weight, share, tokens and passes when mixed by weight.
        pair_layout: the separator and d1 budget when a pairs dir is among the corpora.
    """

    rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    selected: int = 0
    dropped: int = 0
    reused: bool = True
    mixture: list[dict[str, Any]] = field(default_factory=list)
    pair_layout: dict[str, Any] | None = None


def build_rows(corpus: str | list[str], tokenizer, settings: RowSettings,
               eval_corpus: str | None = None) -> RowPlan:
    """The training (and held-out) rows of the corpora for the student.

    Args:
        corpus: a corpus dir, a .jsonl/.parquet/.txt file or a pairs dir; or a list of them
            (``--data.corpus``).
        tokenizer: the student's tokenizer.
        settings: the settings that shape the rows.
        eval_corpus: a held-out corpus (``--data.eval_corpus``), taken whole; None: none.

    Raises:
        SelftrainError: a corpus that gives no row, most of whose rows hold nothing to train
            on, or whose ids or text the student cannot take; named with its flag.
    """
    corpora = corpus if isinstance(corpus, list) else [corpus]
    fingerprint = functools.cache(lambda: tokenizer_fingerprint(tokenizer))
    plan = RowPlan(rows=[])
    per_corpus = []
    for path in corpora:
        rows, reused, selected = _corpus_rows(path, "--data.corpus", tokenizer, settings,
                                              fingerprint, plan, use_subset=True,
                                              in_list=len(corpora) > 1)
        per_corpus.append(rows)
        plan.reused, plan.selected = plan.reused and reused, plan.selected + selected
    plan.dropped = plan.selected - sum(len(rows) for rows in per_corpus)
    plan.rows, plan.mixture = _mix(per_corpus, corpora, settings)
    if eval_corpus is not None:  # taken whole: no subset, every document ended or not
        whole = dataclasses.replace(settings, ended_only=False)
        plan.eval_rows, _, _ = _corpus_rows(eval_corpus, "--data.eval_corpus", tokenizer,
                                            whole, fingerprint, plan, use_subset=False)
    return plan


def _corpus_rows(path: str, flag: str, tokenizer, settings: RowSettings,
                 fingerprint: Callable[[], str], plan: RowPlan, use_subset: bool,
                 in_list: bool = False) -> tuple[list[dict[str, Any]], bool, int]:
    """Rows of one corpus for the student: (rows, source ids reused, rows selected).

    Args:
        path: the corpus.
        flag: the flag it came from.
        tokenizer: the student's tokenizer.
        settings: the settings that shape the rows.
        fingerprint: the student's tokenizer fingerprint, computed when first needed.
        plan: the plan being built; a pairs dir records its layout there.
        use_subset: keep ``settings.subset`` only.
        in_list: the corpus is one of several.
    """
    if is_pairs_dir(path):
        rows, plan.pair_layout = _pair_rows(path, flag, tokenizer, settings)
        return rows, False, len(rows)
    corpus = read_corpus(path, flag=flag)
    manifest = corpus.manifest or {}
    if in_list and manifest.get("num_subsets") == 1 and manifest.get("kind") in SAMPLED:
        use_subset = False  # sampled for one student: all of it is that student's
    keep = (select_subset(corpus, settings.subset, settings.num_subsets, path) if use_subset
            else list(range(len(corpus))))
    if settings.ended_only and manifest.get("kind") in SAMPLED and "finished" in corpus.columns:
        keep = _ended(corpus.columns["finished"], keep, path, flag)
    reuse = reuse_ids(corpus, settings.same_tokenizer, fingerprint, path, flag)
    if reuse:
        sequences = stored_ids(corpus, keep, len(tokenizer), path, flag)
    else:
        sequences = retokenize(corpus, keep, tokenizer, settings.bos_token_id, path, flag)
    cut = settings.max_length
    rows = [{"input_ids": list(ids[:cut])} for ids in sequences if len(ids[:cut]) >= 2]
    if not rows:
        raise SelftrainError(f"{flag} {path}: no row has 2 or more tokens after subset "
                             f"selection (subset={settings.subset}); check the corpus")
    _refuse_mostly_empty(len(keep) - len(rows), len(keep), path, flag)
    return rows, reuse, len(keep)


def _pair_rows(path: str, flag: str, tokenizer, settings: RowSettings
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A pairs dir as synthesizer rows (``BOS d1 SEP d2 EOS``, trained on from d2 on).

    Returns the rows and their layout, which exports record (``selftrain synthesize`` prompts
    with it).

    Args:
        path: the pairs dir.
        flag: the flag it came from.
        tokenizer: the student's tokenizer.
        settings: the settings that shape the rows.
    """
    if settings.subset is not None:
        raise SelftrainError(f"--data.subset {settings.subset}: {flag} {path} is a pairs dir, "
                             "which has no subsets; train the synthesizer on all its pairs")
    max_length = settings.max_length
    separator = separator_ids(tokenizer, settings.pair_separator, "--data.pair_separator")
    budget = d1_budget(max_length, len(separator))
    if budget < 1 or max_length - 1 - len(separator) - budget < 1:
        raise SelftrainError(f"--data.max_length {max_length}: leaves no room for d1 and "
                             f"d2 beside BOS and the {len(separator)}-token separator; raise "
                             "it")
    columns, _ = read_pairs(path, flag)
    bos_id, _ = resolve_bos_id(tokenizer, None, settings.bos_token_id)
    d1 = tokenizer(columns["d1_text"], add_special_tokens=False)["input_ids"]
    d2 = tokenizer(columns["d2_text"], add_special_tokens=False)["input_ids"]
    rows = [pair_row(first, second, separator, bos_id, tokenizer.eos_token_id, max_length)
            for first, second in zip(d1, d2, strict=True)]
    kept = [row for row in rows if row is not None]
    if not kept:
        longest = max(len(ids) for ids in d2)
        raise SelftrainError(f"--data.max_length {max_length}: no pair's d2 fits whole with its "
                             f"EOS beside BOS, the separator and a shortened d1 (the shortest "
                             f"d2 has {min(len(ids) for ids in d2)} tokens, the longest "
                             f"{longest}); raise it")
    if len(kept) < len(rows):
        rank_zero_info(f"{flag} {path}: {len(rows) - len(kept)} of {len(rows)} pairs dropped: "
                       f"their d2 and its EOS do not fit whole in --data.max_length "
                       f"{max_length} beside a d1 of a quarter of its {budget}-token budget")
    layout = {"separator": settings.pair_separator, "separator_ids": separator,
              "max_d1_tokens": budget, "max_length": max_length, "bos_token_id": bos_id,
              "pairs_dropped": len(rows) - len(kept)}
    return kept, layout


def _ended(finished: list[bool], keep: list[int], path: str, flag: str) -> list[int]:
    """The selected rows that ended on EOS (``--data.ended_only``), the rest logged as dropped.

    Args:
        finished: the corpus's ``finished`` column.
        keep: the selected rows.
        path: the corpus.
        flag: the flag it came from.
    """
    ended = [i for i in keep if finished[i]]
    if not ended:
        raise SelftrainError(f"--data.ended_only true: none of the {len(keep)} selected "
                             f"documents of {flag} {path} ended on EOS; train on it without "
                             "--data.ended_only or sample documents that end")
    rank_zero_info(f"{flag} {path}: {len(keep) - len(ended)} of {len(keep)} documents dropped "
                   "(--data.ended_only): they did not end on EOS")
    return ended


def _mix(per_corpus: list[list[dict[str, Any]]], corpora: list[str], settings: RowSettings
         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The epoch's rows: the corpora concatenated, or mixed by ``mixture_weights``.

    Returns the rows and the mixture's records (none when concatenated).

    Args:
        per_corpus: each corpus's rows.
        corpora: the corpora, in the same order.
        settings: the settings that shape the rows.
    """
    if settings.mixture_weights is None:
        return [row for rows in per_corpus for row in rows], []
    lengths = [[len(row["input_ids"]) for row in rows] for rows in per_corpus]
    taken, mixture = mixture_plan(lengths, settings.mixture_weights, settings.mixture_tokens,
                                  settings.seed)
    for record, path in zip(mixture, corpora, strict=True):
        record["corpus"] = str(path)
        rank_zero_info(f"CorpusDataModule: mixture takes {record['tokens']:,} tokens "
                       f"({record['share']:.1%} target) from {path}, "
                       f"{record['passes']:.2f} passes over its rows")
    for j, rows in enumerate(per_corpus):
        for row in rows:
            row["corpus"] = j  # which corpus a row came from (collation ignores it)
    return [rows[i] for rows, chosen in zip(per_corpus, taken, strict=True)
            for i in chosen], mixture


def _refuse_mostly_empty(dropped: int, selected: int, path: str, flag: str) -> None:
    """Refuse a corpus most of whose selected rows hold nothing to train on; log a few.

    A row needs a token after its BOS to be trained on; rows of empty text have none.

    Args:
        dropped: selected rows without a token to predict.
        selected: rows selected (the subset, or all).
        path: the corpus, named in the error.
        flag: the flag it came from.
    """
    if 2 * dropped > selected:
        raise SelftrainError(f"{flag} {path}: {dropped} of {selected} selected rows have no "
                             "token to train on (empty text); regenerate the corpus or drop "
                             "those rows")
    if dropped:
        rank_zero_info(f"CorpusDataModule: dropped {dropped} of {selected} rows of {path} with "
                       "no token to train on (empty text)")


def reuse_ids(corpus: Corpus, same_tokenizer: bool | None, fingerprint: Callable[[], str],
              path: str, flag: str) -> bool:
    """Whether the corpus's stored ``input_ids`` are the student's.

    Args:
        corpus: a corpus.
        same_tokenizer: ``--data.same_tokenizer``; None compares fingerprints.
        fingerprint: the student's tokenizer fingerprint, computed when first needed.
        path: the corpus path, named in error messages.
        flag: the flag it came from.
    """
    if "input_ids" not in corpus.columns:
        if same_tokenizer:
            raise SelftrainError(f"--data.same_tokenizer true but {flag} {path} has "
                                 "no input_ids column; leave it unset to tokenize the text")
        return False
    if same_tokenizer is not None:
        return bool(same_tokenizer)
    stored = ((corpus.manifest or {}).get("tokenizer") or {}).get("fingerprint")
    if stored is None:
        return False
    return stored == fingerprint()


def stored_ids(corpus: Corpus, keep: list[int], vocabulary: int, path: str,
               flag: str) -> list[list[int]]:
    """The stored ``input_ids`` of the kept rows, checked against the student's vocabulary.

    :func:`selftrain.corpus.read_corpus` has checked they are lists of ids >= 0; here every
    kept row must have them, and below the student's vocabulary size.

    Args:
        corpus: a corpus with an ``input_ids`` column.
        keep: indices of the rows to take.
        vocabulary: the student's vocabulary size.
        path: the corpus path, named in error messages.
        flag: the flag it came from.
    """
    sequences = [corpus.columns["input_ids"][i] for i in keep]
    missing = next((i for i, ids in zip(keep, sequences, strict=True) if ids is None), None)
    if missing is not None:
        raise SelftrainError(f"{flag} {path}: row {missing + 1} has no input_ids although the "
                             "tokenizers are treated as equal; set --data.same_tokenizer false "
                             "to tokenize the text")
    worst = max((max(ids) for ids in sequences if ids), default=-1)
    if worst >= vocabulary:
        raise SelftrainError(
            f"{flag} {path}: token id {worst} is outside the student's "
            f"vocabulary ({vocabulary} tokens) although the tokenizers are treated as equal; "
            "set --data.same_tokenizer false to retokenize the text")
    return sequences


def retokenize(corpus: Corpus, keep: list[int], tokenizer, bos_token_id: int | None,
               path: str, flag: str) -> list[list[int]]:
    """The kept rows' ``text`` as the student's ids: its BOS, the text, EOS if it finished.

    Args:
        corpus: a corpus with a ``text`` column.
        keep: indices of the rows to take.
        tokenizer: the student's tokenizer.
        bos_token_id: ``--data.bos_token_id`` (None: the student's own).
        path: the corpus path, named in error messages.
        flag: the flag it came from.
    """
    if "text" not in corpus.columns:
        raise SelftrainError(f"{flag} {path}: its ids come from "
                             "another tokenizer and it has no 'text' column to retokenize")
    bos_id, _ = resolve_bos_id(tokenizer, None, bos_token_id)
    texts = [corpus.columns["text"][i] or "" for i in keep]
    finished = corpus.columns.get("finished")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    eos = tokenizer.eos_token_id
    return [[bos_id, *ids, *([eos] if finished and finished[i] and eos is not None else [])]
            for i, ids in zip(keep, encoded, strict=True)]
