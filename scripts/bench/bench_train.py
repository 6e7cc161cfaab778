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

    python scripts/bench_train.py                      # CPU: embedded SmolLM2-135M, ~3.5 min
    python scripts/bench_train.py --model shape:qwen2.5-0.5b --batch_size 8 --seq_len 2048 \\
        --precision bf16-mixed --strategy fsdp         # one GPU (add --devices 8 for a node)

With ``--devices N > 1`` only the lightning arm is distributed (rank 0 reports; tokens/s counts
all ranks); the plain arm stays on one device, and the ratio compares per-device throughput.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

PRECISIONS = ("bf16-mixed", "32-true", "bf16-true")
"""Precisions both arms can reproduce (16-mixed would need a GradScaler in the plain arm)."""
TARGET_RATIO = 0.95
NOISY_SPREAD = 1.5
"""A run whose slowest measured step is this many times its fastest was disturbed."""


def _progress(message: str) -> None:
    print(f"[bench_train] {message}", file=sys.stderr, flush=True)


def _device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compute_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "32-true" else torch.bfloat16


# --------------------------------------------------------------------------------------------
# measurements shared by both arms


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of a ``size`` x ``size`` matmul at ``dtype`` on ``device``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 2
    torch.matmul(a, b, out=out)  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size ** 3 / best


