"""`make sbp-mini`: Synthetic Bootstrapped Pretraining against its baselines, on a CPU.

1. writes the real text: Python documentation (``pydoc_data.topics``, without the topics the
   ``selftrain_bpb_pydoc`` task holds out), cut into documents of at most 1000 characters and
   taken whole topic by topic in a seeded order: the first ``--real`` documents are the real
   corpus, the first ``2 x --real`` the oracle's (more unique real text);
2. runs the grid ``configs/sweep/sbp_mini.yaml`` with ``selftrain sweep``: pairs in the real
   corpus, the synthesizer, synthesis, then one student each on real + synthetic (``sbp``), on
   the real documents repeated (``sbp_repeat``) and on the oracle's (``sbp_oracle``), all at
   one token budget, evaluated every epoch; the report;
3. copies what a reader needs into ``docs/records/sbp-mini/`` as the run wrote it: the report's
   ``summary.md``, figures and scalars, the pairs' and the synthetic corpus's manifests, a few
   synthetic documents beside their seeds, the grid, the commands and the wall times.

The real text goes into ``--out`` and the sweep into ``--out``/sweep, a dir of its own apart
from its inputs. Rerunning resumes (the sweep's records). Flags: ``--out DIR`` (default
runs/sbp-mini; the grid's paths assume it), ``--publish DIR`` (default docs/sbp-mini; ``""``
skips the copy), ``--publish_only`` (copy a finished run again; its wall time is then the sum of
the steps').
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repro_mini import REPO, pydoc_documents, run  # noqa: E402

GRID = "configs/sweep/sbp_mini.yaml"
SEED = 20251127


def write_real_text(out: Path, real: int) -> dict[str, int]:
    """``real.jsonl`` (``real`` documents) and ``oracle.jsonl`` (twice as many, a superset).

    Args:
        out: the dir both go into.
        real: documents of the real corpus.
    """
    by_topic: dict[str, list[str]] = {}
    for topic, text in pydoc_documents(max_chars=1000):
        by_topic.setdefault(topic, []).append(text)
    order = sorted(by_topic)
    random.Random(SEED).shuffle(order)
    documents = [(topic, text) for topic in order for text in by_topic[topic]]
    if len(documents) < 2 * real:
        raise SystemExit(f"--real {real}: only {len(documents)} documents; lower it")
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("real", real), ("oracle", 2 * real)):
        rows = [{"id": i, "text": text, "source": f"pydoc_data.topics[{topic!r}]"}
                for i, (topic, text) in enumerate(documents[:count])]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"real": real, "oracle": 2 * real}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sbp-mini")
    parser.add_argument("--publish", default="docs/records/sbp-mini")
    parser.add_argument("--real", type=int, default=96, help="documents of the real corpus")
    parser.add_argument("--publish_only", action="store_true",
                        help="copy a finished run into --publish without running anything")
    args = parser.parse_args()
    out = REPO / args.out
    if args.publish_only:
        seconds = json.loads((out / "sweep" / ".sweep" / "summary.json").read_text())["seconds"]
        publish(out, REPO / args.publish, sum(v or 0.0 for v in seconds.values()),
                {"real": args.real, "oracle": 2 * args.real}, "sum of the steps")
        return
    start = time.perf_counter()
    counts = write_real_text(out, args.real)
    print(f"real text: {counts} documents -> {out}", flush=True)
    sweep = [sys.executable, "-m", "selftrain", "sweep", "--config", GRID]
    run(sweep)
    total = time.perf_counter() - start
    if args.publish:
        publish(out, REPO / args.publish, total, counts)


def examples(corpus: Path, seeds_file: Path, count: int = 3) -> list[str]:
    """Markdown of a synthetic corpus's first documents beside the start of their seeds."""
    import pyarrow.parquet as pq

    seeds = {json.loads(line)["id"]: json.loads(line)["text"]
             for line in seeds_file.read_text().splitlines()}
    table = pq.read_table(corpus / "data").to_pylist()
    lines = []
    for row in table[:count]:
        lines += [f"### {corpus.name}: synthetic document {row['id']} (seed document "
                  f"{row['seed_id']})", "",
                  "Seed (first 400 characters):", "", "```text",
                  seeds[row["seed_id"]][:400].replace("```", "'''"), "```", "",
                  "Synthesized (first 600 characters):", "", "```text",
                  row["text"][:600].replace("```", "'''"), "```", ""]
    return lines


def publish(out: Path, target: Path, total: float, counts: dict[str, int],
            timed: str = "the whole script") -> None:
    """Copy the report and the run's record into ``target``, replacing what was there.

    ``out`` holds the real text the script wrote and ``out/sweep``, the sweep's own dir.
    """
    swept = out / "sweep"
    record = json.loads((swept / ".sweep" / "summary.json").read_text())
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(swept / "report" / "figures", target / "figures")
    for name in ("summary.md", "scalars.csv"):
        shutil.copy(swept / "report" / name, target / name)
    subsets = sorted(path.name for path in (swept / "pairs").iterdir() if path.is_dir())
    for subset in subsets:  # one pairs dir and synthetic corpus per subset
        shutil.copy(swept / "pairs" / subset / "manifest.json",
                    target / f"pairs_manifest_{subset}.json")
        shutil.copy(swept / "corpora" / "g1" / "sbp" / subset / "manifest.json",
                    target / f"sbp_manifest_{subset}.json")
    shutil.copy(REPO / GRID, target / "grid.yaml")
    shutil.copy(swept / ".sweep" / "commands.sh", target / "commands.sh")
    seconds = record.get("seconds", {})
    lines = ["# SBP in miniature: how it was run", "",
             "Written by `scripts/sbp_mini.py` (`make sbp-mini`) at the end of the run; nothing "
             "here is edited by hand.", "",
             f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
             f"Python {platform.python_version()}",
             f"- real documents: {counts['real']} (oracle: {counts['oracle']})",
             f"- wall time: {total:.0f} s ({timed})", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {value:.0f} |" for step, value in seconds.items() if value]
    lines += ["", "## Synthetic documents beside their seeds", ""]
    for subset in subsets:
        lines += examples(swept / "corpora" / "g1" / "sbp" / subset, out / "real.jsonl",
                          count=2)
    (target / "RUN.md").write_text("\n".join(lines) + "\n")
    print(f"published {target}", flush=True)


if __name__ == "__main__":
    main()
