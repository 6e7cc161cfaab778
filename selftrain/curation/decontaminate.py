"""`selftrain decontaminate`: drop corpus samples that share a word n-gram with a benchmark.

A self-generated corpus can reproduce benchmark questions the source model memorized; training
a student on them would inflate its benchmark scores. This tool removes every sample that shares
one n-gram (default 8 words) with any benchmark item and writes the rest as a new corpus dir
whose manifest records, per benchmark, how many samples went.

Text is normalized the same way on both sides: lower-cased; apostrophes and invisible format
characters deleted ("don't", "don’t" and "dont" all give "dont"); every other Unicode punctuation,
symbol or control character made a space ("well-known", "stop—the", "and/or" split into words);
then split on whitespace. Letters, digits and combining marks stay. n-grams never span two texts
(two fields of a benchmark item, or two samples). A text shorter than n words has no n-grams:
such a sample is never removed, and such a benchmark item removes nothing (counted as
``items_too_short``), as in lm-eval-harness's own decontamination.

n-grams are hashed to 64 bits by vectorized polynomial hashing in numpy (see
:class:`NgramHasher` and :mod:`selftrain.curation.ngrams`; the same value in every process and on
every machine, unlike ``hash()``) and looked up in the benchmarks' sorted hash arrays: 100k
samples of ~200 words against 50k items take about 10 s end to end on one core
(``scripts/bench/bench_decontaminate.py``).

Held-out probe sets (``--probe_sets``) are checked beside the benchmarks, by token n-grams in the
probe set's tokenizer (:mod:`selftrain.curation.leaks`), so that no training sample holds a
window the extraction probes test; the manifest records the drops per benchmark and per probe
set.
"""

from __future__ import annotations

import functools
import logging
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from selftrain.corpus import (
    SCHEMA,
    Corpus,
    CorpusWriter,
    check_corpus_out,
    read_corpus,
)
from selftrain.curation.benchmarks import load_benchmark
from selftrain.curation.leaks import (
    DEFAULT_NGRAM,
    check_ngram,
    corpus_ids,
    find_leaks,
    probe_windows,
)
from selftrain.curation.ngrams import (
    NGRAM_BASE,
    NGRAM_BASE_INVERSE,
    HashIndex,
    distinct,
    mix64,
    polynomial_ngrams,
)
from selftrain.errors import SelftrainError
from selftrain.models import tokenizer_fingerprint
from selftrain.outputs import refuse_input_overlap

log = logging.getLogger(__name__)

NORMALIZATION = ("lowercase; delete apostrophes and format characters (Cf); other punctuation, "
                 "symbols and controls (P*, S*, Cc) become spaces; split on whitespace")
_APOSTROPHES = "'`\u00b4\u2018\u2019\u201b\u2032"  # deleted: they sit inside words
_PROGRESS_FROM = 10_000  # show a progress bar from this many samples


