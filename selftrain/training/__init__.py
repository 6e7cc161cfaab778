"""Training: the student under Lightning's Trainer.

``StudentLM`` (``module``) with its optimizer and schedule (``optim``), the checks of its
settings against the machine (``checks``) and its HF export (``export``); the corpus data module
(``data``) with the corpus rows as the student's ids (``rows``), its batch sampler and padding
(``batching``) or padding-free packing (``packing``); the FSDP strategy (``fsdp``) and atomic
checkpoint writes (``checkpoint_io``); what ``selftrain fit|validate|test`` decides before the
Trainer runs: its run dir (``run_dir``), its trainer flags (``flags``), and Ctrl-C
(``interrupts``).
May import: the core, ``sampling``, ``curation`` and ``synthesis`` (the pair layout).
"""
