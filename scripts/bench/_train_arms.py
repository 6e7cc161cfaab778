"""The two arms of ``bench_train``, each run in its own process (``bench_train.py --arm ...``).

``bench_train.py`` is the parent: it writes the bench corpus, starts the arms round by round
and reports. This file is what runs and is timed inside an arm's process, kept apart so that
each side reads on its own. Both arms read the clock at the end of every step (CUDA
synchronised at the end of the last warm-up step and of the last step) and hand
:func:`arm_result` the same figures.
"""

from __future__ import annotations

import importlib
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from _common import (
    compute_dtype,
    matmul_peak,
    memory_figures,
    progress,
    resolve_device,
    spread,
    student_optimizer,
    sync,
    train_step,
)


def data_module(args):
    """The bench corpus as ``selftrain fit`` loads it: in order, BOS-started rows, no padding."""
    from selftrain.training.data import CorpusDataModule

    return CorpusDataModule(corpus=args.corpus, tokenizer=args.model, max_length=args.seq_len,
                            batch_size=args.batch_size, shuffle=False, same_tokenizer=True)


def arm_result(args, device, times: list[float], losses: list[torch.Tensor], world: int,
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
              "step_spread": spread(window), "seconds": seconds,
              "tokens": steps * step_tokens, "steps": steps, "world_size": world,
              "setup_s": setup_s, "step_s": window,
              "losses": torch.stack(losses).float().cpu().tolist(),
              "trainable_params": trainable, **memory}
    dtype = compute_dtype(args.precision)
    result["peak_flops"] = matmul_peak(device, dtype, args.matmul_size)
    result["peak_dtype"] = str(dtype).removeprefix("torch.")
    return result


# --------------------------------------------------------------------------------------------
# the arms (each in its own process)


def plain_model(args, device: torch.device) -> torch.nn.Module:
    """The student as the plain loop trains it: on ``device``, checkpointed if asked, train mode."""
    from selftrain.models import load_model
    from selftrain.training.module import enable_activation_checkpointing

    model = load_model(args.model, attn_implementation=args.attn)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.to(device)
    if args.precision == "bf16-true":
        model.to(torch.bfloat16)
    return model.train()


def run_plain(args) -> dict:
    """The hand-written loop: same model, optimizer, batches and autocast as StudentLM."""
    from selftrain.training.batching import BATCH_KEYS
    from selftrain.training.fsdp import compile_decoder_layers

    device = resolve_device(args.device)
    begin = time.perf_counter()
    data = data_module(args)
    data.load()
    loader = data.train_dataloader()
    model = plain_model(args, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.compile:  # as StudentLM(compile=True)
        compile_decoder_layers(model)
    optimizer = student_optimizer(model, args.lr)
    total = args.warmup + args.steps
    times: list[float] = []
    losses: list[torch.Tensor] = []
    setup_s = time.perf_counter() - begin
    for step, batch in enumerate(loader):
        batch = {k: batch[k].to(device, non_blocking=True) for k in BATCH_KEYS
                 if k in batch}
        losses.append(train_step(model, optimizer, batch, args.precision,
                                 args.loss_chunk).detach())
        if step in (args.warmup - 1, total - 1):
            sync(device)
        times.append(time.perf_counter())
        if step:
            progress(f"plain step {step + 1}/{total}: {times[-1] - times[-2]:.3f} s")
        if step + 1 == total:
            break
    if len(times) < total:
        raise SystemExit(f"the bench corpus gave {len(times)} batches, not {total}")
    return arm_result(args, device, times, losses, 1, trainable, setup_s,
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


def run_lightning(args, finite_check: bool = True) -> dict:
    """`selftrain fit`'s training step: Trainer + StudentLM + CorpusDataModule.

    Args:
        finite_check: False replaces StudentLM's per-step finite-loss check with nothing, to
            measure what that check (one host synchronisation per step) costs.
    """
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # its start-up banner

    from selftrain.callbacks.tb_layout import TensorBoardLayout
    from selftrain.training.module import StudentLM

    device = resolve_device(args.device)
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
                sync(pl_module.device)
            self.times.append(time.perf_counter())
            if batch_idx == total - 1:
                self.memory = memory_figures(pl_module.device)
            if batch_idx and trainer.is_global_zero:
                progress(f"lightning step {batch_idx + 1}/{total}: "
                         f"{self.times[-1] - self.times[-2]:.3f} s")

    if not finite_check:
        StudentLM._stop_unless_finite = lambda self, loss: None
    extra = {"compile": True} if args.compile else {}
    gradient_checkpointing = args.gradient_checkpointing and args.strategy != "fsdp"
    module = StudentLM(model=args.model, lr=args.lr, warmup_steps=0, schedule="constant",
                       export_hf="never", attn_implementation=args.attn,
                       gradient_checkpointing=gradient_checkpointing,
                       loss_chunk=args.loss_chunk, loss_kernel="torch", **extra)
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
    trainer.fit(module, datamodule=data_module(args))
    if not trainer.is_global_zero:
        return {}
    if len(clock.times) < total:
        raise SystemExit(f"the bench corpus gave {len(clock.times)} batches, not {total}")
    device = (torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda"
              else device)
    return arm_result(args, device, clock.times, clock.losses, trainer.world_size,
                      clock.trainable, clock.setup_s, clock.memory)



# --------------------------------------------------------------------------------------------
# --find_max_batch: does one batch size fit? (each try in its own process)

PROBE_LOSSES = ("hf", "chunked", "liger")
"""The losses a batch-size probe can train with: transformers', the chunked torch one, Liger's."""


def run_probe(args) -> dict:
    """Two training steps of the plain loop at ``--batch_size`` with ``--probe_loss``.

    The second step runs with the optimizer's states allocated, so its peak is a steady
    step's. Random ids (below the tokenizer's size, as the bench corpus draws them), no
    padding.

    Returns:
        ``{"fits": True, **memory}``, or ``{"fits": False}`` at CUDA out-of-memory.
    """
    from selftrain.models import load_tokenizer

    device = resolve_device(args.device)
    vocab = len(load_tokenizer(args.model))
    model = plain_model(args, device)
    optimizer = student_optimizer(model, args.lr)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    batch = {key: value.to(device) for key, value in batch.items()}
    chunk = None if args.probe_loss == "hf" else args.loss_chunk
    try:
        for _ in range(2):
            train_step(model, optimizer, batch, args.precision, chunk,
                       fused=args.probe_loss == "liger")
        sync(device)
    except torch.cuda.OutOfMemoryError:
        return {"fits": False, "batch_size": args.batch_size}
    return {"fits": True, "batch_size": args.batch_size, **memory_figures(device)}
