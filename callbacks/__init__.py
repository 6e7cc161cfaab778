"""Lightning callbacks of selftrain, one concern per file (``class_path: callbacks.<Name>``)."""

from callbacks.benchmark_eval import BenchmarkEval
from callbacks.extraction_probe import ExtractionProbe
from callbacks.likelihood_tracker import LikelihoodTracker
from callbacks.run_checkpoint import RunCheckpoint

__all__ = ["BenchmarkEval", "ExtractionProbe", "LikelihoodTracker", "RunCheckpoint"]
