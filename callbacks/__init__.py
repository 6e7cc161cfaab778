"""Evaluation: Lightning callbacks that measure the student every epoch, one concern per file.

Installed as ``selftrain.callbacks`` (``class_path: selftrain.callbacks.<Name>``): the folder
sits at the top of the repository, as the project's layout names it, and pyproject's
``package-dir`` maps it under the package.
May import: the core, ``sampling``, ``curation``, ``training`` and ``probes``.
"""

if __name__ != "selftrain.callbacks":  # e.g. `import callbacks` with the repo root on sys.path
    raise ImportError(f"the callbacks are imported as selftrain.callbacks, not {__name__}; "
                      "in a config write class_path: selftrain.callbacks.<Name>")

from selftrain.callbacks.benchmark_eval import BenchmarkEval
from selftrain.callbacks.extraction_probe import ExtractionProbe
from selftrain.callbacks.likelihood_tracker import LikelihoodTracker
from selftrain.callbacks.run_checkpoint import RunCheckpoint

__all__ = ["BenchmarkEval", "ExtractionProbe", "LikelihoodTracker", "RunCheckpoint"]
