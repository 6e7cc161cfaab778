"""Precision ``auto``: bf16 only where the device computes it natively, decided once per process.

bf16 halves memory traffic where the hardware has it (Ampere and newer GPUs; CPUs with
AVX512-BF16 or AMX) and is emulated, 20 to 150 times slower than float32 per matmul, where it
does not (an AVX2-only x86 CPU, most laptops and many servers). Every command with a precision
or dtype setting accepts ``auto`` and resolves it here:

- **CUDA**: ``torch.cuda.is_bf16_supported()``.
- **CPU**: a short measured matmul check (:func:`measure_cpu_bf16_slowdown`): the best of a
  few square bf16 matmuls against the same in float32, in this process, on one thread timed
  by its own CPU clock. Measured rather than read off the capability torch reports, because
  that string (``AVX2``, ``AVX512``, ...) does not say whether the CPU has the bf16
  instructions (an AVX512 CPU without AVX512-BF16 still prints ``AVX512``), and because the
  measurement sees what this torch build really dispatches to, under whatever ISA cap
  (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``) the process runs with. The gap it
  separates is wide (about 1x or faster against 20x and slower), and CPU time on one thread
  does not stretch when other work shares the cores, so a busy machine decides the same way.
  It costs about 0.2 s, once per process.
- anything else (MPS, ...): float32.

Asking for bf16 explicitly where it is emulated is allowed (a user may want the numerics), with
one warning line giving the measured slowdown.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

NATIVE_MAX_SLOWDOWN = 2.0
"""bf16 counts as native when its matmul takes at most this many times float32's time."""

AUTOCAST_PRECISIONS = ("auto", "32", "bf16")
"""``--precision`` values of the commands that run a model under autocast outside Lightning."""


@dataclass(frozen=True)
class Bf16Support:
    """Whether a device computes bf16 natively, and how that was decided.

    Args:
        device_type: ``cpu``, ``cuda``, ...
        native: bf16 runs at hardware speed there.
        slowdown: measured bf16 / float32 matmul time (CPU only; None elsewhere).
        how: one phrase saying how it was decided, for logs and warnings.
    """

    device_type: str
    native: bool
    slowdown: float | None
    how: str