def memory_figures(device: torch.device) -> dict:
    """Peak memory of this process: RSS on CPU, CUDA allocator peaks on CUDA (MiB)."""
    import resource

    figures = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        figures["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        figures["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return figures


def _data_module(args):
    from selftrain.training.data import CorpusDataModule

    return CorpusDataModule(corpus=args.corpus, tokenizer=args.model, max_length=args.seq_len,
                            batch_size=args.batch_size, shuffle=False, same_tokenizer=True)


def _arm_result(args, device, times: list[float], losses: list[torch.Tensor], world: int,
                trainable: int | None, setup_s: float, memory: dict) -> dict:
    """Tokens/s over the measured window, and everything else the parent reports.

    ``tokens_per_sec`` is end to end over the window; ``median_step_tokens_per_sec`` uses the
    median step instead, which a burst of other load on the machine barely moves (every
    per-step cost is in every step, so it still counts them). ``memory`` is taken at the end
    of the last step (Lightning's teardown later moves the weights back to the CPU); the
    matmul peak is measured after it.
    """
    seconds = times[-1] - times[args.warmup - 1]
    steps = len(times) - args.warmup
    step_tokens = args.batch_size * args.seq_len * world
    window = [b - a for a, b in zip(times[args.warmup - 1:-1], times[args.warmup:], strict=True)]
    result = {"arm": args.arm, "tokens_per_sec": steps * step_tokens / seconds,
              "median_step_tokens_per_sec": step_tokens / statistics.median(window),
              "step_spread": max(window) / min(window), "seconds": seconds,
              "tokens": steps * step_tokens, "steps": steps, "world_size": world,
              "setup_s": setup_s, "step_s": window,
              "losses": torch.stack(losses).float().cpu().tolist(),
              "trainable_params": trainable, **memory}
    dtype = _compute_dtype(args.precision)
    result["peak_flops"] = matmul_peak(device, dtype, args.matmul_size)
    result["peak_dtype"] = str(dtype).removeprefix("torch.")
    return result


# --------------------------------------------------------------------------------------------
# the arms (each in its own process)


def run_plain(args) -> dict:
    """The hand-written loop: same model, optimizer, batches and autocast as StudentLM."""
    from selftrain.models import load_model
    from selftrain.training import module as student
    from selftrain.training.fsdp import compile_decoder_layers

    device = _device(args)
    begin = time.perf_counter()
    data = _data_module(args)
    data.load()
    loader = data.train_dataloader()
    model = load_model(args.model, attn_implementation=args.attn)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    if args.precision == "bf16-true":
        model.to(torch.bfloat16)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.compile:  # as StudentLM(compile=True)
        compile_decoder_layers(model)
    # StudentLM.configure_optimizers: its parameter groups, default weight decay and betas;
    # fused on CUDA as the student is (unless gradients are clipped or fp16-scaled: not here)
    defaults = inspect.signature(student.StudentLM).parameters
    groups = student.param_groups(model, defaults["weight_decay"].default)
    optimizer = student.build_optimizer("adamw", groups, lr=args.lr,
                                        betas=tuple(defaults["betas"].default),
                                        fused=device.type == "cuda")
    mixed = args.precision.endswith("-mixed")
    total = args.warmup + args.steps
    times: list[float] = []
    losses: list[torch.Tensor] = []
    setup_s = time.perf_counter() - begin
    for step, batch in enumerate(loader):
        batch = {k: batch[k].to(device, non_blocking=True) for k in student.BATCH_KEYS
                 if k in batch}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step in (args.warmup - 1, total - 1):
            _sync(device)
        times.append(time.perf_counter())
        if step:
            _progress(f"plain step {step + 1}/{total}: {times[-1] - times[-2]:.3f} s")
        if step + 1 == total:
            break
    if len(times) < total:
        raise SystemExit(f"the bench corpus gave {len(times)} batches, not {total}")
    return _arm_result(args, device, times, losses, 1, trainable, setup_s,
                       memory_figures(device))


def _strategy(args):
    """The Trainer's strategy from --strategy: a name, ``fsdp``, or a class path."""
    name = args.strategy
    if name == "fsdp":
        try:
            from selftrain.training.fsdp import DecoderLayerFSDP
        except ImportError:
            return "fsdp"
        return DecoderLayerFSDP(activation_checkpointing=args.gradient_checkpointing)
    if "." in name:
        module, _, cls = name.rpartition(".")
        return getattr(importlib.import_module(module), cls)()
    return name


def run_lightning(args) -> dict:
    """`selftrain fit`'s training step: Trainer + StudentLM + CorpusDataModule."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # its start-up banner

    from selftrain.callbacks.tb_layout import TensorBoardLayout

    from selftrain.training.module import StudentLM

    device = _device(args)
    total = args.warmup + args.steps
    begin = time.perf_counter()

    class StepClock(L.Callback):
        """Wall clock at the end of every training batch (optimizer step and logging done)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[torch.Tensor] = []
            self.trainable: int | None = None
            self.setup_s = 0.0
            self.memory: dict = {}

        def on_train_start(self, trainer, pl_module) -> None:
            self.trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            self.setup_s = time.perf_counter() - begin

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(outputs["loss"].detach())
            if batch_idx in (args.warmup - 1, total - 1):
                _sync(pl_module.device)
            self.times.append(time.perf_counter())
            if batch_idx == total - 1:
                self.memory = memory_figures(pl_module.device)
            if batch_idx and trainer.is_global_zero:
                _progress(f"lightning step {batch_idx + 1}/{total}: "
                          f"{self.times[-1] - self.times[-2]:.3f} s")

    extra = {"compile": True} if args.compile else {}
    gradient_checkpointing = args.gradient_checkpointing and args.strategy != "fsdp"
    module = StudentLM(model=args.model, lr=args.lr, warmup_steps=0, schedule="constant",
                       export_hf="never", attn_implementation=args.attn,
                       gradient_checkpointing=gradient_checkpointing, **extra)
    clock = StepClock()
    root = Path(args.workdir) / f"lightning-{os.getpid()}"
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=args.devices,
        strategy=_strategy(args), precision=args.precision, max_steps=total,
        logger=TensorBoardLogger(save_dir=str(root), name="tb", version="",
                                 default_hp_metric=False),
        callbacks=[TensorBoardLayout(), clock], default_root_dir=str(root),
        log_every_n_steps=args.log_every_n_steps, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=_data_module(args))
    if not trainer.is_global_zero:
        return {}
    if len(clock.times) < total:
        raise SystemExit(f"the bench corpus gave {len(clock.times)} batches, not {total}")
    device = (torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda"
              else device)
    return _arm_result(args, device, clock.times, clock.losses, trainer.world_size,
                       clock.trainable, clock.setup_s, clock.memory)


# --------------------------------------------------------------------------------------------
# the parent


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


