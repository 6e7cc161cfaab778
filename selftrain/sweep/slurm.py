"""A sweep as SLURM jobs: one job per preparation wave, one array task per fit, in order.

``selftrain sweep --slurm DIR`` writes DIR/submit.sh and the command lists it submits; SLURM
does the scheduling, this module only writes files. Waves, each ``afterok`` the one before:
generation g's preparation (sampling, decontamination, replay, proxies; one job running its
commands in order), then generation g's fits (one array task each), and the report last.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from selftrain.io import atomic_dir
from selftrain.outputs import refuse_unwritable
from selftrain.sweep.plan import Step

RUNNER = """#!/bin/bash
# Runs the `selftrain` commands listed in the file given as $1, one per line: all of them in
# order, or, in a job array, only line SLURM_ARRAY_TASK_ID + 1 (one fit per array task).
#SBATCH --job-name=selftrain-sweep
{options}
set -euo pipefail
if [ -n "${{SLURM_ARRAY_TASK_ID:-}}" ]; then
    eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$1")"
else
    while IFS= read -r line; do eval "$line"; done < "$1"
fi
"""


def _generation(step: Step) -> int | None:
    """The generation in a step's id (``fit/g1/...``; 0 for SBP's pairs and synthesizer)."""
    match = re.search(r"/g(\d+)(/|$)", step.id)
    return int(match.group(1)) if match else None


def waves(steps: list[Step]) -> list[tuple[str, list[Step], bool]]:
    """(file stem, steps, as an array) in submission order.

    Steps of no generation but the report (the base evaluation every fit reads) open the first
    preparation wave, so they run before any fit.
    """
    found: list[tuple[str, list[Step], bool]] = []
    first = [s for s in steps if _generation(s) is None and s.kind != "report"]
    for g in sorted({_generation(s) for s in steps if _generation(s) is not None}):
        prep = first + [s for s in steps if _generation(s) == g and s.kind not in ("fit",
                                                                                   "report")]
        first = []
        fits = [s for s in steps if _generation(s) == g and s.kind == "fit"]
        if prep:
            found.append((f"g{g}-prep", prep, False))
        found.append((f"g{g}-fit", fits, True))
    found.append(("report", [s for s in steps if s.kind == "report"], False))
    return found


def write_slurm(steps: list[Step], target: str, options: list[str], grid_note: str) -> Path:
    """Write the SLURM submission of a sweep into a new dir (whole or not at all).

    Args:
        steps: the expanded sweep.
        target: the dir to write (``--slurm``).
        options: ``#SBATCH`` options for every job, e.g. ``["--gpus-per-task=1"]``.
        grid_note: what the sweep is, for the script's header.
    """
    root = Path(target)
    refuse_unwritable(root, "--slurm")
    here = root.resolve()
    lines = ["#!/bin/bash", f"# {grid_note}",
             "# Submit from the directory the grid's paths are relative to: bash submit.sh",
             "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}",
             f"runner={shlex.quote(str(here / 'run_lines.sbatch'))}"]
    previous = None
    with atomic_dir(root) as staging:
        for stem, members, array in waves(steps):
            (staging / f"{stem}.txt").write_text("".join(s.line() + "\n" for s in members))
            flags = ["--parsable"]
            if previous:
                flags.append(f"--dependency=afterok:${previous}")
            if array:
                flags.append(f"--array=0-{len(members) - 1}")
            variable = stem.replace("-", "_")
            lines.append(f"{variable}=$(sbatch {' '.join(flags)} --job-name=sweep-{stem} "
                         f"\"$runner\" {shlex.quote(str(here / f'{stem}.txt'))})")
            lines.append(f'echo "{stem}: job ${variable} ({len(members)} command(s))"')
            previous = variable
        (staging / "submit.sh").write_text("\n".join(lines) + "\n")
        (staging / "run_lines.sbatch").write_text(RUNNER.format(
            options="\n".join(f"#SBATCH {option}" for option in options)))
        for name in ("submit.sh", "run_lines.sbatch"):
            (staging / name).chmod(0o755)
    return root
