"""Padded against packed training steps on the same batches, measured in one run.

The corpus is made up in memory to look like a BOS-sampled one: ``--rows`` rows of random ids
in the student's vocabulary, each starting with its BOS id, whose lengths are a seeded mix of
rows that stopped early on EOS (``--short_fraction``, uniform in ``[--min_len, --max_len)``)
and rows cut at the cap (exactly ``--max_len``). ``LengthGroupedBatchSampler`` (seeded,
shuffled, ``--group_batches`` as ``CorpusDataModule``'s, 1 = no grouping, the most padding)
plans one epoch; its first ``--warmup + --steps`` index lists are the batches, and each is
collated twice over the same indices:

  * padded: ``selftrain.training.batching.pad_collate`` (``B x longest`` with an attention mask);
  * packed: ``selftrain.training.packing.pack_collate`` (``1 x sum(lengths)``, documents kept apart
    by position ids; the model must pass ``packing_support``).

A training step is what ``StudentLM`` does: forward with the HF labels loss
(``use_cache=False``, under ``torch.autocast`` for ``bf16-mixed``), backward, AdamW step
(StudentLM's parameter groups, betas and fused AdamW on CUDA), ``zero_grad(set_to_none=True)``.
Both modes start from the same weights (a copy of the loaded state is restored, and a fresh
optimizer built, before every run) and alternate in the same process over ``--repeats``
rounds (padded, packed, padded, packed, ...): a subprocess per mode is not needed here, since
both modes are the same model code and the alternation spreads any drift of the machine over
both. Batches are collated and moved to the device before the clock starts; each step is
timed alone (CUDA synchronised after it) and warm-up steps are excluded.

Printed: per mode real tokens/s (only real tokens count, padding never does; the same count in
both modes), the real-token fraction of the padded batches, the median step time and the
positions computed per step; the ratio packed / padded in real tokens/s (goal: > 1 where
padding is heavy); the largest per-step loss difference between the modes (the targets are
the same, so only float noise: at the first step, from identical weights, ~1e-3 under bf16
autocast and ~1e-6 in 32-true; later steps drift a little further apart, ~2e-2 after 8 bf16
steps at a loss of ~13).

    python scripts/bench_packing.py                        # CPU: embedded SmolLM2-135M, ~2.5 min
    python scripts/bench_packing.py --group_batches 1      # no length grouping: most padding
    python scripts/bench_packing.py --model shape:qwen2.5-0.5b --batch_size 16 \\
        --max_len 2048 --attn flash_attention_2 --steps 20 # one GPU

With ``sdpa`` / ``eager`` the packed row gets one dense ``sum x sum`` mask, so attention costs
the square of the packed length (selftrain.training.packing); ``flash_attention_2`` computes
only the diagonal blocks.

The defaults (batch 4 x <= 256 tokens, 2 warm-up + 6 measured steps, 2 rounds) are sized for
a 2-core CPU, where the embedded SmolLM2-135M trains only ~200 real tokens/s in bf16-mixed
(~4 s a 1024-token step, faster than 32-true); batch 8 x 256 takes about three times as long.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

PRECISIONS = ("bf16-mixed", "32-true")
MODES = ("padded", "packed")
NOISY_SPREAD = 1.5
"""A step that took this many times longer in one round than in another was disturbed."""


def _progress(message: str) -> None:
    print(f"[bench_packing] {message}", file=sys.stderr, flush=True)


def _device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# data


def make_rows(args) -> tuple[list[dict], dict]:
    """Rows of random ids starting with BOS; lengths a seeded mix of early stops and the cap."""
    import numpy as np

    from selftrain.models import load_tokenizer, pad_token_id, resolve_bos_id

    tokenizer = load_tokenizer(args.model)
    bos_id, bos_source = resolve_bos_id(tokenizer)
    vocab = len(tokenizer)
    rng = np.random.default_rng(args.seed)
    short = rng.random(args.rows) < args.short_fraction
    lengths = np.where(short, rng.integers(args.min_len, args.max_len, size=args.rows),
                       args.max_len)
    rows = []
    for length in lengths:
        ids = rng.integers(0, vocab, size=int(length))
        ids[0] = bos_id
        rows.append({"input_ids": ids.tolist()})
    pad_id = pad_token_id(tokenizer)
    info = {"rows": args.rows, "vocab": vocab, "bos_token_id": bos_id, "bos_source": bos_source,
            "pad_id": pad_id, "short_rows": int(short.sum()),
            "mean_length": float(lengths.mean())}
    return rows, info


def make_batches(args, rows: list[dict], pad_id: int) -> tuple[dict, dict]:
    """The first warm-up + measured index lists of one epoch, collated padded and packed."""
    from selftrain.training.batching import LengthGroupedBatchSampler, pad_collate
    from selftrain.training.packing import pack_collate

    sampler = LengthGroupedBatchSampler([len(row["input_ids"]) for row in rows],
                                        batch_size=args.batch_size, seed=args.seed,
                                        shuffle=True, group_batches=args.group_batches)
    plan = [batch.tolist() for batch in sampler.global_plan(0)]
    total = args.warmup + args.steps
    if len(plan) < total:
        raise SystemExit(f"--rows {args.rows} give {len(plan)} batches of {args.batch_size}, "
                         f"fewer than --warmup + --steps = {total}; raise --rows")
    plan = plan[:total]
    collate = {"padded": partial(pad_collate, pad_id=pad_id), "packed": pack_collate}
    batches = {mode: [collate[mode]([rows[i] for i in indices]) for indices in plan]
               for mode in MODES}
    real = [sum(len(rows[i]["input_ids"]) for i in indices) for indices in plan]
    for mode in MODES:  # the same documents, the same targets (labels shift by one)
        for step, batch in enumerate(batches[mode]):
            assert int((batch["labels"][:, 1:] != -100).sum()) == real[step] - len(plan[step]), mode
    measured = slice(args.warmup, None)
    padded_positions = [batch["input_ids"].numel() for batch in batches["padded"]]
    info = {"real_tokens": real,
            "padded_positions": padded_positions,
            "packed_positions": [batch["input_ids"].numel() for batch in batches["packed"]],
            "padded_shapes": [list(batch["input_ids"].shape) for batch in batches["padded"]],
            "real_token_fraction": sum(real[measured]) / sum(padded_positions[measured]),
            "epoch_real_token_fraction": sampler.real_token_fraction(0),
            "epoch_batches": len(sampler)}
    return batches, info


# --------------------------------------------------------------------------------------------
# training


def load_student(args, device: torch.device):
    """The student on the device in train mode, after checking it can train packed rows."""
    from selftrain.models import load_model
    from selftrain.training.packing import packing_support

    model = load_model(args.model, attn_implementation=args.attn)
    supported, reason = packing_support(model)
    if not supported:
        raise SystemExit(f"packing is not supported here: {reason}")
    model.to(device)
    model.train()
    return model, reason


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    """StudentLM.configure_optimizers: AdamW, weight decay on matrices only, default betas."""
    from selftrain.training import module as student

    defaults = inspect.signature(student.StudentLM).parameters
    groups = student.param_groups(model, defaults["weight_decay"].default)
    on_cuda = next(model.parameters()).is_cuda  # fused there, as the student is (no clipping)
    return student.build_optimizer("adamw", groups, lr=args.lr,
                                   betas=tuple(defaults["betas"].default), fused=on_cuda)


def run_mode(args, mode: str, model, initial: dict, batches: list[dict], real: list[int],
             device: torch.device, round_: int) -> dict:
    """Train on every batch from the initial weights; per-step times, losses and tokens/s."""
    model.load_state_dict(initial)
    optimizer = build_optimizer(args, model)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    mixed = args.precision.endswith("-mixed")
    times: list[float] = []
    losses: list[float] = []
    total = len(batches)
    for step, batch in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.detach().float().item())
        tag = "warm-up" if step < args.warmup else "step"
        _progress(f"round {round_ + 1} {mode} {tag} {step + 1}/{total}: {times[-1]:.3f} s, "
                  f"{real[step]} real tokens in {batch['input_ids'].numel()} positions")
    window = times[args.warmup:]
    tokens = sum(real[args.warmup:])
    result = {"mode": mode, "round": round_, "real_tokens_per_sec": tokens / sum(window),
              "median_step_s": statistics.median(window), "seconds": sum(window),
              "real_tokens": tokens, "step_s": times, "losses": losses}
    if device.type == "cuda":
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    del optimizer
    return result


# --------------------------------------------------------------------------------------------
# report


def report(args, device: torch.device, data_info: dict, batch_info: dict, reason: str,
           runs: dict[str, list[dict]], wall_s: float) -> dict:
    measured = slice(args.warmup, None)
    real_per_step = statistics.mean(batch_info["real_tokens"][measured])
    summary: dict[str, dict] = {}
    for mode in MODES:
        results = runs[mode]
        tokens = sum(r["real_tokens"] for r in results)
        positions = statistics.mean(batch_info[f"{mode}_positions"][measured])
        summary[mode] = {
            "real_tokens_per_sec": tokens / sum(r["seconds"] for r in results),
            "runs": [r["real_tokens_per_sec"] for r in results],
            "median_step_s": statistics.median(s for r in results for s in r["step_s"][measured]),
            "positions_per_step": positions,
            "real_token_fraction": real_per_step / positions,
            # the same step (same batch) across rounds: the batches differ in size, the
            # rounds should not
            "round_spread": max(max(s) / min(s) for s in zip(
                *(r["step_s"][measured] for r in results), strict=True))}
        if device.type == "cuda":
            summary[mode]["cuda_max_allocated_mib"] = max(r["cuda_max_allocated_mib"]
                                                          for r in results)
    ratio = summary["packed"]["real_tokens_per_sec"] / summary["padded"]["real_tokens_per_sec"]
    median_step_ratio = summary["padded"]["median_step_s"] / summary["packed"]["median_step_s"]
    paired = [packed["real_tokens_per_sec"] / padded["real_tokens_per_sec"]
              for padded, packed in zip(runs["padded"], runs["packed"], strict=True)]
    loss_diff = max(abs(a - b) for padded, packed in zip(runs["padded"], runs["packed"],
                                                         strict=True)
                    for a, b in zip(padded["losses"], packed["losses"], strict=True))
    first_diff = max(abs(padded["losses"][0] - packed["losses"][0])
                     for padded, packed in zip(runs["padded"], runs["packed"], strict=True))
    noisy = max(row["round_spread"] for row in summary.values()) > NOISY_SPREAD
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    setup = {"model": args.model, "device": device.type, "device_name": name,
             "threads": torch.get_num_threads(), "precision": args.precision,
             "attn": args.attn, "batch_size": args.batch_size, "max_len": args.max_len,
             "min_len": args.min_len, "short_fraction": args.short_fraction,
             "rows": args.rows, "group_batches": args.group_batches, "seed": args.seed,
             "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
             "lr": args.lr, "vocab": data_info["vocab"], "packing_support": reason}
    print(f"bench_packing: {args.model} on {name} ({device.type}, {torch.get_num_threads()} "
          f"threads), batch {args.batch_size} rows of <= {args.max_len} tokens, "
          f"{args.precision}, attn {args.attn}, group_batches {args.group_batches}, "
          f"{args.warmup} warm-up + {args.steps} measured steps, {args.repeats} rounds")
    print(f"corpus: {args.rows} rows, {args.short_fraction:.0%} stopped early (uniform in "
          f"[{args.min_len}, {args.max_len})), mean length {data_info['mean_length']:.1f}; "
          f"padded real-token fraction {batch_info['real_token_fraction']:.3f} over the "
          f"measured batches ({batch_info['epoch_real_token_fraction']:.3f} over the epoch's "
          f"{batch_info['epoch_batches']} batches); measured padded shapes "
          f"{', '.join('x'.join(map(str, s)) for s in batch_info['padded_shapes'][measured])}")
    cuda = device.type == "cuda"
    print(f"{'mode':<8} {'real tok/s':>10} {'per round':<20} {'median step s':>13} "
          f"{'positions/step':>14} {'real frac':>9}"
          + (f" {'CUDA alloc MiB':>14}" if cuda else "") + f" {'round max/min':>13}")
    for mode in MODES:
        row = summary[mode]
        runs_text = ", ".join(f"{rate:.1f}" for rate in row["runs"])
        line = (f"{mode:<8} {row['real_tokens_per_sec']:>10.1f} {runs_text:<20} "
                f"{row['median_step_s']:>13.3f} {row['positions_per_step']:>14.1f} "
                f"{row['real_token_fraction']:>9.3f}")
        if cuda:
            line += f" {row['cuda_max_allocated_mib']:>14,.0f}"
        print(line + f" {row['round_spread']:>13.2f}")
    print(f"ratio packed / padded = {ratio:.3f} real tokens/s (paired rounds: "
          f"{', '.join(f'{r:.3f}' for r in paired)}; median step: {median_step_ratio:.3f})")
    print(f"per-step losses of the two modes differ by at most {loss_diff:.2e} ({first_diff:.2e} "
          "at the first step, from identical weights; same documents and targets: float noise "
          "only)")
    if noisy:
        print(f"WARNING: a step took over {NOISY_SPREAD}x longer in one round than in another "
              "(same mode, same batch): other load on the machine; rerun when it is idle")
    print(f"wall time {wall_s:.0f} s")
    result = {"setup": setup, "modes": summary, "ratio": ratio, "paired_ratios": paired,
              "median_step_ratio": median_step_ratio, "loss_max_abs_diff": loss_diff,
              "first_step_loss_abs_diff": first_diff,
              "padded_real_token_fraction": batch_info["real_token_fraction"],
              "epoch_real_token_fraction": batch_info["epoch_real_token_fraction"],
              "noisy": noisy, "wall_s": wall_s}
    print(json.dumps(result))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m",
                        help="student spec (hub id, local dir, embedded:, tiny:, shape:)")
    parser.add_argument("--attn", default="sdpa",
                        choices=("sdpa", "eager", "flash_attention_2"))
    parser.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--batch_size", type=int, default=4, help="rows per step")
    parser.add_argument("--max_len", type=int, default=256,
                        help="length cap in tokens, BOS incl.; cut rows have exactly this")
    parser.add_argument("--min_len", type=int, default=16, help="shortest early-stopped row")
    parser.add_argument("--short_fraction", type=float, default=0.4,
                        help="share of rows that stop early, uniform in [min_len, max_len)")
    parser.add_argument("--rows", type=int, default=2048, help="corpus rows")
    parser.add_argument("--group_batches", type=int, default=64,
                        help="batches per length-sorted group (CorpusDataModule's default 64; "
                             "1 = no grouping, the most padding; 0 sorts the epoch)")
    parser.add_argument("--seed", type=int, default=0, help="corpus and batch-order seed")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from timing")
    parser.add_argument("--steps", type=int, default=6, help="measured steps")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of padded, packed")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup must be >= 0, --steps and --repeats >= 1")
    if not 2 <= args.min_len < args.max_len:
        parser.error("need 2 <= --min_len < --max_len")
    if not 0.0 <= args.short_fraction <= 1.0:
        parser.error("--short_fraction must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = _device(args)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    start = time.perf_counter()
    rows, data_info = make_rows(args)
    batches, batch_info = make_batches(args, rows, data_info["pad_id"])
    _progress(f"corpus: {args.rows} rows (vocab {data_info['vocab']}, BOS "
              f"{data_info['bos_token_id']}); padded real-token fraction "
              f"{batch_info['real_token_fraction']:.3f} over the measured batches")
    model, reason = load_student(args, device)
    _progress(f"packing support: {reason}")
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    batches = {mode: [{key: value.to(device) for key, value in batch.items()}
                      for batch in batches[mode]] for mode in MODES}
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_ in range(args.repeats):
        for mode in MODES:
            _progress(f"round {round_ + 1}/{args.repeats}: {mode}")
            runs[mode].append(run_mode(args, mode, model, initial, batches[mode],
                                       batch_info["real_tokens"], device, round_))
    result = report(args, device, data_info, batch_info, reason, runs,
                    time.perf_counter() - start)
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "batches": batch_info, "runs": runs},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
