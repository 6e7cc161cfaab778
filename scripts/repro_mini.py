"""`make repro-mini`: the paper's grid in miniature, on real models, on a CPU, in one command.

1. builds the student as the demo does: canary windows of license text and Python source
   (``selftrain probeset``) planted into the embedded SmolLM2-135M (``selftrain plant``);
2. writes the replay's real text from a domain no evaluation measures: the installed
   packages' descriptions (``python -m selftrain.curation.held_in --kind packages``);
3. runs the grid ``configs/sweep/repro_mini.yaml`` with ``selftrain sweep``: the base
   evaluated once; self and cross family, each in its four proxy cells; the replay matched to
   self cell by cell; 12 fits; proxies; the report;
4. applies the pre-registered rules of ``docs/repro-mini.md`` (``selftrain findings``);
5. copies what a reader needs into ``docs/records/repro-mini/`` as the run wrote it: the report's
   ``summary.md``, figures and scalars, the findings, the grid file, the commands and the wall
   time of every stage.

The planted model, the canaries and the replay text go into ``--out`` and the sweep into
``--out``/sweep, a dir of its own apart from its inputs. Rerunning resumes: a finished stage is
skipped (the sweep's records; the planted model), and keeps the wall time it took
(``stages.json``). Flags: ``--out DIR`` (default
runs/repro-mini; the grid's paths assume it), ``--publish DIR``
(default docs/records/repro-mini; ``""`` skips the copy).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from selftrain.curation import held_in
from selftrain.io import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
GRID = "configs/sweep/repro_mini.yaml"
FINDINGS = "configs/findings/repro_mini.yaml"
"""The pre-registered rules, applied to the sweep's runs."""
HELD_OUT = REPO / "configs/tasks/selftrain_large/selftrain_bpb_pydoc.jsonl"
"""Documentation the benchmark holds out: its topics never enter the replay."""
HELD_OUT_TASKS = [HELD_OUT, REPO / "configs/tasks/selftrain_large/selftrain_bpb_stdlib.jsonl"]
"""Every document a bits-per-byte task holds out."""


def plant_commands(selftrain: list[str], out: Path) -> list[tuple[str, list[str]]]:
    """The probeset and plant commands that build the planted base in ``out``.

    The rehearsal text planting trains the canaries in among (pydoc topics and standard-library
    modules, minus the held-out documents and the canaries' own files) is written between the
    two, once the canaries exist.

    Args:
        selftrain: the command that runs selftrain.
        out: where the canaries, the rehearsal text and ``planted/`` go.
    """
    canaries, rehearsal = out / "canaries.parquet", out / "held_in.jsonl"
    return [("probeset", [*selftrain, "probeset", "--config",
                          "configs/probeset/smollm2_canaries.yaml", "--out", str(canaries)]),
            ("rehearsal text", [sys.executable, "-m", "selftrain.curation.held_in",
                                str(rehearsal), *map(str, [*HELD_OUT_TASKS, canaries])]),
            ("plant", [*selftrain, "plant", "--config", "configs/plant/smollm2.yaml",
                       "--canaries", str(canaries), "--rehearsal", str(rehearsal),
                       "--out", str(out / "planted")])]


def pydoc_documents(max_chars: int = 1500) -> list[tuple[str, str]]:
    """(topic, text) of every pydoc topic the ``selftrain_bpb_pydoc`` task does not hold out.

    Args:
        max_chars: longest document; a longer topic becomes several.
    """
    documents = held_in.pydoc_documents(held_in.held_out_sources([HELD_OUT]), max_chars)
    return [(source.removeprefix("pydoc_data.topics[").removesuffix("]").strip("'"), text)
            for source, text in documents]


STAGES = "stages.json"
"""In ``--out``: each finished stage's wall time, kept so a resumed run still reports it."""


def load_stages(out: Path) -> dict[str, float]:
    """The wall times of the stages an earlier run in ``out`` finished."""
    path = out / STAGES
    return json.loads(path.read_text()) if path.is_file() else {}


