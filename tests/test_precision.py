"""Precision ``auto``: bf16 only where the device computes it natively, on both kinds of CPU.

The machine under test may or may not have native bf16, so each branch is reached on purpose:

- the emulated branch for real, in a subprocess whose ISA is capped to AVX2
  (``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``), which means the same on any
  x86-64 machine;
- the native branch through the same resolvers with the measurement replaced by a native
  ratio, and for real (uncapped) on a CPU whose measurement says native, skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import REPO, fit_command

from selftrain import precision
from selftrain.precision import (
    NATIVE_MAX_SLOWDOWN,
    autocast_dtype,
    bf16_support,
    decide_cpu,
    trainer_precision,
    weight_dtype,
)

CAPPED = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
"""An AVX2-only CPU as oneDNN and ATen see it (they cap down, never up)."""
x86_only = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                              reason="the ISA cap names x86 instruction sets")


def capped_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter on the AVX2-capped CPU."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True, capture_output=True,
                          env={**os.environ, **CAPPED}, timeout=300)


@pytest.fixture
def measured_as(monkeypatch):
    """Replace the CPU measurement by a given bf16 / float32 ratio (the cache cleared)."""
    def use(slowdown: float) -> None:
        bf16_support.cache_clear()
        monkeypatch.setattr(precision, "measure_cpu_bf16_slowdown", lambda: slowdown)

    yield use
    bf16_support.cache_clear()


def test_the_rule_separates_native_from_emulated():
    assert decide_cpu(0.4) and decide_cpu(1.0) and decide_cpu(NATIVE_MAX_SLOWDOWN)
    assert not decide_cpu(NATIVE_MAX_SLOWDOWN + 0.1) and not decide_cpu(60.0)


def test_the_native_branch_resolves_every_setting_to_bf16(measured_as):
    measured_as(0.5)
    cpu = torch.device("cpu")
    assert bf16_support("cpu").native and bf16_support("cpu").slowdown == 0.5
    assert trainer_precision("auto", "cpu") == "bf16-mixed"
    assert autocast_dtype("auto", cpu) is torch.bfloat16
    assert weight_dtype("auto", cpu) == "bfloat16"
    assert autocast_dtype("32", cpu) is None and weight_dtype("float32", cpu) == "float32"
    assert trainer_precision("32-true", "cpu") == "32-true"


def test_the_emulated_branch_resolves_every_setting_to_float32(measured_as, caplog):
    measured_as(60.0)
    cpu = torch.device("cpu")
    assert trainer_precision("auto", "cpu") == "32-true"
    assert autocast_dtype("auto", cpu) is None
    assert weight_dtype("auto", "cpu") == "float32"
    caplog.clear()
    assert trainer_precision("bf16-mixed", "cpu") == "bf16-mixed"  # asked for: allowed
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["--trainer.precision bf16-mixed: this CPU has no native bf16 (a bf16 "
                        "matmul took 60.0x float32's time here, measured); use auto or 32 "
                        "unless you need bf16's numerics"]
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and weight_dtype("bf16", cpu) == "bf16"


@x86_only
def test_a_capped_cpu_measures_bf16_as_emulated_and_warns_in_one_line():
    result = capped_python(
        "import logging, torch; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from selftrain.precision import bf16_support, trainer_precision, autocast_dtype\n"
        "s = bf16_support('cpu'); print(torch.backends.cpu.get_cpu_capability(), s.native, "
        "s.slowdown)\n"
        "print(trainer_precision('auto', 'cpu'), autocast_dtype('auto', torch.device('cpu')))\n"
        "trainer_precision('bf16-mixed', 'cpu')\n")
    assert result.returncode == 0, result.stderr
    capability, native, slowdown, resolved, autocast = result.stdout.split()
    assert capability == "AVX2" and native == "False"
    assert float(slowdown) > 5 * NATIVE_MAX_SLOWDOWN  # far from the line: load cannot flip it
    assert (resolved, autocast) == ("32-true", "None")
    warned = [line for line in result.stderr.splitlines() if "no native bf16" in line]
    assert len(warned) == 1 and warned[0].startswith("--trainer.precision bf16-mixed: ")


@x86_only
@pytest.mark.slow
def test_fit_with_auto_on_a_capped_cpu_trains_in_float32_and_records_it(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        fit_command(run, "--trainer.precision", "auto", "--trainer.max_steps", "2",
                    callbacks=False),
        cwd=REPO, text=True, capture_output=True, env={**os.environ, **CAPPED}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--trainer.precision auto -> 32-true on cpu" in result.stderr
    config = yaml.safe_load((run / "tb" / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "32-true"


@pytest.mark.slow
def test_fit_with_auto_where_bf16_is_native_trains_in_bf16_and_records_it(tmp_path):
    support = bf16_support("cpu")
    if not support.native:
        pytest.skip(f"this CPU has no native bf16 ({support.how}); the capped test covers "
                    "the emulated branch")
    run = tmp_path / "run"
    result = subprocess.run(
        fit_command(run, "--trainer.precision", "auto", "--trainer.max_steps", "2",
                    callbacks=False), cwd=REPO, text=True, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load((run / "tb" / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "bf16-mixed"


def test_generate_records_the_dtype_auto_resolved_to(tmp_path):
    from selftrain.cli import main

    main(["generate", "--model", "tiny:qwen2", "--out", str(tmp_path / "c"), "--num_samples",
          "2", "--max_new_tokens", "4", "--dtype", "auto"])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    expected = "bfloat16" if bf16_support("cpu").native else "float32"
    assert manifest["sampling"]["dtype"] == expected
