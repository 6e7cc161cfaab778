"""selftrain.training.run_dir and the fit/resume rules of SelftrainCLI: one run per run dir.

The plan (:func:`plan_run`) is checked first on run dirs built by hand, without LightningCLI.
A second fit into a run dir is refused unless it resumes (``--ckpt_path last``) or starts over
(``--overwrite true``); a resume of another run is refused in one line; ``--ckpt_path last``
with no checkpoint starts from step 0; a run that crashed (or, slow tier, was SIGKILLed at a
random moment) and resumed ends with the uninterrupted run's weights (bitwise), loss curve and
evaluation history, each evaluation once in ``eval/*.jsonl`` and in TensorBoard.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    DEBUG,
    DEBUG_CORPUS,
    EXPORT_WRITE_POINTS,
    NO_CALLBACKS,
    REPO,
    crash_flag,
    file_bytes,
    fit_args,
    fit_command,
    flip_bytes,
    held_run,
    history,
    kill_when,
    one_error_line,
    run_fit,
    signal_in_export_flag,
    succeeded,
    tests_importable,
)

from selftrain.analysis.tb import scalar_events
from selftrain.cli import main
from selftrain.digests import save_with_digest
from selftrain.errors import SelftrainError
from selftrain.training.run_dir import (
    IDENTITY_KEY,
    RUN_MARKER,
    RunPlan,
    find_last_checkpoint,
    is_run_dir,
    plan_run,
    prepare_fit,
    run_files,
)

EVALUATIONS = ("benchmark", "extraction", "likelihood")
"""The debug config's evaluation callbacks (their ``eval/<name>.jsonl``)."""
TWO_EPOCHS = ("--trainer.max_epochs", "2")


def refused(capsys, *args: str) -> str:
    """The one error line of an in-process ``selftrain`` that must exit with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return one_error_line(capsys.readouterr().err)


def tree(root: Path) -> dict[str, float]:
    """Every file under ``root`` with its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file()}


def final_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def without_seconds(records: list[dict]) -> list[tuple]:
    return [(r["epoch"], r["global_step"], r["metrics"]) for r in records]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bitwise weights, the same loss curve and evaluation history, each evaluation once."""
    for name, tensor in final_state(reference).items():
        assert torch.equal(final_state(run)[name], tensor), name
    for name in EVALUATIONS:
        assert without_seconds(history(run, name)) == without_seconds(history(reference, name))
    events, expected = scalar_events(run / "tb"), scalar_events(reference / "tb")
    for tag in ("train/loss", *[t for t in expected if t.startswith(("benchmark", "extraction",
                                                                     "likelihood"))]):
        steps = [step for step, _ in events[tag]]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at a step: {steps}"
        assert sorted(events[tag]) == sorted(expected[tag]), tag


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted debug run, 2 epochs, evaluations on."""
    run = tmp_path_factory.mktemp("reference") / "run"
    main(fit_args(run, *TWO_EPOCHS))
    return run


# --- the plan, on run dirs built by hand ----------------------------------------------------


