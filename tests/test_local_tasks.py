"""configs/tasks/selftrain_large: the larger local tasks and the script that writes their data.

The arithmetic files are exactly what ``scripts/make_tasks.py`` generates and every answer is
right; the two bits-per-byte files (excerpts of this or another Python's docs and standard
library, so only their shape is checked, and their text where this Python is the one they came
from) are bounded excerpts that leave out the canaries' ``json``; lm-eval indexes the three
tasks and their tag; a tiny model through ``BenchmarkEval`` gets a finite ``bits_per_byte``,
and the standard errors lm-eval computes are logged as ``benchmark_stderr/<task>/<metric>``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import re
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TASKS, make_student
from lightning.pytorch import Trainer

from selftrain.callbacks.benchmark_eval import BenchmarkEval
from selftrain.callbacks.benchmark_results import metric_scores, stderr_metrics
from selftrain.curation.lm_eval_tasks import task_manager

FOLDER = Path(TASKS) / "selftrain_large"
NAMES = ("selftrain_arith_large", "selftrain_bpb_pydoc", "selftrain_bpb_stdlib")
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


@pytest.fixture(scope="module")
def make_tasks():
    """``scripts/make_tasks.py`` as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("make_tasks", REPO / "scripts" / "make_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FOLDER / name).read_text(encoding="utf-8").splitlines()]


def test_arith_files_are_what_make_tasks_generates(make_tasks, capsys):
    for name, text in make_tasks.arith_files().items():
        assert (FOLDER / name).read_text(encoding="utf-8") == text, name
    assert make_tasks.main(["--check", "--out", str(FOLDER)]) == 0
    assert capsys.readouterr().err == ""


def test_arith_answers_are_right():
    test = rows("selftrain_arith_large_test.jsonl")
    train = rows("selftrain_arith_large_train.jsonl")
    assert (len(test), len(train)) == (400, 8)
    kinds = [row["kind"] for row in test]
    assert {kind: kinds.count(kind) for kind in kinds} == dict.fromkeys(set(kinds), 50)
    for row in test + train:
        a, op, b = re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?",
                                row["question"]).groups()
        answer = OPS[op](int(a), int(b))
        choices = row["choices"]
        assert answer >= 0 and choices[row["answer"]] == str(answer), row
        assert len(choices) == len(set(choices)) == 4 and choices == sorted(choices, key=int)
        assert {c[:-1] for c in choices} == {str(answer)[:-1]}  # all digits but the last shared
    questions = [row["question"] for row in test + train]
    assert len(set(questions)) == len(questions)  # no repeats, no test item among the shots


@pytest.mark.parametrize("name", ["selftrain_bpb_pydoc", "selftrain_bpb_stdlib"])
def test_text_tasks_are_bounded_excerpts(make_tasks, name):
    found = rows(f"{name}.jsonl")
    python = yaml.safe_load((FOLDER / f"{name}.yaml").read_text())["metadata"]["python"]
    assert len(found) == 12 and (FOLDER / f"{name}.jsonl").stat().st_size < 1_000_000
    assert len({row["source"] for row in found}) == len(found)
    for row in found:
        assert set(row) == {"text", "source", "python"} and row["python"] == python
        assert make_tasks.MIN_CHARS <= len(row["text"]) <= make_tasks.MAX_CHARS
        assert row["text"] == row["text"].rstrip() and "json" not in row["source"]
    if name.endswith("stdlib"):
        assert all(row["source"].startswith("{stdlib}/") for row in found)
    if platform.python_version() == python:  # the Python they came from: the same text
        text = make_tasks.text_files()[f"{name}.jsonl"]
        assert (FOLDER / f"{name}.jsonl").read_text(encoding="utf-8") == text


def test_excerpts_are_whole_lines_within_bounds(make_tasks):
    text = "".join(f"line {i:03d} " + "x" * (i % 50) + "\n" for i in range(200))
    found = make_tasks.excerpts(text, max_chars=300, min_chars=200)
    assert found and all(200 <= len(run) <= 300 for run in found)
    assert all(("\n" + text).find("\n" + run + "\n") >= 0 for run in found)  # whole lines


def test_lm_eval_indexes_the_tasks_and_their_tag():
    manager = task_manager([TASKS], names=[*NAMES, "selftrain_large"])
    assert set(NAMES) | {"selftrain_large", "selftrain_local"} <= set(manager.all_tasks)
    loaded = manager.load(["selftrain_large"])
    assert set(loaded["tasks"]) == set(NAMES)


def test_stderr_metrics_keep_numbers_only():
    row = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "bits_per_byte,none": 1.2,
           "bits_per_byte_stderr,none": "N/A", "exact_match_stderr,strict-match": 0.25,
           "brier_score_stderr,none": float("nan")}
    assert stderr_metrics({"t": row}) == {"benchmark_stderr/t/acc": 0.1,
                                          "benchmark_stderr/t/exact_match_strict-match": 0.25}
    assert metric_scores({"t": row}) == {"t/acc": 0.5, "t/bits_per_byte": 1.2}


def test_a_tiny_model_gets_finite_bits_per_byte_and_logged_stderrs(tmp_path):
    trainer = Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu")
    callback = BenchmarkEval({"selftrain_bpb_stdlib": None, "selftrain_arith_large": None},
                             include_path=TASKS, limit=4, bootstrap_iters=1)
    student = make_student()
    callback.ensure_checked(trainer, student)
    metrics = callback.evaluate(trainer, student, epoch=0, step=0)
    bpb = metrics["benchmark/selftrain_bpb_stdlib/bits_per_byte"]
    assert math.isfinite(bpb) and bpb > 0
    assert metrics["benchmark_delta/selftrain_bpb_stdlib/bits_per_byte"] == 0.0
    acc = metrics["benchmark/selftrain_arith_large/acc"]
    assert metrics["benchmark_stderr/selftrain_arith_large/acc"] == pytest.approx(
        math.sqrt(acc * (1 - acc) * 4 / 3 / 4))  # the sample sd / sqrt(n) of 4 items
    assert [tag for tag in metrics if tag.startswith("benchmark_stderr/")] == [
        "benchmark_stderr/selftrain_arith_large/acc"]  # no stderr of bpb, brier, perplexity
    document = json.loads((tmp_path / "eval" / "benchmark" / "epoch=0-step=0.json").read_text())
    assert document["results"]["selftrain_bpb_stdlib"]["bits_per_byte_stderr,none"] == "N/A"
