"""The decoding step's host cost: the sampler that read every step against one that looks every k.

Before, :class:`~selftrain.decoding.sampler.BosSampler` read each step's tokens on the host
(``drawn.tolist()``), checked the draw there (``bool(...)`` in ``draw_tokens``) and hashed the
next uniforms in numpy. Now a step runs on the device alone and the host reads the batch once
every ``host_every`` (k) steps. On a GPU each read waits for the device; on a CPU it waits for
nothing, so what a CPU can show is the host's work per step and the reads per token, which
are what the change removes.

Arms, in one process, on the same ids, batch, temperature and length cap:

  * ``before``: the sampler as it was at ``--before`` (default ``7285975^``), read from git at
    run time (``git show REV:selftrain/decoding/sampler.py``) into a temporary module; it
    imports today's ``draw``, ``slot_cache`` and ``kv_cache_argument``, whose behaviour for it
    is unchanged. Skipped, with the reason, where git or the revision is missing;
  * ``k=1``, ``k=8``, ``k=16``: today's sampler, eager; ``static k=8``: with ``static_shapes``;
  * ``generate``: ``model.generate(do_sample=True, top_k=0, top_p=1.0, ...)`` on the same
    batch, as ``bench_generate.py`` runs it.

On ``tiny:qwen2`` (91k parameters) the forward is negligible, so the wall time per decoding
step is the host's share of a step; one bare forward of the batch at a mid-length cache is
timed beside it to show how small the forward is. Each arm runs once under a counter of host
reads (untimed: the counter itself costs time), then ``--rounds`` timed runs, the arms in turn;
the median wall time is reported.
Every arm runs on one torch thread (``--threads``): on a shared 2-core machine
a second OpenMP thread waits behind other processes at every parallel region, and the timings
turn bimodal (the same tiny sampler run took 0.2 to 14.7 s on two threads, 0.23 to 0.33 s on
one; SmolLM2's rounds of the same arm 62 and 727 tokens/s on two).

A host read is what waits for the device on CUDA: every ``aten._local_scalar_dense``
(``.item()``, ``bool()``, ``int()`` of a tensor; under inference mode the dispatcher hands the
counting mode ``item``, ``is_nonzero`` and ``equal`` before they reach it, so those count too),
and every call of ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.cpu`` (patched on the class
for the arm's run). A ``.numpy()`` of what ``.cpu()`` just returned is the same read and is not
counted again. Host-to-device copies are not counted. For today's sampler the count is checked
against its own ``host_reads``.

Tokens count what a corpus keeps: each sequence up to and including its EOS. The samplers'
samples must be the same in every arm (tokens and ends, exactly); ``generate`` draws from its
own random stream and is not compared.

``--smollm2`` adds the CPU check that the change costs nothing there: the embedded
SmolLM2-135M in bfloat16, ``before`` against today's sampler at its CPU default (k=1) and at
k=8, the arms alternating over ``--smollm2_rounds`` rounds (tokens/s, ratio today / before,
paired by round).

    python scripts/bench/bench_decode_step.py               # tiny:qwen2, a few seconds
    python scripts/bench/bench_decode_step.py --smollm2     # and SmolLM2-135M, ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from _common import machine, progress, write_figures
from bench_generate import plain_generate, useful_tokens
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[2]
SAMPLER_PATH = "selftrain/decoding/sampler.py"

SCALAR_READS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal")
"""Ops that hand a tensor's value to Python (one device-to-host read each on CUDA)."""

HOST_METHODS = ("tolist", "numpy", "cpu")
"""Tensor methods that copy a tensor to the host (patched on ``torch.Tensor`` while counting)."""


# --------------------------------------------------------------------------------------------
# the sampler before the change


