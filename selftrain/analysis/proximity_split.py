"""The proximity split and the proxy cells: a corpus re-cut by its intrinsic proxies.

**Proxy cells** (``selftrain proxies --cells_out DIR``): the samples of one source differ in
both proxies, so a rank test over whole sources confounds the proxies with the source. The cells
split a corpus at the median of the student's NLL and, within each half, at the median of the
largest benchmark similarity, into four subsets of (nearly) equal size: 0 = low NLL / low
similarity, 1 = low / high, 2 = high / low, 3 = high / high. ``DIR`` is one corpus dir holding
every row with its ``subset`` set to its cell (manifest ``num_subsets: 4`` and a ``proxy_cells``
record), so ``selftrain fit --data.subset k --data.num_subsets 4`` trains on cell k: within a
source, the proxies differ while the source does not.

**The proximity split**: a corpus as two corpus dirs, below and above a similarity threshold.

The paper's control for benchmark proximity trains one student on the samples far from every
benchmark and one on the samples close to one, to show that the distant ones help as much.
`selftrain proxies --split_out DIR` writes ``DIR/below`` and ``DIR/above`` here: proper corpus
dirs with the source's rows (schema columns, in order) and manifest, so its provenance carries
over and ``selftrain fit --data.corpus DIR/above`` trains on one as on any corpus (reusing the
stored ids when the tokenizer matches). The manifest's ``kind`` becomes ``proximity-split`` and
a ``proximity`` record says which side, the threshold, the benchmarks, the embedding model and
the source corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from selftrain.analysis.corpus_chunks import ChunkedCorpus
from selftrain.corpus import SCHEMA, CorpusWriter
from selftrain.errors import SelftrainError
from selftrain.io import atomic_dir

SPLIT_SIDES = ("below", "above")
CHUNK_ROWS = 1024
CELL_NAMES = ("low NLL / low similarity", "low NLL / high similarity",
              "high NLL / low similarity", "high NLL / high similarity")
"""Subset k of a cells corpus, by k."""


def upper_half(values: np.ndarray) -> np.ndarray:
    """Whether each value is in the upper half by rank (ties by position): halves of n//2, n-n//2.

    Args:
        values: the values (no NaN).
    """
    order = np.argsort(values, kind="stable")
    upper = np.zeros(len(values), dtype=bool)
    upper[order[len(values) // 2:]] = True
    return upper


def proxy_cells(nll: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """Each sample's cell 0..3: the NLL half (x2) plus the similarity half within it.

    Args:
        nll: per sample, the mean NLL under the student.
        similarity: per sample, the largest similarity to any benchmark item.
    """
    nll, similarity = np.asarray(nll, np.float64), np.asarray(similarity, np.float64)
    if not np.isfinite(nll).all():
        raise SelftrainError("--cells_out: some samples have no NLL (fewer than 2 tokens for "
                             "the student); drop them from the corpus first")
    high_nll = upper_half(nll)
    cells = 2 * high_nll.astype(np.int64)
    for half in (False, True):
        members = np.flatnonzero(high_nll == half)
        cells[members] += upper_half(similarity[members])
    return cells


def cells_record(cells: np.ndarray, nll: np.ndarray, similarity: np.ndarray,
                 cells_out: Path) -> dict[str, Any]:
    """``summary.json``'s ``cells``: per cell its rows and the mean of each proxy."""
    per_cell = []
    for k, name in enumerate(CELL_NAMES):
        chosen = cells == k
        per_cell.append({"subset": k, "cell": name, "rows": int(chosen.sum()),
                         "nll_mean": float(nll[chosen].mean()) if chosen.any() else None,
                         "max_similarity_mean": (float(similarity[chosen].mean())
                                                 if chosen.any() else None)})
    empty = [cell["cell"] for cell in per_cell if cell["rows"] == 0]
    if empty:
        raise SelftrainError(f"--cells_out: cell {empty[0]!r} would be empty ({len(nll)} "
                             "samples); four cells need at least 4 samples")
    return {"corpus": str(cells_out.resolve()), "nll_median": float(np.median(nll)),
            "cells": per_cell}


