"""lm-eval generation speed: HFLM's ``generate_until`` against FastHFLM's, in one process.

Same model, requests, batch size and bf16 autocast for both:
  * hflm: ``lm_eval.models.huggingface.HFLM.generate_until`` (left-padded batches, each run
    until its longest row stops);
  * fast: :class:`selftrain.probes.fast_generation.FastHFLM` (prompts prefilled a batch at a
    time, a shared few-shot block once, finished rows replaced at once by
    :class:`~selftrain.decoding.prompted.PromptedDecoder`).

The requests are GSM8K-shaped, built here from templates (no download): worked few-shot
examples with multi-line answers (``--shots varied``: 1-5 of each prompt's own; ``shared``: one
fixed 5-shot block), a new question, greedy, ``until`` = ["\\n\\n", "Question:"].
Answer tokens are the returned continuations re-encoded; the share of identical answers says
how often the two paths agree string for string (bf16 rounding may move a near-tie).
The two alternate over ``--rounds`` rounds in the process; the figures are the medians, the
ratio the median of the paired per-round ratios (the answers must not change between rounds).

    python scripts/bench/bench_eval_generation.py                # 32 requests, batch 8
    python scripts/bench/bench_eval_generation.py --requests 16 --max_gen_toks 32
    python scripts/bench/bench_eval_generation.py --shots shared --max_gen_toks 256
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import statistics
import time

import torch
from _common import machine, progress, resolve_device, write_figures

from selftrain.models import load_model, load_tokenizer

NAMES = ["Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
ITEMS = ["apples", "stamps", "marbles", "books", "coins", "pencils", "shells", "cards"]


def _problem(rng: random.Random) -> tuple[str, str]:
    """One GSM8K-shaped question and its worked, multi-line answer."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(3, 40), rng.randint(2, 9), rng.randint(1, 20)
    question = (f"{name} has {a} {item}. {name} buys {b} packs of {item} with {c} {item} in "
                f"each pack, then gives away half of the packs' {item} to a friend. How many "
                f"{item} does {name} have now?")
    bought = b * c
    answer = (f"{name} buys {b} * {c} = {bought} {item}.\nHalf of them is {bought} / 2 = "
              f"{bought / 2:g}.\nSo {name} has {a} + {bought / 2:g} = {a + bought / 2:g} "
              f"{item}.\n#### {a + bought / 2:g}")
    return question, answer


def requests(count: int, max_gen_toks: int, seed: int, shared_shots: bool = False) -> list:
    """``count`` lm-eval generate_until Instances.

    Varied: each has its own 1-5 shots (prompts of varied length), as lm-eval's gsm8k samples
    shots per document. Shared: all start with the same 5 shots, as a task whose few-shot
    prompt is fixed (minerva_math's ``first_n``, the gsm8k CoT variants).
    """
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    fixed = [_problem(rng) for _ in range(5)]
    made = []
    for i in range(count):
        shots = fixed if shared_shots else [_problem(rng) for _ in range(1 + i % 5)]
        question, _ = _problem(rng)
        context = "\n\n".join([*(f"Question: {q}\nAnswer: {a}" for q, a in shots),
                               f"Question: {question}\nAnswer:"])
        kwargs = {"until": ["\n\n", "Question:"], "max_gen_toks": max_gen_toks,
                  "do_sample": False, "temperature": 0.0}
        made.append(Instance("generate_until", {}, (context, kwargs), i))
    return made


def timed(lm, batch: list) -> tuple[list[str], float]:
    start = time.perf_counter()
    answers = lm.generate_until(batch, disable_tqdm=True)
    return answers, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max_gen_toks", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--autocast", default="bfloat16", help="HFLM mixed_precision_dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", choices=["varied", "shared"], default="varied",
                        help="each prompt's own 1-5 shots, or one fixed 5-shot block for all")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    from lm_eval.models.huggingface import HFLM

    from selftrain.probes.fast_generation import FastHFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval().to(resolve_device(args.device))
    dtype = getattr(torch, args.autocast) if args.autocast != "none" else None
    lms = {name: cls(pretrained=model, tokenizer=copy.deepcopy(tokenizer),
                     batch_size=args.batch_size, mixed_precision_dtype=dtype)
           for name, cls in (("hflm", HFLM), ("fast", FastHFLM))}
    work = requests(args.requests, args.max_gen_toks, args.seed, args.shots == "shared")
    prompt_tokens = [len(tokenizer.encode(r.args[0])) for r in work]
    for lm in lms.values():  # warm-up: kernels, allocator, lazy inits
        timed(lm, requests(2, 4, args.seed + 1))

    rounds: dict[str, list[float]] = {name: [] for name in lms}
    answers: dict[str, list[str]] = {}
    for round_ in range(args.rounds):  # alternating, so drifts of the machine hit both
        for name, lm in lms.items():
            progress(f"round {round_ + 1}/{args.rounds}, {name}: {len(work)} requests")
            got, seconds = timed(lm, work)
            if answers.setdefault(name, got) != got:
                raise SystemExit(f"{name} answered differently in round {round_ + 1}")
            rounds[name].append(seconds)
    results = {}
    for name in lms:
        seconds = statistics.median(rounds[name])
        tokens = sum(len(tokenizer.encode(a, add_special_tokens=False)) for a in answers[name])
        results[name] = {"seconds": seconds, "rounds_s": rounds[name], "answer_tokens": tokens,
                         "answer_tokens_per_sec": tokens / seconds,
                         "problems_per_sec": len(work) / seconds}
    results["fast"]["fast_requests"] = lms["fast"].fast_requests
    identical = sum(a == b for a, b in zip(answers["hflm"], answers["fast"], strict=True))
    paired = [h / f for h, f in zip(rounds["hflm"], rounds["fast"], strict=True)]
    ratio = statistics.median(paired)
    setup = {"model": args.model, "autocast": args.autocast, "shots": args.shots,
             **machine(model.device),
             "batch_size": args.batch_size, "requests": len(work),
             "max_gen_toks": args.max_gen_toks, "prompt_tokens_min": min(prompt_tokens),
             "prompt_tokens_max": max(prompt_tokens)}
    print(f"setup: {json.dumps(setup)}")
    for name, figures in results.items():
        print(f"{name:<5} {figures['answer_tokens_per_sec']:7.1f} answer tokens/s  "
              f"{figures['problems_per_sec']:6.2f} problems/s  ({figures['answer_tokens']} "
              f"tokens in {figures['seconds']:.1f} s)")
    print(f"ratio fast/hflm (problems/s, median of {args.rounds} paired rounds) {ratio:.2f}; "
          f"per round {', '.join(f'{r:.2f}' for r in paired)}")
    print(f"identical answers {identical}/{len(work)} ({identical / len(work):.0%})")
    for i, (a, b) in enumerate(zip(answers["hflm"], answers["fast"], strict=True)):
        if a != b:
            print(f"  request {i} ({prompt_tokens[i]} prompt tokens): hflm {a[:60]!r} fast "
                  f"{b[:60]!r}")
    write_figures(args.json, {"setup": setup, "results": results, "ratio": ratio,
                              "paired_ratios": paired,
                              "identical": identical / len(work)})


if __name__ == "__main__":
    main()