def load_before(rev: str) -> tuple[ModuleType | None, str]:
    """The sampler module as it was at ``rev``, imported from a temporary file.

    Args:
        rev: a git revision of this repository.

    Returns:
        (the module, or None where it could not be read; what was loaded, or why not).
    """
    try:
        shown = subprocess.run(["git", "show", f"{rev}:{SAMPLER_PATH}"], cwd=REPO,
                               capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None, "git is not installed"
    if shown.returncode != 0:
        return None, f"git show {rev}:{SAMPLER_PATH} failed: {shown.stderr.strip()}"
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO,
                            capture_output=True, text=True, check=False).stdout.strip()
    name = "_sampler_before"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sampler_before.py"
        path.write_text(shown.stdout)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module, f"{rev} ({commit})"


# --------------------------------------------------------------------------------------------
# counting host reads


@dataclass
class HostCount:
    """What :func:`counting_host_reads` counted.

    Args:
        reads: host reads by kind (an op of :data:`SCALAR_READS` without ``aten.``, or a
            method of :data:`HOST_METHODS`).
        ops: aten ops dispatched (each a kernel launch on a GPU; host work on any device).
    """

    reads: Counter = field(default_factory=Counter)
    ops: int = 0


class _Dispatched(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active, and those of :data:`SCALAR_READS`."""

    def __init__(self, count: HostCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count.ops += 1
        name = str(func.overloadpacket)
        if name in SCALAR_READS:
            self.count.reads[name.removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_host_reads() -> Iterator[HostCount]:
    """Count host reads of tensors and dispatched ops in the block (see the module docstring).

    Yields:
        the count, filled as the block runs; ``sum(count.reads.values())`` is the reads' total.
    """
    count = HostCount()
    counts = count.reads
    originals = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}
    on_host: list[weakref.ref] = []  # the tensor the last counted .cpu() returned

    def tolist(self, *args, **kwargs):
        counts["tolist"] += 1
        return originals["tolist"](self, *args, **kwargs)

    def numpy(self, *args, **kwargs):
        if not (on_host and on_host[0]() is self):
            counts["numpy"] += 1
        return originals["numpy"](self, *args, **kwargs)

    def cpu(self, *args, **kwargs):
        counts["cpu"] += 1
        result = originals["cpu"](self, *args, **kwargs)
        on_host[:] = [weakref.ref(result)]
        return result

    patched = {"tolist": tolist, "numpy": numpy, "cpu": cpu}
    for name, method in patched.items():
        setattr(torch.Tensor, name, method)
    try:
        with _Dispatched(count):
            yield count
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


# --------------------------------------------------------------------------------------------
# the arms


def run_sampler(make: Callable[[], object], num_samples: int) -> dict:
    """One run of a sampler over ids ``0..num_samples-1``.

    Args:
        make: builds a fresh sampler (``sample``, ``steps``, ``rows_computed``).
        num_samples: sequences to sample.

    Returns:
        wall seconds, steps, rows computed, tokens kept, the sampler's own host reads (None
        where it keeps no count) and the samples as ``{id: (tokens, finished)}``.
    """
    sampler = make()
    start = time.perf_counter()
    samples = list(sampler.sample(range(num_samples)))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": sampler.steps, "rows_computed": sampler.rows_computed,
            "tokens": sum(len(s.tokens) for s in samples),
            "finished": sum(s.finished for s in samples),
            "sampler_host_reads": getattr(sampler, "host_reads", None),
            "samples": {s.id: (tuple(s.tokens), s.finished) for s in samples}}


@torch.inference_mode()
def run_generate(model, bos_id: int, eos_id: int | None, pad_id: int, args) -> dict:
    """``model.generate`` over the same number of sequences, as ``bench_generate.py`` runs it.

    Steps are the model's forward calls (a hook counts them); the first feeds BOS, as the
    sampler's first step does.
    """
    calls = [0]
    hook = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        rows, seconds = plain_generate(model, bos_id, eos_id, pad_id, args)
    finally:
        hook.remove()
    return {"seconds": seconds, "steps": calls[0], "rows_computed": None,
            "tokens": useful_tokens(rows, eos_id), "finished": sum(eos_id in r for r in rows),
            "sampler_host_reads": None, "samples": None}


@torch.inference_mode()
def bare_forward(model, bos_id: int, batch: int, length: int, blocks: int = 7,
                 repeats: int = 20) -> dict:
    """One forward of ``batch`` rows, one token each, over a cache of ``length`` columns.

    The cache is the sampler's :class:`~selftrain.decoding.slot_cache.SlotCache`, filled by
    ``length`` steps; the timed call is the model alone (its mask and positions prebuilt).

    Returns:
        ``ms``: the median over ``blocks`` of the mean of ``repeats`` calls; ``ops``: the aten
        ops one call dispatches; ``flops``: its matmul arithmetic, 2 x parameters x rows.
    """
    from selftrain.decoding.slot_cache import SlotCache
    from selftrain.models import kv_cache_argument

    argument = kv_cache_argument(model)
    dtype = next(model.parameters()).dtype
    cache = SlotCache(model.config.get_text_config().num_hidden_layers, length + 1)
    tokens = torch.full((batch, 1), bos_id, dtype=torch.long)
    masks = [torch.zeros(batch, 1, 1, column + 1, dtype=dtype) for column in range(length + 1)]
    positions = [torch.full((batch, 1), column, dtype=torch.long)
                 for column in range(length + 1)]

    def forward(column: int) -> None:
        model(input_ids=tokens, attention_mask=masks[column], position_ids=positions[column],
              use_cache=True, **{argument: cache})

    for column in range(length):
        cache.column = column
        forward(column)
    cache.column = length
    forward(length)  # warm-up at the measured length (each call rewrites the same column)
    with counting_host_reads() as count:
        forward(length)
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(repeats):
            forward(length)
        times.append(1000 * (time.perf_counter() - start) / repeats)
    parameters = sum(p.numel() for p in model.parameters())
    return {"ms": statistics.median(times), "ops": count.ops,
            "host_reads": sum(count.reads.values()), "flops": 2 * parameters * batch}


# --------------------------------------------------------------------------------------------
# reporting


def cpu_name() -> str:
    """The CPU's model name as lscpu gives it (``/proc/cpuinfo``), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return machine(torch.device("cpu"))["device_name"]