def saved_checkpoint(path: Path, step: int) -> Path:
    """A checkpoint (saved with its digest, as fit saves) at ``step``, with a run identity."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_with_digest(path, lambda staged: torch.save(
        {"global_step": step, IDENTITY_KEY: {"student": "tiny:qwen2"}}, staged))
    return path


def plan(subcommand: str, root: Path, ckpt_path: str | None = None, **kwargs) -> RunPlan:
    return plan_run(subcommand, root, root / "checkpoints", ckpt_path, **kwargs)


def test_a_new_run_dir_plans_a_fit_from_step_0(tmp_path):
    assert plan("fit", tmp_path / "run") == RunPlan(None, None, False)
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_a_fit_into_a_run_dir_that_holds_a_run_is_refused_unless_it_starts_over(tmp_path):
    root = tmp_path / "run"
    held_run(root)
    with pytest.raises(SelftrainError, match=r"--trainer.default_root_dir .*: already holds a "
                                             r"run \(selftrain_run.json, tb/events"):
        plan("fit", root)
    assert plan("fit", root, overwrite=True) == RunPlan(None, None, True)
    assert plan("fit", root, first_rank=False) == RunPlan(None, None, False)  # rank 0 judges
    assert plan("validate", root) == RunPlan(None, None, False)  # writes into tb/validate


def test_ckpt_path_last_resumes_the_newest_last_checkpoint(tmp_path):
    root = tmp_path / "run"
    older = saved_checkpoint(held_run(root) / "last.ckpt", 10)
    newer = saved_checkpoint(root / "checkpoints" / "last-v1.ckpt", 20)
    os.utime(older, (1, 1))  # Lightning's rule: the newest by modification time
    resume = plan("fit", root, "last")
    assert resume.ckpt_path == str(newer) and resume.resume_step == 20
    assert not resume.start_over
    assert plan("validate", root, "last").ckpt_path == str(newer)  # named, so it is checked


def test_ckpt_path_last_without_a_checkpoint_plans_a_start_over(tmp_path, caplog):
    root = tmp_path / "run"
    held_run(root)  # a run that died before its first checkpoint
    with caplog.at_level(logging.INFO, logger="selftrain"):
        assert plan("fit", root, "last") == RunPlan(None, None, True)
    assert "no checkpoint in" in caplog.text and "starting from step 0" in caplog.text
    assert plan("validate", root, "last") == RunPlan("last", None, False)  # left to Lightning


def test_overwrite_with_a_ckpt_path_is_refused(tmp_path):
    with pytest.raises(SelftrainError, match="--overwrite true with --ckpt_path last: one starts"):
        plan("fit", tmp_path / "run", "last", overwrite=True)


def test_another_run_dirs_checkpoint_is_planned_only_into_a_run_dir_without_a_run(tmp_path):
    other = saved_checkpoint(tmp_path / "other" / "checkpoints" / "last.ckpt", 24)
    fresh = plan("fit", tmp_path / "fresh", str(other))
    assert fresh.ckpt_path == str(other) and fresh.resume_step == 24 and not fresh.start_over
    root = tmp_path / "run"
    held_run(root)
    with pytest.raises(SelftrainError, match="is not this run dir's checkpoint"):
        plan("fit", root, str(other))
    # the run dir's own checkpoint, named by its path, resumes it
    own = saved_checkpoint(root / "checkpoints" / "last.ckpt", 5)
    assert plan("fit", root, str(own)).resume_step == 5


def test_a_folder_of_other_files_or_an_input_is_refused_whatever_the_flags(tmp_path):
    folder = tmp_path / "folder"
    (folder / "hf").mkdir(parents=True)
    (folder / "hf" / "README.md").write_text("a card\n")
    for overwrite in (False, True):
        with pytest.raises(SelftrainError, match="holds files but no selftrain run"):
            plan("fit", folder, overwrite=overwrite)
    corpus = tmp_path / "run" / "corpus"
    corpus.mkdir(parents=True)
    with pytest.raises(SelftrainError, match="holds --data.corpus"):
        plan("fit", tmp_path / "run", inputs=[("--data.corpus", str(corpus))])


@pytest.mark.parametrize("ckpt_path", ["best", "hpc", "registry", "s3://bucket/run.ckpt"])
def test_a_checkpoint_lightning_resolves_is_not_read_here(tmp_path, ckpt_path):
    def unread(path: Path) -> dict:
        raise AssertionError(f"{path} was read")

    assert plan("validate", tmp_path / "run", ckpt_path, read_meta=unread) == RunPlan(ckpt_path)


def test_a_missing_or_damaged_checkpoint_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(SelftrainError, match="no such checkpoint"):
        plan("fit", tmp_path / "run", str(tmp_path / "gone.ckpt"))
    damaged = saved_checkpoint(tmp_path / "damaged.ckpt", 3)
    flip_bytes(damaged)
    with pytest.raises(SelftrainError, match="does not match the digest saved beside it"):
        plan("fit", tmp_path / "run", str(damaged))
    assert not (tmp_path / "run").exists()


def test_prepare_fit_removes_what_the_plan_says_and_marks_the_run_dir(tmp_path):
    root = tmp_path / "run"
    held_run(root)
    (root / "notes.md").write_text("mine")
    prepare_fit(RunPlan(None, None, True), root, root / "checkpoints")
    assert sorted(path.name for path in root.iterdir()) == ["notes.md", RUN_MARKER]

    staging = root / "hf" / ".epoch=2.partial-x"  # what a killed export left
    staging.mkdir(parents=True)
    (root / "hf" / "epoch=1").mkdir()
    prepare_fit(RunPlan("last.ckpt", {"global_step": 3}), root, root / "checkpoints")
    assert [path.name for path in (root / "hf").iterdir()] == ["epoch=1"]


# --- one run per run dir -------------------------------------------------------------------


def test_a_second_fit_is_refused_and_overwrite_starts_the_run_over(tmp_path, capsys):
    run = tmp_path / "run"
    args = fit_args(run, "--trainer.max_epochs", "1", callbacks=False)
    main(args)
    before = tree(run)
    line = refused(capsys, *args)
    assert "--trainer.default_root_dir" in line and "--ckpt_path last" in line, line
    assert tree(run) == before  # nothing touched

    mine = {"notes.md": "mine", "eval/score.py": "print(1)\n", "hf/README.md": "a card\n"}
    for name, text in mine.items():  # the user's own files stay through a start-over
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text(text)
    main([*args, "--overwrite", "true"])
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    assert {name: (run / name).read_text() for name in mine} == mine
    assert "overwrite: false" in (run / "tb" / "config.yaml").read_text()  # not saved as set


def test_ckpt_path_last_without_a_checkpoint_starts_from_step_0(tmp_path, capfd):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(fit_args(run, "--trainer.max_epochs", "1", crash_flag(5)))
    assert find_last_checkpoint(run / "checkpoints") is None
    assert [r["global_step"] for r in history(run, "extraction")] == [0]
    capfd.readouterr()

    main(fit_args(run, "--trainer.max_epochs", "1", "--ckpt_path", "last"))
    err = capfd.readouterr().err
    assert "no checkpoint in" in err and "starting from step 0" in err
    assert "save_last" not in err  # Lightning's hint does not apply here
    for name in EVALUATIONS:
        assert [r["global_step"] for r in history(run, name)] == [0, 24]
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one_epoch") / "run"
    main(fit_args(run, "--trainer.max_epochs", "1", callbacks=False))
    return run


@pytest.mark.parametrize(("flags", "field"), [
    (("--data.subset", "0"), "corpus"),
    (("--data.max_length", "32"), "corpus"),
    (("--model.model", "tiny:llama"), "student"),
])
def test_a_resume_of_another_run_is_refused(one_epoch, capsys, flags, field):
    before = tree(one_epoch)
    line = refused(capsys, *fit_args(one_epoch, *TWO_EPOCHS, *flags, "--ckpt_path", "last",
                                     callbacks=False))
    assert line.startswith("selftrain: error: --ckpt_path") and f"another {field}" in line, line
    assert tree(one_epoch) == before  # config.yaml kept, no event file added


def test_a_checkpoint_without_a_run_identity_is_refused(one_epoch, tmp_path, capsys):
    state = torch.load(one_epoch / "checkpoints" / "last.ckpt", weights_only=True)
    del state[IDENTITY_KEY]
    foreign = tmp_path / "foreign.ckpt"
    torch.save(state, foreign)
    line = refused(capsys, *fit_args(tmp_path / "new", "--ckpt_path", str(foreign),
                                     callbacks=False))
    assert "records no selftrain run identity" in line
    assert not (tmp_path / "new").exists()


def test_a_run_dir_is_known_by_what_only_a_run_writes(one_epoch, tmp_path):
    import shutil

    folder = tmp_path / "folder"  # every folder name a run has, and none of a run's files
    for name in ("tb", "eval", "hf", "checkpoints"):
        (folder / name).mkdir(parents=True)
        (folder / name / "mine.txt").write_text("mine")
    assert run_files(folder, folder / "checkpoints") == []
    (folder / "tb" / "config.yaml").write_text("colour: blue\n")  # a config, not a run's
    assert not is_run_dir(folder, folder / "checkpoints")

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    assert (run / RUN_MARKER).is_file() and is_run_dir(run, run / "checkpoints")
    (run / RUN_MARKER).unlink()  # a run of a version before the marker: its saved config
    assert is_run_dir(run, run / "checkpoints")
    (run / "tb" / "config.yaml").unlink()  # its checkpoint's run identity
    assert is_run_dir(run, run / "checkpoints")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    del state[IDENTITY_KEY]
    torch.save(state, run / "checkpoints" / "last.ckpt")
    assert not is_run_dir(run, run / "checkpoints")


def test_validate_in_a_fit_run_dir_writes_over_nothing(one_epoch, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    before = file_bytes(run)
    main(["validate", "--config", DEBUG, NO_CALLBACKS, "--trainer.default_root_dir", str(run),
          "--trainer.enable_progress_bar", "false", "--data.eval_corpus", DEBUG_CORPUS,
          "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    after = file_bytes(run)
    assert {name: after[name] for name in before} == before  # hparams.yaml, config.yaml kept
    added = sorted(set(after) - set(before))
    assert added and all(name.startswith("tb/validate/") for name in added), added
    assert "val/loss" in scalar_events(run / "tb" / "validate")


def test_weights_only_false_loads_a_checkpoint_that_needs_unpickling(one_epoch, tmp_path,
                                                                     capsys):
    import shutil
    from fractions import Fraction

    from selftrain.digests import save_with_digest

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    save_with_digest(run / "checkpoints" / "last.ckpt",  # a checkpoint saved as fit saves
                     lambda path: torch.save({**state, "note": Fraction(1, 3)}, path))
    args = fit_args(run, *TWO_EPOCHS, "--ckpt_path", "last", callbacks=False)
    line = refused(capsys, *args)
    assert "only by unpickling" in line and "--weights_only false" in line, line
    with pytest.warns(UserWarning, match="--weights_only false: the checkpoint is unpickled"):
        main([*args, "--weights_only", "false"])
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 48 and "note" not in resumed


def test_a_resume_keeps_the_first_config_and_saves_its_own(one_epoch, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    first = (run / "tb" / "config.yaml").read_text()
    main(fit_args(run, *TWO_EPOCHS, "--ckpt_path", "last", callbacks=False))
    assert (run / "tb" / "config.yaml").read_text() == first
    assert "max_epochs: 2" in (run / "tb" / "config.resumed-at-step=24.yaml").read_text()
    # a copied (or moved) run dir goes on in its own last.ckpt, not in a last-v1.ckpt beside it
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt", "last.ckpt.digest.json"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 48


# --- exactly once after a crash --------------------------------------------------------------


@pytest.mark.parametrize("crash", [
    pytest.param((15, False), id="mid-epoch"),
    pytest.param((48, True), id="after-the-last-evaluations-before-their-checkpoint"),
])
def test_a_crashed_run_resumes_to_the_uninterrupted_one(reference, tmp_path, crash):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(fit_args(run, *TWO_EPOCHS, crash_flag(*crash)))
    if crash[1]:  # the epoch's evaluations ran and were written before the crash
        assert [r["global_step"] for r in history(run, "benchmark")] == [0, 24, 48]
    main(fit_args(run, *TWO_EPOCHS, "--ckpt_path", "last"))
    assert_same_run(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_sigkill_at_a_random_moment_leaves_each_evaluation_once(reference, tmp_path, seed):
    run = tmp_path / "run"
    delay, started = random.Random(seed).uniform(0.0, 2.5), []

    def moment() -> bool:  # a random time after training started (tb/ appears at step 0)
        if not started and (run / "tb").exists():
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > delay

    kill_when(fit_command(run, *TWO_EPOCHS), moment, poll=0.01)
    succeeded(run_fit(run, *TWO_EPOCHS, "--ckpt_path", "last"))
    assert_same_run(run, reference)


# --- an HF export interrupted while it is written -----------------------------------------------


@pytest.fixture(scope="module")
def final_export(tmp_path_factory) -> dict[str, bytes]:
    """Every file of the uninterrupted debug run's final export (2 epochs, no evaluations)."""
    run = tmp_path_factory.mktemp("exported") / "run"
    main(fit_args(run, *TWO_EPOCHS, callbacks=False))
    return file_bytes(run / "hf" / "epoch=2")


