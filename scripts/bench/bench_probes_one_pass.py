"""Probe evaluation in one teacher-forced pass against the old way, on the same canaries.

One evaluation of both probe callbacks (extraction + likelihood) over the same 64 windows:

- before: greedy decoding of every row (``greedy_continuations``, for the memorized count and
  the match rate) plus a separate teacher-forced forward for log p(x | y)
  (the old ``continuation_logprobs``);
- after: one teacher-forced forward (``teacher_forced``: memorized count and log p), plus
  greedy decoding of the rows it does not settle, for the exact match rate, and of rows
  whose count rests on a near-tie (``greedy_counts``); and the same without the match rate
  (``match_rate: false``: near-tie rows alone are decoded).

Two sets: 64 windows of Python stdlib source the model does not extract (nearly every row is
decoded for the match rate), and the same prefixes followed by the model's own greedy
continuation (extracted by construction: the best case, nothing to decode). Checks that both
ways give the same memorized rows, match counts and log-probs. bf16 autocast, one process
(``--device``: auto picks CUDA when there is one).

Usage: python scripts/bench/bench_probes_one_pass.py [--model embedded:smollm2-135m]
    [--rows 64] [--batch_size 32] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from _common import machine, machine_text, resolve_device, sync, write_figures

if TYPE_CHECKING:
    from selftrain.probes.windows import TeacherForced


def old_way(model: torch.nn.Module, windows: torch.Tensor, batch_size: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of every row, then a separate forward for log p: (matched, logprobs)."""
    from selftrain.probes.windows import greedy_continuations, teacher_forced

    generated = greedy_continuations(model, windows[:, :32], windows.shape[1] - 32, batch_size)
    matched = (generated == windows[:, 32:]).sum(dim=-1)
    logprobs = teacher_forced(model, windows, 32, batch_size).logprobs
    return matched, logprobs


def one_pass(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
             match_rate: bool) -> tuple[torch.Tensor, torch.Tensor, TeacherForced]:
    """One teacher-forced pass (+ greedy for unsettled rows): (extracted, matched, the pass)."""
    from selftrain.probes.windows import greedy_counts, needs_decoding, teacher_forced

    result = teacher_forced(model, windows, 32, batch_size)
    decode = needs_decoding(result.extracted, windows.shape[1] - 32, result.close, match_rate)
    extracted, matched = greedy_counts(model, windows, 32, result.extracted, decode, batch_size)
    return extracted, matched, result


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` runs, and the last result."""
    times, out = [], None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), out


def bench_set(name: str, model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
              repeats: int) -> dict:
    """Both ways on one set of windows; seconds, ratios and agreement."""
    from selftrain.probes.windows import needs_decoding

    suffix = windows.shape[1] - 32
    before_s, (matched_old, logprob_old) = best_time(
        lambda: old_way(model, windows, batch_size), repeats)
    after_s, (extracted, matched_new, forced) = best_time(
        lambda: one_pass(model, windows, batch_size, True), repeats)
    only_s, _ = best_time(lambda: one_pass(model, windows, batch_size, False), repeats)
    return {
        "set": name, "rows": len(windows),
        "memorized": int((extracted == suffix).sum()),
        "decoded_rows": int(needs_decoding(forced.extracted, suffix, forced.close).sum()),
        "near_tie_rows": int(forced.close.sum()),
        "before_s": before_s, "after_s": after_s, "after_no_match_rate_s": only_s,
        "ratio": before_s / after_s, "ratio_no_match_rate": before_s / only_s,
        "same_memorized": bool(torch.equal(extracted == suffix, matched_old == suffix)),
        "same_matched_tokens": bool(torch.equal(matched_new, matched_old)),
        "max_logprob_diff": float((forced.logprobs - logprob_old).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    from selftrain.models import load_model, load_tokenizer
    from selftrain.probes.probeset import candidate_windows
    from selftrain.probes.windows import greedy_continuations

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    found = candidate_windows(["code={stdlib}/*.py"], tokenizer, 64, 32, args.rows, seed=0)
    stdlib = torch.tensor([w["input_ids"] for w in found[: args.rows]])
    device = resolve_device(args.device)
    model = load_model(args.model).eval().to(device)
    # windows stay on the CPU, as the callbacks hold them; the probes move each batch
    results = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        greedy_continuations(model, stdlib[:2, :32], 2)  # warm-up
        own = torch.cat([stdlib[:, :32], greedy_continuations(model, stdlib[:, :32], 32,
                                                              args.batch_size)], dim=1)
        for name, windows in (("stdlib (not extracted)", stdlib),
                              ("own greedy continuations (extracted)", own)):
            results.append(bench_set(name, model, windows, args.batch_size, args.repeats))
    print(f"probe evaluation, extraction + likelihood ({args.model}, {machine_text(device)}, "
          f"bf16 autocast, batch {args.batch_size}, "
          f"best of {args.repeats})")
    for r in results:
        print(f"  {r['set']}: {r['rows']} rows, {r['memorized']} memorized, "
              f"{r['decoded_rows']} decoded for the match rate, of them "
              f"{r['near_tie_rows']} near-ties (decoded with match_rate off too)")
        print(f"    before (greedy + logprob forward) {r['before_s']:.2f} s")
        print(f"    after  (one pass + greedy for unsettled rows) {r['after_s']:.2f} s, "
              f"ratio {r['ratio']:.2f}x")
        print(f"    after  (one pass, match_rate off) {r['after_no_match_rate_s']:.2f} s, "
              f"ratio {r['ratio_no_match_rate']:.2f}x (goal >= 3)")
        print(f"    same memorized rows {r['same_memorized']}, same matched tokens "
              f"{r['same_matched_tokens']}, max |dlogp| {r['max_logprob_diff']:.2e}")
    print(json.dumps(results))
    write_figures(args.json, {"setup": {"model": args.model, **machine(device),
                                        "batch_size": args.batch_size, "repeats": args.repeats},
                              "results": {r["set"]: r for r in results}})


if __name__ == "__main__":
    main()
