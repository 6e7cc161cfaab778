"""`make sbp-mini`: Synthetic Bootstrapped Pretraining against its baselines, on a CPU.

1. writes the real text: Python documentation (``pydoc_data.topics``, without the topics the
   ``selftrain_bpb_pydoc`` task holds out), cut into documents of at most 1000 characters and
   taken whole topic by topic in a seeded order: the first ``--real`` documents are the real
   corpus, the first ``--oracle_factor x --real`` the oracle's (more unique real text, a
   superset: document i is in subset i mod K in both);
2. runs the grid ``configs/sweep/sbp_mini.yaml`` with ``selftrain sweep``: pairs in the real
   corpus, the synthesizer, seeded and unseeded synthesis, then one student each on real +
   synthetic (``sbp``), on real + the synthesizer's unconditional text (``sbp_unseeded``), on
   the real documents repeated (``sbp_repeat``) and on the oracle's (``sbp_oracle``), all at
   one token budget; the base evaluated once; the report;
3. copies what a reader needs into ``docs/records/sbp-mini/`` as the run wrote it: the report's
   ``summary.md``, figures and scalars, the pairs' and the synthetic corpora's manifests, the
   students' data records (passes over each corpus), a few synthetic documents beside their
   seeds, the grid, the commands and the wall times.

The real text goes into ``--out`` and the sweep into ``--out``/sweep, a dir of its own apart
from its inputs. Rerunning resumes (the sweep's records). Flags: ``--out DIR`` (default
runs/sbp-mini; the grid's paths assume it), ``--publish DIR`` (default docs/records/sbp-mini,
which it replaces; it must lie under docs/records; ``""`` skips the copy), ``--publish_only``
(copy a finished run again; its wall time is then the sum of the steps').
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

from selftrain.synthesis.synthesize import UNSEEDED  # noqa: E402

GRID = "configs/sweep/sbp_mini.yaml"
SEED = 20251127


def write_real_text(out: Path, real: int, oracle_factor: int) -> dict[str, int]:
    """``real.jsonl`` (``real`` documents) and ``oracle.jsonl`` (``oracle_factor`` times as
    many, a superset).

    Args:
        out: the dir both go into.
        real: documents of the real corpus.
        oracle_factor: the oracle's documents per real one.
    """
    by_topic: dict[str, list[str]] = {}
    for topic, text in pydoc_documents(max_chars=1000):
        by_topic.setdefault(topic, []).append(text)
    order = sorted(by_topic)
    random.Random(SEED).shuffle(order)
    documents = [(topic, text) for topic in order for text in by_topic[topic]]
    if len(documents) < oracle_factor * real:
        raise SystemExit(f"--real {real} x --oracle_factor {oracle_factor}: only "
                         f"{len(documents)} documents; lower one")
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("real", real), ("oracle", oracle_factor * real)):
        rows = [{"id": i, "text": text, "source": f"pydoc_data.topics[{topic!r}]"}
                for i, (topic, text) in enumerate(documents[:count])]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"real": real, "oracle": oracle_factor * real}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sbp-mini")
    parser.add_argument("--publish", default="docs/records/sbp-mini")
    parser.add_argument("--real", type=int, default=24, help="documents of the real corpus")
    parser.add_argument("--oracle_factor", type=int, default=10,
                        help="the oracle's documents per real one")
    parser.add_argument("--publish_only", action="store_true",
                        help="copy a finished run into --publish without running anything")
    args = parser.parse_args()
    out = REPO / args.out
    records = REPO / "docs" / "records"
    if args.publish and records not in (REPO / args.publish).resolve().parents:
        raise SystemExit(f"--publish {args.publish}: the record replaces that dir, so it must "
                         "lie under docs/records")
    if args.publish_only and not args.publish:
        raise SystemExit("--publish_only: give --publish DIR to copy the run into")
    if args.publish_only:
        seconds = json.loads((out / "sweep" / ".sweep" / "summary.json").read_text())["seconds"]
        publish(out, REPO / args.publish, sum(v or 0.0 for v in seconds.values()),
                {"real": args.real, "oracle": args.oracle_factor * args.real},
                "sum of the steps")
        return
    start = time.perf_counter()
    counts = write_real_text(out, args.real, args.oracle_factor)
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
    kind = corpus.parent.name
    lines = []
    for row in table[:count]:
        if row["seed_id"] == UNSEEDED:  # the control: no seed, the prompt is BOS SEP
            seed = ["Prompt: BOS and the separator alone (no seed document).", ""]
        else:
            seed = ["Seed (first 400 characters):", "", "```text",
                    seeds[row["seed_id"]][:400].replace("```", "'''"), "```", ""]
        lines += [f"### {kind} {corpus.name}: synthetic document {row['id']} (seed document "
                  f"{row['seed_id']}, ended on EOS: {row['finished']})", "", *seed,
                  "Synthesized (first 600 characters):", "", "```text",
                  row["text"][:600].replace("```", "'''"), "```", ""]
    return lines


def students(swept: Path) -> dict[str, dict[str, float]]:
    """Each student's data at step 0: rows, tokens, and per corpus of its mixture its tokens an
    epoch and passes over its rows (corpus0 the real text, corpus1 the synthetic).

    Args:
        swept: the sweep's dir.
    """
    from selftrain.analysis.tb import read_scalars

    found = {}
    for student in sorted((swept / "runs" / "g1").glob("*/s*")):
        scalars = read_scalars(student / "tb")
        found[f"{student.parent.name}/{student.name}"] = {
            tag.removeprefix("data/"): values[0][1] for tag, values in sorted(scalars.items())
            if tag.startswith("data/") and values}
    return found


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
    synthetic = sorted(path.name for path in (swept / "corpora" / "g1").iterdir()
                       if path.name.startswith("sbp"))
    for subset in subsets:  # one pairs dir and a synthetic corpus per kind per subset
        shutil.copy(swept / "pairs" / subset / "manifest.json",
                    target / f"pairs_manifest_{subset}.json")
        for kind in synthetic:
            shutil.copy(swept / "corpora" / "g1" / kind / subset / "manifest.json",
                        target / f"{kind}_manifest_{subset}.json")
    (target / "students.json").write_text(json.dumps(students(swept), indent=2) + "\n")
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
    for kind in synthetic:
        for subset in subsets:
            lines += examples(swept / "corpora" / "g1" / kind / subset, out / "real.jsonl",
                              count=1 if kind != "sbp" else 2)
    (target / "RUN.md").write_text("\n".join(lines) + "\n")
    print(f"published {target}", flush=True)


if __name__ == "__main__":
    main()
