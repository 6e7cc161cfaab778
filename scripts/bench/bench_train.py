"""Training speed of `selftrain fit` against a hand-written PyTorch loop, measured in one run.

Two arms train the same model on the same batches, in the same order, at the same precision:
  * lightning: the real thing, ``lightning.Trainer`` + ``StudentLM`` + ``CorpusDataModule``,
    with the TensorBoard logger ``selftrain fit`` writes (every ``--log_every_n_steps``) and its
    layout callback; checkpointing and the progress bar off;
  * plain: ``load_model`` + AdamW with StudentLM's parameter groups, betas and learning rate,
    and a loop of forward (HF labels loss, under ``torch.autocast`` for ``*-mixed``), backward,
    ``optimizer.step()``, ``zero_grad()`` over ``CorpusDataModule.train_dataloader()`` (so the
    batches are the same tensors in the same order). ``--compile`` compiles each decoder layer
    in both arms, as ``StudentLM(compile=True)`` does.

Each arm runs in its own fresh subprocess (``--arm plain|lightning`` prints one JSON line), the
arms alternate over ``--repeats`` rounds, and each reports tokens/s end to end between the end
of the last warm-up step and the end of the last step (data loading, forward, backward,
optimizer step, logging; CUDA is synchronised at both ends) and its peak memory (peak RSS on
CPU; ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` on CUDA). The parent writes
one bench corpus first: fixed-length rows of random ids from the student's tokenizer, each
starting with its BOS id, so there is no padding and both arms see identical tensors (a
``shape:`` student draws ids below its tiny tokenizer's size; every matmul is still full size).

Printed: per-arm median tokens/s over the rounds (and from the median step, which a burst of
other load on the machine barely moves), the ratio lightning / plain (goal >= 0.95), the
per-step losses of both arms (they should agree: same weights, data and optimizer), and model
FLOPs utilisation, 6 x trainable parameters x tokens/s over a matmul peak measured in every
arm's process (a square matmul in bf16 for ``bf16-*``, fp32 for ``32-true``; the best is used).
On a shared 2-core CPU one process in a few is disturbed; the median of 3 rounds absorbs one.

    python scripts/bench/bench_train.py                    # CPU: embedded SmolLM2-135M, ~3.5 min
    python scripts/bench/bench_train.py --model shape:qwen2.5-0.5b --batch_size 8 \\
        --seq_len 2048 --precision bf16-mixed --strategy fsdp  # one GPU (--devices 8: a node)

With ``--devices N > 1`` only the lightning arm is distributed (rank 0 reports; tokens/s counts
all ranks); the plain arm stays on one device, and the ratio compares per-device throughput.

``--loss_chunk N`` trains both arms with the chunked loss (``--model.loss_chunk N``, its torch
path). ``--find_max_batch`` (CUDA) measures instead the largest batch that trains with each
loss: from ``--batch_size`` it doubles the batch, two plain-loop steps a try, each try in a
fresh process, until CUDA runs out of memory (or ``--max_batch``), for transformers' loss,
the chunked one (``--loss_chunk``, 1024 unless given) and Liger's where it is installed:

    python scripts/bench/bench_train.py --model shape:qwen2.5-0.5b --seq_len 512 \\
        --precision bf16-mixed --find_max_batch

The arms' code is in ``_train_arms.py``; what this bench shares with ``bench_packing`` (the
plain training step, the matmul peak, the flags, the table) is in ``_common.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common as common
import torch
from _train_arms import PROBE_LOSSES, run_lightning, run_plain, run_probe

PRECISIONS = ("bf16-mixed", "32-true", "bf16-true")
"""Precisions both arms can reproduce (16-mixed would need a GradScaler in the plain arm)."""
ARMS = ("plain", "lightning")
UNCHECKED = "unchecked"
"""With ``--finite_check_cost``: the lightning arm without StudentLM's per-step finite-loss
check (a host synchronisation), so the check's cost is measured in the same run."""
TARGET_RATIO = 0.95
NOISY_SPREAD = 1.5
"""A run whose slowest measured step is this many times its fastest was disturbed."""


