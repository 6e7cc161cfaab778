"""Where `selftrain generate` runs: its device, and torchrun's ranks when there are several.

Sampling needs little from ``torch.distributed``: a process group, barriers around the moments
rank 0 changes the output dir, and one sum of the counts at the end. Ranks never exchange
samples (each writes its own shards), so these helpers are all there is.
"""

from __future__ import annotations

import datetime
import os

import torch

from selftrain.errors import SelftrainError


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): from torchrun's environment, with a process group when world > 1.

    Args:
        device: this rank's device (CUDA ranks talk over NCCL, CPU ranks over gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        # Ranks wait for each other only at the start and the end; a slow rank may be hours
        # behind on a large corpus.
        timeout = datetime.timedelta(hours=12)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    """Wait for every rank (a no-op in one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(values: list[int], world: int) -> list[int]:
    """Element-wise sums over all ranks, in one all-reduce.

    Args:
        values: this rank's numbers.
        world: the number of processes.
    """
    if world == 1:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.long,
                         device=torch.cuda.current_device() if dist.get_backend() == "nccl"
                         else "cpu")
    dist.all_reduce(total)
    return total.tolist()


def pick_device(device: str) -> torch.device:
    """The device to sample on: "auto" is this rank's CUDA device if there is one, else CPU.

    Args:
        device: "auto", "cpu" or "cuda[:N]".

    Raises:
        SelftrainError: not a device name, or a CUDA device this machine does not have.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise SelftrainError(f"--device {device}: not a device; use auto, cpu or cuda[:N]"
                             ) from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SelftrainError(f"--device {device}: this machine has no CUDA GPU; use "
                                 "--device cpu (or auto)")
        if chosen.index is not None and chosen.index >= count:
            raise SelftrainError(f"--device {device}: this machine has {count} CUDA GPU(s), "
                                 f"cuda:0..cuda:{count - 1}; pick one of them or auto")
    elif chosen.type != "cpu":
        raise SelftrainError(f"--device {device}: generate samples on cpu or cuda[:N]; use "
                             "one of them or auto")
    return chosen
