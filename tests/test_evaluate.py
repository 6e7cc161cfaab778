"""`selftrain evaluate`: offline numbers equal in-training ones; runs written whole or not at all.

One debug run exports every epoch with the three evaluation callbacks on; evaluating its
exports afterwards must log exactly the scalars training logged, at the same steps and on
the same epoch axis. A second debug run trains without callbacks, and is evaluated in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DEBUG, file_bytes, fit, in_process, one_error_line

from selftrain.analysis.tb import read_scalars, scalar_events
from selftrain.cli import main

FAMILIES = ("benchmark", "benchmark_delta", "extraction", "likelihood", "eval")


def evaluation_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The evaluation callbacks' scalars of a run (their time taken left out)."""
    return {tag: points for tag, points in read_scalars(logdir).items()
            if tag.split("/")[0] in FAMILIES}


def refused(capsys, *args: str) -> str:
    """The one error line of a ``selftrain evaluate`` that must exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *args])
    assert exit_info.value.code == 2
    return one_error_line(capsys.readouterr().err)


def tree(root: Path) -> dict[str, float]:
    """Every file under ``root`` with its modification time (to show nothing changed)."""
    return {str(path.relative_to(root)): path.stat().st_mtime_ns
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A debug run with the three evaluation callbacks, exported after every epoch."""
    run = tmp_path_factory.mktemp("trained") / "run"
    fit(run, "--trainer.max_epochs", "2", "--model.export_hf", "every_epoch")
    return run


@pytest.fixture(scope="module")
def untrained_evals(tmp_path_factory) -> Path:
    """A debug run without evaluation callbacks, exported after every epoch."""
    run = tmp_path_factory.mktemp("plain") / "run"
    fit(run, "--trainer.max_epochs", "2", "--model.export_hf", "every_epoch", callbacks=False)
    return run


def test_offline_equals_in_training(trained, tmp_path):
    out = tmp_path / "offline"
    main(["evaluate", "--run", str(trained), "--out", str(out)])
    logged, offline = evaluation_scalars(trained / "tb"), evaluation_scalars(out / "tb")
    assert {"benchmark_delta/selftrain_facts/acc", "extraction/code/memorized",
            "likelihood/license/delta_logprob", "likelihood/corpus_nll",
            "eval/epochs_completed"} <= set(logged)
    assert offline == logged  # every tag, step and value, bit for bit
    steps = [step for step, _ in logged["eval/epochs_completed"]]
    exports = [json.loads((trained / "hf" / f"epoch={n}" / "selftrain_export.json").read_text())
               for n in (1, 2)]
    assert steps == [0] + [info["global_step"] for info in exports]
    for name in ("benchmark", "extraction", "likelihood"):
        records = [json.loads(line) for line in (out / "eval" / f"{name}.jsonl").open()]
        trained_records = [json.loads(line) for line in (trained / "eval" / f"{name}.jsonl").open()]
        assert [(r["epoch"], r["global_step"], r["metrics"]) for r in records] == [
            (r["epoch"], r["global_step"], r["metrics"]) for r in trained_records]
    assert sorted(p.name for p in (out / "eval" / "benchmark").iterdir()) == sorted(
        p.name for p in (trained / "eval" / "benchmark").iterdir())
    summary = json.loads((out / "eval" / "evaluate.json").read_text())
    assert [e["epoch"] for e in summary["evaluations"]] == [0, 1, 2]
    assert all((out / name).is_file() for name in summary["files"])
    assert (out / "tb" / "config.yaml").read_text() == (trained / "tb" / "config.yaml").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_one_epoch_as_its_own_job(trained, tmp_path):
    """A parallel job evaluates one export; its deltas are still against the base."""
    out = tmp_path / "epoch2"
    main(["evaluate", "--run", str(trained), "--out", str(out), "--epochs", "[2]"])
    logged, offline = evaluation_scalars(trained / "tb"), evaluation_scalars(out / "tb")
    assert offline["eval/epochs_completed"] == [logged["eval/epochs_completed"][-1]]
    for tag, points in offline.items():
        assert points == [logged[tag][-1]], tag
    assert offline["likelihood/code/delta_logprob"][0][1] != 0  # the base was measured


def test_in_place_then_overwrite(untrained_evals, capsys):
    run = untrained_evals
    assert not evaluation_scalars(run / "tb")
    loss_before = read_scalars(run / "tb")["train/loss"]
    training = file_bytes(run)
    assert b"lr:" in training["tb/hparams.yaml"]  # the training's hyperparameters
    main(["evaluate", "--run", str(run), "--fit_config", DEBUG])
    first = evaluation_scalars(run / "tb")
    logged_once = len(scalar_events(run / "tb")["eval/epochs_completed"])
    assert [value for _, value in first["eval/epochs_completed"]] == [0.0, 1.0, 2.0]
    assert first["benchmark_delta/selftrain_facts/acc"][0][1] == 0.0
    assert read_scalars(run / "tb")["train/loss"] == loss_before
    assert "already holds evaluations of selftrain evaluate" in refused(
        capsys, "--run", str(run), "--fit_config", DEBUG)
    main(["evaluate", "--run", str(run), "--fit_config", DEBUG, "--overwrite", "true"])
    events = scalar_events(run / "tb")
    assert len(events["eval/epochs_completed"]) == logged_once  # replaced, not added to
    assert evaluation_scalars(run / "tb") == first
    assert read_scalars(run / "tb")["train/loss"] == loss_before
    for name, data in training.items():  # evaluate adds files to the run, and changes none
        assert (run / name).read_bytes() == data, name
    record = json.loads((run / "eval" / "evaluate.json").read_text())
    assert not set(record["files"]) & set(training), record["files"]


