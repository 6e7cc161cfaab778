"""Sampling: a source model writes a corpus dir from its BOS token alone (``selftrain generate``).

The continuous-batching, KV-cached sampler (``sampler``), the resumable shard layout of a corpus
being written (``shards``) and the command that drives them (``generate``).
May import: the core (``selftrain.errors``, ``io``, ``models``, ``tiny``, ``corpus``).
"""
