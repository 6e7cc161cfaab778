"""Time `selftrain decontaminate` on synthetic data and check it finds every planted sample.

Builds, in a temp dir, a corpus dir of ``--samples`` texts (150-250 words drawn from a random
vocabulary, with token ids so reading and writing cost what they do on a real corpus) and
``--benchmarks`` jsonl files holding ``--items`` items (30-60 words) in all; ``--planted``
samples get a window of 8-20 consecutive words of a random item, upper-cased in part and with
punctuation added. Prints the end-to-end time, the n-gram hashing time alone, and a plain
pure-Python baseline (a set of word tuples) against our hashing + lookup on the same
``--baseline`` samples, as a ratio measured in this run.

    .venv/bin/python scripts/bench/bench_decontaminate.py              # 100k samples, 50k items
    .venv/bin/python scripts/bench/bench_decontaminate.py --samples 2000 --items 1000  # quick
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from selftrain.corpus import CorpusWriter, read_corpus
from selftrain.curation.decontaminate import (
    NgramHasher,
    _benchmark_table,
    _contaminated,
    decontaminate,
)
from selftrain.curation.decontaminate import normalize as normalize_words

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    lengths = rng.integers(2, 10, size)
    letters = rng.integers(0, 26, int(lengths.sum()))
    words, start = [], 0
    for length in lengths.tolist():
        words.append("".join(LETTERS[letters[start:start + length]]))
        start += length
    return sorted(set(words))


def sentences(rng: np.random.Generator, vocab: list[str], count: int, low: int,
              high: int) -> list[list[str]]:
    lengths = rng.integers(low, high + 1, count)
    flat = rng.integers(0, len(vocab), int(lengths.sum()))
    out, start = [], 0
    for length in lengths.tolist():
        out.append([vocab[i] for i in flat[start:start + length]])
        start += length
    return out


def build(root: Path, args: argparse.Namespace) -> tuple[Path, list[Path], set[int], list[str]]:
    rng = np.random.default_rng(args.seed)
    vocab = vocabulary(rng, args.vocab)
    items = sentences(rng, vocab, args.items, 30, 60)
    paths = []
    for b, part in enumerate(np.array_split(np.arange(args.items), args.benchmarks)):
        path = root / f"bench{b}.jsonl"
        path.write_text("".join(json.dumps({"question": " ".join(items[i])}) + "\n"
                                for i in part.tolist()))
        paths.append(path)
    docs = sentences(rng, vocab, args.samples, 150, 250)
    planted = set(rng.choice(args.samples, args.planted, replace=False).tolist())
    for row in sorted(planted):
        item = items[int(rng.integers(len(items)))]
        width = int(rng.integers(8, min(20, len(item)) + 1))
        start = int(rng.integers(0, len(item) - width + 1))
        window = [w.upper() if k % 3 == 0 else w + "," if k % 4 == 1 else w
                  for k, w in enumerate(item[start:start + width])]
        at = int(rng.integers(0, len(docs[row])))
        docs[row] = docs[row][:at] + window + docs[row][at:]
    index = {word: i for i, word in enumerate(vocab)}
    texts = [" ".join(doc) for doc in docs]
    rows = ({"id": i, "text": text, "input_ids": [0] + [index.get(w, 1) for w in doc],
             "num_tokens": len(doc) + 1, "finished": True, "subset": 0}
            for i, (text, doc) in enumerate(zip(texts, docs, strict=True)))
    with CorpusWriter(root / "corpus") as writer:
        writer.add(rows)
        writer.finish({"counts": {"requested": args.samples,
                                  "tokens": sum(len(d) + 1 for d in docs),
                                  "finished": args.samples}})
    return root / "corpus", paths, planted, texts


def baseline(texts: list[str], grams: set[tuple[str, ...]], n: int) -> list[bool]:
    hits = []
    for text in texts:
        words = normalize_words(text)
        hits.append(any(tuple(words[k:k + n]) in grams for k in range(len(words) - n + 1)))
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--benchmarks", type=int, default=2, help="files the items are split in")
    parser.add_argument("--planted", type=int, default=1_000)
    parser.add_argument("--vocab", type=int, default=50_000)
    parser.add_argument("--ngram", type=int, default=8)
    parser.add_argument("--baseline", type=int, default=10_000, help="samples for the baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory(prefix="bench-decontaminate-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        corpus, benches, planted, texts = build(root, args)
        print(f"built {args.samples} samples, {args.items} items, {len(planted)} planted in "
              f"{time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        out = decontaminate(str(corpus), str(root / "clean"), [str(b) for b in benches],
                            ngram=args.ngram)
        total = time.perf_counter() - start
        record = json.loads((out / "manifest.json").read_text())["decontamination"]
        kept = set(read_corpus(out).columns["id"])
        removed = set(range(args.samples)) - kept
        assert removed == planted, f"removed {len(removed)} != planted {len(planted)}"
        print(f"decontaminate end to end: {total:.1f} s, {args.samples / total:,.0f} samples/s; "
              f"removed {record['removed']} = planted {len(planted)}; per benchmark "
              + ", ".join(f"{k}: {v['removed']}" for k, v in record["benchmarks"].items()))

        start = time.perf_counter()
        read_corpus(corpus)
        print(f"  of which reading the corpus (read_corpus): {time.perf_counter() - start:.1f} s")

        hasher = NgramHasher(args.ngram)
        start = time.perf_counter()
        grams = sum(hashes.size for _, _, hashes, _ in hasher.hash_batches(texts))
        hashing = time.perf_counter() - start
        print(f"n-gram hashing alone: {hashing:.1f} s for {grams:,} {args.ngram}-grams, "
              f"{args.samples / hashing:,.0f} samples/s")

        sub = texts[:args.baseline]
        items = [[json.loads(line)["question"]] for b in benches
                 for line in b.read_text().splitlines()]
        start = time.perf_counter()
        hasher = NgramHasher(args.ngram)
        tables = {"all": _benchmark_table(hasher, items)[0]}
        ours_index = time.perf_counter() - start
        start = time.perf_counter()
        ours = _contaminated(hasher, sub, tables)["all"]
        ours_scan = time.perf_counter() - start
        start = time.perf_counter()
        tuples = {tuple(w[k:k + args.ngram]) for (text,) in items
                  for w in [normalize_words(text)] for k in range(len(w) - args.ngram + 1)}
        base_index = time.perf_counter() - start
        start = time.perf_counter()
        base = baseline(sub, tuples, args.ngram)
        base_scan = time.perf_counter() - start
        assert ours.tolist() == base, "baseline and hashed lookup disagree"
        print(f"on {len(sub)} samples ({sum(base)} contaminated), {args.items} items:")
        print(f"  index the items: pure-Python tuple set {base_index:.2f} s, hashed "
              f"{ours_index:.2f} s ({base_index / ours_index:.1f}x)")
        print(f"  scan the samples: pure-Python {base_scan:.2f} s "
              f"({len(sub) / base_scan:,.0f} samples/s), hashed {ours_scan:.2f} s "
              f"({len(sub) / ours_scan:,.0f} samples/s): {base_scan / ours_scan:.1f}x faster")


if __name__ == "__main__":
    main()
