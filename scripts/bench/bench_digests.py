"""What the checkpoint digest costs: saving and resuming a real-sized checkpoint, digest or not.

Builds the state a `selftrain fit` checkpoint holds for the student (its fp32 weights and
AdamW's two moments, about 1.6 GB for the embedded SmolLM2-135M) and, over ``--repeats``
alternating rounds in one run, times:

  * save, plain: ``atomic_file`` + ``torch.save`` (what ``AtomicCheckpointIO`` did before
    digests: written beside, fsynced, renamed);
  * save, digest: ``AtomicCheckpointIO.save_checkpoint`` (the same, plus the xxh3-128 of the
    file and its sidecar, written twice when a checkpoint is replaced);
  * resume, plain: ``torch.load`` of the whole checkpoint (what Lightning does on a resume);
  * resume, digest: ``verify`` (read and hash the file) then the same ``torch.load``.

Which arm of a pair goes first alternates over the rounds (the disk's writeback of one save
slows the next). Prints median seconds per arm and the ratios digest / plain, and the hash's
own rate. The file
is in the page cache after it is written (as when a run resumes on the machine that saved it);
a cold read adds the disk's time to both resume arms alike.

    .venv/bin/python scripts/bench/bench_digests.py                       # ~1.6 GB, 3 rounds
    .venv/bin/python scripts/bench/bench_digests.py --model tiny:qwen2    # seconds, a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common as common
import torch

from selftrain.digests import file_digest, verify
from selftrain.io import atomic_file
from selftrain.models import load_model
from selftrain.training.checkpoint_io import AtomicCheckpointIO


def checkpoint_state(model_spec: str) -> dict:
    """Weights and AdamW's two moments in fp32, as a fit checkpoint holds them."""
    weights = load_model(model_spec).state_dict()
    moments = {name: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(tensor),
                      "exp_avg_sq": torch.rand_like(tensor)}
               for name, tensor in weights.items()}
    return {"global_step": 1, "state_dict": weights,
            "optimizer_states": [{"state": moments, "param_groups": []}]}


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def plain_save(state: dict, path: Path) -> None:
    with atomic_file(path) as staging, staging.open("wb") as handle:
        torch.save(state, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m", help="the student spec")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the four arms")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    state = checkpoint_state(args.model)
    io = AtomicCheckpointIO()
    times: dict[str, list[float]] = {arm: [] for arm in
                                     ("save_plain", "save_digest", "resume_plain",
                                      "resume_digest", "hash")}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_digests-") as tmp:
        plain, digested = Path(tmp) / "plain.ckpt", Path(tmp) / "last.ckpt"
        saves = {"save_plain": lambda: plain_save(state, plain),
                 "save_digest": lambda: io.save_checkpoint(state, digested)}
        resumes = {"resume_plain": lambda: torch.load(plain, weights_only=True),
                   "resume_digest": lambda: (verify(digested, "--ckpt_path"),
                                             torch.load(digested, weights_only=True))}
        for round_ in range(args.repeats):
            for arms in (saves, resumes):  # which arm goes first alternates over the rounds
                names = list(arms) if round_ % 2 == 0 else list(arms)[::-1]
                for name in names:
                    times[name].append(timed(arms[name]))
            times["hash"].append(timed(lambda: file_digest(digested)))
            common.progress(f"round {round_ + 1}/{args.repeats}: " + ", ".join(
                f"{arm} {values[-1]:.2f} s" for arm, values in times.items()))
        size = digested.stat().st_size
    median = {arm: statistics.median(values) for arm, values in times.items()}
    save_ratio = median["save_digest"] / median["save_plain"]
    resume_ratio = median["resume_digest"] / median["resume_plain"]
    print(f"bench_digests: {args.model}, checkpoint {size / 1e9:.2f} GB, {args.repeats} rounds "
          f"(median seconds)")
    for arm in ("save_plain", "save_digest", "resume_plain", "resume_digest", "hash"):
        print(f"  {arm:<14} {median[arm]:7.2f} s   rounds {common.rounds_text(times[arm], 2)}")
    print(f"ratio save digest / plain = {save_ratio:.3f}; resume digest / plain = "
          f"{resume_ratio:.3f}; xxh3-128 of the file from the page cache "
          f"{size / median['hash'] / 2**30:.2f} GiB/s")
    common.write_figures(args.json, {"model": args.model, "bytes": size, "seconds": median,
                                     "rounds": times, "save_ratio": save_ratio,
                                     "resume_ratio": resume_ratio})


if __name__ == "__main__":
    main()
