"""The sampling flags both corpus samplers take (``generate``, ``synthesize``), checked alike.

``selftrain generate`` and ``selftrain synthesize`` share their sampling flags (how many
samples, how long, temperature, top-p, top-k, batch, subsets, shards) and refuse a bad one with
the same line, before any model loads. This module imports no torch, so a sweep's plan reads
the default sample count here without loading anything (:mod:`selftrain.sweep.plan`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from selftrain.errors import refuse_first_failed

NUM_SAMPLES = 1000
"""``--num_samples`` when none is given: samples per corpus."""


def check_sampling(num_samples: int, max_new_tokens: int, temperatures: list[float],
                   top_p: float, top_k: int, batch_size: int, num_subsets: int,
                   shard_size: int, more: Iterable[tuple[bool, str]] = ()) -> None:
    """Refuse the first bad sampling flag in one line naming it, before anything loads.

    Args:
        num_samples: ``--num_samples``.
        max_new_tokens: ``--max_new_tokens``.
        temperatures: ``--temperature``, as a list (one value, or generate's list).
        top_p: ``--top_p``.
        top_k: ``--top_k``.
        batch_size: ``--batch_size``.
        num_subsets: ``--num_subsets``.
        shard_size: ``--shard_size``.
        more: the command's own checks, ``(ok, "<flag> <value>: <rule>")``, checked last.

    Raises:
        SelftrainError: the first check that fails.
    """
    shown = temperatures[0] if len(temperatures) == 1 else temperatures
    checks = [
        (num_samples > 0, "--num_samples", num_samples, "must be > 0"),
        (max_new_tokens >= 1, "--max_new_tokens", max_new_tokens, "must be >= 1"),
        (len(temperatures) > 0, "--temperature", shown, "an empty list; give one value or "
                                                        "several"),
        (all(t > 0 and math.isfinite(t) for t in temperatures), "--temperature", shown,
         "must be > 0 (greedy decoding is not sampling)"),
        (len(set(temperatures)) == len(temperatures), "--temperature", shown,
         "lists a value twice"),
        (0 < top_p <= 1, "--top_p", top_p, "must be in (0, 1]; 1 turns it off"),
        (top_k >= 0, "--top_k", top_k, "must be >= 0; 0 turns it off"),
        (batch_size >= 1, "--batch_size", batch_size, "must be >= 1"),
        (num_subsets >= 1, "--num_subsets", num_subsets, "must be >= 1"),
        (shard_size >= 1, "--shard_size", shard_size, "must be >= 1"),
    ]
    refuse_first_failed([*((ok, f"{flag} {value}: {rule}") for ok, flag, value, rule in checks),
                         *more])


def decoding_checks(host_every: int | None, cuda_graph: bool,
                    device_type: str) -> list[tuple[bool, str]]:
    """The decoder's speed flags, as ``more`` checks for :func:`check_sampling`.

    Neither changes what is sampled, so neither is part of a corpus's settings.

    Args:
        host_every: ``--host_every``.
        cuda_graph: ``--cuda_graph``.
        device_type: the type of the device ``--device`` resolves to (``cpu``, ``cuda``).
    """
    return [(host_every is None or host_every >= 1,
             f"--host_every {host_every}: must be >= 1, or unset for the device's default"),
            (not cuda_graph or device_type == "cuda",
             f"--cuda_graph true: needs a CUDA device and --device resolves to {device_type}; "
             "drop --cuda_graph or sample on a GPU")]
