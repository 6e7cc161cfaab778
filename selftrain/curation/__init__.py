"""Curation: corpora made fit to train on and to compare with.

Benchmark items from local files or lm-eval tasks (``benchmarks``; lm-eval's task index over
local task folders in ``lm_eval_tasks``, which the benchmark callback uses too), n-gram
decontamination against them (``decontaminate``) and the token-matched real-text baseline
(``replay``, reading real documents through ``documents``).
May import: the core and ``sampling``.
"""
