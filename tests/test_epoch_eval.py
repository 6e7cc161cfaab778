"""selftrain.callbacks.epoch_eval: EpochEvaluation's cadence and its evaluation entry.

Epoch 0, every n-th epoch, and the last step, whatever ends the fit; an evaluation at a point
of the run given from outside (as ``selftrain evaluate`` gives an export's) is logged and
recorded at that point, with the Trainer's loop counters left alone.
"""

import json

from helpers import bare_trainer, fit_cli, make_student

from selftrain.analysis.tb import read_scalars
from selftrain.callbacks.epoch_eval import EpochEvaluation
from selftrain.callbacks.tb_layout import close_boards


class Recorder(EpochEvaluation):
    """Measures nothing; notes (epochs completed, global step) of every evaluation."""

    name = "recorder"

    def __init__(self, every_n_epochs: int = 2) -> None:
        super().__init__(every_n_epochs=every_n_epochs)
        self.evaluated: list[tuple[int, int]] = []

    def evaluate(self, trainer, pl_module, epoch, step):
        self.evaluated.append((epoch, step))
        return {}


def evaluated(run_dir, *flags):
    """Fit the debug student on 4 batches per epoch; where the recorder evaluated."""
    recorder = Recorder()
    fit_cli(run_dir, "--trainer.limit_train_batches", "4", *flags, extra_callbacks=[recorder],
            callbacks=False, export=False)
    return recorder.evaluated


def test_max_steps_alone_keeps_the_cadence_and_ends_on_the_last_step(tmp_path):
    # Lightning sets max_epochs to -1 here: no epoch is the last by count
    assert evaluated(tmp_path / "run", "--trainer.max_epochs", "null",
                     "--trainer.max_steps", "12") == [(0, 0), (2, 8), (3, 12)]


def test_max_steps_alone_ending_mid_epoch_evaluates_the_last_step(tmp_path):
    assert evaluated(tmp_path / "run", "--trainer.max_epochs", "null",
                     "--trainer.max_steps", "10") == [(0, 0), (2, 8), (3, 10)]


def test_max_steps_reached_before_max_epochs_evaluates_the_last_step(tmp_path):
    assert evaluated(tmp_path / "run", "--trainer.max_epochs", "5",
                     "--trainer.max_steps", "10") == [(0, 0), (2, 8), (3, 10)]


def test_max_epochs_alone_evaluates_every_nth_and_the_last_epoch(tmp_path):
    assert evaluated(tmp_path / "run", "--trainer.max_epochs", "3") == [(0, 0), (2, 8), (3, 12)]


def test_an_evaluation_at_a_given_point_is_logged_and_recorded_there(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    recorder = Recorder()
    trainer = bare_trainer(tmp_path)
    trainer.loggers = [TensorBoardLogger(save_dir=tmp_path, name="tb", version="")]
    record = recorder.evaluate_at(trainer, make_student(), epoch=3, step=42)
    assert recorder.evaluated == [(3, 42)] and trainer.global_step == 0
    assert record == json.loads((tmp_path / "eval" / "recorder.jsonl").read_text())
    assert (record["epoch"], record["global_step"], record["metrics"]) == (3, 42, {})
    close_boards(trainer)
    trainer.loggers[0].finalize("success")
    assert read_scalars(tmp_path / "tb")["eval/epochs_completed"] == [(42, 3.0)]
