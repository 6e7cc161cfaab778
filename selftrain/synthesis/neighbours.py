"""Nearest neighbours of documents by embedding, and the near-copy test applied to each pair.

SBP pairs each document with its nearest neighbours by inner product of unit-length
embeddings over the whole corpus. :func:`exact_neighbours` computes the top k exactly, a block
of queries at a time (memory ``block x N``), which is the right tool up to a few hundred
thousand documents; :func:`faiss_neighbours` hands the same question to a FAISS HNSW index
(the ``ann`` extra) for millions, trading exactness for time.

A pair of near-copies teaches the synthesizer to copy, not to write a related document, so
pairs are tested with :func:`overlap`: the share of the shorter document's word n-grams
(lower-cased, whitespace-split) that also occur in the other one. 1.0 means one document is
contained in the other; two unrelated texts score near 0. When either document is shorter
than n words the two are compared as whole normalized strings (1.0 when equal, else 0.0), so a
short document inside a long one is not caught; with n = 5 such documents are one short line.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from selftrain.errors import SelftrainError

ANN_INSTALL = "pip install 'selftrain[ann]'"


def exact_neighbours(vectors: np.ndarray, k: int, block: int = 4096
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar other documents of every document, exactly.

    Memory is the block's similarities, ``4 x block x N`` bytes, plus the top k kept.

    Args:
        vectors: ``[N, dim]`` unit-length embeddings (N >= 2).
        k: neighbours per document; at most N - 1 are returned.
        block: query documents per matrix product.

    Returns:
        (similarities, indices), each ``[N, min(k, N - 1)]``, most similar first; a document
        is never its own neighbour. Exact ties are ordered as ``torch.topk`` orders them.
    """
    matrix = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    count = matrix.shape[0]
    k = min(k, count - 1)
    scores = np.empty((count, k), dtype=np.float32)
    indices = np.empty((count, k), dtype=np.int64)
    for start in range(0, count, block):
        stop = min(start + block, count)
        sims = matrix[start:stop] @ matrix.T
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = -torch.inf
        top = torch.topk(sims, k, dim=1, largest=True, sorted=True)
        scores[start:stop] = top.values.numpy()
        indices[start:stop] = top.indices.numpy()
    return scores, indices


def faiss_neighbours(vectors: np.ndarray, k: int, hnsw_m: int = 32, ef_search: int = 128
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Approximate :func:`exact_neighbours` through a FAISS HNSW index (inner product).

    Args:
        vectors: ``[N, dim]`` unit-length embeddings (N >= 2).
        k: neighbours per document; at most N - 1 are returned.
        hnsw_m: HNSW graph degree.
        ef_search: HNSW search breadth (higher: closer to exact, slower).

    Returns:
        (similarities, indices) as :func:`exact_neighbours` returns them; a row may hold
        fewer than k real neighbours, padded with index -1 and similarity -inf.
    """
    if importlib.util.find_spec("faiss") is None:
        raise SelftrainError(f"--index faiss: faiss is not installed; {ANN_INSTALL}, or use "
                             "--index exact")
    import faiss

    data = np.ascontiguousarray(vectors, dtype=np.float32)
    count = data.shape[0]
    k = min(k, count - 1)
    index = faiss.IndexHNSWFlat(data.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = max(ef_search, k + 1)
    index.add(data)
    found_scores, found = index.search(data, k + 1)
    scores = np.full((count, k), -np.inf, dtype=np.float32)
    indices = np.full((count, k), -1, dtype=np.int64)
    for row in range(count):
        keep = [j for j, i in enumerate(found[row]) if i >= 0 and i != row][:k]
        scores[row, :len(keep)] = found_scores[row, keep]
        indices[row, :len(keep)] = found[row, keep]
    return scores, indices


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The set of word n-grams of a text, lower-cased and split on whitespace.

    Args:
        text: the document.
        n: words per n-gram.
    """
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def overlap(first: str, second: str, n: int) -> float:
    """Near-copy score of two documents: see the module docstring.

    Args:
        first: one document.
        second: the other.
        n: words per n-gram.
    """
    a, b = ngrams(first, n), ngrams(second, n)
    if not a or not b:
        return float(" ".join(first.lower().split()) == " ".join(second.lower().split()))
    return len(a & b) / min(len(a), len(b))
