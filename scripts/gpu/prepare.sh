#!/usr/bin/env bash
# Here, with network: download the wheels the GPU machine lacks into .gpu-wheels/, at the
# versions this checkout's environment runs, within what may travel with the working tree
# (64 MiB in all); prints what it kept and what it left out, and why. Then carry .gpu-wheels
# with the tree and run scripts/gpu/check.sh there.
#
#   bash scripts/gpu/prepare.sh                 # CPython 3.12, the GPU image's
#   bash scripts/gpu/prepare.sh --python 3.11 --budget_mib 40
#   bash scripts/gpu/prepare.sh --dry_run       # the plan only
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/gpu/kit.py wheels "$@"
