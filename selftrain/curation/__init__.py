"""Curation: corpora made fit to train on and to compare with.

Benchmark items from local files or lm-eval tasks (``benchmarks``), n-gram decontamination
against them (``decontaminate``) and the token-matched real-text baseline (``replay``).
May import: the core and ``sampling``.
"""
