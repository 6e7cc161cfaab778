"""``selftrain sweep``: an experiment grid as one command, run here in order or on SLURM.

The grid (sources x temperatures, replay, subsets, generations; :mod:`selftrain.sweep.grid`)
expands into ordinary ``selftrain`` commands (:mod:`selftrain.sweep.plan`). ``--dry_run``
prints them; ``--slurm DIR`` writes them as SLURM jobs (:mod:`selftrain.sweep.slurm`);
otherwise they run here one after another, each as its own process.

Reruns are safe. A step records its digest (its command and its inputs' digests) in
``<out>/.sweep/started/`` when it begins and in ``done/`` when it finishes; a rerun skips a
finished step. A step that did not finish runs again and resumes where its command can
(``generate`` resumes its shards, ``fit`` resumes from ``last.ckpt``). A step that finished, or
a ``generate`` or ``fit`` that began, with another digest (the grid changed it or anything
upstream) is refused before anything runs, unless ``--overwrite true``, which reruns it from
scratch. A failed step stops
the steps that need it and no others; the summary names them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from selftrain.errors import Interrupted, SelftrainError
from selftrain.io import write_json_atomic, write_text_atomic
from selftrain.outputs import refuse_foreign, refuse_input_overlap, refuse_unwritable
from selftrain.sweep.grid import (
    Decontamination,
    Grid,
    Proxies,
    Replay,
    Sbp,
    Source,
    check_grid,
    grid_inputs,
)
from selftrain.sweep.plan import Step, digests, expand
from selftrain.sweep.slurm import write_slurm

log = logging.getLogger(__name__)

RESUMABLE = ("generate", "synthesize", "fit")
"""Steps whose command resumes a partial output: begun with another command, they are refused."""

STATE = ".sweep"
"""Under ``out``: ``started/``, ``done/`` (a record per step), ``commands.sh``, ``summary.json``."""
OUT_ENTRIES = (STATE, "base", "corpora", "proxies", "pairs", "runs", "report", "findings")
"""Everything a sweep writes at the top of ``out`` (its state first, before any step runs), and
``findings/``, where ``selftrain findings`` writes its verdicts on the sweep."""


def sweep(
    out: str,
    student: str,
    fit_config: str,
    sources: dict[str, Source] | None = None,
    num_subsets: int = 1,
    generate: dict | None = None,
    fit: dict | None = None,
    replay: Replay | None = None,
    decontaminate: Decontamination | None = None,
    decontaminate_probes: bool = True,
    proxies: Proxies | None = None,
    sbp: Sbp | None = None,
    generations: int = 1,
    mode: str = "replace",
    note: str | None = None,
    evaluate_base: bool = False,
    dry_run: bool = False,
    slurm: str | None = None,
    slurm_options: list[str] | None = None,
    check_fit: bool = True,
    overwrite: bool = False,
) -> list[Step]:
    """Run an experiment grid: sample, curate, train and evaluate every condition, then report.

    Args:
        out: the dir everything is written under (corpora/, proxies/, runs/, report/).
        student: the student's model spec; every condition fine-tunes a fresh copy of it.
        fit_config: the ``selftrain fit`` config every student trains with (callbacks,
            optimizer, epochs); the sweep sets model, corpus, subset and run dir.
        sources: source name -> {model, temperatures, generate}; each temperature is one
            condition, ``<name>_t<T>``.
        num_subsets: K disjoint subsets of each corpus, one student each (the bands).
        generate: ``selftrain generate`` flags shared by every source (num_samples,
            max_new_tokens, batch_size, seed, dtype, ...).
        fit: extra ``selftrain fit`` flags for every student, e.g. ``{trainer.max_epochs: 3}``.
        replay: the real-text control: {sources, match, flags}; one ``replay_<condition>``
            condition per matched condition (default: the first).
        decontaminate: {benchmarks, flags}: clean every sampled corpus before it is used.
        decontaminate_probes: also drop every sampled sample that shares a token n-gram with
            a window of the fit config's probe set (``probes.probe_set``, or ``fit``'s
            ``probes.probe_set``), so that the probes stay held out; on by default, also
            without a ``decontaminate`` block.
        proxies: {benchmarks, split, flags}: proxies of every generation-1 corpus; with
            ``split``, each synthetic corpus's proximity halves are trained on as well.
        sbp: {corpus, weights, tokens, repetition, oracle, synthesizer, synthesizer_config,
            pairs, synthesizer_fit, synthesize, unseeded, ended_only}: Synthetic Bootstrapped
            Pretraining on a real corpus: conditions ``sbp`` (real + synthetic),
            ``sbp_unseeded`` (real + the synthesizer's text from an empty d1, with
            ``unseeded``), ``sbp_repeat`` (real alone, repeated) and ``sbp_oracle`` (more
            unique real text), at one token budget.
        generations: G; generation g+1 samples from the last export of generation g's
            students (same condition and subset), the model-collapse axis.
        mode: ``replace`` (generation g trains on its own corpus) or ``accumulate`` (on every
            corpus of its chain so far).
        note: the report's subtitle (what the grid is).
        evaluate_base: evaluate the student once, before any fit (``selftrain evaluate
            --model <student> --fit_config <fit_config> --out <out>/base``), and give every
            fit of it ``--base_evaluations``: the benchmarks' epoch 0 is that one evaluation
            instead of one per fit.
        dry_run: print the commands in order, as a user could paste them, and stop.
        slurm: write a SLURM submission (submit.sh, one array task per fit) into this dir
            instead of running.
        slurm_options: ``#SBATCH`` options for every job, e.g. ``["--gpus-per-task=1"]``.
        check_fit: parse every fit command (``selftrain fit ... --print_config``) before
            anything runs.
        overwrite: rerun from scratch the finished steps whose inputs changed, instead of
            refusing.

    Returns:
        The steps of the sweep.
    """
    grid = Grid(out=out, student=student, fit_config=fit_config, sources=dict(sources or {}),
                num_subsets=num_subsets, generate=dict(generate or {}), fit=dict(fit or {}),
                replay=replay, decontaminate=decontaminate,
                decontaminate_probes=decontaminate_probes, proxies=proxies, sbp=sbp,
                generations=generations, mode=mode, note=note, evaluate_base=evaluate_base)
    check_grid(grid)
    check_out(grid)
    steps = expand(grid)
    if check_fit:
        check_fit_commands(steps)
    if dry_run:
        for step in steps:
            print(step.line())
        return steps
    if slurm is not None:
        path = write_slurm(steps, slurm, slurm_options or [], note or f"sweep into {out}")
        log.info("selftrain sweep: %d commands as SLURM jobs -> %s (submit: bash %s)",
                 len(steps), path, path / "submit.sh")
        return steps
    run_here(steps, Path(out), overwrite)
    return steps


def check_out(grid: Grid) -> None:
    """Refuse an ``--out`` a sweep may not write into, before anything runs (dry runs too).

    It must be new, empty, or an earlier sweep's (its ``.sweep`` state and nothing but what a
    sweep writes), and apart from every input: the grid's fit config, the student's and the
    sources' model dirs, the replay and SBP corpora. A folder holding the grid file itself is a
    folder of other files.

    Args:
        grid: the parsed grid.
    """
    out = Path(grid.out)
    refuse_unwritable(out, beside=False)
    refuse_input_overlap(out, grid_inputs(grid))
    refuse_foreign(out, (STATE,), OUT_ENTRIES)


def check_fit_commands(steps: list[Step]) -> None:
    """Parse each fit command as ``selftrain fit`` would, without running it.

    The fit parser (LightningCLI) checks every key, type and class path; ``--print_config``
    stops it before anything is built. One line names the step and the parser's complaint.

    Args:
        steps: the sweep.
    """
    from selftrain.cli import parser_error_line
    from selftrain.trainer_cli import SelftrainCLI

    for step in steps:
        if step.kind != "fit":
            continue
        try:
            with redirect_stdout(StringIO()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*args parameter is intended")
                SelftrainCLI(args=[*step.argv[1:], "--print_config"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise SelftrainError(f"--fit_config {step.argv[3]} (with --fit): the command "
                                     f"of {step.id} does not parse (exit {stop.code})") from None
        except Exception as error:  # the parser raises instead of exiting
            raise SelftrainError(f"--fit_config {step.argv[3]} (with --fit): the command of "
                                 f"{step.id} does not parse: "
                                 f"{parser_error_line(str(error), 'fit')}") from None


@dataclass
class Outcome:
    """What happened to each step of one ``selftrain sweep`` run."""

    done: list[str]
    skipped: list[str]
    failed: list[str]
    blocked: list[str]


def run_here(steps: list[Step], out: Path, overwrite: bool) -> Outcome:
    """Run the steps here, in order, each as its own ``selftrain`` process.

    Args:
        steps: the expanded sweep.
        out: the sweep's ``out``.
        overwrite: rerun finished steps whose digest changed.
    """
    state = out / STATE
    current = digests(steps)
    finished = {step.id: _record(state, step) for step in steps}
    started = {step.id: _record(state, step, "started") for step in steps
               if step.kind in RESUMABLE}  # the others write whole outputs or nothing
    changed = [s for s in steps
               if (finished[s.id] or started.get(s.id) or {}).get("digest", current[s.id])
               != current[s.id]]
    if changed and not overwrite:
        first = changed[0]
        raise SelftrainError(f"{first.id}: ran with other inputs than the grid now gives "
                             f"({len(changed)} step(s) changed, e.g. {first.output}); pass "
                             "--overwrite true to rerun them, or write to a new out")
    state.mkdir(parents=True, exist_ok=True)
    write_text_atomic("".join(s.line() + "\n" for s in steps), state / "commands.sh")
    outcome = Outcome([], [], [], [])
    start = time.perf_counter()
    for index, step in enumerate(steps, 1):
        prefix = f"selftrain sweep [{index}/{len(steps)}] {step.id}"
        stopped = [need for need in step.needs if need in outcome.failed + outcome.blocked]
        if stopped:
            outcome.blocked.append(step.id)
            log.warning("%s: not run, it needs %s, which did not finish", prefix, stopped[0])
            continue
        if finished[step.id] and step not in changed:
            outcome.skipped.append(step.id)
            log.info("%s: finished earlier, skipped", prefix)
            continue
        argv = step.argv + _resume_flags(step, restart=step in changed)
        log.info("%s: %s", prefix, " ".join(argv))
        write_json_atomic({"id": step.id, "digest": current[step.id]},
                          _record_path(state, step, "started"))
        began = time.perf_counter()
        try:
            code = subprocess.run([sys.executable, "-m", "selftrain", *argv[1:]]).returncode
        except KeyboardInterrupt:
            code = 130
        seconds = time.perf_counter() - began
        if code == 130:
            _summarize(state, outcome, steps)
            raise Interrupted(f"interrupted in {step.id}; finished steps are recorded, so "
                              "rerunning the same sweep resumes from there")
        if code != 0:
            outcome.failed.append(step.id)
            log.error("%s: failed (exit %d) after %.0f s", prefix, code, seconds)
            continue
        write_json_atomic({"id": step.id, "digest": current[step.id], "command": step.line(),
                           "seconds": round(seconds, 1), "finished": time.time()},
                          _record_path(state, step))
        outcome.done.append(step.id)
        log.info("%s: done in %.0f s (sweep %.0f s so far)", prefix, seconds,
                 time.perf_counter() - start)
    _summarize(state, outcome, steps)
    if outcome.failed:
        raise SelftrainError(f"{len(outcome.failed)} step(s) failed ({', '.join(outcome.failed)})"
                             f"; {len(outcome.blocked)} not run because they need them; the "
                             f"others finished (see {state / 'summary.json'}); fix and rerun "
                             "the same sweep")
    return outcome


def _resume_flags(step: Step, restart: bool) -> list[str]:
    """Flags a rerun adds to a step's command: start over, or resume what is there."""
    if step.kind in ("generate", "synthesize"):
        return ["--overwrite", "true"] if restart else []  # an unfinished corpus resumes
    if step.kind != "fit":
        return []  # written whole, with --overwrite true already
    run = Path(step.output)
    if restart:
        return ["--overwrite", "true"]
    if (run / "checkpoints" / "last.ckpt").is_file():
        return ["--ckpt_path", "last"]
    if run.is_dir() and any(run.iterdir()):
        return ["--overwrite", "true"]  # killed before its first checkpoint: nothing to keep
    return []


def _record_path(state: Path, step: Step, kind: str = "done") -> Path:
    """Where a step's record lives: ``done/`` once it finished, ``started/`` once it began."""
    return state / kind / (step.id.replace("/", "__") + ".json")


def _record(state: Path, step: Step, kind: str = "done") -> dict | None:
    path = _record_path(state, step, kind)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _summarize(state: Path, outcome: Outcome, steps: list[Step]) -> None:
    seconds = {}
    for step in steps:
        record = _record(state, step)
        if record:
            seconds[step.id] = record.get("seconds")
    write_json_atomic({"done": outcome.done, "skipped": outcome.skipped,
                       "failed": outcome.failed, "blocked": outcome.blocked,
                       "seconds": seconds}, state / "summary.json")
    log.info("selftrain sweep: %d run, %d skipped (finished earlier), %d failed, %d not run",
             len(outcome.done), len(outcome.skipped), len(outcome.failed), len(outcome.blocked))