def same_samples(results: dict[str, dict], base: str) -> dict[str, bool]:
    """For each sampler arm, whether its samples equal ``base``'s (tokens and ends, exactly)."""
    reference = results[base]["samples"]
    return {name: figures["samples"] == reference for name, figures in results.items()
            if figures["samples"] is not None and name != base}


def tiny_bench(args, before: ModuleType | None) -> dict:
    """The host-cost arms on ``args.model`` (tiny:qwen2): reads counted, then timed rounds."""
    from selftrain.decoding.sampler import BosSampler
    from selftrain.models import load_model, load_tokenizer, pad_token_id, resolve_bos_id

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype).eval()
    bos_id, _ = resolve_bos_id(tokenizer, model.config)
    eos_id, pad_id, vocab = tokenizer.eos_token_id, pad_token_id(tokenizer), len(tokenizer)
    common = (model, bos_id, eos_id, vocab, args.temperature, args.max_new_tokens,
              args.batch_size)

    arms: dict[str, Callable[[], dict]] = {}
    if before is not None:
        arms["before"] = lambda: run_sampler(
            lambda: before.BosSampler(*common, seed=args.seed), args.num_samples)
    for k in args.host_every:
        arms[f"k={k}"] = lambda k=k: run_sampler(
            lambda: BosSampler(*common, seed=args.seed, host_every=k), args.num_samples)
    arms[f"static k={args.static_every}"] = lambda: run_sampler(
        lambda: BosSampler(*common, seed=args.seed, host_every=args.static_every,
                           static_shapes=True), args.num_samples)
    arms["generate"] = lambda: run_generate(model, bos_id, eos_id, pad_id, args)

    progress("warm-up")
    warm = argparse.Namespace(**{**vars(args), "num_samples": 2, "batch_size": 2,
                                 "max_new_tokens": 4})
    for name, arm in arms.items():
        if name == "generate":
            run_generate(model, bos_id, eos_id, pad_id, warm)
        else:
            arm()

    results: dict[str, dict] = {}
    for name, arm in arms.items():
        progress(f"{name}: counting host reads")
        with counting_host_reads() as count:
            figures = arm()
        figures["host_reads_counted"] = sum(count.reads.values())
        figures["host_reads_by_kind"] = dict(sorted(count.reads.items()))
        figures["ops"] = count.ops
        results[name] = figures
    progress(f"{args.rounds} timed rounds")
    for _ in range(args.rounds):
        for name, arm in arms.items():
            timed = arm()
            if timed["samples"] != results[name]["samples"]:
                raise SystemExit(f"{name}: a timed run sampled other tokens than the counted one")
            results[name].setdefault("rounds_s", []).append(timed["seconds"])
    for figures in results.values():
        figures["seconds"] = statistics.median(figures.pop("rounds_s"))
        figures["step_ms"] = 1000 * figures["seconds"] / figures["steps"]
        figures["reads_per_token"] = figures["host_reads_counted"] / figures["tokens"]
        figures["reads_per_step"] = figures["host_reads_counted"] / figures["steps"]

    forward = bare_forward(model, bos_id, args.batch_size, args.max_new_tokens // 2)
    for figures in results.values():
        figures["ops_per_step"] = figures["ops"] / figures["steps"]
        figures["beside_forward_ms"] = figures["step_ms"] - forward["ms"]
    return {"results": results, "forward": forward}


def print_tiny(args, bench: dict, before_text: str) -> dict:
    results = bench["results"]
    print(f"{args.model}, {args.dtype}, batch {args.batch_size}, {args.num_samples} sequences, "
          f"{args.max_new_tokens} new tokens, temperature {args.temperature}; sampler before: "
          f"{before_text}; median of {args.rounds} timed rounds")
    forward = bench["forward"]
    print(f"{'arm':<12} {'wall s':>7} {'steps':>5} {'step ms':>7} {'- fwd ms':>8} "
          f"{'ops/step':>8} {'tokens':>6} {'reads':>5} {'reads/step':>10} {'reads/token':>11}"
          f"  reads by kind")
    for name, f in results.items():
        print(f"{name:<12} {f['seconds']:7.3f} {f['steps']:5d} {f['step_ms']:7.3f} "
              f"{f['beside_forward_ms']:8.3f} {f['ops_per_step']:8.1f} {f['tokens']:6d} "
              f"{f['host_reads_counted']:5d} {f['reads_per_step']:10.3f} "
              f"{f['reads_per_token']:11.4f}  {json.dumps(f['host_reads_by_kind'])}")
    print(f"step ms: wall / steps. One bare forward of {args.batch_size} rows at a "
          f"{args.max_new_tokens // 2}-column cache: {forward['ms']:.3f} ms, {forward['ops']} "
          f"aten ops, {forward['host_reads']} host reads, {forward['flops'] / 1e6:.1f} MFLOP "
          f"of matmuls; '- fwd ms' is step ms minus it.")
    print(f"On {args.model} the forward's arithmetic is negligible, so a step's time is host "
          f"work: the forward's own op dispatch, then the decoder's bookkeeping. On a CPU a "
          f"host read waits for nothing, so these times are host work, not synchronisation "
          f"waits; the reads columns count what would wait on a GPU.")
    checks = {}
    for name, f in results.items():
        if f["sampler_host_reads"] is not None:
            agree = f["sampler_host_reads"] == f["host_reads_counted"]
            checks[name] = agree
            print(f"{name}: host reads counted {f['host_reads_counted']}, sampler.host_reads "
                  f"{f['sampler_host_reads']}: {'agree' if agree else 'DISAGREE'}")
    base = "before" if "before" in results else f"k={args.host_every[0]}"
    same = same_samples(results, base)
    print(f"samples equal to {base}'s (tokens and ends, exactly): "
          + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in same.items()))

    ratios = {}
    new_arms = [name for name in results if name not in ("before", "generate")]
    if "before" in results:
        old = results["before"]
        for name in new_arms:
            ratios[f"reads/token before / {name}"] = (old["reads_per_token"]
                                                      / results[name]["reads_per_token"])
        for name in new_arms:
            ratios[f"step time {name} / before"] = results[name]["step_ms"] / old["step_ms"]
        for name in new_arms:
            ratios[f"ops/step {name} / before"] = (results[name]["ops_per_step"]
                                                   / old["ops_per_step"])
        ratios["step time before / generate"] = old["step_ms"] / results["generate"]["step_ms"]
    for name in new_arms:
        ratios[f"step time {name} / generate"] = (results[name]["step_ms"]
                                                  / results["generate"]["step_ms"])
    for name in new_arms:
        ratios[f"reads/token generate / {name}"] = (results["generate"]["reads_per_token"]
                                                    / results[name]["reads_per_token"])
    for name, value in ratios.items():
        print(f"ratio {name:<36} {value:8.2f}")
    return {"reads_agree": checks, "same_samples": same, "ratios": ratios}


