"""selftrain.training.run_dir and the fit/resume rules of SelftrainCLI: one run per run dir.

A second fit into a run dir is refused unless it resumes (``--ckpt_path last``) or starts over
(``--overwrite true``); a resume of another run is refused in one line; ``--ckpt_path last``
with no checkpoint starts from step 0; a run that crashed (or, slow tier, was SIGKILLed at a
random moment) and resumed ends with the uninterrupted run's weights (bitwise), loss curve and
evaluation history, each evaluation once in ``eval/*.jsonl`` and in TensorBoard.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    crash_flag,
    fit_args,
    fit_command,
    history,
    kill_when,
    one_error_line,
    run_fit,
    succeeded,
)

from selftrain.analysis.tb import scalar_events
from selftrain.cli import main
from selftrain.training.run_dir import IDENTITY_KEY, find_last_checkpoint

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


# --- one run per run dir -------------------------------------------------------------------


def test_a_second_fit_is_refused_and_overwrite_starts_the_run_over(tmp_path, capsys):
    run = tmp_path / "run"
    args = fit_args(run, "--trainer.max_epochs", "1", callbacks=False)
    main(args)
    before = tree(run)
    line = refused(capsys, *args)
    assert "--trainer.default_root_dir" in line and "--ckpt_path last" in line, line
    assert tree(run) == before  # nothing touched

    (run / "notes.md").write_text("mine")  # the user's own file stays through a start-over
    main([*args, "--overwrite", "true"])
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    assert (run / "notes.md").read_text() == "mine"
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


def test_a_resume_keeps_the_first_config_and_saves_its_own(one_epoch, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    first = (run / "tb" / "config.yaml").read_text()
    main(fit_args(run, *TWO_EPOCHS, "--ckpt_path", "last", callbacks=False))
    assert (run / "tb" / "config.yaml").read_text() == first
    assert "max_epochs: 2" in (run / "tb" / "config.resumed-at-step=24.yaml").read_text()


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