def record_stage(out: Path, stages: dict[str, float], name: str, seconds: float) -> None:
    """Add one stage's wall time to what earlier invocations spent on it (``out``/stages.json).

    A resumed stage (a sweep that skips its finished steps) adds the time of this invocation,
    so the record holds the wall time every invocation spent, not only the last one's.
    """
    stages[name] = round(stages.get(name, 0.0) + seconds, 1)
    write_json_atomic(stages, out / STAGES)


def run(command: list[str]) -> float:
    """Run one command from the repository root; its wall time in seconds."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/repro-mini")
    parser.add_argument("--publish", default="docs/records/repro-mini")
    args = parser.parse_args()
    out = REPO / args.out
    selftrain = [sys.executable, "-m", "selftrain"]
    stages = load_stages(out)
    commands: list[list[str]] = []
    planted = out / "planted"
    start = time.perf_counter()
    for name, command in plant_commands(selftrain, out):
        commands.append(command)
        if not (planted / "plant.json").is_file():
            record_stage(out, stages, name, run(command))
    replay = [sys.executable, "-m", "selftrain.curation.held_in", str(out / "replay_text.jsonl"),
              *map(str, HELD_OUT_TASKS), "--kind", "packages"]
    commands.append(replay)
    record_stage(out, stages, "replay text", run(replay))
    for name, command in (("sweep", [*selftrain, "sweep", "--config", GRID]),
                          ("findings", [*selftrain, "findings", "--config", FINDINGS])):
        commands.append(command)
        record_stage(out, stages, name, run(command))
    total = sum(stages.values())
    print(f"repro-mini: {total:.0f} s in all ({time.perf_counter() - start:.0f} s this run)")
    if args.publish:
        publish(out / "sweep", REPO / args.publish, stages, total, commands)


def publish(out: Path, target: Path, stages: dict[str, float], total: float,
            commands: list[list[str]]) -> None:
    """Copy the sweep's (``out``) report and record into ``target``, replacing what was there."""
    record = json.loads((out / ".sweep" / "summary.json").read_text())
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(out / "report" / "figures", target / "figures")
    shutil.copy(out / "report" / "summary.md", target / "summary.md")
    shutil.copy(out / "report" / "scalars.csv", target / "scalars.csv")
    for name in ("findings.md", "findings.json"):
        shutil.copy(out / "findings" / name, target / name)
    shutil.copy(REPO / GRID, target / "grid.yaml")
    shutil.copy(out / ".sweep" / "commands.sh", target / "commands.sh")
    seconds = record.get("seconds", {})
    by_kind: dict[str, float] = {}
    for step, value in seconds.items():
        by_kind[step.split("/")[0]] = by_kind.get(step.split("/")[0], 0.0) + (value or 0.0)
    lines = ["# Mini reproduction: how it was run", "",
             "Written by `scripts/repro_mini.py` (`make repro-mini`) at the end of the run; "
             "nothing here is edited by hand.", "",
             f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
             f"Python {platform.python_version()}",
             f"- wall time: {total:.0f} s in all (the sum of the stages below; a stage an "
             "earlier invocation finished keeps its time)", "", "## Commands", "", "```"]
    lines += [shlex.join(["python", "-m", *c[2:]]) if c[:1] == [sys.executable] else
              shlex.join(c) for c in commands]
    lines += ["```", "", "The sweep's own commands, in order: `commands.sh`.", "",
              "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.0f} |" for name, value in stages.items()]
    lines += ["", "Inside the sweep, by kind of step (a step skipped because an earlier run "
              "finished it keeps that run's time):", "", "| step kind | steps | seconds |",
              "|---|---|---|"]
    for kind, value in by_kind.items():
        count = sum(1 for step in seconds if step.split("/")[0] == kind)
        lines.append(f"| {kind} | {count} | {value:.0f} |")
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {value:.0f} |" for step, value in seconds.items()]
    (target / "run.md").write_text("\n".join(lines) + "\n")
    print(f"published -> {target}")


if __name__ == "__main__":
    main()