def measure_cpu_bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """bf16 matmul time over float32 matmul time on this CPU, best of ``repeats`` each.

    One thread, timed by that thread's own CPU clock (``time.thread_time``): a busy machine
    delays a timed matmul but does not add to its CPU time, and one thread has no parallel
    region waiting for a descheduled partner. (Timed by the wall clock on all cores, the ratio
    fell from about 40 to 3 with two test suites running beside it.)

    Args:
        size: side of the square matrices (256: about 1 ms in float32, about 30 ms emulated).
        repeats: timed runs of each, interleaved, after one untimed warm-up run each.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        a32 = torch.randn(size, size, generator=generator)
        b32 = torch.randn(size, size, generator=generator)
        a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)
        best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            a32 @ b32, a16 @ b16  # kernel selection warm-up
            for _ in range(repeats):
                for dtype, (a, b) in ((torch.float32, (a32, b32)), (torch.bfloat16, (a16, b16))):
                    start = time.thread_time()
                    a @ b
                    best[dtype] = min(best[dtype], time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)


def decide_cpu(slowdown: float) -> bool:
    """Whether a measured bf16 / float32 slowdown means bf16 is native on this CPU.

    Args:
        slowdown: :func:`measure_cpu_bf16_slowdown`'s ratio.
    """
    return slowdown <= NATIVE_MAX_SLOWDOWN


@functools.cache
def bf16_support(device_type: str) -> Bf16Support:
    """Whether ``device_type`` computes bf16 natively; measured once per process on the CPU.

    Args:
        device_type: ``cpu``, ``cuda``, ``mps``, ...
    """
    if device_type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return Bf16Support("cuda", native, None, "torch.cuda.is_bf16_supported()")
    if device_type == "cpu":
        slowdown = measure_cpu_bf16_slowdown()
        how = f"a bf16 matmul took {slowdown:.1f}x float32's time here, measured"
        return Bf16Support("cpu", decide_cpu(slowdown), slowdown, how)
    return Bf16Support(device_type, False, None, f"not decided for {device_type}: float32")


def device_type(accelerator: Any) -> str:
    """The device type a Lightning ``--trainer.accelerator`` (or a device) runs on.

    ``auto`` and ``gpu`` resolve as Lightning resolves them (MPS first, then CUDA, else CPU).

    Args:
        accelerator: ``cpu``, ``gpu``, ``cuda``, ``auto``, None, a torch device or an
            Accelerator instance.
    """
    if isinstance(accelerator, torch.device):
        return accelerator.type
    if accelerator is not None and not isinstance(accelerator, str):
        from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

        if isinstance(accelerator, CUDAAccelerator):
            return "cuda"
        return "mps" if isinstance(accelerator, MPSAccelerator) else "cpu"
    name = str(accelerator or "auto").lower()
    if name in ("cpu", "cuda", "mps"):
        return name
    if name in ("gpu", "auto"):
        if torch.backends.mps.is_available():
            return "mps"
        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def warn_if_emulated(what: str, support: Bf16Support) -> None:
    """One warning line when bf16 is asked for explicitly where it is emulated.

    Args:
        what: the flag and value asked for, e.g. ``--trainer.precision bf16-mixed``.
        support: the device's :func:`bf16_support`.
    """
    if support.native or support.device_type != "cpu":
        return
    log.warning("%s: this CPU has no native bf16 (%s); use auto or 32 unless you need "
                "bf16's numerics", what, support.how)


def _resolve(value: Any, asks_bf16: bool, device: Any, flag: str, choices: tuple[Any, Any]
             ) -> Any:
    """``auto`` -> ``choices[0]`` where bf16 is native on ``device``, else ``choices[1]``.

    An explicit bf16 (``asks_bf16``) passes through, warned about where it is emulated; any
    other value passes through untouched.
    """
    if value != "auto" and not asks_bf16:
        return value
    support = bf16_support(device_type(device))
    if value != "auto":
        warn_if_emulated(f"{flag} {value}", support)
        return value
    resolved = choices[0] if support.native else choices[1]
    log.info("%s auto -> %s on %s: %s", flag, resolved, support.device_type, support.how)
    return resolved


def trainer_precision(precision: Any, accelerator: Any, flag: str = "--trainer.precision"
                      ) -> Any:
    """Lightning's ``precision`` with ``auto`` resolved (bf16-mixed where native, else 32-true).

    Other values pass through; an explicit bf16 where it is emulated is warned about.

    Args:
        precision: the flag's value (``auto``, ``32-true``, ``bf16-mixed``, 16, None, ...).
        accelerator: the Trainer's accelerator (``cpu``, ``gpu``, ``auto``, ...).
        flag: the flag named in logs and warnings.
    """
    return _resolve(precision, str(precision).startswith("bf16"), accelerator, flag,
                    ("bf16-mixed", "32-true"))


def autocast_dtype(precision: str, device: torch.device, flag: str = "--precision"
                   ) -> torch.dtype | None:
    """The autocast dtype of an ``auto`` / ``32`` / ``bf16`` ``--precision`` (None: float32).

    Args:
        precision: one of :data:`AUTOCAST_PRECISIONS`.
        device: where the model runs.
        flag: the flag named in logs and warnings.
    """
    name = _resolve(precision, precision == "bf16", device, flag, ("bf16", "32"))
    return torch.bfloat16 if name == "bf16" else None


def weight_dtype(dtype: str, device: str | torch.device, flag: str = "--dtype") -> str:
    """A model-weights ``--dtype`` with ``auto`` resolved (bfloat16 where native, else float32).

    Other names pass through; an explicit bf16 where it is emulated is warned about.

    Args:
        dtype: ``auto`` or a dtype name (``float32``, ``bfloat16``, ``bf16``, ...).
        device: where the model runs (``cpu``, ``cuda``, ``auto``, or a torch device).
        flag: the flag named in logs and warnings.
    """
    return _resolve(dtype, dtype in ("bfloat16", "bf16"), device, flag, ("bfloat16", "float32"))
