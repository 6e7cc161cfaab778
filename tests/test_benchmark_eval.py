"""selftrain.callbacks.benchmark_eval: BenchmarkEval runs lm-eval on the in-memory student.

Scores and deltas from the base on the evaluation cadence (per task too, across a resume),
the results files, the scores equal
to lm-eval's own ``simple_evaluate`` on the run's HF export, resume, code execution gated,
prompts truncated to the context, one-line errors, tasks split over 2 DDP ranks (slow).

Besides the project's tasks (``configs/tasks``) the runs here evaluate the tests' own
``selftrain_ppl`` (``tests/tasks``): rolling log-likelihood, whose bits per byte are continuous,
where the project's tasks give counts out of 8 that two different models often share.
"""

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from helpers import (
    BENCHMARK,
    DEBUG_CORPUS,
    TASKS,
    callback,
    callbacks_config,
    cli,
    fit,
    history,
    make_student,
    one_error_line,
    refused_fit,
    run_fit,
    succeeded,
    train_modes,
    write_jsonl,
)
from lightning.pytorch import Trainer

from selftrain.analysis.tb import read_scalars
from selftrain.callbacks.benchmark_eval import BenchmarkEval
from selftrain.callbacks.benchmark_results import metric_scores
from selftrain.errors import SelftrainError

TEST_TASKS = str(Path(__file__).parent / "tasks")
"""The tests' own lm-eval task: selftrain_ppl."""
SETTINGS = {"tasks": {"selftrain_facts": 2, "selftrain_arith": None, "selftrain_ppl": 0},
            "include_path": [TASKS, TEST_TASKS], "limit": 8}
SHOTS = {"selftrain_facts": 2, "selftrain_arith": 3,  # arith: its YAML's num_fewshot
         "selftrain_ppl": 0}
FLOAT32 = 2e-6
"""TensorBoard keeps float32: scores up to 16 (bits per byte is about 8) are rounded by at most
half an ulp, 9.5e-7, so a difference of two of them by at most 1.9e-6."""
METRICS = ["selftrain_facts/acc", "selftrain_facts/acc_norm",
           "selftrain_arith/exact_match_strict-match",
           "selftrain_arith/exact_match_flexible-extract", "selftrain_ppl/bits_per_byte"]


def callback_config(path, **init_args):
    """A config file adding one BenchmarkEval with ``init_args``."""
    return callbacks_config(path, (BENCHMARK, init_args))


