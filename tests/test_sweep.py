"""`selftrain sweep`: grids expand into commands that parse, reruns are safe, SLURM scripts.

The shipped grids are expanded with ``--dry_run`` and every command they print is parsed by
its own subcommand's parser (``--print_config``), as a user pasting it would run it. The
runner's bookkeeping (skip, refuse, block, resume) is checked on real ``selftrain``
commands that take a second; a whole tiny sweep (two sources, two subsets, two generations),
killed once and rerun, runs in the slow tier, and so does a chain killed inside its first
student's final export, whose rerun must reach the uninterrupted chain's report.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import yaml
from helpers import DEBUG, DEBUG_CORPUS, REPO, tests_importable

from selftrain.cli import TOOLS, main
from selftrain.errors import SelftrainError
from selftrain.sweep.plan import Step, digests
from selftrain.sweep.run import STATE, run_here, sweep

SWEEPS = REPO / "configs" / "sweep"
REFERENCE = SWEEPS / "shared" / "reference.yaml"
REFERENCE_GRIDS = ["qwen_self", "llama_self", "llama_on_qwen", "qwen_cross_source",
                   "pythia_self"]


def dry_run(*configs: Path) -> list[list[str]]:
    """The commands ``selftrain sweep --config ... --dry_run true`` prints, split."""
    argv = ["sweep", *(a for c in configs for a in ("--config", str(c))), "--dry_run", "true"]
    with redirect_stdout(StringIO()) as out:
        main(argv)
    return [shlex.split(line) for line in out.getvalue().splitlines()]


def parses(command: list[str]) -> None:
    """Parse one printed command with its subcommand's parser; nothing runs."""
    assert command[0] == "selftrain"
    if command[1] == "fit":
        return  # the sweep parsed every fit command itself before printing (check_fit)
    assert command[1] in TOOLS
    with redirect_stdout(StringIO()), pytest.raises(SystemExit) as stop:
        main([*command[1:], "--print_config"])
    assert stop.value.code in (0, None), command


@pytest.mark.parametrize("name", REFERENCE_GRIDS)
def test_every_reference_grid_expands_into_commands_that_parse(name):
    commands = dry_run(REFERENCE, SWEEPS / f"{name}.yaml")
    kinds = [c[1] for c in commands]
    grid = {**yaml.safe_load(REFERENCE.read_text()),
            **yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())}
    conditions = sum(len(s.get("temperatures", [1.0])) for s in grid["sources"].values())
    conditions += 1 if grid.get("replay") else 0
    conditions *= 3 if grid["proxies"]["split"] else 1  # a split adds each corpus's halves
    if grid["proxies"]["split"] and grid.get("replay"):
        conditions -= 2  # the replay is not split
    assert kinds.count("fit") == conditions * grid["num_subsets"]
    assert kinds.count("generate") == len(grid["sources"])
    assert kinds[-1] == "report" and kinds.count("report") == 1
    for command in commands:
        parses(command)
    header = (SWEEPS / f"{name}.yaml").read_text().splitlines()
    assert any(line.startswith("# Command:") and f"sweep/{name}.yaml" in line
               for line in header)


def test_the_mini_reproduction_grid_expands_into_commands_that_parse():
    commands = dry_run(SWEEPS / "repro_mini.yaml")
    assert [c[1] for c in commands].count("fit") >= 10
    replays = [c[c.index("--out") + 1] for c in commands if c[1] == "replay"]
    cleaned = {c[c.index("--corpus") + 1]: c[c.index("--out") + 1]
               for c in commands if c[1] == "decontaminate"}
    assert replays and all(out in cleaned for out in replays)  # the replay is cleaned too
    trained = {c[c.index("--data.corpus") + 1] for c in commands if c[1] == "fit"}
    assert all(cleaned[out] in trained and out not in trained for out in replays)
    for command in commands:
        parses(command)


