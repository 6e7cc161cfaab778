"""selftrain: prompt-free unconditional self-training of causal language models."""

__version__ = "0.1.0"
