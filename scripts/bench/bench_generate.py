"""Sampling speed of `selftrain generate`, measured against the plain ways in one process.

Same model, dtype, batch size, temperature and length cap for all three:
  * sampler: :class:`selftrain.decoding.sampler.BosSampler` (KV cache written in place,
    finished rows refilled or dropped, per-sample seeds);
  * plain: ``model.generate(do_sample=True, ...)`` over the same number of sequences, the way a
    user would write it;
  * forward: one teacher-forced forward pass over as many tokens (the compute ceiling of
    decoding: same matmuls, no step-by-step latency).

Tokens count what a corpus keeps: each sequence up to and including its EOS.

    python scripts/bench/bench_generate.py            # embedded SmolLM2-135M, bf16, batch 64
    python scripts/bench/bench_generate.py --model tiny:qwen2 --dtype float32 --batch_size 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import machine, sync, write_figures

from selftrain.decoding.draw import draw_tokens, draw_workspace
from selftrain.decoding.sampler import BosSampler
from selftrain.models import load_model, load_tokenizer, pad_token_id, resolve_bos_id


def useful_tokens(rows: list[list[int]], eos_id: int | None) -> int:
    """Tokens a corpus keeps of ``generate``'s rows: each up to and including its EOS."""
    return sum(row.index(eos_id) + 1 if eos_id in row else len(row) for row in rows)


def bench_sampler(model, bos_id: int, eos_id: int | None, vocab: int, args,
                  host_every: int | None = None, cuda_graph: bool = False) -> dict:
    sampler = BosSampler(model, bos_id, eos_id, vocab, args.temperature, args.max_new_tokens,
                         args.batch_size, seed=args.seed, host_every=host_every,
                         cuda_graph=cuda_graph)
    start = time.perf_counter()
    samples = list(sampler.sample(range(args.num_samples)))
    sync(sampler.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(s.tokens) for s in samples)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_sec": tokens / seconds,
            "finished": sum(s.finished for s in samples), "steps": sampler.steps,
            "rows_computed": sampler.rows_computed, "host_reads": sampler.host_reads,
            "host_every": sampler.host_every,
            "samples": {s.id: s.tokens for s in samples}}


@torch.inference_mode()
def plain_generate(model, bos_id: int, eos_id: int | None, pad_id: int, args
                   ) -> tuple[list[list[int]], float]:
    """Plain ``model.generate`` from BOS: (the rows after BOS, seconds).

    ``args.num_samples`` rows, ``args.batch_size`` at a time, pure sampling at
    ``args.temperature``.
    """
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    rows: list[list[int]] = []
    for first in range(0, args.num_samples, args.batch_size):
        size = min(args.batch_size, args.num_samples - first)
        prompt = torch.full((size, 1), bos_id, dtype=torch.long, device=model.device)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                             max_new_tokens=args.max_new_tokens, eos_token_id=eos_id,
                             pad_token_id=pad_id)
        rows += out[:, 1:].tolist()
    return rows, time.perf_counter() - start


def bench_plain_generate(model, bos_id: int, eos_id: int | None, pad_id: int, args) -> dict:
    rows, seconds = plain_generate(model, bos_id, eos_id, pad_id, args)
    tokens = useful_tokens(rows, eos_id)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_sec": tokens / seconds}