def test_the_sbp_grid_expands_into_commands_that_parse(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_text('{"text": "a document"}\n')
    grid = tmp_path / "grid.yaml"
    config = yaml.safe_load((SWEEPS / "sbp_mini.yaml").read_text())
    config["sbp"].update(corpus=str(real), oracle=str(real))
    grid.write_text(yaml.safe_dump({**config, "out": str(tmp_path / "sw")}))
    commands = dry_run(grid)
    # the base evaluated once; per subset pairs, the synthesizer, seeded and unseeded
    # synthesis, then the sbp, sbp_unseeded, sbp_repeat and sbp_oracle students
    per_subset = ["pairs", "fit", "synthesize", "synthesize", "fit", "fit", "fit", "fit"]
    assert [c[1] for c in commands] == (["evaluate"] + per_subset * config["num_subsets"]
                                        + ["report"])
    for command in commands:
        parses(command)


def sbp_steps(tmp_path: Path, sbp: dict | None = None, **flags) -> list[Step]:
    from selftrain.sweep.grid import Sbp

    real = tmp_path / "real.jsonl"
    real.write_text('{"text": "a document"}\n')
    return sweep(out=str(tmp_path / "sw"), student="tiny:qwen2", fit_config=DEBUG,
                 sources=_sources(), num_subsets=2, check_fit=False,
                 sbp=Sbp(corpus=str(real), weights=[0.25, 0.75], tokens=5000,
                         synthesize={"num_samples": 64}, **(sbp or {})),
                 **{"dry_run": True, **flags})


def test_the_unseeded_control_is_the_same_synthesizer_from_an_empty_d1(tmp_path):
    steps = sbp_steps(tmp_path, {"unseeded": True, "ended_only": True},
                      decontaminate_probes=False)
    by_id = {s.id: s for s in steps}
    for k in range(2):
        seeded, unseeded = (by_id[f"synthesize/g1/{name}/s{k}"]
                            for name in ("sbp", "sbp_unseeded"))
        assert unseeded.needs == seeded.needs == [f"fit/g0/synthesizer/s{k}"]
        assert unseeded.argv[unseeded.argv.index("--unseeded") + 1] == "true"
        assert "--seeds" not in unseeded.argv and "--seeds_subset" not in unseeded.argv
        assert (unseeded.argv[unseeded.argv.index("--num_samples") + 1]
                == seeded.argv[seeded.argv.index("--num_samples") + 1] == "64")
        fits = {name: dict(zip(by_id[f"fit/g1/{name}/s{k}"].argv,
                               by_id[f"fit/g1/{name}/s{k}"].argv[1:], strict=False))
                for name in ("sbp", "sbp_unseeded", "sbp_repeat")}
        assert json.loads(fits["sbp_unseeded"]["--data.corpus"])[1] == unseeded.output
        for name in ("sbp", "sbp_unseeded"):  # the same mixture, budget and filter
            assert fits[name]["--data.mixture_weights"] == "[0.25, 0.75]"
            assert fits[name]["--data.mixture_tokens"] == "5000"
            assert fits[name]["--data.ended_only"] == "true"
        assert "--data.ended_only" not in fits["sbp_repeat"]  # real text: nothing to drop
    report = by_id["report"]
    conditions = json.loads(report.argv[report.argv.index("--conditions") + 1])
    assert set(conditions.values()) == {"self_t1.0", "sbp", "sbp_unseeded", "sbp_repeat"}


def test_sbp_is_a_condition_beside_the_bos_ones_at_one_token_budget(tmp_path):
    steps = sbp_steps(tmp_path)
    by_id = {s.id: s for s in steps}
    for k in range(2):
        pairs = by_id[f"pairs/g0/sbp/s{k}"]
        assert pairs.argv[pairs.argv.index("--subset") + 1] == str(k)
        synthesizer = by_id[f"fit/g0/synthesizer/s{k}"]
        assert synthesizer.needs == [pairs.id]
        assert synthesizer.argv[synthesizer.argv.index("--data.corpus") + 1] == pairs.output
        synthesize = by_id[f"synthesize/g1/sbp/s{k}"]
        export = synthesize.argv[synthesize.argv.index("--synthesizer") + 1]
        assert export == f"{synthesizer.output}/hf/epoch=3"  # debug.yaml's max_epochs
        assert synthesize.needs == [synthesizer.id]
        assert synthesize.argv[synthesize.argv.index("--seeds_subset") + 1] == str(k)
        assert "--num_subsets" not in synthesize.argv  # written for student k alone
        mixed, alone = by_id[f"fit/g1/sbp/s{k}"], by_id[f"fit/g1/sbp_repeat/s{k}"]
        flags = dict(zip(mixed.argv, mixed.argv[1:], strict=False))
        clean = by_id[f"decontaminate/g1/sbp/s{k}"]  # of the fit config's probe set
        assert clean.needs == [synthesize.id] and clean.argv[3] == synthesize.output
        assert json.loads(flags["--data.corpus"])[1] == clean.output
        assert flags["--data.mixture_weights"] == "[0.25, 0.75]"
        assert flags["--data.mixture_tokens"] == "5000" and flags["--data.subset"] == str(k)
        repeat = dict(zip(alone.argv, alone.argv[1:], strict=False))
        assert repeat["--data.mixture_tokens"] == "5000"
        assert repeat["--data.mixture_weights"] == "[1.0]" and repeat["--data.subset"] == str(k)
    report = by_id["report"]
    conditions = json.loads(report.argv[report.argv.index("--conditions") + 1])
    assert set(conditions.values()) == {"self_t1.0", "sbp", "sbp_repeat"}


def test_an_sbp_student_sees_only_its_subset_of_the_real_text(tmp_path):
    """In the sbp list the real corpus is subset like the baselines'; the synthetic is whole."""
    from selftrain.training.data import CorpusDataModule

    real = tmp_path / "real.jsonl"
    real.write_text("".join(json.dumps({"text": f"real document {i}"}) + "\n"
                            for i in range(10)))
    synthetic = tmp_path / "sbp"
    subprocess.run(["cp", "-r", str(DEBUG_CORPUS), str(synthetic)], check=True)
    manifest = json.loads((synthetic / "manifest.json").read_text())
    (synthetic / "manifest.json").write_text(json.dumps({**manifest, "kind": "sbp",
                                                         "num_subsets": 1}))
    sizes = {}
    for name, corpus in (("sbp", [str(real), str(synthetic)]), ("repeat", [str(real)])):
        data = CorpusDataModule(corpus=corpus, tokenizer="tiny:qwen2", max_length=64,
                                subset=1, num_subsets=2)
        data.load()
        sizes[name] = len(data.rows)
    assert sizes["repeat"] == 5
    assert sizes["sbp"] == 5 + manifest["counts"]["written"]


def test_sbp_slurm_waves_put_the_synthesizer_before_synthesis(tmp_path):
    target = tmp_path / "slurm"
    steps = sbp_steps(tmp_path, slurm=str(target), dry_run=False, evaluate_base=True)
    submit = (target / "submit.sh").read_text()
    assert submit.index("g0-prep.txt") < submit.index("g0-fit.txt") < submit.index(
        "g1-prep.txt") < submit.index("g1-fit.txt")
    assert "synthesize" in (target / "g1-prep.txt").read_text()
    first = (target / "g0-prep.txt").read_text().splitlines()
    # the base evaluation every fit reads (--base_evaluations) runs in the first wave, first
    assert "pairs" in first[1] and "selftrain evaluate" in first[0]
    submitted = "".join((target / f"{stem}.txt").read_text() for stem in (
        "g0-prep", "g0-fit", "g1-prep", "g1-fit", "report")).splitlines()
    assert len(submitted) == len(steps)  # every step in some wave


def test_order_runs_every_step_after_what_it_needs(tmp_path):
    steps = sweep(out=str(tmp_path / "sw"), student="tiny:qwen2", fit_config=DEBUG,
                  sources=_sources(), num_subsets=2, generations=3, mode="accumulate",
                  fit={"trainer.max_epochs": 2}, dry_run=True, check_fit=False)
    seen: set[str] = set()
    for step in steps:
        assert set(step.needs) <= seen, step.id
        seen.add(step.id)
    fits = {s.id: s for s in steps if s.kind == "fit"}
    third = fits["fit/g3/self_t1.0/s1"]
    corpora = json.loads(third.argv[third.argv.index("--data.corpus") + 1])
    # every generation's corpus, each cleaned of the probe set
    assert [Path(c).relative_to(tmp_path / "sw" / "corpora").parts[0] for c in corpora] == [
        "g1", "g2", "g3"]
    assert all(c.endswith("-clean") for c in corpora)
    generate = next(s for s in steps if s.id == "generate/g3/self_t1.0/s1")
    assert generate.argv[generate.argv.index("--model") + 1].endswith(
        "runs/g2/self_t1.0/s1/hf/epoch=2")
    assert "fit/g2/self_t1.0/s1" in generate.needs
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing


def _sources(**more) -> dict:
    from selftrain.sweep.grid import Source

    return {"self": Source(model="tiny:qwen2"), **more}


def test_a_changed_grid_is_refused_and_overwrite_reruns_only_what_changed(tmp_path):
    out = tmp_path / "sw"
    ok = Step("a", "report", ["selftrain", "--help"], output=str(out / "a"))
    after = Step("b", "report", ["selftrain", "--help"], ["a"], str(out / "b"))
    outcome = run_here([ok, after], out, overwrite=False)
    assert outcome.done == ["a", "b"]
    assert run_here([ok, after], out, overwrite=False).skipped == ["a", "b"]
    changed = Step("a", "report", ["selftrain", "-h"], output=str(out / "a"))
    with pytest.raises(SelftrainError, match="--overwrite true"):
        run_here([changed, after], out, overwrite=False)
    outcome = run_here([changed, after], out, overwrite=True)
    assert outcome.done == ["a", "b"]  # b's input changed with a
    records = {p.name: json.loads(p.read_text()) for p in (out / STATE / "done").iterdir()}
    assert records["a.json"]["digest"] == digests([changed, after])["a"]


def test_a_failed_step_stops_what_needs_it_and_nothing_else(tmp_path):
    out = tmp_path / "sw"
    failing = Step("bad", "generate", ["selftrain", "generate", "--model", "tiny:nope",
                                       "--out", str(out / "c")], output=str(out / "c"))
    blocked = Step("fit", "report", ["selftrain", "--help"], ["bad"], str(out / "r"))
    fine = Step("other", "report", ["selftrain", "--help"], output=str(out / "o"))
    with pytest.raises(SelftrainError, match=r"1 step\(s\) failed \(bad\); 1 not run"):
        run_here([failing, blocked, fine], out, overwrite=False)
    summary = json.loads((out / STATE / "summary.json").read_text())
    assert (summary["failed"], summary["blocked"], summary["done"]) == (["bad"], ["fit"],
                                                                      ["other"])
    # begun (and failed) with one command: another one for it would mix two runs' outputs
    other = Step("bad", "generate", [*failing.argv, "--seed", "1"], output=failing.output)
    with pytest.raises(SelftrainError, match="bad: ran with other inputs"):
        run_here([other, blocked, fine], out, overwrite=False)


def test_slurm_submission_chains_the_waves(tmp_path):
    target = tmp_path / "slurm"
    steps = sweep(out=str(tmp_path / "sw"), student="tiny:qwen2", fit_config=DEBUG,
                  sources=_sources(), num_subsets=2, generations=2, slurm=str(target),
                  slurm_options=["--gpus-per-task=1"], fit={"trainer.max_epochs": 1},
                  check_fit=False)
    submit = (target / "submit.sh").read_text()
    assert submit.index("g1-prep.txt") < submit.index("g1-fit.txt") < submit.index(
        "g2-prep.txt") < submit.index("g2-fit.txt") < submit.index("report.txt")
    assert "--array=0-1" in submit and submit.count("--dependency=afterok:") == 4
    fits = (target / "g1-fit.txt").read_text().splitlines()
    assert fits == [s.line() for s in steps if s.id.startswith("fit/g1/")]
    assert "#SBATCH --gpus-per-task=1" in (target / "run_lines.sbatch").read_text()
    for script in ("submit.sh", "run_lines.sbatch"):
        subprocess.run(["bash", "-n", str(target / script)], check=True)
        assert os.access(target / script, os.X_OK)


def test_a_list_of_corpora_takes_subsets_only_where_they_were_sampled(tmp_path):
    from selftrain.training.data import CorpusDataModule

    whole = tmp_path / "one_student"
    subprocess.run(["cp", "-r", str(DEBUG_CORPUS), str(whole)], check=True)
    manifest = json.loads((whole / "manifest.json").read_text())
    (whole / "manifest.json").write_text(json.dumps({**manifest, "num_subsets": 1}))
    sizes = {}
    for name, corpus in (("split", str(DEBUG_CORPUS)), ("both", [str(DEBUG_CORPUS), str(whole)])):
        data = CorpusDataModule(corpus=corpus, tokenizer="tiny:qwen2", max_length=64,
                                subset=0, num_subsets=2)
        data.load()
        sizes[name] = len(data.rows)
    total = manifest["counts"]["written"]
    assert 0 < sizes["split"] < total  # alone, a corpus is split whatever its manifest says
    assert sizes["both"] == sizes["split"] + total  # in a list, one sampled for one student is not


@pytest.mark.slow
def test_a_tiny_sweep_killed_once_and_rerun_reaches_the_whole_report(tmp_path):
    grid = tmp_path / "grid.yaml"
    out = tmp_path / "sw"
    grid.write_text(yaml.safe_dump({
        "out": str(out), "student": "tiny:qwen2", "fit_config": DEBUG,
        "sources": {"self": {"model": "tiny:qwen2"}, "llama": {"model": "tiny:llama"}},
        "num_subsets": 1, "generations": 2, "mode": "accumulate",
        "generate": {"num_samples": 32, "max_new_tokens": 24, "batch_size": 16},
        "fit": {"trainer.max_epochs": 1, "trainer.enable_progress_bar": False}}))
    command = [sys.executable, "-m", "selftrain", "sweep", "--config", str(grid)]
    done = out / STATE / "done"
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and len(list(done.glob("fit__*"))) < 3:
        time.sleep(0.2)
    time.sleep(2)  # into the fourth fit, or the generation after it
    os.killpg(process.pid, signal.SIGKILL)  # the sweep and the command it runs, at once
    process.wait()
    killed = len(list(done.glob("*.json")))
    assert 0 < killed < 13
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / STATE / "summary.json").read_text())
    assert len(summary["skipped"]) == killed and not summary["failed"] + summary["blocked"]
    # per generation: sampling from 2 models, cleaning of the probe set (as many), 2 fits; report
    assert len(summary["skipped"]) + len(summary["done"]) == 13
    report = (out / "report" / "summary.md").read_text()
    for condition in ("self_t1.0", "llama_t1.0", "self_t1.0@g2", "llama_t1.0@g2"):
        assert f"| {condition} |" in report
    assert "4 runs in 4 conditions" in report and "## Iterated generations" in report
    assert (out / "report" / "figures" / "generations.png").is_file()
    for run in (out / "runs").glob("g*/*/s*"):  # one run per dir, none doubled by the rerun
        assert not list((run / "checkpoints").glob("last-v*.ckpt")), run
        assert len(list((run / "hf").glob("epoch=*"))) == 1, run
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 run, 13 skipped" in again.stderr, again.stderr[-2000:]


