"""selftrain.callbacks.tb_layout: the custom-scalars page and the by-epoch sub-run.

One chart per charted evaluation tag, each selecting exactly one tag of exactly one run (so no
two lines of a run share a chart, and so a colour); the layout written last is the one
TensorBoard serves; the by-epoch copies hold each epoch once after a crash and resume, while
the step-axis series stay those of the uninterrupted run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import crash_flag, fit_args

from selftrain.analysis.tb import scalar_events
from selftrain.callbacks.epoch_eval import EpochEvaluation
from selftrain.callbacks.tb_layout import (
    BY_EPOCH,
    BY_EPOCH_CATEGORY,
    BY_STEP_CATEGORY,
    PLACEHOLDER_CATEGORY,
    TRAINING_CATEGORY,
    charts,
    layout,
    resume_epoch,
)
from selftrain.cli import main

TAGS = ["extraction/license/memorized", "extraction/code/memorized", "extraction/memorized",
        "extraction/code/match_rate", "likelihood/code/delta_logprob", "likelihood/corpus_nll",
        "benchmark_delta/arc_easy/acc", "benchmark/arc_easy/acc", "likelihood/code/logprob"]


def served_layout(logdir: Path) -> dict:
    """The layout TensorBoard's custom-scalars plugin serves for ``logdir`` (Python loader)."""
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.context import RequestContext
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    context = base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer,
                                    data_provider=provider)
    served = CustomScalarsPlugin(context).layout_impl(RequestContext(), "")
    return json.loads(served) if isinstance(served, str) else served


def test_one_chart_per_quantity_all_domains_first():
    assert charts(TAGS) == [
        ("benchmark delta vs base — arc_easy/acc", "benchmark_delta/arc_easy/acc"),
        ("extraction: memorized rows — all domains", "extraction/memorized"),
        ("extraction: memorized rows — code", "extraction/code/memorized"),
        ("extraction: memorized rows — license", "extraction/license/memorized"),
        ("likelihood delta vs base — code", "likelihood/code/delta_logprob"),
        ("extraction: match rate — code", "extraction/code/match_rate"),
        ("training-corpus NLL", "likelihood/corpus_nll"),
    ]


def test_each_chart_selects_one_tag_of_one_run():
    page = layout(TAGS, val_loss=True)
    assert [(c.title, c.closed) for c in page.category] == [
        (BY_EPOCH_CATEGORY, False), (TRAINING_CATEGORY, False), (BY_STEP_CATEGORY, True)]
    by_epoch = [f"{BY_EPOCH}/{tag}" for tag in TAGS]
    step_tags = [*TAGS, "train/loss", "val/loss", "train/loss_epoch"]
    titles = []
    for category, run_tags in zip(page.category, (by_epoch, step_tags, step_tags), strict=True):
        for chart in category.chart:
            titles.append(chart.title)
            (regex,) = chart.multiline.tag
            # the plugin applies re.match to the tags of every run
            assert [t for t in by_epoch + step_tags if re.match(regex, t)] == \
                [t for t in run_tags if re.match(regex, t)], chart.title
            assert len([t for t in run_tags if re.match(regex, t)]) == 1, chart.title
    assert len(titles) == len(set(titles))  # read_layout keys charts by title
    assert [c.title for c in page.category[1].chart] == ["train/loss", "val/loss"]


def test_before_any_evaluation_the_page_holds_family_placeholders():
    page = layout([])
    assert [c.title for c in page.category] == [PLACEHOLDER_CATEGORY, TRAINING_CATEGORY]
    assert [c.title for c in page.category[1].chart] == ["train/loss"]