def write_corpus(args, out: Path) -> dict:
    """Fixed-length rows of random ids in the student's tokenizer, each starting with BOS."""
    import numpy as np

    from selftrain.corpus import CorpusWriter
    from selftrain.models import load_tokenizer, resolve_bos_id, tokenizer_fingerprint

    tokenizer = load_tokenizer(args.model)
    bos_id, bos_source = resolve_bos_id(tokenizer)
    vocab = len(tokenizer)
    rows = (args.warmup + args.steps) * args.batch_size * args.devices
    ids = np.random.default_rng(0).integers(0, vocab, size=(rows, args.seq_len), dtype=np.int64)
    ids[:, 0] = bos_id
    with CorpusWriter(out) as writer:
        writer.add({"id": i, "text": "", "input_ids": row.tolist(), "num_tokens": args.seq_len,
                    "finished": False, "subset": 0, "source": "bench_train"}
                   for i, row in enumerate(ids))
        writer.finish({"kind": "bench", "source_model": args.model,
                       "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer)},
                       "bos_token_id": bos_id, "bos_source": bos_source})
    return {"rows": rows, "vocab": vocab, "bos_token_id": bos_id}


def run_arm(arm: str, args, corpus: Path | None, workdir: Path) -> dict:
    """One arm in a fresh process; its last JSON line on stdout."""
    command = [sys.executable, str(Path(__file__).resolve()), "--arm", arm,
               "--corpus", str(corpus), "--workdir", str(workdir)]
    for key, value in vars(args).items():
        if key in ("arm", "corpus", "workdir", "repeats", "json", "finite_check_cost",
                   "find_max_batch", "max_batch") or value is None:
            continue
        if isinstance(value, bool):
            command += [f"--{key}"] if value else []
        else:
            command += [f"--{key}", str(value)]
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.stdout.write(done.stdout)
        raise SystemExit(f"the {arm} arm failed (exit {done.returncode}): {' '.join(command)}")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            result["process_s"] = time.perf_counter() - start
            return result
    raise SystemExit(f"the {arm} arm printed no result line")


MEMORY = ("peak_rss_mib", "cuda_max_allocated_mib", "cuda_max_reserved_mib")


def summarise(results: list[dict], flops_per_token: float, peak: float) -> dict:
    """One arm over the rounds: median tokens/s (also from the median step), MFU, peaks."""
    rates = [r["tokens_per_sec"] for r in results]
    median = statistics.median(rates)
    world = results[0]["world_size"]
    return {"tokens_per_sec": median, "runs": rates,
            "median_step_tokens_per_sec": statistics.median(
                r["median_step_tokens_per_sec"] for r in results),
            "world_size": world,
            "mfu": flops_per_token * median / (peak * world),
            "achieved_flops": flops_per_token * median,
            **{key: max(r.get(key, 0.0) for r in results) for key in MEMORY if key in results[0]},
            "setup_s": statistics.median(r["setup_s"] for r in results),
            "step_spread": max(r["step_spread"] for r in results)}


