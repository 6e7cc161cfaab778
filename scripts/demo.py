"""`make demo`: the main job on the real embedded model, end to end, on a CPU.

1. samples a small corpus from SmolLM2-135M's BOS token (``selftrain generate``);
2. fine-tunes SmolLM2-135M on it for a few epochs (``selftrain fit --config
   configs/smollm2_self.yaml``), writing TensorBoard logs, checkpoints and an HF export;
3. reads the event files back and prints what happened and where to look.

Flags: ``--out DIR`` (default runs/demo), ``--num_samples``, ``--max_new_tokens``, ``--epochs``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from selftrain.tb import read_scalars

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
    corpus, run_dir = out / "corpus", out / "run"
    start = time.perf_counter()
    selftrain = [sys.executable, "-m", "selftrain"]
    run([*selftrain, "generate", "--model", "embedded:smollm2-135m", "--out", str(corpus),
         "--num_samples", str(args.num_samples), "--max_new_tokens", str(args.max_new_tokens),
         "--temperature", "1.0", "--batch_size", "64", "--overwrite", "true"])
    sampled = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)
    run([*selftrain, "fit", "--config", "configs/smollm2_self.yaml",
         "--trainer.default_root_dir", str(run_dir), "--data.corpus", str(corpus),
         "--data.max_length", str(args.max_new_tokens + 1),
         "--trainer.max_epochs", str(args.epochs), "--trainer.enable_progress_bar", "false"])
    trained = time.perf_counter()

    manifest = json.loads((corpus / "manifest.json").read_text())
    scalars = read_scalars(run_dir / "tb")
    epoch_loss = [round(v, 3) for _, v in scalars["train/loss_epoch"]]
    speeds = [v for _, v in scalars["train/tokens_per_sec"]][1:]  # first step pays warm-up
    fractions = [v for _, v in scalars["train/real_token_fraction"]]
    export = sorted((run_dir / "hf").glob("epoch=*"))[-1]
    print("\n=== selftrain demo ===")
    print(f"corpus      {corpus}  ({manifest['counts']['written']} samples, "
          f"{manifest['counts']['tokens']} tokens, {manifest['counts']['finished']} ended on "
          f"EOS, sampled at {manifest['timing']['tokens_per_sec']:.0f} tokens/s)")
    print(f"train loss  per epoch {epoch_loss}")
    print(f"throughput  {sum(speeds) / max(len(speeds), 1):.0f} training tokens/s (mean over "
          f"steps), real-token fraction of batches {sum(fractions) / len(fractions):.3f}")
    print(f"checkpoint  {run_dir / 'checkpoints' / 'last.ckpt'}")
    print(f"HF export   {export}")
    print(f"wall time   {trained - start:.0f} s (sampling {sampled - start:.0f} s, "
          f"training {trained - sampled:.0f} s)")
    print(f"look at it  tensorboard --logdir {run_dir / 'tb'}")
    if not epoch_loss[-1] < epoch_loss[0]:
        sys.exit("train/loss did not fall over the run")


if __name__ == "__main__":
    main()
