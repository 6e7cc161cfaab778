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

    python scripts/bench/bench_packing.py                    # CPU: embedded SmolLM2-135M, ~2.5 min
    python scripts/bench/bench_packing.py --group_batches 1  # no length grouping: most padding
    python scripts/bench/bench_packing.py --model shape:qwen2.5-0.5b --batch_size 16 \\
        --max_len 2048 --attn flash_attention_2 --steps 20   # one GPU

With ``sdpa`` / ``eager`` the packed row gets one dense ``sum x sum`` mask, so attention costs
the square of the packed length (selftrain.training.packing); ``flash_attention_2`` computes
only the diagonal blocks.

The defaults (batch 4 x <= 256 tokens, 2 warm-up + 6 measured steps, 2 rounds) are sized for
a 2-core CPU, where the embedded SmolLM2-135M trains only ~200 real tokens/s in bf16-mixed
(~4 s a 1024-token step, faster than 32-true); batch 8 x 256 takes about three times as long.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import _common as common
import torch

PRECISIONS = ("bf16-mixed", "32-true")
MODES = ("padded", "packed")
NOISY_SPREAD = 1.5
"""A step that took this many times longer in one round than in another was disturbed."""


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


def run_mode(args, mode: str, model, initial: dict, batches: list[dict], real: list[int],
             device: torch.device, round_: int) -> dict:
    """Train on every batch from the initial weights; per-step times, losses and tokens/s."""
    model.load_state_dict(initial)
    optimizer = common.student_optimizer(model, args.lr)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    losses: list[float] = []
    total = len(batches)
    for step, batch in enumerate(batches):
        common.sync(device)
        start = time.perf_counter()
        loss = common.train_step(model, optimizer, batch, args.precision)
        common.sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.detach().float().item())
        tag = "warm-up" if step < args.warmup else "step"
        common.progress(f"round {round_ + 1} {mode} {tag} {step + 1}/{total}: "
                        f"{times[-1]:.3f} s, {real[step]} real tokens in "
                        f"{batch['input_ids'].numel()} positions")
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
            "round_spread": max(common.spread(s) for s in zip(
                *(r["step_s"][measured] for r in results), strict=True))}
        if device.type == "cuda":
            summary[mode]["cuda_max_allocated_mib"] = max(r["cuda_max_allocated_mib"]
                                                          for r in results)
    ratio = summary["packed"]["real_tokens_per_sec"] / summary["padded"]["real_tokens_per_sec"]
    median_step_ratio = summary["padded"]["median_step_s"] / summary["packed"]["median_step_s"]
    paired = common.paired_ratios(runs["padded"], runs["packed"],
                                  lambda run: run["real_tokens_per_sec"])
    losses = common.loss_diff(runs["padded"], runs["packed"])
    first_diff = common.loss_diff(runs["padded"], runs["packed"], slice(0, 1))
    noisy = max(row["round_spread"] for row in summary.values()) > NOISY_SPREAD
    setup = {"model": args.model, **common.machine(device),
             **{key: getattr(args, key) for key in (
                 "precision", "attn", "batch_size", "max_len", "min_len", "short_fraction",
                 "rows", "group_batches", "seed", "warmup", "steps", "repeats", "lr")},
             "vocab": data_info["vocab"], "packing_support": reason}
    print(f"bench_packing: {args.model} on {common.machine_text(device)}, batch "
          f"{args.batch_size} rows of <= {args.max_len} tokens, {args.precision}, attn "
          f"{args.attn}, group_batches {args.group_batches}, {args.warmup} warm-up + "
          f"{args.steps} measured steps, {args.repeats} rounds")
    print(f"corpus: {args.rows} rows, {args.short_fraction:.0%} stopped early (uniform in "
          f"[{args.min_len}, {args.max_len})), mean length {data_info['mean_length']:.1f}; "
          f"padded real-token fraction {batch_info['real_token_fraction']:.3f} over the "
          f"measured batches ({batch_info['epoch_real_token_fraction']:.3f} over the epoch's "
          f"{batch_info['epoch_batches']} batches); measured padded shapes "
          f"{', '.join('x'.join(map(str, s)) for s in batch_info['padded_shapes'][measured])}")
    columns = [("real tok/s", ">10.1f", "real_tokens_per_sec"),
               ("per round", "<20", lambda row: common.rounds_text(row["runs"])),
               ("median step s", ">13.3f", "median_step_s"),
               ("positions/step", ">14.1f", "positions_per_step"),
               ("real frac", ">9.3f", "real_token_fraction")]
    if device.type == "cuda":
        columns.append(("CUDA alloc MiB", ">14", common.mib_cell("cuda_max_allocated_mib")))
    columns.append(("round max/min", ">13.2f", "round_spread"))
    common.print_table(("mode", "<8"), columns, summary)
    print(common.ratio_text("packed / padded", ratio, "real tokens/s", paired,
                            median_step_ratio))
    print(f"per-step losses of the two modes differ by at most {losses:.2e} ({first_diff:.2e} "
          "at the first step, from identical weights; same documents and targets: float noise "
          "only)")
    result = {"setup": setup, "modes": summary, "ratio": ratio, "paired_ratios": paired,
              "median_step_ratio": median_step_ratio, "loss_max_abs_diff": losses,
              "first_step_loss_abs_diff": first_diff,
              "padded_real_token_fraction": batch_info["real_token_fraction"],
              "epoch_real_token_fraction": batch_info["epoch_real_token_fraction"],
              "noisy": noisy, "wall_s": wall_s}
    return common.close_report(result, f"a step took over {NOISY_SPREAD}x longer in one round "
                               "than in another (same mode, same batch): other load on the "
                               "machine; rerun when it is idle")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.training_parser(__doc__, PRECISIONS, "padded, packed", warmup=2, steps=6,
                                    repeats=2)
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
    device = common.resolve_device(args.device)
    start = time.perf_counter()
    rows, data_info = make_rows(args)
    batches, batch_info = make_batches(args, rows, data_info["pad_id"])
    common.progress(f"corpus: {args.rows} rows (vocab {data_info['vocab']}, BOS "
                    f"{data_info['bos_token_id']}); padded real-token fraction "
                    f"{batch_info['real_token_fraction']:.3f} over the measured batches")
    model, reason = load_student(args, device)
    common.progress(f"packing support: {reason}")
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    batches = {mode: [{key: value.to(device) for key, value in batch.items()}
                      for batch in batches[mode]] for mode in MODES}
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_ in range(args.repeats):
        for mode in MODES:
            common.progress(f"round {round_ + 1}/{args.repeats}: {mode}")
            runs[mode].append(run_mode(args, mode, model, initial, batches[mode],
                                       batch_info["real_tokens"], device, round_))
    result = report(args, device, data_info, batch_info, reason, runs,
                    time.perf_counter() - start)
    common.write_figures(args.json, {**result, "batches": batch_info, "runs": runs})


if __name__ == "__main__":
    main()
