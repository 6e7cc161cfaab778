"""What the bench scripts share, so that each measures and reports the same way.

Every speed claim in the docs comes from a ``scripts/bench/bench_*.py`` script that measures our
way against the plain way in one run. They share the device handling (``--device auto``, CUDA
synchronised at the ends of a timed region, the machine named in the report), progress lines
on stderr (stdout carries the report and its closing JSON line), and what the two training
benches (``bench_train``, ``bench_packing``) need alike: StudentLM's optimizer and training
step, the matmul peak and peak memory, their common flags, and the table of per-arm figures
with the rounds, paired ratios and loss agreement of the two arms.

``python scripts/bench/<script>.py`` puts this folder first on ``sys.path``, so the scripts
import this file as ``_common``. selftrain is imported inside the functions that need it, as
the scripts do, so that a script's ``--help`` and its parent process stay light.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ATTENTION = ("sdpa", "eager", "flash_attention_2")

# --------------------------------------------------------------------------------------------
# device and progress


def progress(message: str) -> None:
    """A progress line on stderr, tagged with the running script's name."""
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA where one is visible), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible")
    return device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict:
    """The device type, its name (the GPU's, else the CPU's) and the torch thread count."""
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads()}


def machine_text(device: torch.device) -> str:
    figures = machine(device)
    return f"{figures['device_name']} ({figures['device']}, {figures['threads']} threads)"


# --------------------------------------------------------------------------------------------
# measurements


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls run in under a Lightning precision flag."""
    return torch.float32 if precision == "32-true" else torch.bfloat16


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of a ``size`` x ``size`` matmul at ``dtype`` on ``device``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 2
    torch.matmul(a, b, out=out)  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        sync(device)
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


# --------------------------------------------------------------------------------------------
# StudentLM's training step, written out


def student_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """StudentLM.configure_optimizers: AdamW, its parameter groups, weight decay and betas.

    Fused on CUDA, as the student's is when gradients are neither clipped nor fp16-scaled (no
    bench does either). Build it after the model is on its device.
    """
    from selftrain.training.module import StudentLM
    from selftrain.training.optim import build_optimizer, param_groups

    defaults = inspect.signature(StudentLM).parameters
    groups = param_groups(model, defaults["weight_decay"].default)
    return build_optimizer("adamw", groups, lr=lr,
                                   betas=tuple(defaults["betas"].default),
                                   fused=next(model.parameters()).is_cuda)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
               precision: str, loss_chunk: int | None = None, fused: bool = False
               ) -> torch.Tensor:
    """StudentLM's step on a batch already on the device; the loss, not synchronised.

    Forward with the HF labels loss (``use_cache=False``, under bf16 ``torch.autocast`` for
    ``*-mixed``), or with ``loss_chunk`` the chunked loss of ``selftrain.training.loss`` (its
    torch path, or Liger's kernel when ``fused``), backward, optimizer step,
    ``zero_grad(set_to_none=True)``.
    """
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision.endswith("-mixed")):
        if loss_chunk is None:
            loss = model(**batch, use_cache=False).loss
        else:
            from selftrain.training.loss import causal_lm_loss

            loss = causal_lm_loss(model, batch, loss_chunk, fused=fused)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def training_parser(doc: str, precisions: Sequence[str], arms: str, warmup: int, steps: int,
                    repeats: int) -> argparse.ArgumentParser:
    """The flags both training benches take; ``arms`` names one round (``plain, lightning``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m",
                        help="student spec (hub id, local dir, embedded:, tiny:, shape:)")
    parser.add_argument("--attn", default="sdpa", choices=ATTENTION)
    parser.add_argument("--precision", default="bf16-mixed", choices=precisions)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--batch_size", type=int, default=4, help="sequences (rows) per step")
    parser.add_argument("--warmup", type=int, default=warmup, help="steps excluded from timing")
    parser.add_argument("--steps", type=int, default=steps, help="measured steps")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"rounds of {arms}")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser


# --------------------------------------------------------------------------------------------
# reporting


def spread(values: Sequence[float]) -> float:
    """Largest over smallest: how far apart the same work's times are (1.0: not at all)."""
    return max(values) / min(values)


def rounds_text(values: Sequence[float], digits: int = 1) -> str:
    """Figures of the rounds, in order: ``12.3, 12.5, 12.1``."""
    return ", ".join(f"{value:.{digits}f}" for value in values)


Cell = str | Callable[[dict], object]
"""What a table column shows of a row: the value under a key, or a function of the row."""


def mib_cell(key: str) -> Cell:
    """A memory figure in whole MiB with thousands separators, ``-`` where the row has none."""
    return lambda row: "-" if row.get(key) is None else f"{row[key]:,.0f}"


def print_table(label: tuple[str, str], columns: Sequence[tuple[str, str, Cell]],
                rows: dict[str, dict]) -> None:
    """A header line, then a line a row.

    ``label`` is the first column's title and format spec (its cells: the row names); each
    column is a title, a format spec that starts with alignment and width (``>9.1f``,
    ``<20``) and a :data:`Cell`.
    """

    def width(spec: str) -> str:
        return re.match(r"[<>^]?\d*", spec)[0]

    print(" ".join([format(label[0], label[1])]
                   + [format(title, width(spec)) for title, spec, _ in columns]))
    for name, row in rows.items():
        print(" ".join([format(name, label[1])]
                       + [format(row[cell] if isinstance(cell, str) else cell(row), spec)
                          for _, spec, cell in columns]))


def paired_ratios(base: list[dict], other: list[dict], rate: Callable[[dict], float]) -> list:
    """``rate`` of the other arm over the base arm's, round by round."""
    return [rate(b) / rate(a) for a, b in zip(base, other, strict=True)]


def ratio_text(name: str, ratio: float, unit: str, paired: Sequence[float],
               median_step: float) -> str:
    """The headline ratio, then the same ratio round by round and from the median steps."""
    return (f"ratio {name} = {ratio:.3f} {unit} (paired rounds: {rounds_text(paired, 3)}; "
            f"median step: {median_step:.3f})")


def loss_diff(base: list[dict], other: list[dict], steps: slice = slice(None)) -> float:
    """The largest per-step loss difference between the arms' runs of the same round."""
    return max(abs(x - y) for a, b in zip(base, other, strict=True)
               for x, y in zip(a["losses"][steps], b["losses"][steps], strict=True))


def close_report(result: dict, noisy_warning: str) -> dict:
    """The warning where ``result["noisy"]`` (other load disturbed the timings), the wall
    time, then the whole result as the last line of stdout (one JSON object)."""
    if result["noisy"]:
        print(f"WARNING: {noisy_warning}")
    print(f"wall time {result['wall_s']:.0f} s")
    print(json.dumps(result))
    return result


def write_figures(path: str | None, figures: dict) -> None:
    """``--json``: the figures, indented, to ``path`` (nothing when it is not given)."""
    if path:
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")
