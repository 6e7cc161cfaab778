"""64-bit n-gram hashing and lookup, shared by the word and the token n-gram checks.

Decontamination hashes word n-grams of text (:class:`selftrain.curation.decontaminate.
NgramHasher`), the probe leak check token n-grams of ids (:func:`token_ngram_hashes`); both mix
each unit with splitmix64, take the polynomial of n of them modulo 2**64 and look the results up
in a sorted table (:class:`HashIndex`). The values are the same in every process and machine,
unlike ``hash()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NGRAM_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2**64: polynomial hash base
NGRAM_BASE_INVERSE = np.uint64(pow(int(NGRAM_BASE), -1, 2**64))


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the whole 64-bit word."""
    values = values ^ (values >> np.uint64(30))
    values *= np.uint64(0xBF58476D1CE4E5B9)
    values ^= values >> np.uint64(27)
    values *= np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def token_ngram_hashes(sequences: Sequence[Sequence[int]], n: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The n-gram hashes of token-id sequences, and for each the index of its sequence.

    The word-n-gram hash with token ids for words: each id splitmix64-mixed, an n-gram the
    polynomial of its n mixed ids (base :data:`NGRAM_BASE`, mod 2**64); no n-gram spans two
    sequences. The same value in every process and machine.

    Args:
        sequences: token ids, one list (or array) per text.
        n: tokens per n-gram.
    """
    lengths = np.fromiter((len(ids) for ids in sequences), dtype=np.int64, count=len(sequences))
    empty = np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    if int(lengths.sum()) < n:
        return empty
    ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in sequences if len(ids)])
    words = mix64(ids.astype(np.uint64) + np.uint64(1))
    return polynomial_ngrams(words, np.repeat(np.arange(len(sequences)), lengths), n)


def polynomial_ngrams(units: np.ndarray, owner: np.ndarray, n: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of n consecutive units of one text, and the text of each.

    ``h = sum_k unit[i + k] * B**(n - 1 - k)`` mod 2**64 (B = :data:`NGRAM_BASE`), computed for
    all i at once; runs that cross two texts are left out.

    Args:
        units: uint64 hashes of the words or tokens, every text's end to end (at least n).
        owner: the text of each unit.
        n: units per n-gram.
    """
    count = units.size - n + 1
    hashes = units[:count].copy()
    for offset in range(1, n):
        hashes *= NGRAM_BASE
        hashes += units[offset:offset + count]
    inside = owner[:count] == owner[n - 1:]
    return hashes[inside], owner[:count][inside]


def distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values; sort-based, as np.unique's hash path is slower here."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if values.size else values


class HashIndex:
    """Membership in a sorted uint64 array, fast when most queries are absent.

    A bitmap over the top bits of the stored hashes (about one bit in 32 set) rejects most
    absent queries with one gather; only the rest go through ``searchsorted``.

    Args:
        table: sorted distinct hashes.
    """

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        bits = int(np.clip(np.ceil(np.log2(max(table.size, 1) * 32)), 16, 26))
        self._shift = np.uint64(64 - bits)
        self._bitmap = np.zeros(1 << bits, dtype=bool)
        self._bitmap[table >> self._shift] = True

    def find(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in ``hashes`` of those in the table, and where each is in the table."""
        candidates = np.flatnonzero(self._bitmap[hashes >> self._shift])
        values = hashes[candidates]
        index = np.minimum(np.searchsorted(self.table, values), self.table.size - 1)
        found = self.table[index] == values
        return candidates[found], index[found]
