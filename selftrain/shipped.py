"""The configs the package ships, and ``selftrain configs``, which copies them out.

A wheel holds the repository's ``configs/`` folder as package data, ``selftrain/configs/``
(pyproject's ``package-dir`` maps it, as it maps the callbacks); a source checkout has it
beside the package. The folder holds what its configs name: the debug corpus and probe set
(``configs/data/``) and the local lm-eval tasks (``configs/tasks/``).

Every path inside a config is relative to the working directory, as a checkout runs them
(``selftrain fit --config configs/qwen_self.yaml``). So the configs are copied out as a
folder named ``configs``, and from the folder that holds it the commands in the configs'
headers run as they do in the repository::

    selftrain configs --out work
    cd work && selftrain fit --config configs/debug.yaml --trainer.default_root_dir runs/debug

Configs copied out are the user's to edit, so an existing ``configs`` folder is never replaced.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from selftrain.errors import SelftrainError
from selftrain.io import atomic_dir
from selftrain.outputs import refuse_input_overlap, refuse_unwritable

log = logging.getLogger(__name__)

CONFIGS = "configs"
"""The folder's name: in the wheel (``selftrain/configs``), a checkout and a copy alike."""


def shipped_configs() -> Path:
    """The configs folder of this install: package data in a wheel, beside it in a checkout."""
    package = Path(__file__).resolve().parent
    installed = package / CONFIGS
    if installed.is_dir():
        return installed
    checkout = package.parent / CONFIGS
    if (package.parent / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    raise SelftrainError(f"this selftrain install holds no configs (looked for {installed}); "
                         "reinstall it from its wheel or a source checkout")


def configs(out: str) -> Path:
    """Copy the shipped configs, with the debug data and lm-eval tasks they name, to OUT/configs.

    From ``out`` every command in the configs' headers runs as in the repository, e.g.
    ``selftrain fit --config configs/debug.yaml``.

    Args:
        out: the working directory to copy into (made if missing); ``out/configs`` must not
            exist yet: configs copied out are yours to edit, so they are never replaced.

    Returns:
        The new configs folder.
    """
    source, folder = shipped_configs(), Path(out)
    target = folder / CONFIGS
    refuse_unwritable(folder, beside=False)
    if target.exists() or target.is_symlink():
        raise SelftrainError(f"--out {out}: already holds {target} (configs copied out are "
                             "yours to edit, so they are never replaced); move it away or "
                             "choose another --out")
    refuse_input_overlap(target, [("the shipped configs", source)])
    with atomic_dir(target, replace=False) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    log.info("selftrain configs: copied to %s; from %s run e.g. selftrain fit --config "
             "%s/debug.yaml --trainer.default_root_dir runs/debug", target, folder, CONFIGS)
    return target
