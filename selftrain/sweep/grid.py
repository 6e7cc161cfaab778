"""The grid file of ``selftrain sweep``: what an experiment grid names, and its checks.

A grid is sources x temperatures (plus an optional replay control, proximity split and SBP
conditions) x K disjoint subsets x generations, trained into one student with one fit config. These
dataclasses are the parts of the grid that have parts of their own; jsonargparse builds them
from the grid YAML (and flags), so a misspelt key is refused by the parser. :func:`check_grid`
refuses what the types cannot (a temperature <= 0, an unknown model spec, a fit config that
does not parse is checked in :mod:`selftrain.sweep.plan`) before anything runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftrain.errors import SelftrainError

MODES = ("replace", "accumulate")
"""How generation g+1 trains: on the newest corpus only, or on every corpus of its chain."""


@dataclass
class Source:
    """A source model sampled from its BOS token.

    Args:
        model: model spec (hub id, local dir, ``embedded:<name>``, ``tiny:<family>``).
        temperatures: sampling temperatures (> 0); one condition each, all sampled in one
            ``selftrain generate`` call.
        generate: extra ``selftrain generate`` flags for this source only (over the grid's
            ``generate``), e.g. ``{dtype: bfloat16, batch_size: 32}``.
    """

    model: str
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    generate: dict[str, Any] = field(default_factory=dict)


@dataclass
class Replay:
    """The real-text control: a token-matched replay of real documents.

    Args:
        sources: real text for ``selftrain replay --sources`` (local .txt / .jsonl / .parquet
            files or dirs, or a ``datasets`` name streamed from the hub).
        match: the conditions (``<source>_t<T>``) to match, one replay condition each
            (``replay_<condition>``); None matches the first condition of the grid.
        flags: extra ``selftrain replay`` flags, e.g. ``{text_field: text, seed: 0}``.
    """

    sources: list[str]
    match: list[str] | None = None
    flags: dict[str, Any] = field(default_factory=dict)


@dataclass
class Decontamination:
    """Drop samples that share an n-gram with a benchmark, before anything trains on them.

    Args:
        benchmarks: benchmark specs as ``selftrain decontaminate --benchmarks`` takes them.
        flags: extra ``selftrain decontaminate`` flags, e.g. ``{ngram: 8, include_path: ...}``.
    """

    benchmarks: list[str]
    flags: dict[str, Any] = field(default_factory=dict)


@dataclass
class Proxies:
    """Intrinsic proxies (benchmark proximity, student NLL) of every first-generation corpus.

    Args:
        benchmarks: benchmark specs for the proximity, as ``selftrain proxies`` takes them.
        split: also train on each synthetic corpus's proximity split (conditions
            ``<condition>_below`` and ``<condition>_above``).
        cells: train each synthetic condition on its four proxy cells (median student NLL x
            median similarity within the corpus, ``selftrain proxies --cells_out``) as its
            subsets 0..3 instead of random subsets, so the proxies differ within a source;
            needs ``num_subsets: 4``. A replay then matches the cells, subset by subset.
        flags: extra ``selftrain proxies`` flags, e.g. ``{threshold: 0.35, limit: 500}``.
    """

    benchmarks: list[str]
    split: bool = False
    cells: bool = False
    flags: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sbp:
    """Synthetic Bootstrapped Pretraining on a real corpus, trained beside the BOS conditions.

    Expands, for each subset k of the real corpus, into ``selftrain pairs`` on subset k, a
    synthesizer ``selftrain fit`` on those pairs, ``selftrain synthesize`` seeded from subset
    k, and students on the mixture of subset k and its synthetic text (condition ``sbp``; with
    ``unseeded`` also ``sbp_unseeded``, the synthesizer's text from an empty d1), on
    subset k alone repeated to the same token budget (``sbp_repeat``, with ``repetition``) and
    on more unique real text at that budget (``sbp_oracle``, with an ``oracle`` corpus).

    Args:
        corpus: the real corpus (a corpus dir, or a .jsonl / .parquet / .txt file): pairs
            come from it, seeds are drawn from it, and it is each mixture's real share.
        weights: [real, synthetic] token shares of the ``sbp`` mixture.
        tokens: every SBP student's tokens per epoch (``--data.mixture_tokens``); needed by
            the repetition baseline, which must match the mixture's budget.
        repetition: also train the repetition baseline ``sbp_repeat``.
        oracle: a larger real corpus (more unique documents), trained alone at the same
            token budget as condition ``sbp_oracle``; None: no oracle.
        synthesizer: the model the synthesizer starts from; None: the student.
        synthesizer_config: the synthesizer's ``selftrain fit`` config; None: the grid's
            ``fit_config``.
        pairs: extra ``selftrain pairs`` flags, e.g. ``{threshold: 0.6, top_k: 2}``.
        synthesizer_fit: extra ``selftrain fit`` flags of the synthesizer.
        synthesize: extra ``selftrain synthesize`` flags, e.g. ``{num_samples: 2000}``.
        unseeded: also synthesize from an empty d1 (``synthesize --unseeded true``, the same
            synthesizer and flags) and train ``sbp_unseeded`` on the mixture with that text,
            at the same weights and budget: what the seed adds over the synthesizer alone.
        ended_only: the SBP students keep only the synthetic documents that ended on EOS
            (``--data.ended_only``); at a token budget the mixture repeats them to fill its
            share (watch its passes: few that end means many repeats).
    """

    corpus: str
    weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    tokens: int | None = None
    repetition: bool = True
    oracle: str | None = None
    synthesizer: str | None = None
    synthesizer_config: str | None = None
    pairs: dict[str, Any] = field(default_factory=dict)
    synthesizer_fit: dict[str, Any] = field(default_factory=dict)
    synthesize: dict[str, Any] = field(default_factory=dict)
    unseeded: bool = False
    ended_only: bool = False


@dataclass
class Grid:
    """A whole grid, as :func:`selftrain.sweep.sweep` received it (see its ``Args``)."""

    out: str
    student: str
    fit_config: str
    sources: dict[str, Source]
    num_subsets: int = 1
    generate: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    replay: Replay | None = None
    decontaminate: Decontamination | None = None
    decontaminate_probes: bool = True
    proxies: Proxies | None = None
    sbp: Sbp | None = None
    generations: int = 1
    mode: str = "replace"
    note: str | None = None
    evaluate_base: bool = False

    def conditions(self) -> dict[str, tuple[str, float]]:
        """Synthetic condition name -> (source name, temperature), in grid order."""
        return {condition_name(name, t): (name, t) for name, source in self.sources.items()
                for t in source.temperatures}


def condition_name(source: str, temperature: float) -> str:
    """``self`` at 1.0 -> ``self_t1.0``: the name of a run dir and of a report condition."""
    return f"{source}_t{float(temperature)}"


RESERVED_FLAGS = {
    "generate": ("model", "out", "temperature", "num_subsets", "overwrite"),
    "replay": ("match", "out", "sources", "student", "num_subsets", "overwrite"),
    "decontaminate": ("corpus", "out", "benchmarks", "probe_sets", "overwrite"),
    "proxies": ("corpus", "out", "benchmarks", "student", "split_out", "cells_out",
                "overwrite"),
    "fit": ("config", "model.model", "data.corpus", "data.subset", "data.num_subsets",
            "trainer.default_root_dir", "overwrite", "ckpt_path", "base_evaluations"),
    "pairs": ("corpus", "out", "subset", "num_subsets", "overwrite"),
    "synthesize": ("synthesizer", "seeds", "out", "seeds_subset", "seeds_num_subsets",
                   "unseeded", "overwrite"),
}
"""Flags the sweep sets itself in each kind of step; a grid may not set them in ``flags``."""


def check_grid(grid: Grid) -> None:
    """Refuse a grid that cannot expand into a sweep, in one line naming the key and the fix.

    Args:
        grid: the parsed grid.
    """
    if not grid.sources and grid.sbp is None:
        raise SelftrainError("--sources: the grid names no source; give at least one, e.g. "
                             "sources: {self: {model: <the student's spec>}}, or an sbp block")
    if grid.replay is not None and not grid.sources:
        raise SelftrainError("--replay: the replay control matches a BOS-sampled condition and "
                             "the grid has none; add a source or remove replay")
    if grid.num_subsets < 1:
        raise SelftrainError(f"--num_subsets {grid.num_subsets}: must be >= 1 (K disjoint "
                             "subsets, one student each)")
    if grid.generations < 1:
        raise SelftrainError(f"--generations {grid.generations}: must be >= 1")
    if grid.mode not in MODES:
        raise SelftrainError(f"--mode {grid.mode!r}: use one of {', '.join(MODES)}")
    _check_model(grid.student, "--student")
    for name, source in grid.sources.items():
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise SelftrainError(f"--sources.{name}: a source name is part of run dir names; use "
                                 "letters, digits, '-', '_' and '.'")
        _check_model(source.model, f"--sources.{name}.model")
        if not source.temperatures:
            raise SelftrainError(f"--sources.{name}.temperatures: empty; give at least one")
        for t in source.temperatures:
            if not (math.isfinite(t) and t > 0):
                raise SelftrainError(f"--sources.{name}.temperatures: {t} is not > 0; sampling "
                                     "temperatures are positive (1.0 samples the model as is)")
        _check_flags(source.generate, "generate", f"--sources.{name}.generate")
    _check_flags(grid.generate, "generate", "--generate")
    _check_flags(grid.fit, "fit", "--fit")
    _check_unique(grid)
    conditions = grid.conditions()
    if grid.replay is not None:
        for match in grid.replay.match or []:
            if match not in conditions:
                raise SelftrainError(f"--replay.match: {match!r} is no condition of the grid; use "
                                     f"one of {', '.join(conditions)}")
        _check_flags(grid.replay.flags, "replay", "--replay.flags")
    if grid.decontaminate is not None:
        _check_flags(grid.decontaminate.flags, "decontaminate", "--decontaminate.flags")
    if grid.proxies is not None:
        _check_flags(grid.proxies.flags, "proxies", "--proxies.flags")
        if grid.proxies.cells and grid.num_subsets != 4:
            raise SelftrainError(f"--proxies.cells: the proxy cells are 4 subsets (median NLL x "
                                 f"median similarity) and the grid has num_subsets "
                                 f"{grid.num_subsets}; set num_subsets: 4 or drop cells")
    if grid.sbp is not None:
        _check_sbp(grid.sbp)
    if not Path(grid.fit_config).is_file():
        raise SelftrainError(f"--fit_config {grid.fit_config}: no such file; give the "
                             "`selftrain fit` config every student trains with")


def _check_sbp(sbp: Sbp) -> None:
    """Refuse an SBP block that cannot expand (see :class:`Sbp`)."""
    if not Path(sbp.corpus).exists():
        raise SelftrainError(f"--sbp.corpus {sbp.corpus}: no such file or directory; give the "
                             "real corpus (a corpus dir or a .jsonl / .parquet / .txt file)")
    if len(sbp.weights) != 2 or not all(math.isfinite(w) and w >= 0 for w in sbp.weights) or (
            not sum(sbp.weights) > 0):
        raise SelftrainError(f"--sbp.weights {sbp.weights}: give [real, synthetic], two numbers "
                             ">= 0 with a positive sum")
    if sbp.tokens is not None and sbp.tokens < 1:
        raise SelftrainError(f"--sbp.tokens {sbp.tokens}: must be >= 1")
    if (sbp.repetition or sbp.oracle) and sbp.tokens is None:
        raise SelftrainError("--sbp.tokens: the repetition and oracle baselines spend the "
                             "mixture's token budget, so give it (tokens per student per "
                             "epoch), or set repetition: false and no oracle")
    if sbp.oracle is not None and not Path(sbp.oracle).exists():
        raise SelftrainError(f"--sbp.oracle {sbp.oracle}: no such file or directory")
    if sbp.synthesizer is not None:
        _check_model(sbp.synthesizer, "--sbp.synthesizer")
    if sbp.synthesizer_config is not None and not Path(sbp.synthesizer_config).is_file():
        raise SelftrainError(f"--sbp.synthesizer_config {sbp.synthesizer_config}: no such file")
    _check_flags(sbp.pairs, "pairs", "--sbp.pairs")
    _check_flags(sbp.synthesizer_fit, "fit", "--sbp.synthesizer_fit")
    _check_flags(sbp.synthesize, "synthesize", "--sbp.synthesize")
    for flag in ("data.mixture_weights", "data.mixture_tokens"):
        if flag in sbp.synthesizer_fit:
            raise SelftrainError(f"--sbp.synthesizer_fit.{flag}: the synthesizer trains on the "
                                 "pairs alone; remove it")


def grid_inputs(grid: Grid) -> list[tuple[str, str | None]]:
    """What a sweep reads and never writes, with its key: no ``--out`` may hold or be one.

    Model specs and benchmark names that are not paths are listed too; only existing paths are
    compared with ``--out``.

    Args:
        grid: the parsed grid.
    """
    found: list[tuple[str, str | None]] = [("--student", grid.student),
                                           ("--fit_config", grid.fit_config)]
    found += [(f"--sources.{name}.model", source.model) for name, source in grid.sources.items()]
    if grid.replay is not None:
        found += [("--replay.sources", source) for source in grid.replay.sources]
    for key, block in (("--decontaminate", grid.decontaminate), ("--proxies", grid.proxies)):
        if block is not None:
            found += [(f"{key}.benchmarks", name) for name in block.benchmarks]
    if grid.sbp is not None:
        found += [("--sbp.corpus", grid.sbp.corpus), ("--sbp.oracle", grid.sbp.oracle),
                  ("--sbp.synthesizer", grid.sbp.synthesizer),
                  ("--sbp.synthesizer_config", grid.sbp.synthesizer_config)]
    return found


def _check_model(spec: str, flag: str) -> None:
    """Refuse a model spec no command could load (:func:`selftrain.models.parse_model_spec`).

    Imported here, not at the top: models pulls in torch and transformers, which expanding a
    grid into commands never needs (``import selftrain.sweep.plan`` stays light).

    Args:
        spec: the model spec.
        flag: the grid key it came from.
    """
    from selftrain.models import parse_model_spec

    parse_model_spec(spec, flag)


def _check_flags(flags: dict[str, Any], kind: str, key: str) -> None:
    """Refuse extra flags that the sweep sets itself (they would fight the grid)."""
    for name in flags:
        if name.lstrip("-") in RESERVED_FLAGS[kind]:
            raise SelftrainError(f"{key}.{name}: the sweep sets --{name.lstrip('-')} of every "
                                 f"`selftrain {kind}` itself; remove it from the grid")


def _check_unique(grid: Grid) -> None:
    """Refuse two conditions that would write the same run dir (``self`` at 1 and 1.0)."""
    seen: dict[str, str] = {}
    for name, source in grid.sources.items():
        for t in source.temperatures:
            condition = condition_name(name, t)
            where = f"--sources.{name}.temperatures {t}"
            if condition in seen:
                raise SelftrainError(f"{where}: writes the same run dir as {seen[condition]} "
                                     f"({condition}); list each temperature once")
            seen[condition] = where
