"""`selftrain pairs`: related-document pairs of a real corpus, to train an SBP synthesizer.

Synthetic Bootstrapped Pretraining learns p(d2 | d1) from pairs of related documents. Here a
corpus (a corpus dir, or a .jsonl / .parquet / .txt file) is embedded with a sentence-embedding
model (all-MiniLM-L6-v2 by default, as ``selftrain proxies`` loads it), each document's top-k
neighbours by inner product of the unit embeddings are found over the whole corpus
(:mod:`selftrain.synthesis.neighbours`: exact in torch blocks, or a FAISS index), and a
directed pair (d1 = the document, d2 = a neighbour) is kept when its similarity is at least
``--threshold`` and the two are not near-copies (``overlap < --max_overlap``). One d1 thus
pairs with up to k d2.

The output is a dir: ``data/pairs.parquet`` (``d1_id``, ``d2_id``, ``d1_text``, ``d2_text``,
``similarity``, ``overlap``, ``rank``) and ``manifest.json`` (``kind: pairs``, the settings and
counts), written whole or not at all. ``selftrain fit --data.corpus PAIRS_DIR`` trains a
synthesizer on it (:mod:`selftrain.synthesis.layout`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from selftrain.corpus import DATA_DIR, MANIFEST_NAME, corpus_documents, stamp
from selftrain.embedding import DEFAULT_EMBEDDING_MODEL, embed, load_embedder
from selftrain.errors import SelftrainError, refuse_first_failed
from selftrain.io import atomic_dir, write_json_atomic, write_parquet_atomic
from selftrain.outputs import check_out_dir, refuse_input_overlap
from selftrain.sampling.ranks import pick_device
from selftrain.synthesis.layout import PAIRS_FILE, PAIRS_FORMAT, PAIRS_KIND
from selftrain.synthesis.neighbours import exact_neighbours, faiss_neighbours, overlap

log = logging.getLogger(__name__)

OUT_ENTRIES = (MANIFEST_NAME, DATA_DIR)


def pairs(
    corpus: str,
    out: str,
    threshold: float = 0.5,
    top_k: int = 4,
    max_overlap: float = 0.5,
    ngram: int = 5,
    embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    index: Literal["exact", "faiss"] = "exact",
    subset: int | None = None,
    num_subsets: int | None = None,
    embed_batch_size: int = 64,
    block_size: int = 1024,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Pair each document with its nearest neighbours above a similarity threshold.

    Args:
        corpus: the real corpus: a corpus dir, or a .jsonl / .parquet file (a ``text`` per row)
            or a .txt file (one document per line). Its ``id`` column (else the row number)
            names each document.
        out: new directory for ``data/pairs.parquet`` and ``manifest.json``.
        threshold: keep a pair when the cosine similarity of the two documents is at least
            this; in [-1, 1].
        top_k: neighbours looked at per document (each kept one is a pair with it as d1).
        max_overlap: drop near-copies: pairs whose word n-gram overlap (the share of the
            shorter document's n-grams found in the other) is at least this; in (0, 1], 1
            drops only containment.
        ngram: words per n-gram of the near-copy test.
        embedding_model: sentence-transformers model: ``all-MiniLM-L6-v2`` (bundled by the
            ``proxies`` extra), a local model dir, or a hub id already in the HF cache.
        index: ``exact`` top-k in torch blocks, or ``faiss`` (an HNSW index, approximate; the
            ``ann`` extra) for millions of documents.
        subset: pair the documents of subset k only (0..K-1), as ``--data.subset`` selects
            them; None pairs the whole corpus.
        num_subsets: K; None takes the corpus's own ``subset`` column, another K takes row i
            into subset i mod K (as ``--data.num_subsets``).
        embed_batch_size: documents per embedding forward pass.
        block_size: documents per block of the exact search (memory ``4 x block x N``
            bytes: the block's similarities).
        device: "auto", "cpu" or "cuda[:N]" for the embedding model.
        overwrite: replace a pairs dir already at ``out``.

    Returns:
        The pairs dir.
    """
    checks = [
        (math.isfinite(threshold) and -1 <= threshold <= 1, "--threshold", threshold,
         "must be in [-1, 1] (a cosine similarity)"),
        (top_k >= 1, "--top_k", top_k, "must be >= 1"),
        (0 < max_overlap <= 1, "--max_overlap", max_overlap,
         "must be in (0, 1]; 1 drops only documents contained in the other"),
        (ngram >= 1, "--ngram", ngram, "must be >= 1"),
        (embed_batch_size >= 1, "--embed_batch_size", embed_batch_size, "must be >= 1"),
        (block_size >= 1, "--block_size", block_size, "must be >= 1"),
    ]
    refuse_first_failed((ok, f"{flag} {value}: {rule}") for ok, flag, value, rule in checks)
    target = Path(out)
    refuse_input_overlap(target, [("--corpus", corpus)])
    check_out_dir(target, overwrite, (MANIFEST_NAME,), OUT_ENTRIES, "pairs dir")
    torch_device = pick_device(device)
    ids, texts = _documents(corpus, subset, num_subsets)

    start = time.perf_counter()
    model = load_embedder(embedding_model, torch_device)
    log.info("embedding %d documents with %s", len(texts), embedding_model)
    vectors = embed(model, texts, embed_batch_size, progress=True)
    embedded = time.perf_counter() - start
    search = exact_neighbours(vectors, top_k, block_size) if index == "exact" else (
        faiss_neighbours(vectors, top_k))
    table, counts = _pair_table(ids, texts, *search, threshold, max_overlap, ngram)
    if table.num_rows == 0:
        best = float(search[0][:, 0].max())
        raise SelftrainError(f"--threshold {threshold}: no pair is left (the most similar pair "
                             f"scores {best:.3f}; {counts['near_copies']} near-copies dropped); "
                             "lower --threshold or raise --max_overlap")
    similarity = np.asarray(table.column("similarity").to_pylist())
    manifest = stamp({
        "format": PAIRS_FORMAT, "kind": PAIRS_KIND, "corpus": str(corpus),
        "subset": subset, "num_subsets": num_subsets,
        "documents": len(texts), "embedding_model": embedding_model, "index": index,
        "threshold": threshold, "top_k": top_k,
        "near_copy": {"ngram": ngram, "max_overlap": max_overlap,
                      "rule": "share of the shorter document's word n-grams found in the "
                              "other (lower-cased, whitespace-split)"},
        "counts": counts,
        "similarity": {"min": round(float(similarity.min()), 4),
                       "median": round(float(np.median(similarity)), 4),
                       "max": round(float(similarity.max()), 4)},
        "timing": {"embed_seconds": round(embedded, 2),
                   "total_seconds": round(time.perf_counter() - start, 2)}})
    with atomic_dir(target) as staging:
        (staging / DATA_DIR).mkdir()
        write_parquet_atomic(table, staging / DATA_DIR / PAIRS_FILE)
        write_json_atomic(manifest, staging / MANIFEST_NAME)
    log.info("wrote %s: %d pairs from %d of %d documents (%d below the threshold, %d "
             "near-copies dropped)", target, counts["pairs"], counts["documents_with_pairs"],
             len(texts), counts["below_threshold"], counts["near_copies"])
    return target


