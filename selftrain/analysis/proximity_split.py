"""The proximity split: a corpus as two corpus dirs, below and above a similarity threshold.

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
