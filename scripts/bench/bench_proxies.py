"""What `selftrain proxies` costs per sample, and its batched NLL against a row-at-a-time forward.

Builds, in a temp dir, a corpus dir of ``--samples`` texts (windows of ``--chars`` characters cut
from the Python standard library's source, prose and code mixed, about 300 tokens each) and a
jsonl benchmark of ``--items`` such windows, then runs the command end to end in this process
(all-MiniLM-L6-v2 embeddings and the NLL under ``--student``) and prints its throughputs, read
from the ``summary.json`` it writes, with the time 100k samples would take at those rates.
Then, on the first ``--baseline`` samples, the plain way of getting the same NLL (one row per
forward pass, as a per-sample loop would) against the command's length-sorted, token-budgeted
batches: both times, their ratio, and the largest difference between the two NLLs.

    .venv/bin/python scripts/bench/bench_proxies.py                      # 500 samples, SmolLM2
    .venv/bin/python scripts/bench/bench_proxies.py --samples 64 --student tiny:qwen2   # quick
"""

from __future__ import annotations

import argparse
import json
import logging
import sysconfig
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import pyarrow.parquet as pq
import torch

from selftrain.analysis.proxies import proxies
from selftrain.corpus import CorpusWriter
from selftrain.models import load_model, load_tokenizer, resolve_bos_id


def windows(count: int, chars: int, seed: int) -> list[str]:
    """``count`` windows of ``chars`` characters from standard-library sources, seeded."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = "\n".join(path.read_text(encoding="utf-8", errors="ignore") for path in files)
    starts = np.random.default_rng(seed).integers(0, len(text) - chars, count)
    return [text[start:start + chars] for start in starts.tolist()]


def plain_nll(model: torch.nn.Module, rows: list[list[int]]) -> tuple[list[float], float]:
    """Mean token NLL per row, one row per forward pass; and the seconds it took."""
    out = []
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in rows:
            tensor = torch.tensor([ids])
            logits = model(input_ids=tensor).logits[0, :-1].float()
            out.append(torch.nn.functional.cross_entropy(logits, tensor[0, 1:]).item())
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--chars", type=int, default=1200)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--student", default="embedded:smollm2-135m")
    parser.add_argument("--max_length", type=int, default=513)
    parser.add_argument("--batch_tokens", type=int, default=4096)
    parser.add_argument("--baseline", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    texts = windows(args.samples + args.items, args.chars, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with CorpusWriter(root / "corpus") as writer:
            writer.add({"id": i, "text": text, "subset": 0} for i, text in
                       enumerate(texts[:args.samples]))
            corpus = writer.finish({"kind": "synthetic"})
        bench = root / "bench.jsonl"
        bench.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[args.samples:]))
        _common.progress(f"running selftrain proxies on {args.samples} samples")
        start = time.perf_counter()
        out = proxies(str(corpus), str(root / "out"), [str(bench)], student=args.student,
                      max_length=args.max_length, batch_tokens=args.batch_tokens)
        total = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
        nll = pq.read_table(out / "samples.parquet").column("nll").to_pylist()
        tokenizer = load_tokenizer(args.student)
        bos, _ = resolve_bos_id(tokenizer)  # what the command puts before retokenized text
        rows = [[bos, *ids][:args.max_length] for ids in tokenizer(
            texts[:args.baseline], add_special_tokens=False)["input_ids"]]
        _common.progress(f"plain per-row NLL on {len(rows)} samples")
        model = load_model(args.student).eval()
        plain, plain_seconds = plain_nll(model, rows)
    timing = summary["timing"]
    tokens = float(np.mean([len(row) for row in rows]))
    batched_rate = timing["samples_per_second_nll"]
    plain_rate = len(rows) / plain_seconds
    figures = {
        "machine": _common.machine_text(torch.device("cpu")), "samples": args.samples,
        "tokens_per_sample": round(tokens, 1), "student": args.student,
        "end_to_end_seconds": round(total, 1), **timing,
        "hours_per_100k_embed": round(1e5 / timing["samples_per_second_embed"] / 3600, 2),
        "hours_per_100k_nll": round(1e5 / batched_rate / 3600, 2),
        "plain_nll_samples_per_second": round(plain_rate, 2),
        "batched_over_plain": round(batched_rate / plain_rate, 2),
        "max_nll_difference": float(np.max(np.abs(np.array(nll[:len(rows)]) - plain))),
    }
    print(f"machine: {figures['machine']}; {args.samples} samples of ~{tokens:.0f} "
          f"{args.student} tokens")
    print(f"selftrain proxies end to end: {total:.1f} s (loading models and benchmarks included)")
    print(f"  embedding (all-MiniLM-L6-v2): {timing['samples_per_second_embed']:.1f} samples/s "
          f"-> {figures['hours_per_100k_embed']:.2f} h per 100k samples")
    print(f"  NLL under {args.student}: {batched_rate:.1f} samples/s "
          f"-> {figures['hours_per_100k_nll']:.2f} h per 100k samples")
    print(f"plain per-row NLL on {len(rows)} samples: {plain_rate:.1f} samples/s; batched / "
          f"plain {figures['batched_over_plain']:.2f}; largest NLL difference "
          f"{figures['max_nll_difference']:.2e}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
