"""selftrain.cli: the `selftrain` command as a whole, and the configs it ships.

Every config parses and documents itself, ``--help`` lists the commands and their flags, bad
input is one error line with nothing written, ``python -m selftrain`` equals the console script,
Ctrl-C ends a command with one line and status 130.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    CONFIGS,
    DDP_PRESET,
    REPO,
    cli,
    fit_args,
    fit_command,
    in_process,
    one_error_line,
    refused_fit,
    selftrain,
)
from lightning.pytorch import Callback

from selftrain.cli import main

SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"debug.yaml", "smollm2_self.yaml", "qwen_self.yaml"} <= names


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_every_config_parses_and_documents_itself(config):
    text = config.read_text()
    assert text.startswith("#") and "Command:" in text and "Prerequisites:" in text
    result = in_process("fit", "--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr
    assert "model:" in result.stdout and "data:" in result.stdout


TOOL_CONFIGS = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in ("data", "scale"))


@pytest.mark.parametrize("config", TOOL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_tool_config_parses_and_documents_itself(config):
    text = config.read_text()
    assert text.startswith("#") and "Command:" in text and "Prerequisites:" in text
    assert f"selftrain {config.parent.name} --config configs/{config.parent.name}/" in text
    result = in_process(config.parent.name, "--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr
    assert "out:" in result.stdout


def test_ddp_preset_parses_with_an_experiment_config():
    built = cli(None, "--config", DDP_PRESET, "--trainer.accelerator", "cpu",
                "--trainer.devices", "1")
    assert built.trainer.strategy.__class__.__name__ == "DDPStrategy"
    assert built.trainer.strategy._ddp_kwargs["gradient_as_bucket_view"] is True


def test_top_level_help_lists_commands():
    result = in_process("--help")
    assert result.returncode == 0
    for command in ("fit", "validate", "test", "generate", "decontaminate", "replay"):
        assert f"  {command}" in result.stdout


@pytest.mark.parametrize("command, expected", [
    (["fit", "--help"], "--model.model"),
    (["fit", "--help"], "--data.same_tokenizer"),
    (["generate", "--help"], "--temperature"),
    (["generate", "--help"], "--shard_size"),
    (["decontaminate", "--help"], "--benchmarks"),
    (["replay", "--help"], "--sources"),
])
def test_subcommand_help_documents_flags(command, expected):
    result = in_process(*command)
    assert result.returncode == 0
    assert expected in result.stdout


def test_unknown_config_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "debug.yaml").read_text() + "\nmodel_typo: 1\n")
    result = in_process("fit", "--config", str(bad), "--trainer.default_root_dir",
                        str(tmp_path / "run"))
    assert result.returncode != 0
    assert "model_typo" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--data.corpus", "/nonexistent/corpus"], "--data.corpus /nonexistent/corpus"),
    (["--data.max_length", "1"], "--data.max_length 1"),
    (["--model.model", "tiny:nope"], "--model.model 'tiny:nope'"),
    (["--data.same_tokenizer", "true", "--data.corpus", "LLAMA"], "outside the student's"),
])
def test_bad_fit_input_is_one_line_and_writes_nothing(tmp_path, llama_corpus, flags, fragment):
    flags = [str(llama_corpus) if f == "LLAMA" else f for f in flags]
    assert fragment in refused_fit(tmp_path / "run", *flags)


def test_generate_bad_flag_is_one_line(tmp_path):
    result = in_process("generate", "--model", "tiny:qwen2", "--out", str(tmp_path / "c"),
                        "--temperature", "-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("selftrain: error: --temperature")
    assert not (tmp_path / "c").exists()


def test_python_dash_m_and_console_script_agree():
    script = Path(sys.executable).with_name("selftrain")
    result = subprocess.run([str(script), "--help"], text=True, capture_output=True)
    assert result.returncode == 0 and result.stdout == selftrain("--help").stdout


def test_generate_takes_a_temperature_list_and_a_config_file(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("model: tiny:qwen2\nnum_samples: 6\nmax_new_tokens: 8\n"
                      "temperature: [0.75, 1.25]\n")
    result = in_process("generate", "--config", str(config), "--out", str(tmp_path / "sweep"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["t0.75", "t1.25"]
    result = in_process("generate", "--model", "tiny:qwen2", "--out", str(tmp_path / "one"),
                        "--num_samples", "4", "--max_new_tokens", "4", "--temperature", "[1.5]")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "one" / "t1.5" / "manifest.json").exists()


@pytest.mark.parametrize("tool", ["decontaminate", "replay"])
def test_corpus_tool_bad_input_is_one_line_and_writes_nothing(tmp_path, qwen_corpus, tool):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of real text.\n")
    out = tmp_path / "out"
    args = {"decontaminate": ["--corpus", str(qwen_corpus), "--benchmarks", str(empty)],
            "replay": ["--match", str(qwen_corpus), "--sources", str(short),
                       "--student", "tiny:qwen2"]}[tool]
    result = in_process(tool, *args, "--out", str(out))
    assert result.returncode == 2
    flag = {"decontaminate": "--benchmarks", "replay": "--sources"}[tool]
    assert one_error_line(result.stderr).startswith(f"selftrain: error: {flag}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "short.txt"]


# --- Ctrl-C ----------------------------------------------------------------------------------


class InterruptAt(Callback):
    """Raises KeyboardInterrupt (what Ctrl-C raises) after a given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_during_fit_is_one_line_that_says_how_to_resume(tmp_path, capsys):
    run = tmp_path / "run"
    interrupt = ('--trainer.callbacks+={"class_path": "test_cli.InterruptAt", '
                 '"init_args": {"step": 15}}')
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C while it shuts down
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(fit_args(run, "--trainer.max_epochs", "1", interrupt, callbacks=False))
    finally:
        signal.signal(signal.SIGINT, handler)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "selftrain fit: interrupted at step 15; the last checkpoint is at step 10: rerun the "
        "same command with --ckpt_path last to resume")
    main(fit_args(run, "--trainer.max_epochs", "1", "--ckpt_path", "last", callbacks=False))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 24


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_a_real_sigint_ends_fit_with_status_130_and_one_line(tmp_path):
    run = tmp_path / "run"
    # the child takes Ctrl-C as a terminal would deliver it, even where this suite runs with
    # SIGINT ignored (a background job, nohup, some CI runners), which children inherit
    process = subprocess.Popen(fit_command(run, "--trainer.max_epochs", "50", callbacks=False),
                               cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    while not (run / "checkpoints" / "last.ckpt").exists() and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "fit ended before its first checkpoint"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate()  # however long a loaded machine takes; pytest-timeout backs it
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("selftrain fit: interrupted at step ") and "--ckpt_path last" in last


def test_ctrl_c_during_generate_is_one_line_with_status_130(tmp_path, capsys, monkeypatch):
    from selftrain.sampling.shards import ShardedCorpus

    real_write = ShardedCorpus.write_shard

    def ctrl_c_at_the_third_shard(self, index, rows):
        if index == 2:
            raise KeyboardInterrupt
        real_write(self, index, rows)

    monkeypatch.setattr(ShardedCorpus, "write_shard", ctrl_c_at_the_third_shard)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "tiny:qwen2", "--out", str(tmp_path / "c"),
              "--num_samples", "8", "--shard_size", "2", "--max_new_tokens", "8"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("selftrain generate: interrupted after 2 of 4 "
                                            "shards; rerun the same command to resume")


def test_the_students_revision_reaches_the_data_modules_tokenizer():
    built = cli(None, "--model.revision", "v1.0")
    assert built.model.hparams.revision == built.datamodule.hparams.revision == "v1.0"