EXPORT_INTERRUPTS = [("SIGKILL", 0), ("SIGKILL", 2), ("SIGINT", 1), ("SIGINT", 5)]
"""(signal, seed): the seed picks the moment of the write (:data:`EXPORT_WRITE_POINTS`)."""


@pytest.mark.slow
@pytest.mark.parametrize(("signal_name", "point"), [
    pytest.param(name, point, id=f"{name}-seed{seed}-{point}") for name, seed in EXPORT_INTERRUPTS
    for point in [EXPORT_WRITE_POINTS[random.Random(seed).randrange(len(EXPORT_WRITE_POINTS))]]])
def test_a_final_export_interrupted_comes_back_whole_on_resume(final_export, tmp_path,
                                                               signal_name, point):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    killed = subprocess.run(
        fit_command(run, *TWO_EPOCHS, signal_in_export_flag(point, signal_name), callbacks=False),
        cwd=REPO, env=tests_importable(), capture_output=True, text=True)
    assert killed.returncode == (130 if signal_name == "SIGINT" else -signal.SIGKILL), \
        killed.stderr[-3000:]
    assert (run / "hf" / "epoch=2").exists() == (point == "published")
    resumed = succeeded(run_fit(run, *TWO_EPOCHS, "--ckpt_path", "last", callbacks=False))
    assert file_bytes(run / "hf" / "epoch=2") == final_export  # bit for bit
    assert [p.name for p in (run / "hf").iterdir()] == ["epoch=2"]  # no staging dir left
    assert ("export was interrupted" in resumed.stderr) == (point != "published")
    AutoModelForCausalLM.from_pretrained(run / "hf" / "epoch=2")


