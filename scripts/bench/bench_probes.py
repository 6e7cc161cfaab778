"""What the evaluation callbacks cost, measured in one run.

1. Extraction: the probe's greedy continuation (``selftrain.probes.windows.greedy_continuations``)
   against a plain batched ``model.generate(do_sample=False)`` over the same prefixes, same
   batch size, same bf16 autocast, alternating runs; prints sequences/s and the ratio (goal
   >= 0.9) and checks the two give the same tokens.
2. Share of the training: the demo's fit (``configs/smollm2_self.yaml`` on the planted base,
   probe set and corpus ``make demo`` made), ``--epochs`` epochs, all three callbacks; prints
   the seconds of every training epoch and of every evaluation (epoch 0 and after each epoch,
   each task at its own cadence) and the evaluations' share of the whole.

Usage: python scripts/bench/bench_probes.py [--demo runs/demo] [--rows 64] [--batch_size 32]
    [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from selftrain.callbacks.epoch_eval import EpochEvaluation
from selftrain.models import load_model, load_tokenizer, pad_token_id
from selftrain.probes.probeset import candidate_windows
from selftrain.probes.windows import greedy_continuations
from selftrain.trainer_cli import SelftrainCLI

REPO = Path(__file__).resolve().parents[2]


def bench_extraction(model_spec: str, rows: int, batch_size: int, repeats: int) -> dict:
    tokenizer = load_tokenizer(model_spec)
    windows = candidate_windows(["code={stdlib}/*.py"], tokenizer, 64, 32, rows, seed=0)
    ids = torch.tensor([w["input_ids"] for w in windows[:rows]])
    prefixes = ids[:, :32]
    model = load_model(model_spec).eval()

    def ours() -> torch.Tensor:
        return greedy_continuations(model, prefixes, 32, batch_size)

    def plain() -> torch.Tensor:
        out = [model.generate(chunk, attention_mask=torch.ones_like(chunk), do_sample=False,
                              max_new_tokens=32, min_new_tokens=32,
                              pad_token_id=pad_token_id(tokenizer))[:, 32:]
               for chunk in prefixes.split(batch_size)]
        return torch.cat(out)

    times: dict[str, list[float]] = {"probe": [], "generate": []}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours(), plain()  # warm-up
        for _ in range(repeats):
            for name, fn in (("probe", ours), ("generate", plain)):
                start = time.perf_counter()
                tokens = fn()
                times[name].append(time.perf_counter() - start)
                if name == "probe":
                    probe_tokens = tokens
                else:
                    agree = float((probe_tokens == tokens).float().mean())
    best = {name: len(prefixes) / min(values) for name, values in times.items()}
    return {"rows": len(prefixes), "probe_seq_per_s": best["probe"],
            "generate_seq_per_s": best["generate"],
            "ratio": best["probe"] / best["generate"], "token_agreement": agree}


class EpochClock(L.Callback):
    """Wall time of each training epoch, up to (not including) the evaluation callbacks."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def bench_epoch_share(demo: Path, run: Path, epochs: int) -> dict:
    planted = demo / "planted"
    if not (planted / "probes.parquet").exists():
        raise SystemExit(f"{planted} not found: run `make demo` first (it plants the base)")
    shutil.rmtree(run, ignore_errors=True)  # this bench's scratch run: its records only
    cli = SelftrainCLI(args=[  # the demo's own fit (scripts/demo.py), into another run dir
        "--config", str(REPO / "configs" / "smollm2_self.yaml"),
        "--probes.probe_set", str(planted / "probes.parquet"),
        "--model.model", str(planted / "model"), "--data.corpus", str(demo / "corpus"),
        "--data.max_length", "65", "--trainer.max_epochs", str(epochs),
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--model.export_hf", "never", "--checkpoint.save_last", "false",
        "--overwrite", "true"], run=False)
    clock = EpochClock()
    cli.trainer.callbacks.insert(0, clock)  # its epoch-end hook runs before the evaluations
    cli.datamodule.load()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    evaluations = {}
    for callback in cli.trainer.callbacks:
        if isinstance(callback, EpochEvaluation):
            lines = (run / "eval" / f"{callback.name}.jsonl").read_text().splitlines()
            evaluations[callback.name] = [json.loads(line)["seconds"] for line in lines]
    trained = sum(clock.seconds)
    spent = sum(sum(seconds) for seconds in evaluations.values())
    return {"epochs": epochs, "epoch_train_s": clock.seconds, "callbacks_s": evaluations,
            "callback_share": spent / (trained + spent)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="the demo's epochs")
    args = parser.parse_args()
    torch.manual_seed(0)
    demo = REPO / args.demo
    model = str(demo / "planted" / "model")
    if not Path(model).exists():
        model = "embedded:smollm2-135m"
    extraction = bench_extraction(model, args.rows, args.batch_size, args.repeats)
    print(f"extraction ({model}, {extraction['rows']} prefixes x 32 greedy tokens, batch "
          f"{args.batch_size}, bf16 autocast, best of {args.repeats})")
    print(f"  probe    {extraction['probe_seq_per_s']:.2f} seq/s")
    print(f"  generate {extraction['generate_seq_per_s']:.2f} seq/s")
    print(f"  ratio probe / generate = {extraction['ratio']:.2f} (goal >= 0.9); same tokens "
          f"{extraction['token_agreement']:.1%}")
    share = bench_epoch_share(demo, demo / "bench_run", args.epochs)
    print(f"the demo's training, {args.epochs} epochs (configs/smollm2_self.yaml), evaluations "
          "at epoch 0 and after every epoch")
    print(f"  training epochs {', '.join(f'{s:.1f}' for s in share['epoch_train_s'])} s")
    for name, seconds in share["callbacks_s"].items():
        print(f"  {name:<10} {', '.join(f'{s:.1f}' for s in seconds)} s")
    print(f"  callbacks' share of the training = {share['callback_share']:.1%}")
    print(yaml.safe_dump({"extraction": extraction, "epoch": share}, sort_keys=False))


if __name__ == "__main__":
    main()