def smollm2_bench(args, before: ModuleType | None) -> dict:
    """Before against today's sampler (k=1, k=8) on the embedded SmolLM2-135M, alternating."""
    from selftrain.decoding.sampler import BosSampler
    from selftrain.models import load_model, load_tokenizer, resolve_bos_id

    tokenizer = load_tokenizer(args.smollm2_model)
    model = load_model(args.smollm2_model, dtype=args.smollm2_dtype).eval()
    bos_id, _ = resolve_bos_id(tokenizer, model.config)
    eos_id, vocab = tokenizer.eos_token_id, len(tokenizer)

    def arm(sampler_class, batch: int, new_tokens: int, samples: int, **extra):
        return lambda: run_sampler(
            lambda: sampler_class(model, bos_id, eos_id, vocab, args.temperature, new_tokens,
                                  batch, seed=args.seed, **extra), samples)

    def arms(batch: int, new_tokens: int, samples: int) -> dict[str, Callable[[], dict]]:
        chosen = {} if before is None else {"before": arm(before.BosSampler, batch,
                                                          new_tokens, samples)}
        chosen["k=1"] = arm(BosSampler, batch, new_tokens, samples, host_every=1)
        chosen["k=8"] = arm(BosSampler, batch, new_tokens, samples, host_every=8)
        return chosen

    progress(f"{args.smollm2_model}: warm-up")
    for warm in arms(2, 4, 2).values():
        warm()
    results: dict[str, dict] = {}
    measured = arms(args.batch_size, args.max_new_tokens, args.num_samples)
    for index in range(args.smollm2_rounds):
        order = list(measured) if index % 2 == 0 else list(reversed(measured))
        for name in order:
            progress(f"{args.smollm2_model}: round {index + 1}, {name}")
            figures = measured[name]()
            entry = results.setdefault(name, {"rounds": [], "samples": figures["samples"]})
            entry["rounds"].append({key: figures[key] for key in
                                    ("seconds", "tokens", "steps", "rows_computed",
                                     "sampler_host_reads")})
            if figures["samples"] != entry["samples"]:
                raise SystemExit(f"{name}: round {index + 1} sampled other tokens")
    for entry in results.values():
        rounds = entry["rounds"]
        entry["tokens_per_sec"] = [r["tokens"] / r["seconds"] for r in rounds]
        entry["tokens_per_sec_all"] = (sum(r["tokens"] for r in rounds)
                                       / sum(r["seconds"] for r in rounds))
    return {"results": results, "model": args.smollm2_model, "dtype": args.smollm2_dtype}


