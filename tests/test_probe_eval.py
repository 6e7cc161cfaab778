"""selftrain.callbacks.probe_eval: what ExtractionProbe and LikelihoodTracker share.

Their arguments checked in init, their settings from a second config file, one teacher-forced
pass per evaluation shared by both (measured again at another step, for another student, or
once a fit starts), and (slow) the
numbers of a DDP run on 2 CPU processes equal those of one process.
"""

import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    ALLOW_LEAKS,
    EXTRACTION,
    LIKELIHOOD,
    bare_trainer,
    callback,
    callbacks_config,
    cli,
    corpus_probes,
    fit_cli,
    make_student,
    run_fit,
    succeeded,
)

import selftrain.callbacks.probe_eval as probe_eval_module
from selftrain.analysis.tb import read_scalars
from selftrain.callbacks.extraction_probe import ExtractionProbe
from selftrain.callbacks.likelihood_tracker import LikelihoodTracker
from selftrain.errors import SelftrainError
from selftrain.models import load_model
from selftrain.probes.metrics import RowResults
from selftrain.probes.windows import continuation_logprobs, greedy_continuations


@pytest.mark.parametrize("cls, kwargs, message", [
    (ExtractionProbe, {"prefix_tokens": 0}, "ExtractionProbe.prefix_tokens 0: must be >= 1"),
    (ExtractionProbe, {"batch_size": -2}, "ExtractionProbe.batch_size -2: must be >= 1"),
    (ExtractionProbe, {"every_n_epochs": 0}, "ExtractionProbe.every_n_epochs 0: must be >= 1"),
    (LikelihoodTracker, {"suffix_tokens": 0}, "LikelihoodTracker.suffix_tokens 0"),
    (LikelihoodTracker, {"corpus_sample": -1}, "LikelihoodTracker.corpus_sample -1"),
    (LikelihoodTracker, {"probe_set": " "}, "LikelihoodTracker.probe_set is empty"),
])
def test_bad_arguments_name_the_argument(cls, kwargs, message):
    with pytest.raises(SelftrainError, match=message.replace(".", r"\.")):
        cls(**{"probe_set": "probes.jsonl", **kwargs})


def test_callbacks_from_a_second_config_file(tmp_path):
    probes = corpus_probes(tmp_path / "probes.parquet")
    extra = callbacks_config(
        tmp_path / "probes.yaml",
        (EXTRACTION, {"probe_set": str(probes), "prefix_tokens": 16, "suffix_tokens": 16,
                      "save_rows": False}),
        (LIKELIHOOD, {"probe_set": str(probes), "prefix_tokens": 16, "suffix_tokens": 8,
                      "corpus_seed": 3}))
    built = cli(tmp_path / "run", "--config", extra, callbacks=False, export=False)
    extraction, likelihood = callback(built, ExtractionProbe), callback(built, LikelihoodTracker)
    assert extraction.save_rows is False
    assert extraction.prefix_tokens == 16
    assert (likelihood.suffix_tokens, likelihood.corpus_seed) == (8, 3)


def test_both_probes_share_one_teacher_forced_pass_per_evaluation(tmp_path, planted_probes,
                                                                  monkeypatch):
    path, model = planted_probes
    calls = []
    real = probe_eval_module.teacher_forced_rows
    monkeypatch.setattr(probe_eval_module, "teacher_forced_rows",
                        lambda m, ids, *a, **k: calls.append(len(ids)) or real(m, ids, *a, **k))
    trainer, student = bare_trainer(tmp_path), make_student(model).eval()
    extraction = ExtractionProbe(probe_set=str(path), batch_size=4)
    likelihood = LikelihoodTracker(probe_set=str(path), corpus_sample=0, batch_size=3)
    for probe in (extraction, likelihood):
        probe.check(trainer, student)
    with torch.no_grad():
        extraction.evaluate(trainer, student, epoch=0, step=0)
        likelihood.evaluate(trainer, student, epoch=0, step=0)
        assert calls == [9]  # one pass over the 9 rows, read by both
        # the same tensors: log p is continuation_logprobs', the memorized rows greedy's
        shared = extraction.teacher_forced(trainer, student, step=0)
        assert torch.equal(likelihood.base, shared.logprobs)
        assert torch.equal(shared.logprobs, continuation_logprobs(model, extraction.probes
                                                                  .input_ids, 32))
        # the next step's weights (an optimizer step moves the step): measured again, once
        likelihood.evaluate(trainer, student, epoch=1, step=4)
        extraction.evaluate(trainer, student, epoch=1, step=4)
        assert calls == [9, 9]
        # a fit starting may load other weights at a known step: the kept pass is forgotten
        likelihood.on_fit_start(trainer, student)
        extraction.evaluate(trainer, student, epoch=1, step=4)
        assert calls == [9, 9, 9]
        # another student, or another window, is never served the stored pass
        other = make_student(model).eval()
        extraction.evaluate(trainer, other, epoch=1, step=4)
        short = LikelihoodTracker(probe_set=str(path), suffix_tokens=31, corpus_sample=0)
        short.check(trainer, other)
        short.evaluate(trainer, other, epoch=1, step=4)
        assert calls == [9, 9, 9, 9, 9]
    # alone, each callback measures its own pass
    calls.clear()
    alone, fresh = ExtractionProbe(probe_set=str(path), save_rows=False), bare_trainer(tmp_path)
    alone.check(fresh, student)
    with torch.no_grad():
        alone.evaluate(fresh, student, epoch=0, step=0)
    assert calls == [9]


