"""selftrain.shipped: `selftrain configs` copies the configs out, and their paths resolve there.

Here the source checkout's configs, in this process; the wheel's (package data), with a debug
fit in the copy, is tested in test_layout.py (slow: it builds the wheel).
"""

from pathlib import Path

import yaml
from helpers import CONFIGS, file_bytes

from selftrain.cli import main
from selftrain.shipped import shipped_configs


def test_a_checkout_ships_its_own_configs_folder():
    assert shipped_configs() == CONFIGS


def test_configs_are_copied_out_whole_and_the_debug_config_finds_its_files(tmp_path):
    work = tmp_path / "work"
    main(["configs", "--out", str(work)])
    assert [path.name for path in work.iterdir()] == ["configs"]  # no staging dir left
    shipped = file_bytes(CONFIGS)
    assert file_bytes(work / "configs") == {name: data for name, data in shipped.items()
                                            if "__pycache__" not in name}
    debug = yaml.safe_load((work / "configs" / "debug.yaml").read_text())
    [benchmark] = [c for c in debug["trainer"]["callbacks"] if "include_path" in
                   c.get("init_args", {})]
    for relative in (debug["data"]["corpus"], debug["probes"]["probe_set"],
                     benchmark["init_args"]["include_path"]):
        assert not Path(relative).is_absolute() and (work / relative).exists(), relative