def print_smollm2(args, bench: dict) -> dict:
    results = bench["results"]
    print(f"{bench['model']}, {bench['dtype']}, batch {args.batch_size}, {args.num_samples} "
          f"sequences, {args.max_new_tokens} new tokens, temperature {args.temperature}; "
          f"{args.smollm2_rounds} rounds, arms alternating")
    for name, entry in results.items():
        last = entry["rounds"][-1]
        rates = ", ".join(f"{rate:.1f}" for rate in entry["tokens_per_sec"])
        reads = ("" if last["sampler_host_reads"] is None
                 else f", host_reads {last['sampler_host_reads']}")
        print(f"{name:<8} {entry['tokens_per_sec_all']:7.1f} tokens/s (rounds: {rates}; "
              f"{last['tokens']} tokens, {last['steps']} steps, {last['rows_computed']} rows "
              f"computed{reads})")
    ratios, same = {}, {}
    if "before" in results:
        old = results["before"]
        for name in ("k=1", "k=8"):
            paired = [new / base for new, base in zip(results[name]["tokens_per_sec"],
                                                      old["tokens_per_sec"], strict=True)]
            ratios[f"{name} / before"] = results[name]["tokens_per_sec_all"] / \
                old["tokens_per_sec_all"]
            print(f"ratio tokens/s {name} / before {ratios[f'{name} / before']:.3f} "
                  f"(paired rounds: {', '.join(f'{p:.3f}' for p in paired)})")
        same = {name: results[name]["samples"] == old["samples"] for name in ("k=1", "k=8")}
        print("samples equal to before's (tokens and ends, exactly): "
              + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in same.items()))
    return {"ratios": ratios, "same_samples": same}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny:qwen2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_samples", type=int, default=None,
                        help="sequences per arm (default: one batch)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host_every", type=int, nargs="+", default=[1, 8, 16],
                        help="k of today's eager arms")
    parser.add_argument("--static_every", type=int, default=8, help="k of the static arm")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each arm")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every arm (see the module docstring)")
    parser.add_argument("--before", default="7285975^",
                        help="git revision of the sampler before the change")
    parser.add_argument("--smollm2", action="store_true",
                        help="also the SmolLM2-135M comparison (minutes on a CPU)")
    parser.add_argument("--smollm2_model", default="embedded:smollm2-135m")
    parser.add_argument("--smollm2_dtype", default="bfloat16")
    parser.add_argument("--smollm2_rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    args.num_samples = args.num_samples or args.batch_size
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import transformers

    start = time.perf_counter()
    before, before_text = load_before(args.before)
    if before is None:
        print(f"sampler before: {before_text}; its arm is skipped")
    setup = {"cpu": cpu_name(), **machine(torch.device("cpu")), "torch": torch.__version__,
             "transformers": transformers.__version__}
    torch.set_num_threads(args.threads)
    setup.update(threads=args.threads, cores=os.cpu_count())
    print(f"setup: {json.dumps(setup)}")
    tiny = tiny_bench(args, before)
    report = {"setup": setup, "before": before_text, "tiny": print_tiny(args, tiny, before_text)}
    figures = {name: {key: value for key, value in f.items() if key != "samples"}
               for name, f in tiny["results"].items()}
    report["tiny"].update(figures=figures, forward=tiny["forward"])
    if args.smollm2:
        smollm2 = smollm2_bench(args, before)
        report["smollm2"] = print_smollm2(args, smollm2)
        report["smollm2"]["figures"] = {
            name: {key: value for key, value in entry.items() if key != "samples"}
            for name, entry in smollm2["results"].items()}
    print(f"wall time {time.perf_counter() - start:.0f} s")
    write_figures(args.json, report)


if __name__ == "__main__":
    main()
