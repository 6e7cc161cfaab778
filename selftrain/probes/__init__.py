"""Probes: what the evaluation callbacks measure, outside of Lightning.

Probe sets on disk and their prefix/suffix windows with the scoring maths (``windows``), the
row gather over ranks (``metrics``), building a probe set a model extracts (``probeset``) and
planting canaries into a base model for the demo (``plant``), and lm-eval's HF model with
greedy generation on the prompted slot decoder (``fast_generation``).
May import: the core, ``decoding``, ``sampling``, ``curation`` and ``training``.
"""
