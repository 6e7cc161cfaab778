"""Sampling: a source model writes a corpus dir from its BOS token alone (``selftrain generate``).

The resumable shard layout of a corpus being written (``shards``) and its filling over ranks
(``fill``, which ``selftrain synthesize`` fills the same way), the sampling flags and their
checks (``settings``, no torch), the device and torchrun ranks (``ranks``) and the command that
drives them (``generate``). The sampler itself, ``BosSampler``, is :mod:`selftrain.decoding`'s.
May import: the core (``selftrain.errors``, ``io``, ``inputs``, ``models``, ``embedded``,
``tiny``, ``corpus``, ``provenance``) and ``decoding``.
"""