def test_a_layout_written_after_the_logger_closed_its_writer_is_the_one_served(tmp_path):
    # Lightning's finalize closes the SummaryWriter at the end of every fit and validate
    from lightning.pytorch.loggers import TensorBoardLogger

    from selftrain.callbacks.tb_layout import run_board

    logger = TensorBoardLogger(save_dir=tmp_path, name="tb", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.finalize("success")
    assert logger.experiment.file_writer is None
    run_board(logger).chart(TAGS)
    served = served_layout(tmp_path / "tb")
    assert [c["title"] for c in served["category"]] == [
        BY_EPOCH_CATEGORY, TRAINING_CATEGORY, BY_STEP_CATEGORY]
    assert served["category"][2]["closed"] is True
    logger.finalize("success")


def record(epoch: int, step: int) -> dict:
    return {"epoch": epoch, "global_step": step, "seconds": 0.1, "metrics": {}}


@pytest.mark.parametrize(("step", "expected"), [(0, 0), (6, 1), (7, 2), (30, 3)])
def test_the_by_epoch_purge_keeps_what_was_evaluated_before_the_checkpoint(step, expected):
    checkpoint = {"global_step": step, "callbacks": {
        "EpochEvaluation{'name': 'a'}": {"history": [record(0, 0), record(1, 6), record(2, 12)]},
        "EpochEvaluation{'name': 'b'}": {"history": [record(0, 0), record(2, 12)]},
        "RunCheckpoint": {"history": "not an evaluation's"},
    }}
    assert resume_epoch(checkpoint) == expected


# --- a fit, a crash and its resume ---------------------------------------------------------


class FakeEval(EpochEvaluation):
    """Two domains whose values follow from the epoch alone (so runs compare exactly)."""

    name = "fake"

    def evaluate(self, trainer, pl_module, epoch, step):
        return {"extraction/code/memorized": float(epoch),
                "extraction/license/memorized": float(10 + epoch)}


FLAGS = ("--trainer.max_epochs", "3", "--trainer.limit_train_batches", "6",
         "--checkpoint.every_n_train_steps", "4", "--model.export_hf", "never",
         '--trainer.callbacks+={"class_path": "test_tb_layout.FakeEval"}')
"""Epochs end at steps 6, 12, 18; checkpoints at 4, 6, 8, 12, 16, 18."""
FAKE = ("extraction/code/memorized", "extraction/license/memorized")


def fit(run: Path, *flags: str) -> None:
    main(fit_args(run, *FLAGS, *flags, callbacks=False))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    fit(run)
    return run


def test_a_fit_writes_the_by_epoch_sub_run_and_its_page(reference):
    by_epoch = scalar_events(reference / "tb" / BY_EPOCH)
    assert by_epoch[f"{BY_EPOCH}/extraction/code/memorized"] == [(e, e) for e in range(4)]
    assert [s for s, _ in by_epoch[f"{BY_EPOCH}/eval_time/fake"]] == [0, 1, 2, 3]
    steps = scalar_events(reference / "tb")
    assert [s for s, _ in steps["extraction/code/memorized"]] == [0, 6, 12, 18]
    assert not any(tag.startswith(BY_EPOCH) for tag in steps)  # the step-axis run unchanged

    served = served_layout(reference / "tb")  # the last layout written: the per-tag page
    categories = {c["title"]: [chart["title"] for chart in c["chart"]]
                  for c in served["category"]}
    assert categories == {
        BY_EPOCH_CATEGORY: ["extraction: memorized rows — code",
                            "extraction: memorized rows — license"],
        TRAINING_CATEGORY: ["train/loss"],
        BY_STEP_CATEGORY: ["extraction: memorized rows — code (by step)",
                           "extraction: memorized rows — license (by step)"]}


@pytest.mark.parametrize("crash", [
    # last checkpoint at step 6, the step epoch 1 was evaluated at: it is logged again
    pytest.param((8, False), id="mid-epoch"),
    # epoch 2 evaluated at step 12 and logged, its checkpoint never written (last: step 8)
    pytest.param((12, True), id="after-the-evaluation-before-its-checkpoint"),
])
def test_after_a_crash_and_resume_each_epoch_is_logged_once(reference, tmp_path, crash):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(run, crash_flag(*crash))
    fit(run, "--ckpt_path", "last")
    assert len(list((run / "tb" / BY_EPOCH).glob("events.out.tfevents.*"))) == 2

    by_epoch, expected = scalar_events(run / "tb" / BY_EPOCH), scalar_events(
        reference / "tb" / BY_EPOCH)
    steps, expected_steps = scalar_events(run / "tb"), scalar_events(reference / "tb")
    for tag in FAKE:
        assert by_epoch[f"{BY_EPOCH}/{tag}"] == expected[f"{BY_EPOCH}/{tag}"], tag
        assert [s for s, _ in by_epoch[f"{BY_EPOCH}/{tag}"]] == [0, 1, 2, 3]
        assert steps[tag] == expected_steps[tag], tag
    assert [s for s, _ in by_epoch[f"{BY_EPOCH}/eval_time/fake"]] == [0, 1, 2, 3]