def _documents(corpus: str, subset: int | None, num_subsets: int | None
               ) -> tuple[list[int], list[str]]:
    """The corpus's document ids and texts, refused when fewer than two are non-empty."""
    ids, texts = corpus_documents(corpus, "--corpus", subset, num_subsets)
    if len(texts) < 2:
        raise SelftrainError(f"--corpus {corpus}: {len(texts)} non-empty document(s); pairs "
                             "need at least two")
    return ids, texts


def _pair_table(ids: list[int], texts: list[str], scores: np.ndarray, neighbours: np.ndarray,
                threshold: float, max_overlap: float, ngram: int
                ) -> tuple[pa.Table, dict[str, Any]]:
    """The kept pairs as a table, and how many were looked at, kept and dropped.

    Args:
        ids: document ids.
        texts: document texts.
        scores: ``[N, k]`` similarities of each document's neighbours.
        neighbours: ``[N, k]`` their row numbers (-1: none found).
        threshold: the least similarity kept.
        max_overlap: near-copies at or above this overlap are dropped.
        ngram: words per n-gram of the near-copy test.
    """
    rows: dict[str, list[Any]] = {name: [] for name in (
        "d1_id", "d2_id", "d1_text", "d2_text", "similarity", "overlap", "rank")}
    below = copies = candidates = 0
    for first in range(len(texts)):
        for rank, (score, second) in enumerate(zip(scores[first], neighbours[first],
                                                   strict=True)):
            if second < 0:
                continue
            candidates += 1
            if score < threshold:
                below += 1
                continue
            shared = overlap(texts[first], texts[second], ngram)
            if shared >= max_overlap:
                copies += 1
                continue
            for name, value in (("d1_id", ids[first]), ("d2_id", ids[second]),
                                ("d1_text", texts[first]), ("d2_text", texts[second]),
                                ("similarity", float(score)), ("overlap", shared),
                                ("rank", rank)):
                rows[name].append(value)
    schema = pa.schema([("d1_id", pa.int64()), ("d2_id", pa.int64()), ("d1_text", pa.string()),
                        ("d2_text", pa.string()), ("similarity", pa.float32()),
                        ("overlap", pa.float32()), ("rank", pa.int32())])
    counts = {"candidates": candidates, "below_threshold": below, "near_copies": copies,
              "pairs": len(rows["d1_id"]), "documents_with_pairs": len(set(rows["d1_id"]))}
    return pa.Table.from_pydict(rows, schema=schema), counts