def write_cells(source: ChunkedCorpus, cells: np.ndarray, cells_out: Path,
                record: dict[str, Any]) -> None:
    """The corpus as one corpus dir whose ``subset`` is each row's proxy cell (atomically).

    Args:
        source: the corpus.
        cells: per sample, its cell (:func:`proxy_cells`).
        cells_out: ``--cells_out``.
        record: :func:`cells_record`, kept in the manifest as ``proxy_cells``.
    """
    manifest = {key: value for key, value in (source.manifest or {}).items()
                if key not in ("format", "tool_version", "created", "sharding")}
    names = [name for name in SCHEMA.names if name in source.columns]
    with CorpusWriter(cells_out, overwrite=True) as writer:  # --overwrite checked before
        done = 0
        for chunk in source.chunks(names, CHUNK_ROWS):
            values = dict(chunk.columns)
            count = len(chunk)
            values.setdefault("id", list(range(done, done + count)))
            rows = [{**{name: column[i] for name, column in values.items()},
                     "subset": int(cells[done + i])} for i in range(count)]
            writer.add(rows)
            done += count
        writer.finish({**manifest, "num_subsets": len(CELL_NAMES),
                       "proxy_cells": {**record, "source_corpus": str(source.path.resolve()),
                                       "source_num_subsets": manifest.get("num_subsets")}})


def split_record(source: ChunkedCorpus, above: np.ndarray, split_out: Path,
                  threshold: float) -> dict[str, Any]:
    """``summary.json``'s ``split``; refused when one side would hold no sample.

    Args:
        source: the corpus.
        above: per sample, whether its largest similarity is >= the threshold.
        split_out: ``--split_out``.
        threshold: ``--threshold``, named in the error.
    """
    rows = {"above": int(above.sum()), "below": int((~above).sum())}
    for side, other in (("above", "below"), ("below", "above")):
        if rows[side] == 0:
            raise SelftrainError(f"--threshold {threshold}: all {source.rows} samples are "
                                 f"{other} it, so the {side!r} corpus would be empty; pick a "
                                 "threshold inside the similarities or drop --split_out")
    resolved = split_out.resolve()
    return {"below": str(resolved / "below"), "above": str(resolved / "above"),
            "rows_below": rows["below"], "rows_above": rows["above"]}


def write_split(source: ChunkedCorpus, above: np.ndarray, split_out: Path, threshold: float,
                 specs: dict[str, str], embedding_model: str) -> None:
    """The corpus as two corpus dirs, ``below/`` and ``above/`` of ``split_out`` (atomically).

    Each keeps the source's rows (schema columns), order and manifest (so its provenance, and
    the data module's id reuse, carry over), with ``kind`` ``proximity-split`` and a
    ``proximity`` record.

    Args:
        source: the corpus.
        above: per sample, whether its largest similarity is >= the threshold.
        split_out: ``--split_out``; its two corpus dirs are staged and swapped in together.
        threshold: ``--threshold``.
        specs: benchmark name -> the ``--benchmarks`` spec it came from.
        embedding_model: ``--embedding_model``.
    """
    manifest = {key: value for key, value in (source.manifest or {}).items()
                if key not in ("format", "tool_version", "created", "sharding", "generation")}
    names = [name for name in SCHEMA.names if name in source.columns]
    totals = {side: {"tokens": 0, "finished": 0, "rows": 0} for side in SPLIT_SIDES}
    with atomic_dir(split_out) as staging, \
            CorpusWriter(staging / "below") as below, CorpusWriter(staging / "above") as upper:
        writers, done = {"below": below, "above": upper}, 0
        for chunk in source.chunks(names, CHUNK_ROWS):
            values = dict(chunk.columns)
            count = len(chunk)
            values.setdefault("id", list(range(done, done + count)))
            rows: dict[str, list[dict[str, Any]]] = {side: [] for side in SPLIT_SIDES}
            for i in range(count):
                row = {name: column[i] for name, column in values.items()}
                side = "above" if above[done + i] else "below"
                rows[side].append(row)
                totals[side]["rows"] += 1
                totals[side]["tokens"] += int(row.get("num_tokens") or 0)
                totals[side]["finished"] += int(bool(row.get("finished")))
            for side, writer in writers.items():
                writer.add(rows[side])
            done += count
        for side, writer in writers.items():
            counts = dict(manifest.get("counts", {}))
            counts.update({key: totals[side][key] for key, column in (
                ("tokens", "num_tokens"), ("finished", "finished"))
                if key in counts and column in source.columns})
            writer.finish({**manifest, "kind": "proximity-split", "counts": counts,
                           "proximity": {"side": side, "threshold": threshold,
                                         "benchmarks": specs, "embedding_model": embedding_model,
                                         "corpus": str(source.path.resolve()),
                                         "corpus_kind": manifest.get("kind"),
                                         "rows": totals[side]["rows"],
                                         "rows_total": source.rows}})
