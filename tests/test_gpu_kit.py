"""The GPU check kit (scripts/gpu/) on a CPU, so that it cannot rot between GPU loans.

The dry run plans every step and finds every script it names; two real steps run end to end
on tiny models and leave exactly the four files the kit promises, with the table filled from
the steps' own reports; pytest's counts reach the table; the wheel plan names every package
at this environment's version and says what it leaves out.
"""

import json
import os
import subprocess
import sys

from helpers import REPO

CHECK = REPO / "scripts" / "gpu" / "check.sh"
KIT = REPO / "scripts" / "gpu" / "kit.py"
STEPS = ["gpu_tier", "train_sdpa", "train_compile", "train_fsdp", "generate", "fit_debug",
         "eval_generation", "probes_one_pass"]


def check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CHECK), *args], cwd=REPO, text=True, capture_output=True,
                          env={**os.environ, "PYTHON": sys.executable, **env}, timeout=600)


def test_the_dry_run_plans_every_step_and_finds_every_script():
    result = check("--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in STEPS:
        assert f"  {name} (" in result.stdout
    assert "plan (time boxes in seconds; 560 s at most)" in result.stdout
    assert result.stdout.rstrip().endswith("every script is there and parses")


def test_an_unknown_step_or_flag_is_one_line():
    for args, line in ((("--only", "train,generate"), "check.sh: --only train: no such step"),
                       (("--bogus",), "check.sh: unknown argument --bogus; see --help")):
        result = check(*args)
        assert result.returncode == 2 and result.stderr.startswith(line)
        assert result.stderr.count("\n") == 1


def test_two_steps_run_on_a_cpu_and_fill_the_table(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = check("--only", "generate,probes_one_pass", OUT=str(out), WORK=str(work),
                   WHEELS=str(tmp_path / "none"), SHAPE="tiny:qwen2", SMALL="tiny:llama",
                   BOXES="off")  # the GPU's time boxes: a loaded CPU must not decide the test
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["check.md", "figures.json", "log.txt",
                                                      "steps.tsv"]
    table = (out / "check.md").read_text()
    assert table.startswith("# GPU check: no GPU found\n\ntorch ")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()
            if line.startswith("| generate") or line.startswith("| probes_one_pass")}
    assert " | ok | " in rows["generate"]
    assert "results.sampler_k8.tokens_per_sec" in rows["generate"]
    assert "ratio_no_match_rate" in rows["probes_one_pass"]
    figures = json.loads((out / "figures.json").read_text())
    assert figures["generate"]["setup"]["model"] == "tiny:qwen2"
    assert [line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()] == [
        ["generate", "ok"], ["probes_one_pass", "ok"]]
    log = (out / "log.txt").read_text()
    assert "=== generate: ok" in log and "=== probes_one_pass: ok" in log


def test_pytests_counts_reach_the_table(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "test_two.py").write_text("import pytest\n\ndef test_a():\n    pass\n\n"
                                         "@pytest.mark.skip(reason='no GPU')\ndef test_b():\n"
                                         "    pass\n\ndef test_c():\n    assert False\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    str(tmp_path / "test_two.py"), "--junitxml", str(work / "gpu_tier.xml")],
                   cwd=tmp_path, capture_output=True, timeout=120)
    (work / "steps.tsv").write_text("gpu_tier\tfailed (exit 1)\t3\n")
    subprocess.run([sys.executable, str(KIT), "summarize", "--work", str(work), "--out",
                    str(tmp_path / "check.md"), "--gpu", "NVIDIA H200", "--torch", "2.11.0",
                    "--cuda", "13.0"], check=True, capture_output=True, timeout=60)
    table = (tmp_path / "check.md").read_text()
    assert table.startswith("# GPU check: NVIDIA H200\n\ntorch 2.11.0, CUDA 13.0\n")
    assert ("| gpu_tier | failed (exit 1) | 3 | tests 3<br>failures 1<br>errors 0<br>skipped 1 |"
            in table)


def test_the_wheel_plan_names_every_package_at_this_environments_version():
    result = subprocess.run([sys.executable, str(KIT), "wheels", "--dry_run"], cwd=REPO,
                            text=True, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    from importlib.metadata import version

    for name in ("transformers", "jsonargparse", "lm-eval", "datasets", "gguf"):
        assert f"  {name}=={version(name)}  (" in result.stdout
    assert "  flash-attn: left out: its wheel" in result.stdout
    assert "budget" in result.stdout.splitlines()[0]
