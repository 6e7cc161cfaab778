"""A grid expanded into the ordinary ``selftrain`` commands that carry it out, in order.

Every step is one command a user could paste (``selftrain generate ...``, ``selftrain fit
...``), the steps it needs, and the path it writes. Generation 1 samples every source at all
its temperatures in one ``generate`` call; optional decontamination cleans each corpus; the
replay control is matched to its (clean) synthetic corpus; proxies measure every
first-generation training corpus (and optionally split it by proximity into two more
conditions); one fit per condition x subset. Generation g+1 samples, for each condition and
subset, from the final export of generation g's student, and trains a fresh student on it
(``mode: replace``) or on the whole chain so far (``accumulate``). With an ``sbp`` block, for
each subset k of the real corpus, generation 0 finds pairs in subset k and trains a
synthesizer on them, and generation 1 synthesizes from subset k's seeds and trains the ``sbp``
(real subset k + its synthetic text), ``sbp_unseeded`` (the same with the synthesizer's
unconditional text, when asked), ``sbp_repeat`` (real subset k alone) and ``sbp_oracle``
conditions at one token budget: no student sees, even through its synthesizer, real text its
baselines do not. The report reads every run.

Layout under ``out``: ``pairs/s<k>``, ``corpora/g<g>/...``, ``proxies/g1/<condition>``,
``runs/g0/synthesizer/s<k>``, ``runs/g<g>/<condition>/s<k>``, ``report/``, and ``.sweep/``
(what has finished).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selftrain.errors import SelftrainError
from selftrain.sampling.settings import NUM_SAMPLES
from selftrain.sweep.grid import Grid, condition_name

BASE_STEP = "evaluate/base"
"""The one evaluation of the student before any fit (grid ``evaluate_base``)."""


@dataclass
class Step:
    """One command of a sweep.

    Args:
        id: unique name, e.g. ``fit/g1/self_t1.0/s0``; also its record's name.
        kind: the subcommand (``generate``, ``fit``, ...).
        argv: the command, starting with ``selftrain``.
        needs: ids of the steps whose outputs it reads.
        output: the dir it writes.
    """

    id: str
    kind: str
    argv: list[str]
    needs: list[str] = field(default_factory=list)
    output: str = ""

    def line(self) -> str:
        """The command as a shell line."""
        return shlex.join(self.argv)


def flag_value(value: Any) -> str:
    """A flag value as jsonargparse reads it: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def as_flags(flags: dict[str, Any]) -> list[str]:
    """``{a: 1, b.c: [x]}`` -> ``--a 1 --b.c '["x"]'`` as argv; None values are left out."""
    argv: list[str] = []
    for name, value in flags.items():
        if value is not None:
            argv += [f"--{name.lstrip('-')}", flag_value(value)]
    return argv


def final_epoch(config: str, flags: dict[str, Any], key: str = "--fit_config") -> int:
    """The epoch of a fit's last export: ``trainer.max_epochs`` of its flags, else its config.

    Args:
        config: the fit config's path.
        flags: the grid's extra flags for that fit.
        key: the grid key naming the config, for the error.
    """
    epochs = flags.get("trainer.max_epochs")
    if epochs is None:
        epochs = (_fit_config(config, key).get("trainer") or {}).get("max_epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise SelftrainError(f"{key} {config}: the next step samples from this fit's last "
                             "export, so it needs trainer.max_epochs >= 1 (in the config or "
                             "the grid's flags: {trainer.max_epochs: N})")
    return epochs