def test_row_results_gather_several_values_per_row():
    metric = RowResults(5, width=2)
    metric.update(torch.tensor([3, 0]), torch.tensor([[3.0, 30.0], [0.5, 5.0]]))
    metric.update(torch.tensor([1, 2, 4]), torch.tensor([[1.0, 10.0], [2.0, 20.0],
                                                         [4.0, 40.0]]))
    assert metric.compute().tolist() == [[0.5, 5.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0],
                                         [4.0, 40.0]]
    with pytest.raises(ValueError, match="width 0"):
        RowResults(3, width=0)


# --- DDP ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_on_two_processes_gives_the_numbers_of_one(tmp_path):
    probes = corpus_probes(tmp_path / "probes.parquet", count=4, heldout=3)  # 7 rows: uneven
    extra = callbacks_config(
        tmp_path / "probes.yaml",
        (EXTRACTION, {"probe_set": str(probes), "prefix_tokens": 16, "suffix_tokens": 16,
                      "batch_size": 2}),
        (LIKELIHOOD, {"probe_set": str(probes), "prefix_tokens": 16, "suffix_tokens": 16,
                      "corpus_sample": 37, "batch_size": 2}))
    run = tmp_path / "ddp"
    succeeded(run_fit(run, "--config", extra, "--trainer.devices", "2", "--trainer.strategy",
                      "ddp", "--trainer.max_epochs", "1", ALLOW_LEAKS, callbacks=False))
    ddp = read_scalars(run / "tb")
    assert [s for s, _ in ddp["likelihood/train/logprob"]] == [0, 12]
    start, end = (v for _, v in ddp["likelihood/train/logprob"])
    assert end > start + 0.1  # training moved the numbers compared below
    for name in ("epoch=0-step=0.parquet", "epoch=1-step=12.parquet"):
        assert pq.read_table(run / "eval" / "extraction" / name)["row"].to_pylist() == list(
            range(7))

    # one process, the same (base) student: the core functions on the whole probe set
    rows = torch.tensor(pq.read_table(probes).to_pydict()["input_ids"])
    base_model = load_model("tiny:qwen2")
    logprobs = continuation_logprobs(base_model, rows, 16)
    matched = (greedy_continuations(base_model, rows[:, :16], 16) == rows[:, 16:]).sum(-1)
    for domain, part in (("train", slice(0, 4)), ("heldout", slice(4, 7))):
        assert ddp[f"likelihood/{domain}/logprob"][0][1] == pytest.approx(
            float(logprobs[part].mean()), abs=1e-4)
        assert ddp[f"extraction/{domain}/match_rate"][0][1] == pytest.approx(
            float(matched[part].double().mean() / 16), abs=1e-6)

    # one process, the DDP-trained student: its epoch-0 numbers are DDP's last ones
    single = tmp_path / "single"
    fit_cli(single, "--config", extra, "--model.model", str(run / "hf" / "epoch=1"),
            "--data.same_tokenizer", "true", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "1", ALLOW_LEAKS, callbacks=False, export=False)
    one = read_scalars(single / "tb")
    tags = [t for t in ddp if t.startswith(("likelihood/", "extraction/"))
            and not t.endswith("delta_logprob")]
    assert len(tags) == 10, tags  # 6 extraction, 2 + 1 logprob, corpus_nll
    for tag in tags:
        assert one[tag][0][1] == pytest.approx(ddp[tag][-1][1], abs=1e-4), tag
    assert ddp["likelihood/train/delta_logprob"][-1][1] == pytest.approx(
        ddp["likelihood/train/logprob"][-1][1] - ddp["likelihood/train/logprob"][0][1],
        abs=1e-4)


def test_the_runs_probe_set_reaches_both_probe_callbacks_and_one_flag_swaps_it(tmp_path):
    probes = corpus_probes(tmp_path / "probes.jsonl")
    built = cli(tmp_path / "run", "--probes.probe_set", str(probes), "--probes.suffix_tokens",
                "12")
    for cls in (ExtractionProbe, LikelihoodTracker):
        found = callback(built, cls)
        assert (found.probe_set, found.prefix_tokens, found.suffix_tokens) == (
            str(probes), 16, 12)


def test_a_probe_callback_window_that_contradicts_the_runs_is_refused(tmp_path):
    config = tmp_path / "window.yaml"
    config.write_text("trainer:\n  callbacks:\n"
                      "    - class_path: selftrain.callbacks.ExtractionProbe\n"
                      "      init_args: {suffix_tokens: 8}\n")
    with pytest.raises(SelftrainError, match=r"ExtractionProbe\.suffix_tokens 8: this callback "
                                             r"reads the run's probe set"):
        cli(tmp_path / "run", "--config", str(config))
    with pytest.raises(SelftrainError, match=r"--probes\.prefix_tokens 0: must be >= 1"):
        cli(tmp_path / "run", "--probes.prefix_tokens", "0")