def benchmark_cli(run, *flags, export=False):
    """The debug config with only the BenchmarkEval a test adds, on the debug corpus."""
    return cli(run, "--data.corpus", DEBUG_CORPUS, *flags, callbacks=False, export=export)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 epochs, every 2nd evaluated, run from a foreign cwd (data paths must still resolve);
    the HF export of the last epoch is written."""
    root = tmp_path_factory.mktemp("benchmark")
    extra = callback_config(root / "benchmark.yaml", every_n_epochs=2, **SETTINGS)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        probe = train_modes()
        built = benchmark_cli(root / "run", "--config", extra, "--trainer.max_epochs", "3",
                              export=True)
        built.trainer.callbacks.append(probe)
        built.trainer.fit(built.model, built.datamodule)
    return root / "run", built, probe


def test_scores_deltas_cadence_and_results_files(trained):
    run, built, probe = trained
    scalars = read_scalars(run / "tb")
    for metric in METRICS:
        assert [s for s, _ in scalars[f"benchmark/{metric}"]] == [0, 48, 72]  # epochs 0, 2, 3
        deltas = dict(scalars[f"benchmark_delta/{metric}"])
        values = dict(scalars[f"benchmark/{metric}"])
        assert deltas[0] == 0.0
        for step in (48, 72):
            assert deltas[step] == pytest.approx(values[step] - values[0], abs=FLOAT32)
    assert [v for _, v in scalars["eval/epochs_completed"]] == [0, 2, 3]
    assert len(probe.modes) == 72 and set(probe.modes) == {(True, True)}  # train mode restored

    files = sorted(p.name for p in (run / "eval" / "benchmark").glob("*.json"))
    assert files == ["epoch=0-step=0.json", "epoch=2-step=48.json", "epoch=3-step=72.json"]
    assert sorted(p.name for p in (run / "eval" / "benchmark").glob("*.parquet")) == [
        name.replace(".json", ".items.parquet") for name in files]
    for name in files:
        document = json.loads((run / "eval" / "benchmark" / name).read_text())
        assert set(document["results"]) == set(document["configs"]) == set(SHOTS)
        assert document["n-shot"] == SHOTS
        assert {k: v["effective"] for k, v in document["n-samples"].items()} == \
            dict.fromkeys(SHOTS, 8)
        assert "samples" not in document and document["config"]["model"] == "tiny:qwen2"
        logged = {f"benchmark/{k}": v for k, v in metric_scores(document["results"]).items()}
        step = document["global_step"]
        assert {k: pytest.approx(dict(scalars[k])[step], abs=FLOAT32) for k in logged} == logged
        items = pd.read_parquet(run / "eval" / "benchmark" / document["items"])
        means = items[items["aggregation"] == "mean"].groupby(["task", "metric"])["value"]
        assert means.size().eq(8).all() and len(means) >= len(SHOTS)  # 8 items per task metric
        for (task, metric), value in means.mean().items():  # the score is their mean
            assert value == pytest.approx(logged[f"benchmark/{task}/{metric}"], abs=1e-6)
    assert [h["epoch"] for h in history(run, "benchmark")] == [0, 2, 3]


def lm_eval_name(key: str) -> str | None:
    """lm-eval's ``<metric>,<filter>`` result key as BenchmarkEval names the metric; None for
    what is no metric (stderrs, alias, name, sample_len)."""
    metric, comma, filter_name = key.partition(",")
    if not comma or metric.endswith("_stderr"):
        return None
    return metric if filter_name == "none" else f"{metric}_{filter_name}"


def test_scores_equal_lm_evals_simple_evaluate_on_the_export(trained, monkeypatch):
    """The last evaluation, rebuilt from what BenchmarkEval recorded, as a user would run it:
    lm-eval's ``simple_evaluate`` with ``--model hf`` on ``<run>/hf/epoch=3``, per task with
    its shots, the same limit, batch size, bootstrap iterations and seeds, and lm-eval's own
    task manager (its data paths are relative to each YAML's folder: run from there)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    run = trained[0]
    (record,) = [r for r in history(run, "benchmark") if r["epoch"] == 3]
    document = json.loads((run / "eval" / "benchmark" / "epoch=3-step=72.json").read_text())
    config = document["config"]
    assert config["skipped"] == [] and config["max_length"] is None
    manager = TaskManager(include_path=config["include_path"], include_defaults=False)
    seed = config["seed"]
    export = run / "hf" / "epoch=3"
    assert json.loads((export / "selftrain_export.json").read_text())["global_step"] == 72
    ours = {k.removeprefix("benchmark/"): v for k, v in record["metrics"].items()
            if k.startswith("benchmark/")}
    theirs = {}
    for task, shots in config["tasks"].items():
        monkeypatch.chdir(Path(manager.task_index[task].yaml_path).parent)
        results = simple_evaluate(
            model="hf", model_args={"pretrained": str(export)}, tasks=[task],
            num_fewshot=shots, batch_size=config["batch_size"], device="cpu",
            limit=config["limit"], bootstrap_iters=config["bootstrap_iters"],
            log_samples=False, task_manager=manager, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
        assert results["n-shot"] == {task: document["n-shot"][task]}
        assert results["n-samples"][task]["effective"] == 8
        row = results["results"][task]
        theirs.update({f"{task}/{lm_eval_name(k)}": v for k, v in row.items()
                       if lm_eval_name(k)})
        # the results file holds lm-eval's own row
        assert {k: v for k, v in document["results"][task].items() if lm_eval_name(k)} == \
            pytest.approx({k: v for k, v in row.items() if lm_eval_name(k)}, rel=1e-6)
    assert sorted(ours) == sorted(theirs) == sorted(METRICS)
    # the same float32 weights (the export is the checkpoint's, bit for bit), tokenizer, batch
    # composition and CPU kernels: equal up to rounding; the counts of 8 differ by >= 1/8 when
    # they differ, and 1e-6 of bits per byte (about 8) is far below what one step changes
    assert ours == pytest.approx(theirs, rel=1e-6, abs=0)
    assert ours["selftrain_ppl/bits_per_byte"] != pytest.approx(
        history(run, "benchmark")[0]["metrics"]["benchmark/selftrain_ppl/bits_per_byte"],
        rel=1e-3)  # training moved it: the comparison can tell the base from the trained


def test_resume_keeps_the_base_and_refuses_a_changed_or_missing_one(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    base = json.loads((run / "eval" / "benchmark" / "epoch=0-step=0.json").read_text())
    base = metric_scores(base["results"])
    extra = callback_config(tmp_path / "benchmark.yaml", **SETTINGS)

    resumed = benchmark_cli(run, "--config", extra, "--trainer.max_epochs", "4")
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path="last")
    # from the checkpoint, not re-run
    assert callback(resumed, BenchmarkEval).state_dict()["base"] == base
    scalars = read_scalars(run / "tb")
    for metric in METRICS:
        values = dict(scalars[f"benchmark/{metric}"])
        assert max(values) == 96
        assert dict(scalars[f"benchmark_delta/{metric}"])[96] == pytest.approx(
            values[96] - base[metric], abs=FLOAT32)

    changed = callback_config(tmp_path / "changed.yaml", **{**SETTINGS, "limit": 4})
    other = benchmark_cli(run, "--config", changed, "--trainer.max_epochs", "5")
    with pytest.raises(SelftrainError, match=r"^BenchmarkEval.limit: differs from the run's"):
        other.trainer.fit(other.model, other.datamodule, ckpt_path="last")
    new_task = callback_config(tmp_path / "new.yaml", tasks={"selftrain_facts": 1},
                               include_path=TASKS, limit=8)  # no base for this task set
    other = benchmark_cli(run, "--config", new_task, "--trainer.max_epochs", "5")
    with pytest.raises(SelftrainError, match=r"^BenchmarkEval.run_at_start: this run resumes"):
        other.trainer.fit(other.model, other.datamodule, ckpt_path="last")


UNSAFE_YAML = """task: unsafe_echo
dataset_path: json
dataset_kwargs: {data_files: {test: unsafe_echo.jsonl}}
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 4, do_sample: false}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
unsafe_code: true
"""


@pytest.fixture
def student():
    return make_student()


@pytest.mark.parametrize("allow", [False, True])
def test_code_execution_tasks_run_only_when_allowed(tmp_path, monkeypatch, student, allow):
    tasks_dir = tmp_path / "unsafe"
    tasks_dir.mkdir()
    (tasks_dir / "unsafe_echo.yaml").write_text(UNSAFE_YAML)
    write_jsonl(tasks_dir / "unsafe_echo.jsonl",
                ({"prompt": f"print({i})\n", "answer": str(i)} for i in range(4)))
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for unsafe_echo.jsonl here
    trainer = Trainer(default_root_dir=tmp_path / "run", logger=False, accelerator="cpu")
    callback = BenchmarkEval({"selftrain_facts": 3, "unsafe_echo": 0}, limit=4, seed=7,
                             include_path=[TASKS, str(tasks_dir)], allow_code_execution=allow)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        callback.ensure_checked(trainer, student)
    mine = [str(w.message) for w in warned if "unsafe_echo" in str(w.message)]
    rng = random.getstate(), torch.get_rng_state()
    metrics = callback.evaluate(trainer, student, epoch=0, step=0)
    assert (random.getstate(), torch.get_rng_state().tolist()) == (rng[0], rng[1].tolist())
    assert callback.evaluate(trainer, student, epoch=1, step=0) == metrics  # same few-shot prompts
    document = json.loads((tmp_path / "run" / "eval" / "benchmark" / "epoch=0-step=0.json")
                          .read_text())
    if allow:
        assert mine == [] and callback.skipped == []
        assert "benchmark/unsafe_echo/exact_match" in metrics
        assert set(document["results"]) == {"selftrain_facts", "unsafe_echo"}
        assert os.environ["HF_ALLOW_CODE_EVAL"] == "1"
    else:
        assert mine == ["BenchmarkEval.tasks: skipping unsafe_echo: they execute model-written "
                        "code; set BenchmarkEval.allow_code_execution true to run them (in a "
                        "sandbox)"]
        assert not any("unsafe_echo" in tag for tag in metrics)
        assert set(document["results"]) == {"selftrain_facts"}
        assert document["config"]["skipped"] == ["unsafe_echo"]
        with pytest.raises(SelftrainError, match="every task .* executes model-written code"):
            BenchmarkEval({"unsafe_echo": 0}, include_path=str(tasks_dir)).check(trainer,
                                                                                   student)


def test_prompts_longer_than_the_context_are_truncated(tmp_path, student):
    trainer = Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu")
    callback = BenchmarkEval({"selftrain_facts": 8, "selftrain_arith": 8}, include_path=TASKS,
                             limit=2, max_length=48)  # 8-shot prompts: ~400 bytes = tokens
    callback.ensure_checked(trainer, student)
    metrics = callback.evaluate(trainer, student, epoch=0, step=0)
    assert sorted(k for k in metrics if k.startswith("benchmark/")) == \
        sorted(f"benchmark/{m}" for m in METRICS if not m.startswith("selftrain_ppl"))
    document = json.loads((tmp_path / "eval" / "benchmark" / "epoch=0-step=0.json").read_text())
    assert document["n-shot"] == {"selftrain_facts": 8, "selftrain_arith": 8}


CADENCE = {"tasks": {"selftrain_facts": {"num_fewshot": 2},  # the callback's: every epoch
                     "selftrain_arith": {"every_n_epochs": 2}, "selftrain_ppl": 0},
           "include_path": [TASKS, TEST_TASKS], "limit": 2}
"""Per-task cadence: log-likelihood tasks every epoch, the generation task every 2nd."""
DUE = {0: ["selftrain_facts", "selftrain_arith", "selftrain_ppl"],
       1: ["selftrain_facts", "selftrain_ppl"],
       2: ["selftrain_facts", "selftrain_arith", "selftrain_ppl"],
       3: ["selftrain_facts", "selftrain_arith", "selftrain_ppl"]}  # 3: the last epoch
"""The tasks evaluated after each of 3 epochs under CADENCE."""


class CrashAt(L.Callback):
    """Raises at the start of an epoch, as if the process was killed after the last epoch's
    checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


def tasks_by_epoch(run: Path) -> dict[int, list[str]]:
    """Epoch -> the tasks whose scores one run's history holds."""
    return {record["epoch"]: sorted({tag.split("/")[1] for tag in record["metrics"]})
            for record in history(run, "benchmark")}


@pytest.fixture(scope="module")
def per_task(tmp_path_factory):
    """3 epochs with CADENCE."""
    root = tmp_path_factory.mktemp("per_task")
    extra = callback_config(root / "benchmark.yaml", **CADENCE)
    built = benchmark_cli(root / "run", "--config", extra, "--trainer.max_epochs", "3",
                          export=False)
    built.trainer.fit(built.model, built.datamodule)
    return root / "run", built


def test_the_task_mapping_sets_shots_and_cadence():
    callback = BenchmarkEval({"a": 1, "b": {"num_fewshot": None, "every_n_epochs": 3},
                              "c": {"every_n_epochs": 2}, "d": None}, every_n_epochs=4)
    assert callback.tasks == {"a": 1, "b": None, "c": None, "d": None}
    assert callback.task_every_n_epochs == {"a": 4, "b": 3, "c": 2, "d": 4}
    assert callback.settings["tasks"] == callback.tasks  # what checkpoints compare: unchanged
    assert [callback.due(epoch) for epoch in range(7)] == [
        ["a", "b", "c", "d"], [], ["c"], ["b"], ["a", "c", "d"], [], ["b", "c"]]
    assert callback.due(5, last=True) == ["a", "b", "c", "d"]


def test_both_task_forms_parse_from_the_command_line(tmp_path):
    built = benchmark_cli(tmp_path / "run", f"--trainer.callbacks+={BENCHMARK}",
                          "--trainer.callbacks.tasks={selftrain_facts: {num_fewshot: 1, "
                          "every_n_epochs: 2}, selftrain_arith: 0, selftrain_ppl: null}",
                          f"--trainer.callbacks.include_path={TASKS}",
                          "--trainer.callbacks.every_n_epochs=3")
    found = callback(built, BenchmarkEval)
    assert found.tasks == {"selftrain_facts": 1, "selftrain_arith": 0, "selftrain_ppl": None}
    assert found.task_every_n_epochs == {"selftrain_facts": 2, "selftrain_arith": 3,
                                         "selftrain_ppl": 3}


def test_per_task_cadence_logs_each_task_at_its_epochs(per_task):
    run, built = per_task
    assert tasks_by_epoch(run) == {epoch: sorted(names) for epoch, names in DUE.items()}
    scalars = read_scalars(run / "tb")
    steps = {"selftrain_facts/acc": [0, 24, 48, 72], "selftrain_ppl/bits_per_byte": [0, 24, 48, 72],
             "selftrain_arith/exact_match_strict-match": [0, 48, 72]}
    for metric, expected in steps.items():
        assert [s for s, _ in scalars[f"benchmark/{metric}"]] == expected
        deltas, values = (dict(scalars[f"benchmark{kind}/{metric}"]) for kind in ("_delta", ""))
        assert list(deltas) == expected and deltas[0] == 0.0
        for step in expected[1:]:
            assert deltas[step] == pytest.approx(values[step] - values[0], abs=FLOAT32)
    for epoch, step in ((0, 0), (1, 24), (2, 48), (3, 72)):
        document = json.loads((run / "eval" / "benchmark" / f"epoch={epoch}-step={step}.json")
                              .read_text())
        assert sorted(document["config"]["evaluated"]) == sorted(DUE[epoch])
        assert set(document["results"]) == set(DUE[epoch])
        assert document["config"]["every_n_epochs"] == {
            "selftrain_facts": 1, "selftrain_arith": 2, "selftrain_ppl": 1}
    assert callback(built, BenchmarkEval).state_dict()["base"].keys() >= {
        "selftrain_arith/exact_match_strict-match", "selftrain_facts/acc"}


@pytest.mark.slow
def test_a_resumed_run_evaluates_the_same_tasks_at_the_same_epochs(per_task, tmp_path):
    run = tmp_path / "run"
    extra = callback_config(tmp_path / "benchmark.yaml", **CADENCE)
    crashed = benchmark_cli(run, "--config", extra, "--trainer.max_epochs", "3", export=False)
    crashed.trainer.callbacks.append(CrashAt(epoch=1))  # last.ckpt: after epoch 1 (of 3)
    with pytest.raises(RuntimeError, match="killed"):
        crashed.trainer.fit(crashed.model, crashed.datamodule)
    assert tasks_by_epoch(run) == {epoch: sorted(DUE[epoch]) for epoch in (0, 1)}

    resumed = benchmark_cli(run, "--config", extra, "--trainer.max_epochs", "3", export=False)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path="last")
    assert tasks_by_epoch(run) == tasks_by_epoch(per_task[0])
    assert callback(resumed, BenchmarkEval).state_dict()["base"] == \
        callback(per_task[1], BenchmarkEval).state_dict()["base"]


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": {}}, "BenchmarkEval.tasks {}: give a mapping"),
    ({"tasks": {"selftrain_facts": {"every_n_epochs": 0}}},
     "BenchmarkEval.tasks selftrain_facts: every_n_epochs 0: must be an integer >= 1"),
    ({"tasks": {"selftrain_facts": {"num_fewshot": -2}}},
     "BenchmarkEval.tasks selftrain_facts: -2: num_fewshot"),
    ({"tasks": {"selftrain_facts": {"shots": 2}}},
     "BenchmarkEval.tasks selftrain_facts: unknown key 'shots'"),
    ({"tasks": {"selftrain_facts": -1}}, "BenchmarkEval.tasks selftrain_facts: -1: num_fewshot"),
    ({"tasks": {"selftrain_facts": 1}, "limit": 0}, "BenchmarkEval.limit 0: give a number"),
    ({"tasks": {"selftrain_facts": 1}, "limit": 1.5}, "BenchmarkEval.limit 1.5: give a number"),
    ({"tasks": {"selftrain_facts": 1}, "batch_size": 0}, "BenchmarkEval.batch_size 0: must be"),
    ({"tasks": {"selftrain_facts": 1}, "every_n_epochs": 0}, "BenchmarkEval.every_n_epochs 0"),
])
def test_bad_arguments_fail_in_init(kwargs, message):
    with pytest.raises(SelftrainError) as error:
        BenchmarkEval(**kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_checkpoint_from_before_fast_generation_resumes_on_hflms_path_only():
    """Checkpoints without the switch in their settings generated with HFLM's path."""
    old = BenchmarkEval({"selftrain_facts": 1}, fast_generation=False).state_dict()
    old["base"] = {"benchmark/selftrain_facts/acc": 0.5}
    del old["settings"]["fast_generation"]
    BenchmarkEval({"selftrain_facts": 1}, fast_generation=False).load_state_dict(old)
    with pytest.raises(SelftrainError, match=r"^BenchmarkEval.fast_generation: differs from "
                       r"the run's checkpoint \(fast_generation changed\)"):
        BenchmarkEval({"selftrain_facts": 1}).load_state_dict(old)


@pytest.mark.parametrize("limit, kept", [(8, 8), (8.0, 8), (0.5, 0.5), (None, None)])
def test_limit_reads_a_whole_float_as_documents(limit, kept):
    """As lm-eval reads it: 8.0 is 8 documents, a share stays a share (on a Python 3.12 GPU
    machine the debug config's ``limit: 8`` arrived as 8.0 and was refused)."""
    callback = BenchmarkEval({"selftrain_facts": 1}, limit=limit)
    assert callback.limit == kept and type(callback.limit) is type(kept)


@pytest.mark.parametrize("init_args, expected", [
    ({"tasks": {"selftrain_facts": 9}, "include_path": TASKS},
     "selftrain: error: BenchmarkEval.tasks selftrain_facts: 9-shot needs 9 examples but "
     "selftrain_facts has 8 in its 'train' split; lower it to at most 8"),
    ({"tasks": {"selftrain_facts": 1}, "include_path": "/no/such/tasks"},
     "selftrain: error: BenchmarkEval.include_path /no/such/tasks: no such directory; point it "
     "at a folder of lm-eval task YAMLs (e.g. configs/tasks)"),
])
def test_bad_input_fails_before_training_in_one_line(tmp_path, capsys, init_args, expected):
    run = tmp_path / "run"
    extra = callback_config(tmp_path / "benchmark.yaml", **init_args)
    with pytest.raises(SystemExit) as exit_:
        fit(run, "--config", extra, callbacks=False, quiet=False)
    assert exit_.value.code == 2
    assert one_error_line(capsys.readouterr().err) == expected
    assert not run.exists()


ECHO_YAML = """task: echo_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {kwargs}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
"""


@pytest.mark.parametrize("kwargs, expected", [
    ("{until: [], max_gen_toks: 4}", "BenchmarkEval.tasks echo_gen: generation_kwargs.until "
     "[]: give a stop string or a list of non-empty strings, or leave it out to stop at EOS"),
    ("{until: [7], max_gen_toks: 4}", "BenchmarkEval.tasks echo_gen: generation_kwargs.until "
     "[7]: give a stop string or a list of non-empty strings, or leave it out to stop at EOS"),
    ("{until: ['\\n'], max_gen_toks: 0}",
     "BenchmarkEval.tasks echo_gen: generation_kwargs.max_gen_toks 0: give an integer >= 1"),
    ("{until: ['\\n'], max_gen_toks: 4096}", "BenchmarkEval.tasks echo_gen: max_gen_toks "
     "4096 leaves no room for a prompt in a context of 512 tokens; lower its "
     "generation_kwargs.max_gen_toks or raise BenchmarkEval.max_length"),
])
def test_a_generation_task_that_cannot_stop_or_fit_fails_before_training(tmp_path, capsys,
                                                                          kwargs, expected):
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    data = tasks_dir / "echo.jsonl"
    write_jsonl(data, ({"prompt": f"say {i}", "answer": str(i)} for i in range(4)))
    (tasks_dir / "echo_gen.yaml").write_text(ECHO_YAML.format(data=data, kwargs=kwargs))
    run = tmp_path / "run"
    extra = callback_config(tmp_path / "benchmark.yaml", tasks={"echo_gen": 0},
                            include_path=str(tasks_dir), limit=2)
    with pytest.raises(SystemExit) as exit_:
        fit(run, "--config", extra, callbacks=False, quiet=False)
    assert exit_.value.code == 2
    assert one_error_line(capsys.readouterr().err) == f"selftrain: error: {expected}"
    assert not (run / "checkpoints").exists()


def test_unknown_task_from_the_command_line_names_close_matches(tmp_path):
    assert refused_fit(tmp_path / "run", f"--trainer.callbacks+={BENCHMARK}",
                       "--trainer.callbacks.tasks={selftrain_fact: 1, arc_easy: 0}",
                       f"--trainer.callbacks.include_path={TASKS}", callbacks=False) == (
        "selftrain: error: BenchmarkEval.tasks 'selftrain_fact': no such lm-eval task, group or "
        "tag; did you mean selftrain_facts, selftrain_arith, selftrain_local? List names with "
        "`lm-eval ls tasks`, or add the "
        "folder of its YAML to BenchmarkEval.include_path")


@pytest.mark.slow
def test_ddp_splits_tasks_across_two_ranks_and_writes_once(tmp_path, trained):
    run = tmp_path / "ddp"
    extra = callback_config(tmp_path / "benchmark.yaml", **SETTINGS)
    succeeded(run_fit(run, "--config", extra, "--trainer.strategy", "ddp", "--trainer.devices",
                      "2", "--trainer.max_epochs", "2", "--model.export_hf", "never",
                      callbacks=False))
    files = sorted(p.name for p in (run / "eval" / "benchmark").glob("*.json"))
    assert files == ["epoch=0-step=0.json", "epoch=1-step=12.json", "epoch=2-step=24.json"]
    assert len((run / "eval" / "benchmark.jsonl").read_text().splitlines()) == 3
    scalars = read_scalars(run / "tb")
    for metric in METRICS:  # facts, ppl ran on rank 0, arith on rank 1: all reach rank 0
        assert [s for s, _ in scalars[f"benchmark/{metric}"]] == [0, 12, 24]
        assert dict(scalars[f"benchmark_delta/{metric}"])[0] == 0.0
    ddp_base = json.loads((run / "eval" / "benchmark" / files[0]).read_text())
    one_base = json.loads((trained[0] / "eval" / "benchmark" / files[0]).read_text())
    assert ddp_base["results"] == one_base["results"]  # same base model, same numbers
    ddp_items, one_items = (pd.read_parquet(root / "eval" / "benchmark" / document["items"])
                            .sort_values(["task", "doc_id", "metric"], ignore_index=True)
                            for root, document in ((run, ddp_base), (trained[0], one_base)))
    pd.testing.assert_frame_equal(ddp_items, one_items)  # every rank's items reach the file
    assert ddp_base["n-shot"] == SHOTS
