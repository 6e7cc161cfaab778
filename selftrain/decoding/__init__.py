"""Decoding: the slot decoder that sampling, synthesis and the probes share.

A batch of rows decodes in the slots of one fixed-capacity KV cache (``slot_cache``); a row that
ends frees its slot for the next at once. :class:`~selftrain.decoding.sampler.BosSampler`
(``sampler``) starts every row from BOS alone (``selftrain generate``);
:class:`~selftrain.decoding.prompted.PromptedDecoder` (``prompted``) starts rows from prompts,
greedy or seeded (``selftrain synthesize``, lm-eval's generation requests). Every random draw
comes from per-sample hashed uniforms (``draw``), so a sample depends on its seed and id alone.

May import: the core (``selftrain.errors``, ``models``).
"""
