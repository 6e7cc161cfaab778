"""Peak memory of one training step: transformers' loss against ``--model.loss_chunk``.

transformers' causal-LM loss holds the whole ``batch x sequence x vocabulary`` float32 logits
(and their log-softmax, then their gradient); the chunked loss of
:mod:`selftrain.training.loss` holds one chunk's. This bench runs one forward + backward of
``StudentLM._loss`` on the same random batch in each arm, each arm in a fresh process, with
gradient checkpointing (``--model.gradient_checkpointing``, as one trains when memory is short;
``--no_checkpointing`` turns it off) so that the backbone keeps one hidden state per layer and
token and the loss's logits dominate the step's memory:

  * ``hf``: ``StudentLM()``, the loss from ``model(**batch).loss``;
  * ``chunked``: ``StudentLM(loss_chunk=N)``.

Each arm loads the student, runs a small warm-up step (so lazily allocated buffers exist),
hands freed heap back to the system (``malloc_trim``), notes its resident set, then runs the
measured step and reports:

  * peak RSS (``getrusage`` ``ru_maxrss``, the process's high-water mark) and the step's rise
    above the resident set before it (what the step itself added, the loaded model apart);
  * the tensor peak of a second, profiled step: the largest total of live tensors in torch's
    profiler memory timeline (``torch.profiler`` with ``profile_memory``; every CPU tensor the
    allocator hands out, parameters included). Checked against torch 2.13, whose
    ``MemoryProfileTimeline`` is private.

Printed: a line per arm, the ratios hf / chunked, and the two arms' losses (they agree).

    python scripts/bench/bench_loss_memory.py      # CPU: embedded SmolLM2-135M, ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import _common as common
import torch

ARMS = ("hf", "chunked")
MIB = 2**20


def resident_mib() -> float:
    """This process's resident set now (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmRSS in /proc/self/status: this bench needs Linux")


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc), so the next peak starts clean."""
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).malloc_trim(0)


def random_batch(batch_size: int, seq_len: int, vocab: int) -> dict[str, torch.Tensor]:
    """A padded batch without padding: fixed-seed random ids, every token a target."""
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def step(module, batch: dict[str, torch.Tensor]) -> float:
    """Forward and backward of the student's loss; the loss. Gradients freed after."""
    loss = module._loss(batch)
    loss.backward()
    module.model.zero_grad(set_to_none=True)
    return float(loss.detach())


def tensor_peak_mib(module, batch: dict[str, torch.Tensor]) -> float:
    """Largest total of live CPU tensors during one step, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step(module, batch)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(
        torch.device("cpu"))
    return max(sum(row) for row in sizes) / MIB


def run_arm(args) -> dict:
    """One arm, in this process: load, warm up, measure."""
    from selftrain.training.module import StudentLM

    chunk = args.loss_chunk if args.arm == "chunked" else None
    begin = time.perf_counter()
    module = StudentLM(model=args.model, attn_implementation="sdpa", loss_chunk=chunk,
                       gradient_checkpointing=not args.no_checkpointing)
    module.configure_model()
    vocab = module.model.config.vocab_size
    common.progress(f"{args.arm}: loaded in {time.perf_counter() - begin:.0f} s")
    step(module, random_batch(1, 16, vocab))  # warm-up
    batch = random_batch(args.batch_size, args.seq_len, vocab)
    trim_heap()
    before = resident_mib()
    start = time.perf_counter()
    loss = step(module, batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    common.progress(f"{args.arm}: step {seconds:.0f} s, peak RSS {peak:,.0f} MiB; profiling")
    trim_heap()
    tracked = tensor_peak_mib(module, batch)
    return {"arm": args.arm, "loss_chunk": chunk, "vocab": vocab, "loss": loss,
            "rss_before_mib": before, "peak_rss_mib": peak, "step_rise_mib": peak - before,
            "tensor_peak_mib": tracked, "step_s": seconds}


def spawn(arm: str, args) -> dict:
    """One arm in a fresh process; its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--model",
               args.model, "--batch_size", str(args.batch_size), "--seq_len",
               str(args.seq_len), "--loss_chunk", str(args.loss_chunk)]
    command += ["--no_checkpointing"] if args.no_checkpointing else []
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.stdout.write(done.stdout)
        raise SystemExit(f"the {arm} arm failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m", help="student spec")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--loss_chunk", type=int, default=1024, help="the chunked arm's chunk")
    parser.add_argument("--no_checkpointing", action="store_true",
                        help="keep every layer's activations (they then outweigh the logits)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args)), flush=True)
        return
    start = time.perf_counter()
    runs = {}
    for arm in ARMS:
        common.progress(f"arm {arm}")
        runs[arm] = spawn(arm, args)
    device = torch.device("cpu")
    tokens = args.batch_size * args.seq_len
    logits = tokens * runs["hf"]["vocab"] * 4 / MIB
    print(f"bench_loss_memory: {args.model} on {common.machine_text(device)}, float32, one "
          f"forward + backward of {args.batch_size} x {args.seq_len} = {tokens:,} tokens "
          f"(vocab {runs['hf']['vocab']:,}: the float32 logits alone are {logits:,.0f} MiB), "
          f"chunk {args.loss_chunk}, gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}")
    columns = [("peak RSS MiB", ">12", common.mib_cell("peak_rss_mib")),
               ("step rise MiB", ">13", common.mib_cell("step_rise_mib")),
               ("tensor peak MiB", ">15", common.mib_cell("tensor_peak_mib")),
               ("step s", ">6.0f", "step_s"), ("loss", ">10.6f", "loss")]
    common.print_table(("loss", "<8"), columns, runs)
    ratios = {key: runs["hf"][key] / runs["chunked"][key]
              for key in ("peak_rss_mib", "step_rise_mib", "tensor_peak_mib")}
    print(f"ratio hf / chunked: peak RSS {ratios['peak_rss_mib']:.2f}x, step rise "
          f"{ratios['step_rise_mib']:.2f}x, tensor peak {ratios['tensor_peak_mib']:.2f}x; "
          f"losses differ by {abs(runs['hf']['loss'] - runs['chunked']['loss']):.1e}")
    result = {"setup": {**vars(args), **common.machine(device), "torch": torch.__version__},
              "arms": runs, "ratios": ratios, "wall_s": time.perf_counter() - start}
    print(f"wall time {result['wall_s']:.0f} s")
    print(json.dumps(result))
    common.write_figures(args.json, result)


if __name__ == "__main__":
    main()