def decontaminate(
    corpus: str,
    out: str,
    benchmarks: list[str] | str | None = None,
    ngram: int = 8,
    include_path: str | None = None,
    limit: int | None = None,
    probe_sets: list[str] | str | None = None,
    probe_ngram: int = DEFAULT_NGRAM,
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a copy of a corpus without the samples that share an n-gram with a benchmark.

    Held-out probe sets are checked beside the benchmarks: a sample sharing a token n-gram
    with any window (prefix and suffix together) of a probe set goes too
    (:mod:`selftrain.curation.leaks`), so the probes stay held out.

    Args:
        corpus: corpus dir (or .jsonl / .parquet / .txt file) whose ``text`` is checked.
        out: new corpus dir to write; the input is never modified.
        benchmarks: benchmark specs, each a local .jsonl / .json file (every string in a row,
            also inside lists and objects, is a text), a local lm-eval task .yaml, or an
            lm-eval task or group name whose data can be loaded (the hub cache or the network).
            One, or a list: ``--benchmarks [a.jsonl,hellaswag]``.
        ngram: n, the words per n-gram; a sample is dropped if it shares one n-gram with an item.
        include_path: extra directory of lm-eval task YAMLs for task names. Names found there
            skip indexing lm-eval's built-in tasks (about 10 s); a local .yaml is indexed with
            its own directory and this one only.
        limit: use at most this many items of each benchmark (None: all).
        probe_sets: held-out probe sets (``selftrain probeset`` / ``plant`` parquet, or jsonl)
            whose windows no sample may share a token n-gram with.
        probe_ngram: tokens per n-gram for the probe sets (the same n as ``selftrain fit``'s
            ``--leak_check.ngram``).
        tokenizer: the tokenizer the probe windows are compared in; None: the model each probe
            set records (its ids are used as stored; the corpus's too where they are that
            tokenizer's, else its text is tokenized).
        overwrite: replace an existing corpus at --out.

    Returns:
        The new corpus directory.
    """
    benchmarks = _as_list(benchmarks)
    probe_sets = _as_list(probe_sets)
    _validate(corpus, out, benchmarks, probe_sets, ngram, probe_ngram, limit, overwrite)
    source = read_corpus(corpus, flag="--corpus")
    if "text" not in source.columns and (benchmarks or "input_ids" not in source.columns):
        raise SelftrainError(f"--corpus {corpus}: rows have no 'text' column; decontamination "
                             "compares text, so decode the ids into a text column first")
    hasher = NgramHasher(ngram)
    tables, stats = {}, {}
    for spec in benchmarks:
        name, items = load_benchmark(spec, include_path=include_path, limit=limit)
        if name in tables:
            raise SelftrainError(f"--benchmarks {spec}: a second benchmark named {name!r}; "
                                 "rename one of the files")
        tables[name], counts = _benchmark_table(hasher, items)
        stats[name] = {"source": spec, **counts}
    texts = [text if isinstance(text, str) else "" for text in source.columns.get("text", [])]
    hits = _contaminated(hasher, texts, tables) if tables else {}
    probe_stats, probe_hits = _probe_leaks(source, probe_sets, probe_ngram, tokenizer)
    removed = np.logical_or.reduce([np.zeros(len(source), dtype=bool), *hits.values(),
                                    *probe_hits])
    for name, mask in hits.items():
        stats[name]["removed"] = int(mask.sum())
        log.info("decontaminate: %s: %d items (%d shorter than %d words), %d distinct %d-grams, "
                 "%d samples removed", name, stats[name]["items"],
                 stats[name]["items_too_short"], ngram, stats[name]["ngrams"], ngram,
                 stats[name]["removed"])
        if stats[name]["ngrams"] == 0:
            log.warning("decontaminate: %s has no %d-gram at all, so it removes nothing; "
                        "lower --ngram", name, ngram)
    keep = np.flatnonzero(~removed)
    if keep.size == 0:
        raise SelftrainError(f"--benchmarks/--probe_sets: every one of the {len(source)} samples "
                             f"of --corpus {corpus} shares an n-gram with a benchmark or probe "
                             "window; nothing would be left: check them or raise --ngram / "
                             "--probe_ngram")
    record = {"ngram": ngram, "normalization": NORMALIZATION,
              "unicode_version": unicodedata.unidata_version,
              "hash": "per word: polynomial of its UTF-8 bytes mod 2**64, splitmix64-mixed with "
                      "its length; per n-gram: polynomial of its word hashes mod 2**64",
              "benchmarks": stats, "probe_sets": probe_stats,
              "removed": int(removed.sum()), "kept": int(keep.size),
              "input": str(corpus)}
    return _write(source, keep, record, Path(out), overwrite)


def _as_list(value: list[str] | str | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _validate(corpus: str, out: str, benchmarks: Sequence[str], probe_sets: Sequence[str],
              ngram: int, probe_ngram: int, limit: int | None, overwrite: bool) -> None:
    if ngram < 1:
        raise SelftrainError(f"--ngram {ngram}: must be >= 1 (words per n-gram; 8 is usual)")
    check_ngram(probe_ngram, "--probe_ngram")
    if limit is not None and limit < 1:
        raise SelftrainError(f"--limit {limit}: must be >= 1, or null for every item")
    if not benchmarks and not probe_sets:
        raise SelftrainError("--benchmarks: none given; pass at least one .jsonl, task .yaml or "
                             "lm-eval task name, or a probe set in --probe_sets")
    target = Path(out)
    refuse_input_overlap(target, [("--corpus", corpus),
                                  *(("--benchmarks", spec) for spec in benchmarks),
                                  *(("--probe_sets", path) for path in probe_sets)])
    check_corpus_out(target, overwrite)


def _probe_leaks(source: Corpus, probe_sets: Sequence[str], ngram: int,
                 tokenizer: str | None) -> tuple[dict[str, dict], list[np.ndarray]]:
    """Per probe set, its counts and the mask of the samples that hold one of its windows."""
    stats, masks, ids_in = {}, [], {}
    for path in probe_sets:
        windows, model_tokenizer, spec = probe_windows(path, "--probe_sets", tokenizer)
        fingerprint = tokenizer_fingerprint(model_tokenizer)
        if fingerprint not in ids_in:  # the corpus once per tokenizer
            ids_in[fingerprint] = corpus_ids(source.columns, source.manifest, model_tokenizer)
        leaks = find_leaks(ids_in[fingerprint], windows, ngram)
        record = leaks.record()
        stats[str(path)] = {"source": str(path), "tokenizer": spec,
                            "windows": record["windows"],
                            "windows_leaked": record["windows_leaked"],
                            "ngram_tokens": ngram, "removed": record["rows_leaking"]}
        masks.append(leaks.rows)
        log.info("decontaminate: %s: %d samples share a %d-token n-gram with %d of its %d "
                 "windows", path, record["rows_leaking"], ngram, record["windows_leaked"],
                 record["windows"])
    return stats, masks


@functools.cache
def _translation() -> dict[int, str | None]:
    """str.translate table of :data:`NORMALIZATION`; every kind of whitespace becomes " "."""
    table: dict[int, str | None] = {}
    for code in range(sys.maxunicode + 1):
        category = unicodedata.category(chr(code))
        if category == "Cf":
            table[code] = None
        elif category[0] in "PSZ" or category in ("Cc", "Cs") or chr(code).isspace():
            table[code] = " "
    table.update(dict.fromkeys(map(ord, _APOSTROPHES)))
    del table[ord(" ")]
    return table


def normalize(text: str) -> list[str]:
    """The words of a text, as :data:`NORMALIZATION` says."""
    return text.lower().translate(_translation()).split()


class NgramHasher:
    """Hashes the word n-grams of texts to uint64, identically in every process and machine.

    Normalized texts are joined by NUL bytes into one UTF-8 buffer, where a word is a run of
    bytes above the space. A word's hash is the polynomial of its bytes (base ``B``, mod 2**64),
    read off prefix sums of ``byte[j] * B**-j`` (B is odd, so invertible), mixed with its length
    through splitmix64; an n-gram's hash is the same polynomial over its n word hashes.
    Everything after ``str.translate`` is a handful of numpy passes over the buffer.

    Args:
        n: words per n-gram.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._powers = np.ones(1, dtype=np.uint64)  # B**k
        self._inverses = np.ones(1, dtype=np.uint64)  # B**-k

    def _grow(self, size: int) -> None:
        if size > self._powers.size:
            size = max(size, 2 * self._powers.size)
            for name, base in (("_powers", NGRAM_BASE), ("_inverses", NGRAM_BASE_INVERSE)):
                table = np.full(size, base, dtype=np.uint64)
                table[0] = 1
                setattr(self, name, np.cumprod(table, dtype=np.uint64))

    def hash(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The n-gram hashes of the texts, and for each the index of the text it comes from."""
        table = _translation()
        joined = "\0".join([text.lower().translate(table) for text in texts])
        buffer = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
        empty = np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        if buffer.size == 0:
            return empty
        edges = np.diff((buffer > 32).view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if starts.size < self.n:
            return empty
        self._grow(buffer.size + 1)
        prefix = np.zeros(buffer.size + 1, dtype=np.uint64)
        np.multiply(buffer, self._inverses[:buffer.size], out=prefix[1:])
        np.cumsum(prefix, out=prefix)  # prefix[i] = sum_{j < i} byte[j] * B**-j
        words = (prefix[ends] - prefix[starts]) * self._powers[ends - 1]
        words = mix64(words ^ (ends - starts).astype(np.uint64))
        owner = np.searchsorted(np.flatnonzero(buffer == 0), starts)  # the text of each word
        return polynomial_ngrams(words, owner, self.n)

    def hash_batches(self, texts: Sequence[str], max_chars: int = 1 << 22
                     ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``hash`` over consecutive slices of about ``max_chars`` characters (bounds memory).

        Yields:
            start, stop, hashes, owner (as an index into the whole ``texts``).
        """
        ends = np.cumsum([len(text) + 1 for text in texts])
        start = 0
        while start < len(texts):
            limit = (ends[start - 1] if start else 0) + max_chars
            stop = max(start + 1, int(np.searchsorted(ends, limit, side="right")))
            hashes, owner = self.hash(texts[start:stop])
            yield start, stop, hashes, owner + start
            start = stop


def _benchmark_table(hasher: NgramHasher, items: list[list[str]]) -> tuple[np.ndarray, dict]:
    """Sorted distinct n-gram hashes of a benchmark's items, and its counts."""
    values = [value for item in items for value in item]
    item_of_value = np.repeat(np.arange(len(items)), [len(item) for item in items])
    tables, owners = [np.empty(0, dtype=np.uint64)], [np.empty(0, dtype=np.int64)]
    for _, _, hashes, owner in hasher.hash_batches(values):
        tables.append(hashes)
        owners.append(item_of_value[owner])
    table = distinct(np.concatenate(tables))
    with_ngrams = distinct(np.concatenate(owners)).size
    return table, {"items": len(items), "items_too_short": len(items) - with_ngrams,
                   "ngrams": int(table.size)}


def _contaminated(hasher: NgramHasher, texts: list[str],
                  tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For each benchmark, a bool mask over texts: shares an n-gram with that benchmark."""
    names = list(tables)
    hits = np.zeros((len(texts), len(names)), dtype=bool)
    union, inverse = np.unique(np.concatenate(list(tables.values())), return_inverse=True)
    if union.size == 0:
        return {name: hits[:, column] for column, name in enumerate(names)}
    member = np.zeros((union.size, len(names)), dtype=bool)  # n-gram x benchmark
    member[inverse, np.repeat(np.arange(len(names)), [t.size for t in tables.values()])] = True
    index = HashIndex(union)
    with tqdm(total=len(texts), unit="sample", desc="decontaminate", dynamic_ncols=True,
              disable=len(texts) < _PROGRESS_FROM) as bar:
        for start, stop, hashes, owner in hasher.hash_batches(texts):
            positions, found = index.find(hashes)
            np.logical_or.at(hits, owner[positions], member[found])
            bar.update(stop - start)
    return {name: hits[:, column] for column, name in enumerate(names)}


def _write(source: Corpus, keep: np.ndarray, record: dict[str, Any], out: Path,
           overwrite: bool) -> Path:
    """The kept rows, in order and with every schema column, as a new corpus dir."""
    columns = source.columns
    dropped = sorted(set(columns) - set(SCHEMA.names))
    if dropped:
        log.warning("decontaminate: columns %s are not in the corpus schema and are not copied",
                    dropped)
    names = [name for name in SCHEMA.names if name in columns]
    if "id" not in columns:  # plain files: the row number keeps kept rows traceable
        columns = {**columns, "id": list(range(len(source)))}
        names = ["id", *names]
    manifest = {key: value for key, value in (source.manifest or {}).items()
                if key not in ("format", "tool_version", "created", "sharding", "generation")}
    if "decontamination" in manifest:
        record["previous"] = manifest["decontamination"]
    counts = dict(manifest.get("counts", {}))
    for count, column in (("tokens", "num_tokens"), ("finished", "finished")):
        if count in counts and column in columns:
            counts[count] = int(sum(columns[column][i] or 0 for i in keep))
    manifest.update(counts=counts, decontamination=record)
    with CorpusWriter(out, overwrite=overwrite) as writer:
        writer.add({name: columns[name][i] for name in names} for i in keep.tolist())
        path = writer.finish(manifest)
    log.info("decontaminate: kept %d of %d samples (%d removed) -> %s", record["kept"],
             len(source), record["removed"], path)
    return path
