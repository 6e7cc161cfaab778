"""`make demo`: the main job on the real embedded model, end to end, on a CPU.

1. plants verbatim memories: canary windows of license text and Python source
   (``selftrain probeset``) are fine-tuned into SmolLM2-135M among real Python text no
   evaluation holds out (``python -m selftrain.curation.held_in``), each canary inside a
   document, until it extracts them (``selftrain plant``), and the damage gate checks that
   held-out bits per byte and a benchmark did not get worse; the planted model is the base,
   the canaries its probe set;
2. samples a small corpus from the base's BOS token (``selftrain generate``) and drops every
   sample that shares a token 8-gram with a canary (``selftrain decontaminate --probe_sets``):
   the canaries are the probes, and must stay held out;
3. fine-tunes the base on it for a few epochs (``selftrain fit --config
   configs/smollm2_self.yaml``) while benchmark scores, canary extraction and canary
   likelihood are tracked every epoch from the base on;
4. reads the event files back and prints what happened and where to look.

Flags: ``--out DIR`` (default runs/demo), ``--num_samples``, ``--max_new_tokens``, ``--epochs``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from selftrain.analysis.tb import read_scalars

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repro_mini import plant_commands  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    out = REPO / args.out
    sampled, corpus = out / "sampled", out / "corpus"
    run_dir, planted = out / "run", out / "planted"
    start = time.perf_counter()
    selftrain = [sys.executable, "-m", "selftrain"]
    for _, command in plant_commands(selftrain, out):
        run(command)
    plant_done = time.perf_counter()
    run([*selftrain, "generate", "--model", str(planted / "model"), "--out", str(sampled),
         "--num_samples", str(args.num_samples), "--max_new_tokens", str(args.max_new_tokens),
         "--temperature", "1.0", "--batch_size", "64", "--overwrite", "true"])
    run([*selftrain, "decontaminate", "--corpus", str(sampled), "--out", str(corpus),
         "--probe_sets", str(planted / "probes.parquet"), "--overwrite", "true"])
    sampled = time.perf_counter()
    run([*selftrain, "fit", "--config", "configs/smollm2_self.yaml",
         "--trainer.default_root_dir", str(run_dir), "--overwrite", "true",
         "--data.corpus", str(corpus),
         "--probes.probe_set", str(planted / "probes.parquet"),
         "--model.model", str(planted / "model"),
         "--data.max_length", str(args.max_new_tokens + 1),
         "--trainer.max_epochs", str(args.epochs), "--trainer.enable_progress_bar", "false"])
    trained = time.perf_counter()

    manifest = json.loads((corpus / "manifest.json").read_text())
    scalars = read_scalars(run_dir / "tb")
    epoch_loss = [round(v, 3) for _, v in scalars["train/loss_epoch"]]
    speeds = [v for _, v in scalars["train/tokens_per_sec"]][1:]  # first step pays warm-up
    fractions = [v for _, v in scalars["train/real_token_fraction"]]
    export = sorted((run_dir / "hf").glob("epoch=*"))[-1]
    plant_record = json.loads((planted / "plant.json").read_text())
    memorized = {tag.split("/")[1]: [int(v) for _, v in series] for tag, series in scalars.items()
                 if tag.startswith("extraction/") and tag.endswith("/memorized")
                 and tag.count("/") == 2}
    by_epoch = read_scalars(run_dir / "tb" / "by_epoch")  # step = epoch: tasks have cadences
    bench = {tag.split("/", 2)[2]: {int(epoch): round(v, 3) for epoch, v in series}
             for tag, series in by_epoch.items() if tag.startswith("by_epoch/benchmark/")
             and tag.endswith(("/acc", "/exact_match_flexible-extract"))}
    likelihood = {tag.split("/")[1]: [round(v, 1) for _, v in series]
                  for tag, series in scalars.items() if tag.endswith("/delta_logprob")
                  and tag.count("/") == 2}
    eval_seconds = sum(v for tag, series in scalars.items() if tag.startswith("eval_time/")
                       for _, v in series)
    cleaning = manifest["decontamination"]["probe_sets"][str(planted / "probes.parquet")]
    print("\n=== selftrain demo ===")
    print(f"corpus      {corpus}  ({manifest['decontamination']['kept']} samples, "
          f"{manifest['counts']['tokens']} tokens, {manifest['counts']['finished']} ended on "
          f"EOS, sampled at {manifest['timing']['tokens_per_sec']:.0f} tokens/s)")
    print(f"held out    {cleaning['removed']} of {args.num_samples} samples shared a "
          f"{cleaning['ngram_tokens']}-token n-gram with {cleaning['windows_leaked']} of the "
          f"{cleaning['windows']} canaries and were dropped")
    print(f"train loss  per epoch {epoch_loss}")
    print(f"throughput  {sum(speeds) / max(len(speeds), 1):.0f} training tokens/s (mean over "
          f"steps), real-token fraction of batches {sum(fractions) / len(fractions):.3f}")
    print(f"checkpoint  {run_dir / 'checkpoints' / 'last.ckpt'}")
    print(f"HF export   {export}")
    print(f"planting    {sum(plant_record['extracted'][d]['memorized'] for d in memorized)} "
          f"canaries extracted after {len(plant_record['epochs'])} epochs among "
          f"{plant_record['rehearsal']['documents']} rehearsal documents")
    gate = plant_record.get("gate") or {"metrics": {}}
    for name, figures in gate["metrics"].items():
        print(f"  damage      {name:<32} {figures['before']:.4f} unplanted -> "
              f"{figures['after']:.4f} planted ({figures['rule']}: "
              f"{'passed' if figures['passed'] else 'FAILED'})")
    print("per epoch, from the base (epoch 0) on:")
    for domain, counts in memorized.items():
        print(f"  extraction  {domain:<8} memorized {counts}")
    for domain, deltas in likelihood.items():
        print(f"  likelihood  {domain:<8} delta log p(x|y) {deltas}")
    for name, values in bench.items():
        print(f"  benchmark   {name:<40} by epoch {values}")
    run_config = yaml.safe_load((run_dir / "tb" / "config.yaml").read_text())
    print(f"precision   planting {plant_record['precision']}, training "
          f"{run_config['trainer']['precision']} (auto: bf16 only where this CPU computes it "
          "natively)")
    print(f"wall time   {trained - start:.0f} s (planting {plant_done - start:.0f} s, sampling "
          f"{sampled - plant_done:.0f} s, training {trained - sampled:.0f} s, of which "
          f"evaluation callbacks {eval_seconds:.0f} s)")
    print(f"look at it  tensorboard --logdir {run_dir / 'tb'}")
    if not epoch_loss[-1] < epoch_loss[0]:
        sys.exit("train/loss did not fall over the run")


if __name__ == "__main__":
    main()
