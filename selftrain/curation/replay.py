"""`selftrain replay`: the token-matched real-text baseline for a synthetic corpus.

Self-training gains only mean something beside a student trained on the same number of *real*
tokens (Common Corpus in the reference setting). This module builds that control: from local
txt / jsonl / parquet files or a streamed `datasets` name, a corpus dir in the usual schema
(:mod:`selftrain.corpus`) with one row per synthetic sample, each row exactly as long as its
synthetic counterpart under the student's tokenizer. Same row count, same length multiset,
same token count, so the two corpora train for the same number of steps on the same shapes.
Each replay row also takes the subset of the synthetic row whose length it copies, so subset k
of the replay matches subset k of the synthetic corpus, row for row: a student trained on one
subset of each sees the same tokens (the manifest's ``subset_tokens`` says so per subset).

Lengths are counted the way :class:`~selftrain.training.data.CorpusDataModule` feeds rows:
stored ids when the corpus tokenizer is the student's, else student BOS + the text's ids + EOS
where the row finished. Each replay row is the *start* of one real document, as a BOS-sampled
row is the start of one: ``input_ids = [BOS, *doc_ids[:w]]`` with ``doc_ids`` the document's ids
plus EOS, so a window that reaches the end of its document ends on EOS and is ``finished``, like
a sample that stopped. Documents are handed out best-fit (each to the open row with the longest
window it can fill), so short documents fill short rows instead of being skipped, and no row
ever spans two documents.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from selftrain.corpus import Corpus, CorpusWriter, check_corpus_out, read_corpus, row_subsets
from selftrain.curation.documents import documents, encoded, is_local, local_files
from selftrain.errors import SelftrainError, refuse_first_failed
from selftrain.inputs import check_seed
from selftrain.models import check_token_id, load_tokenizer, parse_model_spec, resolve_bos_id
from selftrain.outputs import refuse_input_overlap
from selftrain.provenance import provenance

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 10_000
"""Documents held in the shuffle buffer of a streamed dataset."""


def replay(
    match: str,
    out: str,
    sources: list[str] | str,
    student: str,
    text_field: str = "text",
    split: str = "train",
    seed: int = 0,
    tolerance: float = 0.01,
    num_subsets: int | None = None,
    bos_token_id: int | None = None,
    shard_size: int = 10_000,
    overwrite: bool = False,
) -> Path:
    """Build a real-text corpus with the token count and lengths of a synthetic corpus.

    Args:
        match: the synthetic corpus dir (or .jsonl/.parquet/.txt file) to match.
        out: corpus directory to write (manifest.json + data/*.parquet).
        sources: where the real text comes from, one or a list: .txt files (one document per
            blank-line-separated paragraph), .jsonl/.json files (field --text_field), .parquet
            files (column --text_field), directories of those, or a `datasets` name such as
            PleIAs/common_corpus (streamed from the hub, so it needs the network). Local files
            are read whole, pooled and shuffled with --seed; datasets follow in the given
            order, streamed through a seeded shuffle buffer.
        student: the student's model spec (hub id, local HF dir, embedded:smollm2-135m or
            tiny:<family>); lengths are counted and rows written in its tokenizer.
        text_field: the field / column holding the text in jsonl, parquet and datasets.
        split: the split of a `datasets` source.
        seed: orders the documents and the rows; the same seed gives the same corpus
            (0..2**63-1).
        tolerance: how far short of the synthetic token count (as a fraction) the replay may
            end when the sources run out; rows left unfilled are then dropped. 0 demands an
            exact match.
        num_subsets: K disjoint subsets; each row takes the subset of the synthetic row it
            matches (as ``--data.num_subsets K`` assigns them there: the matched corpus's own
            subsets at its K, else row i mod K). None takes the matched corpus's K (1 when it
            has none).
        bos_token_id: override the student's BOS id (as --data.bos_token_id does in training);
            an id of the student's vocabulary.
        shard_size: rows per parquet shard.
        overwrite: replace an existing corpus at --out.

    Returns:
        The corpus directory.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    local = _validate(match, out, sources, student, text_field, tolerance, num_subsets,
                      shard_size, seed, overwrite)
    tokenizer = load_tokenizer(student, flag="--student")
    check_token_id(bos_token_id, len(tokenizer), "--bos_token_id")
    bos_id, bos_source = resolve_bos_id(tokenizer, None, bos_token_id)
    eos_id = tokenizer.eos_token_id
    record = provenance(tokenizer, student, bos_id, bos_source, eos_id)
    matched = read_corpus(match, flag="--match")
    with CorpusWriter(Path(out), shard_size=shard_size, overwrite=overwrite) as writer:
        lengths, reused = _student_lengths(matched, tokenizer, record["tokenizer"]["fingerprint"],
                                           bos_id, eos_id)
        target = sum(lengths)
        subsets = num_subsets or (matched.manifest or {}).get("num_subsets") or 1
        subset_of = row_subsets(matched, subsets, str(match), "--num_subsets")
        order = _shuffled_order(len(lengths), seed)
        windows = [lengths[i] - 1 for i in order]
        texts = documents(local, [s for s in sources if s not in local], text_field, split, seed,
                          SHUFFLE_BUFFER)
        filled, doc_counts = _fill_rows(windows, texts, tokenizer, eos_id, target)
        kept = _enough_text(filled, windows, target, tolerance, sources, doc_counts)
        rows = _rows(kept, [subset_of[i] for i, row in zip(order, filled, strict=True)
                            if row is not None], tokenizer, bos_id, eos_id)
        tokens = _checked_token_count(rows, target, tolerance)
        writer.add(rows)
        manifest = {
            "kind": "replay",
            "source": {"datasets": sources, "text_field": text_field, "split": split,
                       "shuffle_buffer": SHUFFLE_BUFFER if len(local) < len(sources) else None,
                       "documents": doc_counts},
            **record,
            "matched": _matched_record(match, matched, lengths, reused),
            "seed": seed, "num_subsets": subsets, "tolerance": tolerance,
            "counts": {"requested": len(lengths), "tokens": tokens,
                       "finished": sum(row["finished"] for row in rows)},
            "length_stats": {"synthetic": _length_stats(lengths),
                             "replay": _length_stats([row["num_tokens"] for row in rows])},
            "subset_tokens": {"synthetic": _per_subset(lengths, subset_of, subsets),
                              "replay": _per_subset([row["num_tokens"] for row in rows],
                                                    [row["subset"] for row in rows], subsets)},
            "decontamination": None,
        }
        path = writer.finish(manifest)
    log.info("replay: %d rows, %d tokens (synthetic %d, %+.3f%%) from %d documents of %s -> %s",
             len(rows), tokens, target, 100 * (tokens - target) / max(target, 1),
             doc_counts["used"], ", ".join(sources), path)
    return path


def _shuffled_order(rows: int, seed: int) -> list[int]:
    """The synthetic rows in a seeded order: documents fill their windows in it."""
    return [int(i) for i in np.random.default_rng([seed, 0]).permutation(rows)]


def _per_subset(lengths: list[int], subsets: list[Any], count: int) -> list[int]:
    """Tokens per subset 0..count-1."""
    totals = [0] * count
    for length, subset in zip(lengths, subsets, strict=True):
        if isinstance(subset, int) and 0 <= subset < count:
            totals[subset] += length
    return totals


def _fill_rows(windows: list[int], texts: Iterable[tuple[str, str]], tokenizer,
               eos_id: int | None, target: int
               ) -> tuple[list[tuple[list[int], bool, str] | None], dict[str, int]]:
    """Tokenize the documents and hand them out best fit, with a progress bar in tokens.

    Args:
        windows: per row, the ids it holds after BOS.
        texts: (text, source) documents.
        tokenizer: the student's tokenizer.
        eos_id: appended to whole documents (None: nothing appended).
        target: the synthetic token count (the bar's total).

    Returns:
        What :func:`_fill` returns.
    """
    with tqdm(total=target, unit="tok", desc="replay", dynamic_ncols=True) as bar:
        return _fill(windows, encoded(texts, tokenizer, eos_id, max(windows)), bar)


def _enough_text(filled: list[tuple[list[int], bool, str] | None], windows: list[int],
                 target: int, tolerance: float, sources: list[str],
                 doc_counts: dict[str, int]) -> list[tuple[list[int], bool, str]]:
    """The filled rows, once the text placed is within ``tolerance`` of the target.

    Args:
        filled: per row, its window or None where the documents ran out.
        windows: per row, the ids it holds after BOS.
        target: the synthetic token count.
        tolerance: the fraction of ``target`` the replay may fall short by.
        sources: the ``--sources``, named in the error.
        doc_counts: documents read, used and too short.

    Raises:
        SelftrainError: the sources ran out further from the target than ``tolerance``.
    """
    placed = sum(windows[i] + 1 for i, row in enumerate(filled) if row is not None)
    if placed < (1 - tolerance) * target:
        raise SelftrainError(
            f"--sources {', '.join(sources)}: only {placed:,} of {target:,} tokens of text "
            f"({doc_counts['read']:,} documents); add more text or sources, or raise "
            f"--tolerance (now {tolerance})")
    kept = [row for row in filled if row is not None]
    if len(kept) < len(filled):
        log.warning("sources ran out: %d of %d rows filled, %d of %d tokens (within "
                    "--tolerance %s)", len(kept), len(filled), placed, target, tolerance)
    return kept


def _rows(kept: list[tuple[list[int], bool, str]], subsets: list[Any], tokenizer, bos_id: int,
          eos_id: int | None) -> list[dict[str, Any]]:
    """The corpus rows: BOS then the window, in the subset of the synthetic row it matches.

    The text leaves out a closing EOS.
    """
    texts = tokenizer.batch_decode([w[:-1] if done and eos_id is not None else w
                                    for w, done, _ in kept], skip_special_tokens=False)
    return [{"id": i, "text": text, "input_ids": [bos_id, *window],
             "num_tokens": len(window) + 1, "finished": done, "subset": subset,
             "source": source}
            for i, ((window, done, source), text, subset) in enumerate(
                zip(kept, texts, subsets, strict=True))]


def _checked_token_count(rows: list[dict[str, Any]], target: int, tolerance: float) -> int:
    """The replay's token count, checked within ``tolerance`` of the target."""
    tokens = sum(row["num_tokens"] for row in rows)
    if abs(tokens - target) > tolerance * target:  # construction rules it out; keep it checked
        raise RuntimeError(f"replay has {tokens} tokens for a target of {target}")
    return tokens


def _matched_record(match: str, matched: Corpus, lengths: list[int],
                    reused: bool) -> dict[str, Any]:
    """What the manifest says of the matched synthetic corpus."""
    manifest = matched.manifest or {}
    return {"corpus": str(match), "samples": len(lengths), "tokens": sum(lengths),
            "ids_reused": reused, "source": (manifest.get("source") or {}).get("model"),
            "seed": manifest.get("seed"),
            "tokenizer_fingerprint": (manifest.get("tokenizer") or {}).get("fingerprint"),
            "created": manifest.get("created")}


def _validate(match: str, out: str, sources: list[str], student: str, text_field: str,
              tolerance: float, num_subsets: int | None, shard_size: int, seed: int,
              overwrite: bool) -> list[str]:
    """Check the flags before anything is read; return the sources that are local paths."""
    parse_model_spec(student, flag="--student")
    check_seed(seed, "--seed")
    checks = [
        (bool(sources), "--sources is empty: give .txt/.jsonl/.parquet files, a dir of them, "
                        "or a datasets name such as PleIAs/common_corpus"),
        (bool(text_field), "--text_field is empty: name the field that holds the text"),
        (0 <= tolerance < 1, f"--tolerance {tolerance}: must be in [0, 1); 0.01 allows a 1% "
                             "shortfall"),
        (num_subsets is None or num_subsets >= 1, f"--num_subsets {num_subsets}: must be >= 1"),
        (shard_size >= 1, f"--shard_size {shard_size}: must be >= 1"),
        (Path(out).resolve() != Path(match).resolve(),
         f"--out {out} is the --match corpus; write the replay to a new dir"),
    ]
    refuse_first_failed(checks)
    refuse_input_overlap(Path(out), [("--match", match), *(("--sources", s) for s in sources)])
    check_corpus_out(Path(out), overwrite)
    local = [s for s in sources if is_local(s)]
    for source in local:
        local_files(source)  # fails now on a missing path or an empty dir
    return local


def _student_lengths(corpus: Corpus, tokenizer, fingerprint: str, bos_id: int,
                     eos_id: int | None) -> tuple[list[int], bool]:
    """Per-row lengths as the student is fed them, and whether stored ids were reused."""
    stored = ((corpus.manifest or {}).get("tokenizer") or {}).get("fingerprint")
    if stored == fingerprint and "input_ids" in corpus.columns:
        return [len(ids) for ids in corpus.columns["input_ids"]], True
    if "text" not in corpus.columns:
        raise SelftrainError(f"--match {corpus.path}: its ids come from another tokenizer and "
                             "it has no 'text' column to count in the student's tokenizer")
    texts = [text or "" for text in corpus.columns["text"]]
    finished = corpus.columns.get("finished") or [False] * len(texts)
    text_ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [1 + len(ids) + int(bool(done) and eos_id is not None)
            for ids, done in zip(text_ids, finished, strict=True)], False


def _fill(windows: list[int], docs: Iterable[tuple[list[int], bool, str]], bar: tqdm
          ) -> tuple[list[tuple[list[int], bool, str] | None], dict[str, int]]:
    """Give each document to the open row with the longest window it can fill (best fit).

    Returns:
        Per row ``(window ids, finished, source)`` or None where the documents ran out, and
        document counts: read, used, too short for every open row.
    """
    filled: list[tuple[list[int], bool, str] | None] = [None] * len(windows)
    open_rows: dict[int, list[int]] = {}
    for row in reversed(range(len(windows))):  # popped from the end: lowest row first
        if windows[row] == 0:  # an empty synthetic row needs no document
            filled[row] = ([], False, "")
        else:
            open_rows.setdefault(windows[row], []).append(row)
    bar.update(sum(1 for row in filled if row is not None))
    sizes = sorted(open_rows)
    counts = {"read": 0, "used": 0, "too_short": 0}
    for ids, whole, source in docs if sizes else ():
        counts["read"] += 1
        slot = bisect.bisect_right(sizes, len(ids)) - 1
        if slot < 0:
            counts["too_short"] += 1
            continue
        size = sizes[slot]
        row = open_rows[size].pop()
        if not open_rows[size]:
            del open_rows[size]
            sizes.pop(slot)
        filled[row] = (ids[:size], whole and size == len(ids), source)
        counts["used"] += 1
        bar.update(size + 1)
        if not sizes:  # every row filled: stop reading (a stream would go on for ever)
            break
    return filled, counts


def _length_stats(lengths: list[int]) -> dict[str, Any]:
    values = np.asarray(lengths, dtype=np.int64)
    if values.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0}
    return {"mean": round(float(values.mean()), 2),
            "p50": round(float(np.percentile(values, 50)), 2),
            "p90": round(float(np.percentile(values, 90)), 2), "max": int(values.max())}