def _fit_config(path: str, key: str = "--fit_config") -> dict[str, Any]:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SelftrainError(f"{key} {path}: not readable YAML "
                             f"({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise SelftrainError(f"{key} {path}: not a `selftrain fit` config (a YAML mapping)")
    return config


def expand(grid: Grid) -> list[Step]:
    """The steps of a grid, each after the steps it needs.

    Args:
        grid: a checked grid (:func:`selftrain.sweep.grid.check_grid`).
    """
    out = Path(grid.out)
    steps: list[Step] = []
    conditions = grid.conditions()
    # corpus each (condition, subset) trains on in generation 1: (path, producing step, subset)
    training: dict[str, tuple[str, str]] = {}
    for name, source in grid.sources.items():
        parent = out / "corpora" / "g1" / name
        flags = {**grid.generate, **source.generate, "num_subsets": grid.num_subsets}
        steps.append(Step(f"generate/g1/{name}", "generate",
                          ["selftrain", "generate", "--model", source.model,
                           "--out", str(parent), "--temperature",
                           json.dumps([float(t) for t in source.temperatures]),
                           *as_flags(flags)], output=str(parent)))
        for t in source.temperatures:
            corpus = parent / f"t{float(t)}"
            training[condition_name(name, t)] = _clean(grid, steps, str(corpus),
                                                       f"generate/g1/{name}",
                                                       f"g1/{condition_name(name, t)}")
    split: dict[str, tuple[str, str]] = {}
    proxy_dirs: list[tuple[str, str]] = []
    if grid.proxies is not None:  # the synthetic corpora first: with cells, replay matches them
        for condition in list(training):
            training[condition] = _proxies(grid, steps, condition, training[condition], True,
                                           split, proxy_dirs)
    if grid.evaluate_base:
        # the base, evaluated once; every fit takes its epoch 0 from it. After the sampling:
        # the fit config's own corpus may be one the sweep samples (its likelihood tracker
        # reads it)
        steps.append(Step(BASE_STEP, "evaluate",
                          ["selftrain", "evaluate", "--model", grid.student, "--fit_config",
                           grid.fit_config, "--out", str(out / "base"), "--overwrite", "true"],
                          [step.id for step in steps if step.kind == "generate"],
                          str(out / "base")))
    replayed: dict[str, tuple[str, str]] = {}
    if grid.replay is not None:
        for match in grid.replay.match or [next(iter(conditions))]:
            corpus, producer = training[match]
            target = out / "corpora" / "g1" / f"replay_{match}"
            steps.append(Step(f"replay/g1/{match}", "replay",
                              ["selftrain", "replay", "--match", corpus, "--out", str(target),
                               "--sources", json.dumps(grid.replay.sources),
                               "--student", grid.student, *as_flags(grid.replay.flags),
                               "--overwrite", "true"], [producer], str(target)))
            # cleaned like the sampled corpora (a drop shortens the match; the manifest says so)
            replayed[f"replay_{match}"] = _clean(grid, steps, str(target), f"replay/g1/{match}",
                                                 f"g1/replay_{match}")
            if grid.proxies is not None:
                _proxies(grid, steps, f"replay_{match}", replayed[f"replay_{match}"], False,
                         split, proxy_dirs)
    runs: list[tuple[str, str, str]] = []  # (run dir, fit step, report condition)
    previous: dict[tuple[str, int], Step] = {}  # (condition, subset) -> last generation's fit
    chains: dict[tuple[str, int], list[tuple[str, str]]] = {}  # (corpus, producer) so far
    extra = _fit_flags(grid)
    for condition, (corpus, producer) in {**training, **replayed, **split}.items():
        for k in range(grid.num_subsets):
            run = out / "runs" / "g1" / condition / f"s{k}"
            step = _fit(grid, extra, f"fit/g1/{condition}/s{k}", corpus, _subset_flags(grid, k),
                        run, [producer])
            steps.append(step)
            runs.append((str(run), step.id, condition))
            if condition in training:
                previous[condition, k] = step
                chains[condition, k] = [(corpus, producer)]
    if grid.sbp is not None:
        for k in range(grid.num_subsets):
            for condition, (corpora, needs, flags) in _sbp_conditions(grid, steps, k).items():
                run = out / "runs" / "g1" / condition / f"s{k}"
                step = _fit(grid, {**extra, **flags}, f"fit/g1/{condition}/s{k}", corpora,
                            _subset_flags(grid, k), run, needs)
                steps.append(step)
                runs.append((str(run), step.id, condition))
    if grid.generations > 1:
        epoch = final_epoch(grid.fit_config, grid.fit)
        per_student = _per_subset(grid)
    for g in range(2, grid.generations + 1):
        for (condition, k), fit in list(previous.items()):
            source, t = conditions[condition]
            student = Path(fit.output) / "hf" / f"epoch={epoch}"
            parent = out / "corpora" / f"g{g}" / condition / f"s{k}"
            flags = {**grid.generate, **grid.sources[source].generate,
                     "num_samples": per_student, "num_subsets": 1}
            flags["seed"] = int(flags.get("seed", 0)) + 1000 * (g - 1) + k
            gen_id = f"generate/g{g}/{condition}/s{k}"
            steps.append(Step(gen_id, "generate",
                              ["selftrain", "generate", "--model", str(student), "--out",
                               str(parent), "--temperature", json.dumps([float(t)]),
                               *as_flags(flags)], [fit.id], str(parent)))
            newest = _clean(grid, steps, str(parent / f"t{float(t)}"), gen_id,
                            f"g{g}/{condition}/s{k}")
            chains[condition, k] = [*chains[condition, k], newest]
            data = chains[condition, k] if grid.mode == "accumulate" else [newest]
            subset = _subset_flags(grid, k) if grid.mode == "accumulate" else []
            run = out / "runs" / f"g{g}" / condition / f"s{k}"
            corpora = [corpus for corpus, _ in data]
            step = _fit(grid, extra, f"fit/g{g}/{condition}/s{k}",
                        corpora[0] if len(corpora) == 1 else corpora, subset, run,
                        list(dict.fromkeys([newest[1], *(producer for _, producer in data)])))
            steps.append(step)
            runs.append((str(run), step.id, f"{condition}@g{g}"))
            previous[condition, k] = step
    steps.append(_report(grid, runs, proxy_dirs))
    _check_unique_outputs(steps)
    return steps


def _proxies(grid: Grid, steps: list[Step], condition: str, trained: tuple[str, str],
             synthetic: bool, split: dict[str, tuple[str, str]],
             proxy_dirs: list[tuple[str, str]]) -> tuple[str, str]:
    """Add the proxies of one training corpus; the corpus its fits train on, and its step.

    A synthetic corpus is also split by proximity (``split``: two more conditions) or re-cut
    into its proxy cells (``cells``: its fits train on cell k as subset k) when the grid asks.

    Args:
        grid: the grid.
        steps: the steps so far (appended to).
        condition: the condition the corpus belongs to.
        trained: (corpus, the step that wrote it).
        synthetic: a BOS-sampled corpus (split and cells apply), not a replay.
        split: proximity-split conditions, added to.
        proxy_dirs: (proxies dir, step) of every corpus, added to.
    """
    corpus, producer = trained
    out = Path(grid.out)
    target = out / "proxies" / "g1" / condition
    argv = ["selftrain", "proxies", "--corpus", corpus, "--out", str(target),
            "--benchmarks", json.dumps(grid.proxies.benchmarks),
            "--student", grid.student, *as_flags(grid.proxies.flags)]
    step_id = f"proxies/g1/{condition}"
    if synthetic and grid.proxies.split:
        halves = out / "corpora" / "g1" / f"{condition}-split"
        argv += ["--split_out", str(halves)]
        for side in ("below", "above"):
            split[f"{condition}_{side}"] = (str(halves / side), step_id)
    if synthetic and grid.proxies.cells:
        cells = out / "corpora" / "g1" / f"{condition}-cells"
        argv += ["--cells_out", str(cells)]
        trained = (str(cells), step_id)
    steps.append(Step(step_id, "proxies", [*argv, "--overwrite", "true"], [producer],
                      str(target)))
    proxy_dirs.append((str(target), step_id))
    return trained


def _subset_flags(grid: Grid, k: int) -> list[str]:
    """``--data.subset k --data.num_subsets K`` when the corpora come in K > 1 subsets."""
    if grid.num_subsets == 1:
        return []
    return ["--data.subset", str(k), "--data.num_subsets", str(grid.num_subsets)]


def _per_subset(grid: Grid) -> int:
    """Samples per student in generations >= 2: generation 1's subset size."""
    total = grid.generate.get("num_samples", NUM_SAMPLES)
    for source in grid.sources.values():
        total = min(total, source.generate.get("num_samples", total))
    return max(1, total // grid.num_subsets)


def _sbp_corpus(grid: Grid, steps: list[Step], k: int) -> dict[str, tuple[str, str]]:
    """Add subset k's pairs, synthesizer fit and synthesis (and the unseeded control's).

    Returns:
        condition (``sbp``, ``sbp_unseeded``) -> (its synthetic corpus, the step writing it).
    """
    sbp, out = grid.sbp, Path(grid.out)
    assert sbp is not None
    many = grid.num_subsets > 1
    subset = ["--subset", str(k), "--num_subsets", str(grid.num_subsets)] if many else []
    seeds = ["--seeds_subset", str(k), "--seeds_num_subsets", str(grid.num_subsets)] if (
        many) else []
    pairs = out / "pairs" / f"s{k}"
    steps.append(Step(f"pairs/g0/sbp/s{k}", "pairs",
                      ["selftrain", "pairs", "--corpus", sbp.corpus, "--out", str(pairs),
                       *subset, *as_flags(sbp.pairs), "--overwrite", "true"], output=str(pairs)))
    config = sbp.synthesizer_config or grid.fit_config
    key = "--sbp.synthesizer_config" if sbp.synthesizer_config else "--fit_config"
    run = out / "runs" / "g0" / "synthesizer" / f"s{k}"
    flags = dict(sbp.synthesizer_fit)
    if (_fit_config(config, key).get("model") or {}).get("export_hf") == "never":
        flags.setdefault("model.export_hf", "last")
    steps.append(Step(f"fit/g0/synthesizer/s{k}", "fit",
                      ["selftrain", "fit", "--config", config, "--model.model",
                       sbp.synthesizer or grid.student, "--data.corpus", str(pairs),
                       "--trainer.default_root_dir", str(run), *as_flags(flags)],
                      [f"pairs/g0/sbp/s{k}"], str(run)))
    export = run / "hf" / f"epoch={final_epoch(config, sbp.synthesizer_fit, key)}"
    corpus = out / "corpora" / "g1" / "sbp" / f"s{k}"
    steps.append(Step(f"synthesize/g1/sbp/s{k}", "synthesize",
                      ["selftrain", "synthesize", "--synthesizer", str(export), "--seeds",
                       sbp.corpus, "--out", str(corpus), *seeds, *as_flags(sbp.synthesize)],
                      [f"fit/g0/synthesizer/s{k}"], str(corpus)))
    found = {"sbp": _clean(grid, steps, str(corpus), f"synthesize/g1/sbp/s{k}", f"g1/sbp/s{k}")}
    if sbp.unseeded:  # the control: the same synthesizer and settings, an empty d1
        corpus = out / "corpora" / "g1" / "sbp_unseeded" / f"s{k}"
        steps.append(Step(f"synthesize/g1/sbp_unseeded/s{k}", "synthesize",
                          ["selftrain", "synthesize", "--synthesizer", str(export),
                           "--unseeded", "true", "--out", str(corpus),
                           *as_flags(sbp.synthesize)], [f"fit/g0/synthesizer/s{k}"],
                          str(corpus)))
        found["sbp_unseeded"] = _clean(grid, steps, str(corpus),
                                       f"synthesize/g1/sbp_unseeded/s{k}",
                                       f"g1/sbp_unseeded/s{k}")
    return found


def _sbp_conditions(grid: Grid, steps: list[Step], k: int
                    ) -> dict[str, tuple[str | list[str], list[str], dict[str, Any]]]:
    """Subset k's SBP conditions -> (corpora, steps they need, mixture flags); adds its steps.

    The synthetic corpus is written for student k alone (one subset), so in the ``sbp``
    student's list it is taken whole while ``--data.subset k`` selects in the real corpus, as
    it does in the baselines'.
    """
    sbp = grid.sbp
    assert sbp is not None
    mixed = {"data.mixture_weights": sbp.weights, "data.mixture_tokens": sbp.tokens,
             **({"data.ended_only": True} if sbp.ended_only else {})}
    found: dict[str, tuple[str | list[str], list[str], dict[str, Any]]] = {
        name: ([sbp.corpus, corpus], [producer], mixed)
        for name, (corpus, producer) in _sbp_corpus(grid, steps, k).items()}
    alone = {"data.mixture_weights": [1.0], "data.mixture_tokens": sbp.tokens}
    if sbp.repetition:
        found["sbp_repeat"] = ([sbp.corpus], [], alone)
    if sbp.oracle is not None:
        found["sbp_oracle"] = ([sbp.oracle], [], alone)
    return found


def _clean(grid: Grid, steps: list[Step], corpus: str, producer: str, name: str
           ) -> tuple[str, str]:
    """Add the decontamination of a corpus when the grid asks; the corpus to train on.

    Against the grid's benchmarks, and against the fit's probe set unless
    ``decontaminate_probes`` is off.
    """
    probe_set = probe_set_of(grid) if grid.decontaminate_probes else None
    if grid.decontaminate is None and probe_set is None:
        return corpus, producer
    target = str(Path(grid.out) / "corpora" / f"{name}-clean")
    step_id = f"decontaminate/{name}"
    argv = ["selftrain", "decontaminate", "--corpus", corpus, "--out", target]
    if grid.decontaminate is not None:
        argv += ["--benchmarks", json.dumps(grid.decontaminate.benchmarks),
                 *as_flags(grid.decontaminate.flags)]
    if probe_set is not None:
        # compared in the student's tokenizer, as its fit's leak check compares
        argv += ["--probe_sets", json.dumps([probe_set]), "--tokenizer", grid.student]
        ngram = grid.fit.get("leak_check.ngram", (_fit_config(grid.fit_config).get(
            "leak_check") or {}).get("ngram"))
        if ngram is not None:  # the n the students' leak check uses
            argv += ["--probe_ngram", str(ngram)]
    steps.append(Step(step_id, "decontaminate", [*argv, "--overwrite", "true"], [producer],
                      target))
    return target, step_id


def probe_set_of(grid: Grid) -> str | None:
    """The probe set the grid's students are probed on: ``fit``'s, else the fit config's."""
    if "probes.probe_set" in grid.fit:
        return grid.fit["probes.probe_set"]
    return (_fit_config(grid.fit_config).get("probes") or {}).get("probe_set")


def _fit_flags(grid: Grid) -> dict[str, Any]:
    """The grid's extra fit flags; with generations, a last export the next one samples from."""
    extra = dict(grid.fit)
    if grid.generations > 1 and "model.export_hf" not in extra:
        if (_fit_config(grid.fit_config).get("model") or {}).get("export_hf") == "never":
            extra["model.export_hf"] = "last"
    return extra


def _fit(grid: Grid, extra: dict[str, Any], step_id: str, corpus: str | list[str],
         subset: list[str], run: Path, needs: list[str]) -> Step:
    data = corpus if isinstance(corpus, str) else json.dumps(corpus)
    argv = ["selftrain", "fit", "--config", grid.fit_config, "--model.model", grid.student,
            "--data.corpus", data, *subset, "--trainer.default_root_dir", str(run),
            *as_flags(extra)]
    if grid.evaluate_base:
        argv += ["--base_evaluations", str(Path(grid.out) / "base")]
        needs = [*needs, BASE_STEP]
    return Step(step_id, "fit", argv, needs, str(run))


def _report(grid: Grid, runs: list[tuple[str, str, str]], proxies: list[tuple[str, str]]
            ) -> Step:
    target = str(Path(grid.out) / "report")
    conditions = {run: condition for run, _, condition in runs}
    argv = ["selftrain", "report", "--runs", json.dumps([run for run, _, _ in runs]),
            "--out", target, "--conditions", json.dumps(conditions)]
    if proxies:
        argv += ["--proxies", json.dumps([path for path, _ in proxies])]
    if grid.note:
        argv += ["--note", grid.note]
    needs = [fit for _, fit, _ in runs] + [step for _, step in proxies]
    return Step("report", "report", [*argv, "--overwrite", "true"], needs, target)


def _check_unique_outputs(steps: list[Step]) -> None:
    """Refuse two steps writing one path (two conditions into one run dir)."""
    seen: dict[str, str] = {}
    for step in steps:
        if step.output in seen:
            raise SelftrainError(f"{step.id}: writes {step.output}, as {seen[step.output]} does; "
                                 "give the conditions distinct names")
        seen[step.output] = step.id


def digests(steps: list[Step]) -> dict[str, str]:
    """Each step's digest: its command and the digests of the steps it needs.

    A finished step whose digest changed has new inputs (its command, or any step upstream).
    """
    found: dict[str, str] = {}
    for step in steps:
        payload = json.dumps([step.argv, [found[need] for need in step.needs]])
        found[step.id] = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return found