def run_arm(arm: str, args, corpus: Path, workdir: Path) -> dict:
    """One arm in a fresh process; its last JSON line on stdout."""
    command = [sys.executable, str(Path(__file__).resolve()), "--arm", arm,
               "--corpus", str(corpus), "--workdir", str(workdir)]
    for key, value in vars(args).items():
        if key in ("arm", "corpus", "workdir", "repeats", "json"):
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


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def report(args, device: torch.device, corpus_info: dict, runs: dict[str, list[dict]],
           wall_s: float) -> dict:
    peak = max(run["peak_flops"] for arm in runs.values() for run in arm)
    trainable = runs["plain"][0]["trainable_params"]
    flops_per_token = 6 * trainable
    world = {arm: results[0]["world_size"] for arm, results in runs.items()}
    summary: dict[str, dict] = {}
    for arm, results in runs.items():
        rates = [r["tokens_per_sec"] for r in results]
        median = statistics.median(rates)
        summary[arm] = {
            "tokens_per_sec": median, "runs": rates,
            "median_step_tokens_per_sec": statistics.median(
                r["median_step_tokens_per_sec"] for r in results),
            "world_size": world[arm],
            "mfu": flops_per_token * median / (peak * world[arm]),
            "achieved_flops": flops_per_token * median,
            **{key: max(r.get(key, 0.0) for r in results)
               for key in ("peak_rss_mib", "cuda_max_allocated_mib", "cuda_max_reserved_mib")
               if key in results[0]},
            "setup_s": statistics.median(r["setup_s"] for r in results),
            "step_spread": max(r["step_spread"] for r in results)}

    def per_device_ratio(key: str) -> float:
        return ((summary["lightning"][key] / world["lightning"])
                / (summary["plain"][key] / world["plain"]))

    ratio = per_device_ratio("tokens_per_sec")
    median_step_ratio = per_device_ratio("median_step_tokens_per_sec")
    paired = [light["tokens_per_sec"] / light["world_size"] / plain["tokens_per_sec"]
              for plain, light in zip(runs["plain"], runs["lightning"], strict=True)]
    noisy = max(row["step_spread"] for row in summary.values()) > NOISY_SPREAD
    loss_diff = max(abs(a - b) for plain, light in zip(runs["plain"], runs["lightning"],
                                                       strict=True)
                    for a, b in zip(plain["losses"], light["losses"], strict=True))
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    setup = {"model": args.model, "device": device.type, "device_name": name,
             "threads": torch.get_num_threads(), "devices": args.devices,
             "strategy": args.strategy, "precision": args.precision, "attn": args.attn,
             "compile": args.compile, "gradient_checkpointing": args.gradient_checkpointing,
             "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup,
             "steps": args.steps, "repeats": args.repeats, "lr": args.lr,
             "log_every_n_steps": args.log_every_n_steps, "vocab": corpus_info["vocab"],
             "trainable_params": trainable}
    print(f"bench_train: {args.model} on {name} ({device.type}, {torch.get_num_threads()} "
          f"threads), batch {args.batch_size} x {args.seq_len} tokens, {args.precision}, "
          f"strategy {args.strategy} x {args.devices}, attn {args.attn}, "
          f"{args.warmup} warm-up + {args.steps} measured steps, {args.repeats} rounds")
    cuda = device.type == "cuda"
    header = (f"{'arm':<10} {'tokens/s':>9} {'per round':<20} {'median step':>11} "
              f"{'MFU':>7} {'peak RSS MiB':>12}"
              + (f" {'CUDA alloc MiB':>14} {'reserved':>9}" if cuda else "")
              + f" {'setup s':>7} {'step max/min':>12}")
    print(header)
    for arm in ("plain", "lightning"):
        row = summary[arm]
        runs_text = ", ".join(f"{rate:.1f}" for rate in row["runs"])
        line = (f"{arm:<10} {row['tokens_per_sec']:>9.1f} {runs_text:<20} "
                f"{row['median_step_tokens_per_sec']:>11.1f} {row['mfu']:>7.2%} "
                f"{_mib(row['peak_rss_mib']):>12}")
        if cuda:
            line += (f" {_mib(row.get('cuda_max_allocated_mib')):>14}"
                     f" {_mib(row.get('cuda_max_reserved_mib')):>9}")
        print(line + f" {row['setup_s']:>7.1f} {row['step_spread']:>12.2f}")
    print(f"trainable parameters {trainable:,}: 6N = {flops_per_token / 1e9:.2f} GFLOP/token; "
          f"matmul peak ({args.matmul_size}^2, {runs['plain'][0]['peak_dtype']}) "
          f"{peak / 1e9:,.1f} GFLOP/s per device")
    if world["lightning"] == 1:
        print(f"per-step losses of the two arms differ by at most {loss_diff:.2e} (same "
              "weights, batches and optimizer: expect ~0)")
    else:  # rank 0 trains on every world-th batch, the plain arm on all of them
        loss_diff = None
    verdict = "holds" if ratio >= TARGET_RATIO else "FAILS"
    print(f"ratio lightning / plain = {ratio:.3f} tokens/s per device (paired rounds: "
          f"{', '.join(f'{r:.3f}' for r in paired)}; median step: {median_step_ratio:.3f}); "
          f"goal >= {TARGET_RATIO}: {verdict}")
    if noisy:
        print(f"WARNING: some step took over {NOISY_SPREAD}x another in the same run: other "
              "load on the machine; trust the median-step ratio or rerun when it is idle")
    print(f"wall time {wall_s:.0f} s")
    result = {"setup": setup, "arms": summary, "ratio": ratio, "paired_ratios": paired,
              "median_step_ratio": median_step_ratio, "goal": TARGET_RATIO,
              "holds": ratio >= TARGET_RATIO, "noisy": noisy, "peak_flops": peak,
              "loss_max_abs_diff": loss_diff, "wall_s": wall_s}
    print(json.dumps(result))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m",
                        help="student spec (hub id, local dir, embedded:, tiny:, shape:)")
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence, BOS incl.")
    parser.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    parser.add_argument("--warmup", type=int, default=3, help="steps excluded from timing")
    parser.add_argument("--steps", type=int, default=8, help="measured steps")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of plain, lightning")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--devices", type=int, default=1, help="lightning arm's devices")
    parser.add_argument("--strategy", default="auto",
                        help="auto, ddp, fsdp (selftrain.training.fsdp.DecoderLayerFSDP), another "
                             "Lightning strategy name, or a class path")
    parser.add_argument("--attn", default="sdpa", help="sdpa, eager or flash_attention_2")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="recompute activations (FSDP: per decoder layer)")
    parser.add_argument("--log_every_n_steps", type=int, default=1,
                        help="lightning arm's logging interval (1: the costliest)")
    parser.add_argument("--matmul_size", type=int, default=None,
                        help="side of the peak matmul (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--float32_matmul_precision", default="highest",
                        choices=("highest", "high", "medium"), help="TF32 for fp32 matmuls")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--arm", choices=("plain", "lightning"), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1 (the clock starts at the "
                     "end of the last warm-up step)")
    if args.matmul_size is None:
        args.matmul_size = 8192 if _device(args).type == "cuda" else 2048
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    if args.arm:
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        result = run_plain(args) if args.arm == "plain" else run_lightning(args)
        if result:
            _progress(f"{args.arm}: {result['tokens_per_sec']:.1f} tokens/s over "
                      f"{result['steps']} steps ({result['seconds']:.1f} s)")
            print(json.dumps(result), flush=True)
        return
    device = _device(args)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        workdir = Path(tmp)
        corpus = workdir / "corpus"
        info = write_corpus(args, corpus)
        _progress(f"corpus: {info['rows']} rows x {args.seq_len} random ids (vocab "
                  f"{info['vocab']}, BOS {info['bos_token_id']}) in {corpus}")
        runs: dict[str, list[dict]] = {"plain": [], "lightning": []}
        for round_ in range(args.repeats):
            for arm in ("plain", "lightning"):
                _progress(f"round {round_ + 1}/{args.repeats}: {arm}")
                runs[arm].append(run_arm(arm, args, corpus, workdir))
        result = report(args, device, info, runs, time.perf_counter() - start)
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