def test_weights_only_false_is_warned_about_loudly(one_epoch, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    with pytest.warns(UserWarning, match="--weights_only false: the checkpoint is unpickled"):
        main(fit_args(run, *TWO_EPOCHS, "--ckpt_path", "last", "--weights_only", "false",
                      callbacks=False))


def test_another_runs_checkpoint_continues_only_in_a_new_run_dir(one_epoch, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(one_epoch, other)
    checkpoint = str(one_epoch / "checkpoints" / "last.ckpt")
    before = tree(other)
    line = refused(capsys, *fit_args(other, *TWO_EPOCHS, "--ckpt_path", checkpoint,
                                     callbacks=False))
    assert "is not this run dir's checkpoint" in line
    assert tree(other) == before

    fresh = tmp_path / "fresh"  # an empty run dir: the run goes on there
    main(fit_args(fresh, *TWO_EPOCHS, "--ckpt_path", checkpoint, callbacks=False))
    assert torch.load(fresh / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 48


def test_a_checkpoint_that_lost_bits_is_refused_before_it_is_read(one_epoch, tmp_path, capsys):
    """64 flipped bytes in ``last.ckpt`` (they land in the optimizer's state) used to resume
    without a word; the digest fit saved beside the checkpoint refuses them in one line."""
    import shutil

    from selftrain.digests import verify

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert verify(checkpoint, "--ckpt_path")  # fit saved the digest with the checkpoint
    assert [verify(export, "--model") for export in (run / "hf").iterdir()] == [True]
    validate = ["validate", "--config", DEBUG, NO_CALLBACKS, "--trainer.default_root_dir",
                str(run), "--trainer.enable_progress_bar", "false", "--data.eval_corpus",
                DEBUG_CORPUS]
    main([*validate, "--ckpt_path", "last"])  # intact: last is resolved, checked and read
    assert "val/loss" in scalar_events(run / "tb" / "validate")
    flip_bytes(checkpoint)
    before = tree(run)
    for args in (fit_args(run, *TWO_EPOCHS, "--ckpt_path", "last", callbacks=False),
                 [*validate, "--ckpt_path", "last"]):  # Lightning resolves last for validate
        line = refused(capsys, *args)
        assert line.startswith(f"selftrain: error: --ckpt_path {checkpoint}: does not match "
                               "the digest saved beside it"), line
        assert tree(run) == before
