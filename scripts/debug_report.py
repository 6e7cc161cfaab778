"""Build the tiny debug runs and the `selftrain report` over them (docs/records/report-example/).

What ``docs/report.md`` shows as its example comes from here: two conditions (the debug
corpus sampled at T=0.7, shipped in ``configs/data/tiny_qwen2_self``, and a second one sampled
here at T=1.0) times two disjoint subsets, each fitted with ``configs/debug.yaml`` for 3 epochs;
then ``selftrain proxies`` on both corpora (skipped, with the reason, if it fails: it needs the
``proxies`` extra), and the report. The models are randomly initialised tiny Qwen2s: the
numbers exercise the pipeline and mean nothing scientifically, and the report says so.

    python scripts/debug_report.py --work runs/debug_report --out docs/records/report-example
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path("configs/data/tiny_qwen2_self")
BENCHMARKS = ["configs/tasks/selftrain_local/selftrain_facts_test.jsonl",
              "configs/tasks/selftrain_local/selftrain_arith_test.jsonl"]
NOTE = ("Example from the tiny debug runs (scripts/debug_report.py): randomly initialised "
        "tiny:qwen2 students, 3 epochs on 96 samples per subset. The numbers exercise the "
        "pipeline and mean nothing scientifically.")


def selftrain(*args: str) -> None:
    """Run one ``selftrain`` command in this process; a refusal (exit 2) stops the script."""
    from selftrain.cli import main

    print("$ selftrain " + " ".join(args), flush=True)
    main(list(args))


def build(work: Path, out: Path, epochs: int) -> None:
    """Fit 2 conditions x 2 subsets under ``work``, measure proxies, write the report to ``out``.

    Args:
        work: a new dir for the corpus, runs and proxies (relative to the repository).
        out: the report dir (replaced if it holds a report).
        epochs: epochs per fit.
    """
    started = time.perf_counter()
    second = work / "corpora" / "tiny_qwen2_t1.0"
    selftrain("generate", "--model", "tiny:qwen2", "--out", str(second), "--num_samples", "192",
              "--max_new_tokens", "48", "--temperature", "1.0", "--num_subsets", "2",
              "--batch_size", "64")
    corpora = {"t0.7": CORPUS, "t1.0": second}
    for name, corpus in corpora.items():
        for subset in (0, 1):
            selftrain("fit", "--config", "configs/debug.yaml",
                      "--trainer.default_root_dir", str(work / "runs" / f"{name}_s{subset}"),
                      "--data.corpus", str(corpus), "--data.subset", str(subset),
                      "--data.num_subsets", "2", "--trainer.max_epochs", str(epochs),
                      "--trainer.enable_progress_bar", "false")
    proxies = []
    for name, corpus in corpora.items():
        target = work / "proxies" / name
        try:
            selftrain("proxies", "--corpus", str(corpus), "--out", str(target), "--benchmarks",
                      "[" + ", ".join(BENCHMARKS) + "]",
                      "--student", "tiny:qwen2", "--threshold", "0.35")
            proxies.append(str(target))
        except (SystemExit, Exception) as error:  # the command may be missing or refuse
            print(f"selftrain proxies on {corpus} failed ({error!r}); the report goes without "
                  "proxies for it", file=sys.stderr)
    args = ["report", "--runs", f"[{work / 'runs'}]", "--out", str(out), "--overwrite", "true",
            "--note", NOTE]
    if proxies:
        args += ["--proxies", "[" + ", ".join(proxies) + "]"]
    selftrain(*args)
    print(f"done in {time.perf_counter() - started:.0f} s: {out}/summary.md")


def main() -> None:
    """Parse the flags and build."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/debug_report"),
                        help="new dir for the second corpus, the runs and the proxies")
    parser.add_argument("--out", type=Path, default=Path("docs/records/report-example"),
                        help="the report dir (an existing report there is replaced)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit")
    args = parser.parse_args()
    work, out = (path if path.is_absolute() else Path.cwd() / path for path in (args.work,
                                                                               args.out))
    if work.exists() and any(work.iterdir()):
        parser.error(f"--work {args.work}: not empty; choose a new dir")
    os.chdir(REPO)  # the config's relative paths; the report shows paths relative to the repo
    build(Path(os.path.relpath(work)), Path(os.path.relpath(out)), args.epochs)


if __name__ == "__main__":
    main()
