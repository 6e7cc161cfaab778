"""Analysis: reading finished runs back (TensorBoard scalars) for tables and figures.

May import: every stage above it (the core, ``sampling``, ``curation``, ``training``,
``probes``, ``callbacks``); nothing imports it but the top (``cli``).
"""