def tiny_chain(out: Path, **fit: object) -> Path:
    """A grid file beside ``out``: one source, one subset, two generations (g2 samples g1's
    export), one epoch of the debug config per student; ``fit`` adds fit flags."""
    grid = out.with_name(out.name + ".yaml")
    grid.write_text(yaml.safe_dump({
        "out": str(out), "student": "tiny:qwen2", "fit_config": DEBUG,
        "sources": {"self": {"model": "tiny:qwen2"}}, "num_subsets": 1, "generations": 2,
        "generate": {"num_samples": 16, "max_new_tokens": 16, "batch_size": 16},
        "fit": {"trainer.max_epochs": 1, "trainer.enable_progress_bar": False, **fit}}))
    return grid


def report_of(out: Path) -> tuple[str, str]:
    """A sweep's report (summary.md, scalars.csv) with its own dir and date taken out."""
    summary, scalars = ((out / "report" / name).read_text().replace(str(out), "OUT")
                        for name in ("summary.md", "scalars.csv"))
    return "\n".join(line for line in summary.splitlines()
                     if not line.startswith("2 runs in 2 conditions; selftrain")), scalars


@pytest.mark.slow
def test_a_sweep_killed_inside_a_final_export_reruns_to_the_same_report(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "selftrain", "sweep", "--config",
                    str(tiny_chain(reference))], cwd=REPO, check=True, capture_output=True)
    out, once = tmp_path / "killed", tmp_path / "signalled"
    kill = {"class_path": "helpers.SignalInExport",  # the sweep and its fit, at once, once
            "init_args": {"point": "fsynced", "group": True, "once": str(once)}}
    command = [sys.executable, "-m", "selftrain", "sweep", "--config",
               str(tiny_chain(out, **{"trainer.callbacks+": kill}))]
    killed = subprocess.run(command, cwd=REPO, env=tests_importable(), start_new_session=True,
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL and once.is_file()
    first_fit = out / "runs" / "g1" / "self_t1.0" / "s0"
    assert not (first_fit / "hf" / "epoch=1").exists()  # g2 has no model to sample from yet
    assert list((first_fit / "hf").glob(".epoch=1.partial-*"))
    rerun = subprocess.run(command, cwd=REPO, env=tests_importable(), capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [p.name for p in (first_fit / "hf").iterdir()] == ["epoch=1"]
    assert report_of(out) == report_of(reference)


def test_generations_are_read_from_condition_names():
    import pandas as pd

    from selftrain.analysis.curves import by_generation

    finals = pd.DataFrame([
        {"tag": "t", "condition": c, "final_mean": m, "final_sd": 0.1, "n": 2}
        for c, m in (("self_t1.0", 1.0), ("self_t1.0@g3", 3.0), ("self_t1.0@g2", 2.0),
                     ("replay_x", 9.0), ("odd@gx", 5.0))])
    table = by_generation(finals)
    assert table["chain"].tolist() == ["self_t1.0"] * 3  # no later generation: left out
    assert table["generation"].tolist() == [1, 2, 3]
    assert table["final_mean"].tolist() == [1.0, 2.0, 3.0]


def test_sampled_corpora_are_cleaned_of_the_fit_probe_set_unless_turned_off(tmp_path):
    steps = sweep(out=str(tmp_path / "sw"), student="tiny:qwen2", fit_config=DEBUG,
                  sources=_sources(), num_subsets=2, check_fit=False, dry_run=True)
    probes = yaml.safe_load(Path(DEBUG).read_text())["probes"]["probe_set"]
    cleans = {step.output: step for step in steps if step.kind == "decontaminate"}
    assert len(cleans) == len(_sources())  # one per sampled corpus
    for step in cleans.values():
        flags = dict(zip(step.argv[2::2], step.argv[3::2], strict=False))
        assert json.loads(flags["--probe_sets"]) == [probes]
        assert flags["--tokenizer"] == "tiny:qwen2"  # the student's, as its fit compares
        assert "--benchmarks" not in flags  # the grid names none
    for step in steps:
        if step.kind == "fit":
            corpus = step.argv[step.argv.index("--data.corpus") + 1]
            assert corpus in cleans and cleans[corpus].id in step.needs
    off = sweep(out=str(tmp_path / "sw2"), student="tiny:qwen2", fit_config=DEBUG,
                sources=_sources(), num_subsets=2, check_fit=False, dry_run=True,
                decontaminate_probes=False)
    assert not [step for step in off if step.kind == "decontaminate"]


def test_cells_and_one_base_evaluation_wire_every_fit(tmp_path):
    from selftrain.sweep.grid import Proxies, Replay, Source

    real = tmp_path / "real.jsonl"
    real.write_text('{"text": "a document"}\n')
    steps = sweep(out=str(tmp_path / "sw"), student="tiny:qwen2", fit_config=DEBUG,
                  sources=_sources(other=Source(model="tiny:llama")), num_subsets=4,
                  replay=Replay(sources=[str(real)], match=["self_t1.0"]),
                  proxies=Proxies(benchmarks=[str(real)], cells=True), evaluate_base=True,
                  check_fit=False, dry_run=True)
    by_id = {step.id: step for step in steps}
    base = by_id["evaluate/base"]
    assert base.argv[:4] == ["selftrain", "evaluate", "--model", "tiny:qwen2"]
    assert set(base.needs) == {"generate/g1/self", "generate/g1/other"}
    position = {step.id: i for i, step in enumerate(steps)}
    cells = {}
    for name in ("self_t1.0", "other_t1.0"):
        proxies = by_id[f"proxies/g1/{name}"]
        cells[name] = proxies.argv[proxies.argv.index("--cells_out") + 1]
    replay = by_id["replay/g1/self_t1.0"]
    assert replay.argv[replay.argv.index("--match") + 1] == cells["self_t1.0"]
    assert replay.needs == ["proxies/g1/self_t1.0"]
    assert "--cells_out" not in by_id["proxies/g1/replay_self_t1.0"].argv  # random subsets
    fits = [step for step in steps if step.kind == "fit"]
    assert len(fits) == 12
    for fit in fits:
        flags = dict(zip(fit.argv[2::2], fit.argv[3::2], strict=False))
        assert flags["--base_evaluations"] == base.output and "evaluate/base" in fit.needs
        assert position[fit.id] > position["evaluate/base"]
        condition = fit.id.split("/")[2]
        if condition in cells:
            assert flags["--data.corpus"] == cells[condition]
            assert f"proxies/g1/{condition}" in fit.needs
    with pytest.raises(SelftrainError, match="--proxies.cells: .*num_subsets 2"):
        sweep(out=str(tmp_path / "sw2"), student="tiny:qwen2", fit_config=DEBUG,
              sources=_sources(), num_subsets=2, check_fit=False, dry_run=True,
              proxies=Proxies(benchmarks=[str(real)], cells=True))


def test_a_dry_run_into_a_closed_pipe_stops_quietly(tmp_path):
    """``selftrain sweep --dry_run true | head``: no traceback, status 141 (128 + SIGPIPE)."""
    command = [sys.executable, "-m", "selftrain", "sweep", "--out", str(tmp_path / "sw"),
               "--student", "tiny:qwen2", "--fit_config", DEBUG, "--sources",
               '{"self": {"model": "tiny:qwen2"}}', "--num_subsets", "2", "--dry_run", "true",
               "--check_fit", "false"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=tests_importable())
    process.stdout.close()  # the reader is gone before a line is written
    stderr = process.stderr.read().decode()
    assert process.wait() == 141, stderr[-2000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
