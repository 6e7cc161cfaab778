"""Training: the student under Lightning's Trainer.

``StudentLM`` (``module``), the corpus data module (``data``) with its batch sampler and
padding (``batching``) or padding-free packing (``packing``), the FSDP strategy (``fsdp``) and
atomic checkpoint writes (``checkpoint_io``).
May import: the core, ``sampling`` and ``curation``.
"""