def report(args, device: torch.device, corpus_info: dict, runs: dict[str, list[dict]],
           wall_s: float) -> dict:
    peak = max(run["peak_flops"] for arm in runs.values() for run in arm)
    trainable = runs["plain"][0]["trainable_params"]
    flops_per_token = 6 * trainable
    summary = {arm: summarise(results, flops_per_token, peak) for arm, results in runs.items()}

    def per_device(row: dict, key: str = "tokens_per_sec") -> float:
        return row[key] / row["world_size"]

    ratio = per_device(summary["lightning"]) / per_device(summary["plain"])
    median_step_ratio = (per_device(summary["lightning"], "median_step_tokens_per_sec")
                         / per_device(summary["plain"], "median_step_tokens_per_sec"))
    paired = common.paired_ratios(runs["plain"], runs["lightning"], per_device)
    noisy = max(row["step_spread"] for row in summary.values()) > NOISY_SPREAD
    # with several devices rank 0 trains on every world-th batch, the plain arm on all of them
    single = summary["lightning"]["world_size"] == 1
    losses = common.loss_diff(runs["plain"], runs["lightning"]) if single else None
    setup = {"model": args.model, **common.machine(device),
             **{key: getattr(args, key) for key in (
                 "devices", "strategy", "precision", "attn", "compile", "gradient_checkpointing",
                 "batch_size", "seq_len", "warmup", "steps", "repeats", "lr",
                 "log_every_n_steps", "loss_chunk")},
             "vocab": corpus_info["vocab"], "trainable_params": trainable}
    print(f"bench_train: {args.model} on {common.machine_text(device)}, batch "
          f"{args.batch_size} x {args.seq_len} tokens, {args.precision}, strategy "
          f"{args.strategy} x {args.devices}, attn {args.attn}, {args.warmup} warm-up + "
          f"{args.steps} measured steps, {args.repeats} rounds"
          + (f", loss chunk {args.loss_chunk}" if args.loss_chunk else ""))
    columns = [("tokens/s", ">9.1f", "tokens_per_sec"),
               ("per round", "<20", lambda row: common.rounds_text(row["runs"])),
               ("median step", ">11.1f", "median_step_tokens_per_sec"), ("MFU", ">7.2%", "mfu"),
               ("peak RSS MiB", ">12", common.mib_cell("peak_rss_mib"))]
    if device.type == "cuda":
        columns += [("CUDA alloc MiB", ">14", common.mib_cell("cuda_max_allocated_mib")),
                    ("reserved", ">9", common.mib_cell("cuda_max_reserved_mib"))]
    columns += [("setup s", ">7.1f", "setup_s"), ("step max/min", ">12.2f", "step_spread")]
    common.print_table(("arm", "<10"), columns, summary)
    print(f"trainable parameters {trainable:,}: 6N = {flops_per_token / 1e9:.2f} GFLOP/token; "
          f"matmul peak ({args.matmul_size}^2, {runs['plain'][0]['peak_dtype']}) "
          f"{peak / 1e9:,.1f} GFLOP/s per device")
    if single:
        print(f"per-step losses of the two arms differ by at most {losses:.2e} (same "
              "weights, batches and optimizer: expect ~0)")
    verdict = "holds" if ratio >= TARGET_RATIO else "FAILS"
    print(common.ratio_text("lightning / plain", ratio, "tokens/s per device", paired,
                            median_step_ratio) + f"; goal >= {TARGET_RATIO}: {verdict}")
    if UNCHECKED in runs:
        check = per_device(summary["lightning"]) / per_device(summary[UNCHECKED])
        check_step = (per_device(summary["lightning"], "median_step_tokens_per_sec")
                      / per_device(summary[UNCHECKED], "median_step_tokens_per_sec"))
        check_paired = common.paired_ratios(runs[UNCHECKED], runs["lightning"], per_device)
        print(common.ratio_text("lightning / unchecked (the finite-loss check's cost)", check,
                                "tokens/s per device", check_paired, check_step))
        finite_check = {"ratio": check, "paired_ratios": check_paired,
                        "median_step_ratio": check_step}
    else:
        finite_check = None
    result = {"setup": setup, "arms": summary, "ratio": ratio, "paired_ratios": paired,
              "finite_check": finite_check,
              "median_step_ratio": median_step_ratio, "goal": TARGET_RATIO,
              "holds": ratio >= TARGET_RATIO, "noisy": noisy, "peak_flops": peak,
              "loss_max_abs_diff": losses, "wall_s": wall_s}
    return common.close_report(result, f"some step took over {NOISY_SPREAD}x another in the "
                               "same run: other load on the machine; trust the median-step "
                               "ratio or rerun when it is idle")