@torch.inference_mode()
def bench_forward(model, bos_id: int, vocab: int, args) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch_size, args.max_new_tokens + 1), generator=generator)
    ids[:, 0] = bos_id
    ids = ids.to(args.device)
    batches = -(-args.num_samples // args.batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        model(input_ids=ids, logits_to_keep=0)
    seconds = time.perf_counter() - start
    tokens = batches * args.batch_size * args.max_new_tokens
    return {"seconds": seconds, "tokens": tokens, "tokens_per_sec": tokens / seconds}


def bench_draw(vocab: int, args, repeats: int = 20) -> dict:
    """ms per draw for [batch, vocab] logits: the sampler's draw vs a flat float64 inverse CDF."""
    generator = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(args.batch_size, vocab, generator=generator).to(
        device=args.device, dtype=getattr(torch, args.dtype))
    uniforms = torch.rand(args.batch_size, dtype=torch.float64, generator=generator)
    workspace = draw_workspace(args.batch_size, vocab, logits.device)

    def flat():
        probs = torch.softmax(logits.float() / args.temperature, dim=-1)
        cdf = probs.double().cumsum(dim=-1)
        target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
        return torch.searchsorted(cdf, target, right=True)

    timings = {}
    for name, draw in (("sampler_draw", lambda: draw_tokens(logits, uniforms, args.temperature,
                                                            workspace=workspace)),
                       ("flat_float64_draw", flat)):
        draw()
        sync(logits.device)
        start = time.perf_counter()
        for _ in range(repeats):
            draw()
        sync(logits.device)
        timings[name] = 1000 * (time.perf_counter() - start) / repeats
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_samples", type=int, default=None,
                        help="sequences per method (default: one batch)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host_every", type=int, nargs="*", default=None,
                        help="sampler arms, one per value (default: one at the device's default)")
    parser.add_argument("--cuda_graph", action="store_true",
                        help="one more sampler arm per --host_every value, as a CUDA graph")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    args.num_samples = args.num_samples or args.batch_size

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype).to(args.device).eval()
    bos_id, _ = resolve_bos_id(tokenizer, model.config)
    eos_id = tokenizer.eos_token_id
    pad_id = pad_token_id(tokenizer)
    vocab = len(tokenizer)

    # One short warm-up of each path (allocator, kernels, lazy inits) outside the timings.
    warm = argparse.Namespace(**{**vars(args), "num_samples": 2, "batch_size": 2,
                                 "max_new_tokens": 4})
    bench_sampler(model, bos_id, eos_id, vocab, warm)
    bench_plain_generate(model, bos_id, eos_id, pad_id, warm)
    bench_forward(model, bos_id, vocab, warm)

    arms = {"sampler": (None, False)}
    if args.host_every:
        arms = {f"sampler_k{every}": (every, False) for every in args.host_every}
    if args.cuda_graph and model.device.type != "cuda":
        print(f"--cuda_graph: no arm, the model is on {model.device.type} (CUDA graphs need CUDA)")
    elif args.cuda_graph:
        arms |= {f"sampler_graph_k{every}": (every, True) for every in args.host_every or [None]}
    results = {name: bench_sampler(model, bos_id, eos_id, vocab, args, every, graph)
               for name, (every, graph) in arms.items()}
    samplers = list(results)
    first_samples = results[samplers[0]]["samples"]
    identical = {name: results[name].pop("samples") == first_samples for name in samplers}
    results |= {"plain_generate": bench_plain_generate(model, bos_id, eos_id, pad_id, args),
                "teacher_forced_forward": bench_forward(model, bos_id, vocab, args)}
    draws = bench_draw(vocab, args)
    ratios = {}
    for name in samplers:
        sampler = results[name]["tokens_per_sec"]
        ratios[f"{name}/plain_generate"] = sampler / results["plain_generate"]["tokens_per_sec"]
        ratios[f"{name}/teacher_forced_forward"] = (
            sampler / results["teacher_forced_forward"]["tokens_per_sec"])
    ratios["plain_generate/teacher_forced_forward"] = (
        results["plain_generate"]["tokens_per_sec"]
        / results["teacher_forced_forward"]["tokens_per_sec"])
    setup = {"model": args.model, "dtype": args.dtype, **machine(torch.device(args.device)),
             "device": args.device, "batch_size": args.batch_size,
             "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
             "temperature": args.temperature}
    print(f"setup: {json.dumps(setup)}")
    for name, figures in results.items():
        extra = "".join(f"  {key} {value}" for key, value in figures.items()
                        if key in ("finished", "steps", "rows_computed", "host_reads"))
        print(f"{name:<24} {figures['tokens_per_sec']:8.1f} tokens/s  "
              f"({figures['tokens']} tokens in {figures['seconds']:.1f} s){extra}")
    for name, value in ratios.items():
        print(f"ratio {name:<38} {value:.2f}")
    print("samples identical to " + samplers[0] + "'s: "
          + ", ".join(f"{name} {same}" for name, same in identical.items()))
    print(f"draw of {args.batch_size} x {vocab} logits: sampler {draws['sampler_draw']:.1f} ms, "
          f"flat float64 cumsum {draws['flat_float64_draw']:.1f} ms, ratio "
          f"{draws['flat_float64_draw'] / draws['sampler_draw']:.2f}")
    write_figures(args.json, {"setup": setup, "results": results, "ratios": ratios,
                              "identical_samples": identical, "draw_ms": draws})


if __name__ == "__main__":
    main()