def test_a_model_beside_its_base(tmp_path, trained):
    out = tmp_path / "merged"
    export = trained / "hf" / "epoch=2"
    main(["evaluate", "--model", str(export), "--fit_config", DEBUG, "--out", str(out),
          "--epoch", "7"])
    offline = evaluation_scalars(out / "tb")
    assert offline["eval/epochs_completed"] == [(0, 0.0), (7, 7.0)]
    logged = evaluation_scalars(trained / "tb")
    delta = "likelihood/code/delta_logprob"
    assert offline[delta][1][1] == logged[delta][-1][1]
    assert "model: " + str(export) in (out / "tb" / "config.yaml").read_text()


@pytest.mark.parametrize("case", ["neither", "both", "not a run", "no exports", "bad epoch",
                                  "model without out", "training evals", "foreign out",
                                  "out inside run", "no callbacks", "no gpu here"])
def test_bad_input(case, trained, tmp_path, capsys):
    if case == "no gpu here" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    bare = tmp_path / "bare"
    (bare / "tb").mkdir(parents=True)
    (bare / "tb" / "config.yaml").write_text((trained / "tb" / "config.yaml").read_text())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    no_callbacks = tmp_path / "plain.yaml"
    no_callbacks.write_text("model:\n  model: tiny:qwen2\ntrainer:\n  callbacks: []\n")
    args, expected = {
        "neither": ([], "give --run RUN_DIR"),
        "both": (["--run", str(trained), "--model", "tiny:qwen2"], "give --run RUN_DIR"),
        "not a run": (["--run", str(tmp_path)], "--run"),
        "no exports": (["--run", str(bare), "--out", str(tmp_path / "o")], "no hf/epoch=N"),
        "bad epoch": (["--run", str(trained), "--out", str(tmp_path / "o"), "--epochs", "[5]"],
                      "--epochs"),
        "model without out": (["--model", "tiny:qwen2", "--fit_config", DEBUG], "--out"),
        "training evals": (["--run", str(trained)], "evaluations its training logged"),
        "foreign out": (["--run", str(trained), "--out", str(foreign)], "did not write"),
        "out inside run": (["--run", str(trained), "--out", str(trained / "x")], "--out"),
        "no callbacks": (["--run", str(trained), "--fit_config", str(no_callbacks), "--out",
                          str(tmp_path / "o")], "no evaluation callback"),
        "no gpu here": (["--run", str(trained), "--out", str(tmp_path / "o"), "--accelerator",
                         "cuda"], "--accelerator cuda"),
    }[case]
    before = tree(tmp_path), tree(trained)
    assert expected in refused(capsys, *args)
    assert (tree(tmp_path), tree(trained)) == before


def test_a_failed_evaluation_leaves_nothing(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "hf" / "epoch=2" / "model.safetensors").unlink()  # fails after two evaluations
    (run / "hf" / "epoch=2" / "digests.json").unlink()  # (with digests it fails before any)
    before = tree(tmp_path)
    line = refused(capsys, "--run", str(run), "--out", str(tmp_path / "out"))
    assert "evaluating epoch 2" in line and "no weights" in line
    assert tree(tmp_path) == before  # no out dir, no staging dir


def test_help_names_every_flag():
    result = in_process("evaluate", "--help")
    assert result.returncode == 0
    for flag in ("--run", "--model", "--fit_config", "--out", "--epochs", "--epoch",
                 "--precision", "--overwrite"):
        assert flag in result.stdout


def test_fits_take_the_base_from_one_evaluation(trained, tmp_path, capsys):
    """A fit given ``--base_evaluations`` logs what a fit measuring its base itself logs.

    The benchmarks' epoch-0 scores and per-item files come from the one evaluation of the base
    (copied byte for byte, the record naming where from); every later delta is against them.
    """
    base = tmp_path / "base"
    main(["evaluate", "--model", "tiny:qwen2", "--fit_config", DEBUG, "--out", str(base)])
    run = tmp_path / "run"
    fit(run, "--trainer.max_epochs", "2", "--model.export_hf", "every_epoch",
        "--base_evaluations", str(base))
    benchmark = {tag: points for tag, points in evaluation_scalars(run / "tb").items()
                 if tag.startswith("benchmark")}
    assert benchmark and benchmark == {tag: points for tag, points
                                       in evaluation_scalars(trained / "tb").items()
                                       if tag.startswith("benchmark")}
    records = [json.loads(line) for line in (run / "eval" / "benchmark.jsonl").open()]
    assert records[0]["base_from"] == str(base.resolve()) and records[0]["seconds"] == 0.0
    assert "base_from" not in records[1]
    for path in (base / "eval" / "benchmark").iterdir():
        assert (run / "eval" / "benchmark" / path.name).read_bytes() == path.read_bytes()
    # the probes measure the base themselves (their epoch 0 depends on nothing else either)
    assert "base_from" not in json.loads((run / "eval" / "extraction.jsonl").open().readline())

    other = tmp_path / "other"
    main(["evaluate", "--model", str(trained / "hf" / "epoch=2"), "--fit_config", DEBUG,
          "--out", str(other)])
    for flags, expected in (([str(other)], "not this run's base tiny:qwen2"),
                            ([str(tmp_path / "nothing")], "holds no evaluations")):
        with pytest.raises(SystemExit) as exit_info:
            fit(tmp_path / "refused", "--trainer.max_epochs", "1", "--base_evaluations", *flags)
        assert exit_info.value.code == 2
        line = one_error_line(capsys.readouterr().err)
        assert "error: --base_evaluations" in line and expected in line, line
        assert not (tmp_path / "refused").exists()  # refused before anything is written