def find_max_batch(args) -> dict:
    """``--find_max_batch``: the largest batch each loss trains at, doubling until OOM."""
    from selftrain.training.loss import liger_available

    device = common.resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("--find_max_batch needs a CUDA GPU: it doubles the batch until CUDA "
                         "runs out of memory")
    losses = [loss for loss in PROBE_LOSSES if loss != "liger" or liger_available()]
    start = time.perf_counter()
    found: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        for loss in losses:
            fits, size = None, args.batch_size
            while size <= args.max_batch:
                common.progress(f"{loss} loss: batch {size} x {args.seq_len}")
                probe = argparse.Namespace(**{**vars(args), "batch_size": size,
                                              "probe_loss": loss})
                tried = run_arm("probe", probe, None, Path(tmp))
                if not tried["fits"]:
                    break
                fits, size = tried, size * 2
            found[loss] = {"max_batch": fits["batch_size"] if fits else 0,
                           "out_of_memory_at": size if size <= args.max_batch else None,
                           **(fits or {})}
    print(f"bench_train --find_max_batch: {args.model} on {common.machine_text(device)}, "
          f"{args.seq_len} tokens a row, {args.precision}, chunk {args.loss_chunk}, batches "
          f"doubled from {args.batch_size} (at most {args.max_batch})")
    columns = [("max batch", ">9", "max_batch"),
               ("OOM at", ">7", lambda row: row["out_of_memory_at"] or "-"),
               ("CUDA alloc MiB", ">14", common.mib_cell("cuda_max_allocated_mib")),
               ("reserved", ">9", common.mib_cell("cuda_max_reserved_mib"))]
    common.print_table(("loss", "<8"), columns, found)
    for loss in losses[1:]:
        if found["hf"]["max_batch"]:
            print(f"ratio {loss} / hf = {found[loss]['max_batch'] / found['hf']['max_batch']:.1f}x "
                  "the batch")
    result = {"setup": {**vars(args), **common.machine(device)}, "losses": found,
              "wall_s": time.perf_counter() - start}
    print(f"wall time {result['wall_s']:.0f} s")
    print(json.dumps(result))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.training_parser(__doc__, PRECISIONS, "plain, lightning", warmup=3,
                                    steps=8, repeats=3)
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence, BOS incl.")
    parser.add_argument("--devices", type=int, default=1, help="lightning arm's devices")
    parser.add_argument("--strategy", default="auto",
                        help="auto, ddp, fsdp (selftrain.training.fsdp.DecoderLayerFSDP), another "
                             "Lightning strategy name, or a class path")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="recompute activations (FSDP: per decoder layer)")
    parser.add_argument("--log_every_n_steps", type=int, default=1,
                        help="lightning arm's logging interval (1: the costliest)")
    parser.add_argument("--matmul_size", type=int, default=None,
                        help="side of the peak matmul (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--float32_matmul_precision", default="highest",
                        choices=("highest", "high", "medium"), help="TF32 for fp32 matmuls")
    parser.add_argument("--finite_check_cost", action="store_true",
                        help="add a third arm, lightning without the per-step finite-loss check, "
                             "and print lightning / unchecked (the check's cost)")
    parser.add_argument("--loss_chunk", type=int, default=None,
                        help="train with the chunked loss, this many tokens a chunk "
                             "(--model.loss_chunk); unset: transformers' loss")
    parser.add_argument("--find_max_batch", action="store_true",
                        help="CUDA: double the batch from --batch_size until out of memory, "
                             "for each loss (transformers', chunked, Liger's if installed), "
                             "and report the largest that trains")
    parser.add_argument("--max_batch", type=int, default=1024,
                        help="--find_max_batch stops doubling here")
    parser.add_argument("--probe_loss", choices=PROBE_LOSSES, help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=(*ARMS, UNCHECKED, "probe"), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1 (the clock starts at the "
                     "end of the last warm-up step)")
    if args.loss_chunk is not None and args.loss_chunk < 1:
        parser.error("--loss_chunk must be >= 1")
    if args.find_max_batch and args.loss_chunk is None:
        args.loss_chunk = 1024
    if args.matmul_size is None:
        args.matmul_size = 8192 if common.resolve_device(args.device).type == "cuda" else 2048
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    if args.arm == "probe":
        print(json.dumps(run_probe(args)), flush=True)
        return
    if args.find_max_batch:
        common.write_figures(args.json, find_max_batch(args))
        return
    if args.arm:
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        result = run_plain(args) if args.arm == "plain" else run_lightning(
            args, finite_check=args.arm != UNCHECKED)
        if result:
            common.progress(f"{args.arm}: {result['tokens_per_sec']:.1f} tokens/s over "
                            f"{result['steps']} steps ({result['seconds']:.1f} s)")
            print(json.dumps(result), flush=True)
        return
    device = common.resolve_device(args.device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        workdir = Path(tmp)
        corpus = workdir / "corpus"
        info = write_corpus(args, corpus)
        common.progress(f"corpus: {info['rows']} rows x {args.seq_len} random ids (vocab "
                        f"{info['vocab']}, BOS {info['bos_token_id']}) in {corpus}")
        arms = (*ARMS, UNCHECKED) if args.finite_check_cost else ARMS
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for round_ in range(args.repeats):
            for arm in arms:
                common.progress(f"round {round_ + 1}/{args.repeats}: {arm}")
                runs[arm].append(run_arm(arm, args, corpus, workdir))
        result = report(args, device, info, runs, time.perf_counter() - start)
    common.write_figures(args.json, {**result, "runs": runs})


if __name__ == "__main__":
    main()
