"""selftrain.callbacks.benchmark_results: lm-eval results as BenchmarkEval logs them."""

from selftrain.callbacks.benchmark_results import metric_scores


def test_metric_names_drop_stderr_alias_and_name_filters():
    row = {"alias": "t", "sample_len": 8, "acc,none": 0.5, "acc_stderr,none": "N/A",
           "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1}
    assert metric_scores({"t": row}) == {"t/acc": 0.5, "t/exact_match_strict-match": 0.25}
