"""A corpus's rows as the student's token ids: subset selection, id reuse or retokenizing.

:class:`selftrain.training.data.CorpusDataModule` reads a corpus and hands it here. Rows of one
of K disjoint subsets are kept if asked (:func:`selftrain.corpus.select_subset`: the corpus's own
``subset`` column, or row i -> i mod K for another K). The stored ``input_ids`` are reused when
they are the student's (same tokenizer fingerprint, or declared so) and checked against its
vocabulary; otherwise ``text`` is retokenized with the student's tokenizer, the student's BOS id
prepended and EOS appended to rows that finished.
"""

from __future__ import annotations

from collections.abc import Callable

from selftrain.corpus import Corpus, select_subset
from selftrain.errors import SelftrainError
from selftrain.models import resolve_bos_id

__all__ = ["retokenize", "reuse_ids", "select_subset", "stored_ids"]


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
