"""How a pair of related documents becomes one synthesizer training row, and a prompt.

The synthesizer learns p(d2 | d1). A row is ``BOS d1 SEP d2 EOS`` in the synthesizer's own
tokens: d1 cut to :func:`d1_budget` tokens, the separator's tokens, then the whole of d2 and
its EOS; the loss is on d2 and its EOS only, from ``loss_from`` on
(:func:`selftrain.training.batching.pad_collate` masks the rest). d2 is never cut: a row that
ends d2 anywhere but at its end teaches the synthesizer that documents do not end. Where d2
does not fit beside d1's budget, d1 is shortened, to as little as a quarter of its budget
(:data:`MIN_D1_SHARE`), and a pair whose d2 does not fit even then is dropped (docs/synthesis.md
argues the choice). ``selftrain synthesize``
builds its prompts with the same :func:`prompt_ids`, so training and sampling agree token for
token on what comes before d2. The separator is text, checked to encode to at least one token
and to decode back to itself (:func:`separator_ids`), and recorded in the synthesizer's export.

Pairs come from ``selftrain pairs``: a dir with ``manifest.json`` (``kind: pairs``) and
``data/pairs.parquet`` (:func:`read_pairs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selftrain.corpus import DATA_DIR, MANIFEST_NAME, read_manifest
from selftrain.errors import SelftrainError
from selftrain.inputs import read_parquet

DEFAULT_SEPARATOR = "\n\n=== related document ===\n\n"
"""Text between d1 and d2: unlikely inside a document, so the boundary is unambiguous."""
PAIRS_KIND = "pairs"
PAIRS_FORMAT = "selftrain-pairs/1"
PAIRS_FILE = "pairs.parquet"
PAIR_COLUMNS = ("d1_id", "d2_id", "d1_text", "d2_text", "similarity", "overlap")


def separator_ids(tokenizer, separator: str, flag: str) -> list[int]:
    """The separator's token ids, refused in one line unless it encodes and decodes back.

    Args:
        tokenizer: the synthesizer's tokenizer.
        separator: the separator text.
        flag: the flag it came from.
    """
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    if not ids:
        raise SelftrainError(f"{flag} {separator!r}: the tokenizer encodes it to no tokens; "
                             "give a non-empty separator such as "
                             f"{DEFAULT_SEPARATOR!r}")
    decoded = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if decoded != separator:
        raise SelftrainError(f"{flag} {separator!r}: the tokenizer cannot encode it (it decodes "
                             f"back as {decoded!r}); use characters the tokenizer knows, such "
                             f"as {DEFAULT_SEPARATOR!r}")
    return list(ids)


def d1_budget(max_length: int, separator_tokens: int) -> int:
    """Tokens of d1 a row keeps: half of what BOS and the separator leave (d2 gets the rest).

    Args:
        max_length: tokens per row, BOS included.
        separator_tokens: tokens of the separator.
    """
    return (max_length - 1 - separator_tokens) // 2


def prompt_ids(d1_ids: list[int], sep_ids: list[int], bos_id: int, max_d1_tokens: int
               ) -> list[int]:
    """``BOS d1 SEP``: what comes before d2, in training rows and synthesis prompts alike.

    Args:
        d1_ids: d1's token ids (no BOS).
        sep_ids: :func:`separator_ids`.
        bos_id: the BOS id.
        max_d1_tokens: d1 is cut to this many tokens.
    """
    return [bos_id, *d1_ids[:max_d1_tokens], *sep_ids]


MIN_D1_SHARE = 4
"""d1 may be shortened to ``1 / MIN_D1_SHARE`` of its budget so that a whole d2 fits."""


def pair_row(d1_ids: list[int], d2_ids: list[int], sep_ids: list[int], bos_id: int,
             eos_id: int | None, max_length: int) -> dict[str, Any] | None:
    """One training row: ``input_ids`` (``BOS d1 SEP d2 EOS``) and ``loss_from``; or None.

    Args:
        d1_ids: the conditioning document's ids (no BOS).
        d2_ids: the target document's ids (no BOS, no EOS).
        sep_ids: :func:`separator_ids`.
        bos_id: the BOS id.
        eos_id: appended after d2 (None: nothing, and d2 is cut to fill the row, as there is
            no end to learn).
        max_length: tokens per row, BOS included.

    Returns:
        ``{"input_ids": ..., "loss_from": p}``: positions ``>= p`` (d2 and its EOS) are
        trained on, the prompt before them is not. None when d2 and its EOS do not fit even
        beside a d1 shortened to :data:`MIN_D1_SHARE` of its budget.
    """
    budget = d1_budget(max_length, len(sep_ids))
    if eos_id is None:
        prompt = prompt_ids(d1_ids, sep_ids, bos_id, budget)
        return {"input_ids": (prompt + d2_ids)[:max_length], "loss_from": len(prompt)}
    room = max_length - 1 - len(sep_ids) - len(d2_ids) - 1  # what BOS, SEP, d2, EOS leave
    kept = min(len(d1_ids), budget, room)
    if kept < min(len(d1_ids), max(1, budget // MIN_D1_SHARE)):
        return None
    prompt = prompt_ids(d1_ids, sep_ids, bos_id, kept)
    return {"input_ids": [*prompt, *d2_ids, eos_id], "loss_from": len(prompt)}


def is_pairs_dir(path: str | Path) -> bool:
    """Whether ``path`` is a pairs dir written by ``selftrain pairs``."""
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        return False
    return read_manifest(manifest, "--data.corpus").get("kind") == PAIRS_KIND


def read_pairs(path: str | Path, flag: str) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """A pairs dir's columns and manifest.

    Args:
        path: the dir ``selftrain pairs --out`` wrote.
        flag: the flag it came from.
    """
    path = Path(path)
    manifest = read_manifest(path / MANIFEST_NAME, flag)
    table = read_parquet(path / DATA_DIR / PAIRS_FILE, flag,
                         "the pairs dir is damaged: rerun `selftrain pairs`")
    missing = [name for name in PAIR_COLUMNS if name not in table.column_names]
    if missing:
        raise SelftrainError(f"{flag} {path}: its pairs lack {', '.join(missing)}; rerun "
                             "`selftrain pairs`")
    if table.num_rows == 0:
        raise SelftrainError(f"{flag} {path}: holds no pairs; lower `selftrain pairs "
                             "--threshold` or give a larger corpus")
    return table.to_pydict(), manifest
