"""``selftrain sweep``: a grid of sources, temperatures, subsets and generations as one command.

:mod:`~selftrain.sweep.grid` (what a grid file names, and its checks),
:mod:`~selftrain.sweep.plan` (the grid as ordinary ``selftrain`` commands),
:mod:`~selftrain.sweep.run` (the command: dry run, here in order, or SLURM via
:mod:`~selftrain.sweep.slurm`).

May import: the core and the top (it parses fit commands with ``trainer_cli``); it runs every
stage only as ``selftrain`` subprocesses, never by calling into them.
"""
