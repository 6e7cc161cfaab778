"""What bf16 costs on this CPU: the check `precision auto` decides by, and a training step.

Two measurements in one process, each the bf16 way against the float32 way of the same work:

1. the check itself (:func:`selftrain.precision.measure_cpu_bf16_slowdown`, a 256 x 256
   matmul), then square matmuls of ``--sizes``: GFLOP/s in both dtypes and their ratio;
2. ``--steps`` training steps of ``--model`` (StudentLM's step: forward with the HF loss,
   backward, AdamW) on batch ``--batch_size`` x ``--seq_len``, under ``torch.autocast`` bf16
   (``--trainer.precision bf16-mixed``) and without it (``32-true``), alternating, best of
   ``--repeats``: tokens/s of each and the ratio.

It ends with what ``auto`` resolves to here. Run it capped to see an AVX2-only CPU on a CPU that
has native bf16 (oneDNN and ATen cap down, never up):

    .venv/bin/python scripts/bench/bench_precision.py                   # embedded SmolLM2-135M
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        .venv/bin/python scripts/bench/bench_precision.py
    .venv/bin/python scripts/bench/bench_precision.py --model tiny:qwen2 --steps 2   # quick
"""

from __future__ import annotations

import argparse
import json
import time

import _common
import torch

from selftrain.models import load_model
from selftrain.precision import bf16_support, measure_cpu_bf16_slowdown, trainer_precision


def matmul_rates(size: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of a ``size`` x ``size`` matmul in float32 and in bf16 (best of ``repeats``)."""
    device = torch.device("cpu")
    return {name: _common.matmul_peak(device, dtype, size, repeats) / 1e9
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
                 precision: str, steps: int) -> float:
    """Seconds per training step at a Lightning ``precision`` (mean of ``steps``, one warm-up)."""
    _common.train_step(model, optimizer, batch, precision)
    start = time.perf_counter()
    for _ in range(steps):
        _common.train_step(model, optimizer, batch, precision)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    capability = torch.backends.cpu.get_cpu_capability()
    result: dict = {"machine": _common.machine(torch.device("cpu")), "capability": capability,
                    "check_slowdown": round(measure_cpu_bf16_slowdown(), 2), "matmul": {}}
    print(f"CPU capability {capability}; {torch.get_num_threads()} threads")
    print(f"the auto check (256 x 256 matmul): bf16 takes {result['check_slowdown']:.1f}x "
          "float32's time")
    for size in args.sizes:
        rates = matmul_rates(size, args.repeats)
        ratio = rates["float32"] / rates["bfloat16"]
        result["matmul"][size] = {**rates, "slowdown": round(ratio, 2)}
        print(f"matmul {size} x {size}: float32 {rates['float32']:.1f} GFLOP/s, bf16 "
              f"{rates['bfloat16']:.2f} GFLOP/s: bf16 takes {ratio:.1f}x float32's time")

    _common.progress(f"loading {args.model}")
    model = load_model(args.model).train()
    optimizer = _common.student_optimizer(model, 1e-5)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    best = {"32-true": float("inf"), "bf16-mixed": float("inf")}
    for _ in range(args.repeats):
        for name in best:
            _common.progress(f"{args.steps} steps in {name}")
            best[name] = min(best[name], step_seconds(model, optimizer, batch, name,
                                                      args.steps))
    tokens = args.batch_size * args.seq_len
    rates = {name: tokens / seconds for name, seconds in best.items()}
    slowdown = rates["32-true"] / rates["bf16-mixed"]
    result["training"] = {"model": args.model, "batch": [args.batch_size, args.seq_len],
                          "tokens_per_sec": {k: round(v, 1) for k, v in rates.items()},
                          "slowdown": round(slowdown, 2)}
    print(f"training {args.model}, batch {args.batch_size} x {args.seq_len}: 32-true "
          f"{rates['32-true']:.0f} tokens/s, bf16-mixed {rates['bf16-mixed']:.0f} tokens/s: "
          f"bf16-mixed takes {slowdown:.1f}x 32-true's time")
    support = bf16_support("cpu")
    result["auto"] = trainer_precision("auto", "cpu")
    state = "native" if support.native else "emulated"
    print(f"precision auto here: {result['auto']} (bf16 {state})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
